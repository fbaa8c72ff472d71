"""Tokenised pairs held in a few flat arrays: small in memory, quick to save, memory-mapped on load."""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterable

import numpy as np
from torch.utils.data import Dataset

PARTS = ("prompt", "chosen", "rejected")


class PairDataset(Dataset):
    """Pairs ``{"index", "prompt_ids", "chosen_ids", "rejected_ids"}``.

    ``arrays`` holds ``index`` (each pair's row number in its split's sources) and, per part,
    ``<part>_tokens`` (all ids back to back) and ``<part>_offsets`` (``pairs + 1`` boundaries).
    ``positions`` selects and orders a subset of the pairs without copying them.
    """

    def __init__(self, arrays: dict[str, np.ndarray], positions: np.ndarray | None = None):
        self.arrays = arrays
        self.positions = np.arange(len(arrays["index"])) if positions is None else positions

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[int, dict[str, list[int]]]]) -> PairDataset:
        """Build from ``(index, {"prompt_ids", "chosen_ids", "rejected_ids"})`` items."""
        index = array("q")
        tokens = {part: array("i") for part in PARTS}
        offsets = {part: array("q", [0]) for part in PARTS}
        for row, pair in pairs:
            index.append(row)
            for part in PARTS:
                tokens[part].extend(pair[f"{part}_ids"])
                offsets[part].append(len(tokens[part]))
        arrays = {"index": np.frombuffer(index, dtype=np.int64)}
        for part in PARTS:
            arrays[f"{part}_tokens"] = np.frombuffer(tokens[part], dtype=np.int32)
            arrays[f"{part}_offsets"] = np.frombuffer(offsets[part], dtype=np.int64)
        return cls(arrays)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> dict:
        position = self.positions[i]
        item = {"index": int(self.arrays["index"][position])}
        for part in PARTS:
            start, end = self.arrays[f"{part}_offsets"][position: position + 2]
            item[f"{part}_ids"] = self.arrays[f"{part}_tokens"][start:end].tolist()
        return item

    def part_lengths(self, part: str) -> np.ndarray:
        return np.diff(self.arrays[f"{part}_offsets"])[self.positions]

    def lengths(self) -> np.ndarray:
        """Tokens in each pair's longer sequence (prompt + longer response): its padded width."""
        return self.part_lengths("prompt") + np.maximum(self.part_lengths("chosen"), self.part_lengths("rejected"))

    def fingerprint(self) -> str:
        """A hash of every pair's ``index`` and token ids, in order (no per-pair Python work)."""
        digest = hashlib.sha256(self.arrays["index"][self.positions].tobytes())
        for part in PARTS:
            starts = self.arrays[f"{part}_offsets"][self.positions]
            lengths = self.part_lengths(part)
            # flat positions of the selected pairs' tokens, back to back
            flat = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
            digest.update(lengths.tobytes())
            digest.update(self.arrays[f"{part}_tokens"][flat].tobytes())
        return digest.hexdigest()

    def select(self, positions: np.ndarray) -> PairDataset:
        """The pairs at ``positions`` (of this dataset)."""
        return PairDataset(self.arrays, self.positions[positions])
