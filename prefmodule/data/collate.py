"""Batching: pairs (chosen sequences first, then rejected), unpaired rows (completions first, then KL
completions) or prompts alone; sequences right-padded or packed into one row."""

from __future__ import annotations

import torch

from prefmodule.data.batches import PairBatch, PromptBatch, RowBatch, Sequences
from prefmodule.models.logps import IGNORE_INDEX


class PreferenceCollator:
    """Turns tokenised items into a batch (:mod:`prefmodule.data.batches`): items with ``chosen_ids`` into a
    :class:`PairBatch`, items with ``completion_ids`` (and ``label``) into a :class:`RowBatch`, with KL
    completions when they carry ``kl_completion_ids``, and items without responses into a :class:`PromptBatch`.
    So ``SequenceStats.split()`` gives (chosen, rejected) for pairs and (completions, KL completions) for rows.

    Sequences are padded (default) to the longest of the batch (optionally rounded up to ``pad_to_multiple_of``),
    or with ``padding_free`` packed back to back in one row (:class:`Sequences`).
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None, padding_free: bool = False):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.padding_free = padding_free

    def __call__(self, items: list[dict]) -> PairBatch | RowBatch | PromptBatch:
        index = torch.tensor([item["index"] for item in items])
        first = items[0]
        if "completion_ids" in first:
            kl = "kl_completion_ids" in first
            sequences = [(item["prompt_ids"], item["completion_ids"]) for item in items]
            sequences += [(item["prompt_ids"], item["kl_completion_ids"]) for item in items] if kl else []
            return RowBatch(index, torch.tensor([item["label"] for item in items], dtype=torch.bool),
                            self.layout(sequences), kl_completions=kl)
        if "chosen_ids" in first:
            sequences = [(item["prompt_ids"], item["chosen_ids"]) for item in items]
            sequences += [(item["prompt_ids"], item["rejected_ids"]) for item in items]
            scores = {key: torch.tensor([item[key] for item in items], dtype=torch.float32)
                      for key in ("score_chosen", "score_rejected", "margin") if key in first}
            return PairBatch(index, self.layout(sequences), **scores)
        return PromptBatch(index, *([item.get(key) for item in items] for key in ("prompt_ids", "prompt", "tools",
                                                                                   "columns")))

    def layout(self, sequences: list[tuple[list[int], list[int]]]) -> Sequences:
        """``(prompt ids, response ids)`` sequences padded or packed, as this collator lays out its batches."""
        return self._pack(sequences) if self.padding_free else self._pad(sequences)

    def _pad(self, sequences: list[tuple[list[int], list[int]]]) -> Sequences:
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
        return Sequences(input_ids, labels, attention_mask, len(sequences))

    def _pack(self, sequences: list[tuple[list[int], list[int]]]) -> Sequences:
        input_ids, labels, position_ids, sequence_ids = [], [], [], []
        for k, (prompt, response) in enumerate(sequences):
            n = len(prompt) + len(response)
            input_ids += prompt + response
            sequence_labels = [IGNORE_INDEX] * len(prompt) + response
            sequence_labels[0] = IGNORE_INDEX  # never a target: in a packed row the previous sequence would predict it
            labels += sequence_labels
            position_ids += range(n)
            sequence_ids += [k] * n
        input_ids = torch.tensor([input_ids])
        return Sequences(input_ids, torch.tensor([labels]), torch.ones_like(input_ids), len(sequences),
                         torch.tensor([position_ids]), torch.tensor([sequence_ids]))
