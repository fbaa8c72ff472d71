"""Batching: pairs (chosen sequences first, then rejected) or unpaired rows (completions first, then KL
completions), right-padded or packed into one row."""

from __future__ import annotations

import torch

from prefmodule.models.logps import IGNORE_INDEX


class PreferenceCollator:
    """Turns tokenised items into a batch for :meth:`PreferenceModule.sequence_stats`.

    Pairs (``n`` of them): sequences ``0..n-1`` are prompt + chosen, ``n..2n-1`` prompt + rejected.
    Unpaired rows (items with ``completion_ids``): sequences ``0..n-1`` are prompt + completion and, when the
    items carry ``kl_completion_ids``, ``n..2n-1`` prompt + KL completion; plus ``label`` (bool ``[n]``). So
    ``SequenceStats.split()`` gives (chosen, rejected) for pairs and (completions, KL completions) for rows.

    Padded (default): ``input_ids``, ``attention_mask`` and ``labels`` of shape ``[sequences, T]``, padded to
    the longest row of the batch (optionally rounded up to ``pad_to_multiple_of``). ``padding_free``: the
    sequences back to back in one row, ``[1, N]``, with ``position_ids`` restarting at 0 per sequence,
    ``sequence_ids`` naming each token's sequence and an all-ones ``attention_mask``. ``labels`` hold the
    response ids and ``-100`` on prompt and padding; ``index`` is each item's row number, and
    ``score_chosen``/``score_rejected`` (float ``[n]``) come along when the data rates its pairs, and ``margin``
    (float ``[n]``, NaN for a pair without one) when it has that column.

    Prompts alone (items without responses): ``index`` and the lists ``prompt_ids``, ``prompt``, ``tools`` and
    ``columns`` (each row's other columns, a dict), as they are (generation pads them itself).
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None, padding_free: bool = False):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.padding_free = padding_free

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        if "chosen_ids" not in items[0] and "completion_ids" not in items[0]:  # prompts to complete
            return {"index": torch.tensor([item["index"] for item in items]),
                    **{key: [item.get(key) for item in items] for key in ("prompt_ids", "prompt", "tools", "columns")}}
        first, second = ("completion_ids", "kl_completion_ids") if "completion_ids" in items[0] else (
            "chosen_ids", "rejected_ids")
        sequences = [(item["prompt_ids"], item[first]) for item in items]
        if second in items[0]:
            sequences += [(item["prompt_ids"], item[second]) for item in items]
        batch = self._pack(sequences) if self.padding_free else self._pad(sequences)
        batch["index"] = torch.tensor([item["index"] for item in items])
        if "label" in items[0]:
            batch["label"] = torch.tensor([item["label"] for item in items], dtype=torch.bool)
        for key in ("score_chosen", "score_rejected", "margin"):
            if key in items[0]:
                batch[key] = torch.tensor([item[key] for item in items], dtype=torch.float32)
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
