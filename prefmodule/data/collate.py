"""Batching pairs into one concatenated, right-padded batch: chosen rows first, then rejected."""

from __future__ import annotations

import torch

from prefmodule.logps import IGNORE_INDEX


class PreferenceCollator:
    """Turns tokenised pairs into ``input_ids``, ``attention_mask`` and ``labels`` of shape ``[2 * pairs, T]``.

    ``labels`` holds the response token ids and ``-100`` on prompt and padding; padding goes to
    the longest row of the batch (dynamic padding), optionally rounded up to ``pad_to_multiple_of``.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, pairs: list[dict]) -> dict[str, torch.Tensor]:
        rows = [(p["prompt_ids"], p["chosen_ids"]) for p in pairs]
        rows += [(p["prompt_ids"], p["rejected_ids"]) for p in pairs]
        width = max(len(prompt) + len(response) for prompt, response in rows)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for i, (prompt, response) in enumerate(rows):
            n, m = len(prompt), len(response)
            input_ids[i, : n + m] = torch.tensor(prompt + response)
            attention_mask[i, : n + m] = 1
            labels[i, n : n + m] = torch.tensor(response)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                 "index": torch.tensor([p["index"] for p in pairs])}
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in pairs[0]:
                batch[key] = torch.tensor([p[key] for p in pairs], dtype=torch.float32)
        return batch
