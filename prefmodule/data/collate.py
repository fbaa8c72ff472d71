"""Batching pairs: chosen sequences first, then rejected, right-padded or packed into one row."""

from __future__ import annotations

import torch

from prefmodule.logps import IGNORE_INDEX


class PreferenceCollator:
    """Turns tokenised pairs into a batch for :meth:`PreferenceModule.sequence_stats`.

    Padded (default): ``input_ids``, ``attention_mask`` and ``labels`` of shape ``[2 * pairs, T]``,
    padded to the longest row of the batch (optionally rounded up to ``pad_to_multiple_of``).
    ``padding_free``: the ``2 * pairs`` sequences back to back in one row, ``[1, N]``, with
    ``position_ids`` restarting at 0 per sequence, ``sequence_ids`` naming each token's sequence and
    an all-ones ``attention_mask``. ``labels`` hold the response ids and ``-100`` on prompt and padding;
    ``index`` is each pair's row number.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None, padding_free: bool = False):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.padding_free = padding_free

    def __call__(self, pairs: list[dict]) -> dict[str, torch.Tensor]:
        sequences = [(p["prompt_ids"], p["chosen_ids"]) for p in pairs]
        sequences += [(p["prompt_ids"], p["rejected_ids"]) for p in pairs]
        batch = self._pack(sequences) if self.padding_free else self._pad(sequences)
        batch["index"] = torch.tensor([p["index"] for p in pairs])
        return batch

    def _pad(self, sequences: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(prompt) + len(response) for prompt, response in sequences)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
        for i, (prompt, response) in enumerate(sequences):
            n, m = len(prompt), len(response)
            input_ids[i, : n + m] = torch.tensor(prompt + response)
            attention_mask[i, : n + m] = 1
            labels[i, n : n + m] = torch.tensor(response)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def _pack(self, sequences: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        input_ids, labels, position_ids, sequence_ids = [], [], [], []
        for k, (prompt, response) in enumerate(sequences):
            n = len(prompt) + len(response)
            input_ids += prompt + response
            sequence_labels = [IGNORE_INDEX] * len(prompt) + response
            sequence_labels[0] = IGNORE_INDEX  # never a target: in a packed row the previous sequence would predict it
            labels += sequence_labels
            position_ids += range(n)
            sequence_ids += [k] * n
        tensors = {name: torch.tensor([values]) for name, values in (
            ("input_ids", input_ids), ("labels", labels), ("position_ids", position_ids),
            ("sequence_ids", sequence_ids))}
        return {**tensors, "attention_mask": torch.ones_like(tensors["input_ids"])}
