"""Tokenised pairs and unpaired rows held in a few flat arrays: small in memory, memory-mapped from the cache.

A :class:`Table` is what one cache entry holds (one source group of a split); a dataset is a view over one or
more tables (a weighted mixture has one per source) through ``positions``, so selecting, reordering and
splitting never copy token ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import xxhash
from torch.utils.data import Dataset

HASH_BLOCK = 1 << 16  # items hashed at a time by ``fingerprint``: memory stays bounded on millions of rows


@dataclass
class Table:
    """One cache entry's arrays: ``index`` (each row's number among its source group's rows), per part
    ``<part>_tokens`` (all ids back to back) and ``<part>_offsets`` (``items + 1`` boundaries), and per kind
    its own columns (``score_chosen``/``score_rejected``, ``label``/``side``).

    ``row_offset`` moves ``index`` to the row's number among all rows of its split; ``split_rows`` is that
    split's number of rows read (an unpaired item made of a pair's rejected response has ``index`` =
    ``split_rows`` + its row).
    """

    arrays: dict[str, np.ndarray]
    row_offset: int = 0
    split_rows: int = 0

    def __len__(self) -> int:
        return len(self.arrays["index"])

    def ids(self, part: str, item: int) -> list[int]:
        start, end = self.arrays[f"{part}_offsets"][item: item + 2]
        return self.arrays[f"{part}_tokens"][start:end].tolist()

    def index(self, item: int | np.ndarray):
        side = self.arrays["side"][item].astype(np.int64) if "side" in self.arrays else 0
        return self.row_offset + self.arrays["index"][item] + side * self.split_rows


class TokenDataset(Dataset):
    """Items of one or more tables, in the order of ``positions`` (indices into the tables one after another)."""

    parts: tuple[str, ...] = ()

    def __init__(self, tables: list[Table] | Table, positions: np.ndarray | None = None):
        self.tables = [tables] if isinstance(tables, Table) else list(tables)
        self.starts = np.cumsum([0] + [len(t) for t in self.tables])
        self.positions = np.arange(self.starts[-1]) if positions is None else np.asarray(positions)

    def __len__(self) -> int:
        return len(self.positions)

    def locate(self, position: int) -> tuple[Table, int]:
        t = int(np.searchsorted(self.starts, position, side="right")) - 1 if len(self.tables) > 1 else 0
        return self.tables[t], int(position - self.starts[t])

    def column(self, name: str, dtype=None, positions: np.ndarray | None = None) -> np.ndarray:
        """A per-item column (``index``, ``label``, ...) of every item (or of ``positions`` of the tables)."""
        positions = self.positions if positions is None else positions
        values = np.empty(len(positions), dtype=np.int64 if name == "index" else self.tables[0].arrays[name].dtype)
        for table, mask, items in self._by_table(positions):
            values[mask] = table.index(items) if name == "index" else table.arrays[name][items]
        return values.astype(dtype) if dtype else values

    def part_lengths(self, part: str, positions: np.ndarray | None = None) -> np.ndarray:
        positions = self.positions if positions is None else positions
        lengths = np.empty(len(positions), dtype=np.int64)
        for table, mask, items in self._by_table(positions):
            offsets = table.arrays[f"{part}_offsets"]
            lengths[mask] = offsets[items + 1] - offsets[items]
        return lengths

    def group_sizes(self) -> list[int]:
        """Items of each table among ``positions`` (the sources of a weighted mixture)."""
        table_of = np.searchsorted(self.starts, self.positions, side="right") - 1
        return np.bincount(table_of, minlength=len(self.tables)).tolist()

    def select(self, positions: np.ndarray):
        """The items at ``positions`` (of this dataset)."""
        return type(self)(self.tables, self.positions[np.asarray(positions, dtype=np.int64)])

    def fingerprint(self) -> str:
        """A hash of every item's ``index``, token ids and kind-specific columns, in order (vectorised, in blocks)."""
        digest = xxhash.xxh3_128(f"{type(self).__name__}:{self._settings()}".encode())
        for start in range(0, len(self), HASH_BLOCK):
            positions = self.positions[start:start + HASH_BLOCK]
            digest.update(self.column("index", positions=positions).tobytes())
            for part in self.parts:
                lengths, tokens = self._gather(part, positions)
                digest.update(lengths.tobytes())
                digest.update(tokens.tobytes())
            for name in self._columns():
                digest.update(self.column(name, positions=positions).tobytes())
        return digest.hexdigest()

    def _by_table(self, positions: np.ndarray):
        """``(table, mask, items)``: which of ``positions`` fall in each table, and their items there."""
        if len(self.tables) == 1:
            yield self.tables[0], slice(None), np.asarray(positions, dtype=np.int64)
            return
        owner = np.searchsorted(self.starts, positions, side="right") - 1
        for t, table in enumerate(self.tables):
            mask = owner == t
            if mask.any():
                yield table, mask, positions[mask] - self.starts[t]

    def _gather(self, part: str, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(lengths, ids back to back)`` of ``part`` of the items at ``positions``, in order."""
        lengths = self.part_lengths(part, positions)
        starts = np.cumsum(lengths) - lengths
        tokens = np.empty(int(lengths.sum()), dtype=np.int32)
        for table, mask, items in self._by_table(positions):
            source = table.arrays[f"{part}_offsets"][items]
            tokens[_ranges(starts[mask], lengths[mask])] = table.arrays[f"{part}_tokens"][
                _ranges(source, lengths[mask])]
        return lengths, tokens

    def _columns(self) -> tuple[str, ...]:
        return ()

    def _settings(self) -> str:
        return ""


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``concatenate([arange(s, s + n) for s, n in zip(starts, lengths)])`` without a Python loop."""
    return np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())


class PairDataset(TokenDataset):
    """Pairs ``{"index", "prompt_ids", "chosen_ids", "rejected_ids"}`` (and ``score_chosen``/``score_rejected``
    when the data rates its responses)."""

    parts = ("prompt", "chosen", "rejected")

    def __getitem__(self, i: int) -> dict:
        table, item = self.locate(self.positions[i])
        pair = {"index": int(table.index(item))}
        for part in self.parts:
            pair[f"{part}_ids"] = table.ids(part, item)
        for column in self._columns():
            pair[column] = float(table.arrays[column][item])
        return pair

    def lengths(self) -> np.ndarray:
        """Tokens in each pair's longer sequence (prompt + longer response): its padded width."""
        return self.part_lengths("prompt") + np.maximum(self.part_lengths("chosen"), self.part_lengths("rejected"))

    def _columns(self) -> tuple[str, ...]:
        columns = ("score_chosen", "score_rejected", "margin")
        return tuple(column for column in columns if column in self.tables[0].arrays)


class UnpairedDataset(TokenDataset):
    """Unpaired rows ``{"index", "prompt_ids", "completion_ids", "label"}``, plus ``kl_completion_ids`` once
    KL partners are set (:meth:`with_kl_chunks`).

    Completions are stored up to ``max_length`` ids and cut here to the room the item's prompt leaves, as
    TRL's collator cuts ``prompt + completion`` to ``max_length``; so is the KL completion, the partner's
    whole completion cut to this item's room.
    """

    parts = ("prompt", "completion")

    def __init__(self, tables: list[Table] | Table, positions: np.ndarray | None = None,
                 max_length: int | None = None, kl_positions: np.ndarray | None = None,
                 chunk_sizes: list[int] | None = None, chunks_per_group: list[int] | None = None):
        super().__init__(tables, positions)
        self.max_length = max_length
        self.kl_positions = kl_positions  # per item, the position (into the tables) of its KL partner
        self.chunk_sizes = chunk_sizes  # the KL chunks: consecutive items, one training batch each
        self.chunks_per_group = chunks_per_group

    def __getitem__(self, i: int) -> dict:
        table, item = self.locate(self.positions[i])
        prompt = table.ids("prompt", item)
        room = None if self.max_length is None else self.max_length - len(prompt)
        row = {"index": int(table.index(item)), "prompt_ids": prompt,
               "completion_ids": table.ids("completion", item)[:room], "label": bool(table.arrays["label"][item])}
        if self.kl_positions is not None:
            partner, partner_item = self.locate(self.kl_positions[i])
            row["kl_completion_ids"] = partner.ids("completion", partner_item)[:room]
        return row

    def select(self, positions: np.ndarray) -> UnpairedDataset:
        """The items at ``positions``, without KL partners (chunks are formed afterwards)."""
        return UnpairedDataset(self.tables, self.positions[np.asarray(positions, dtype=np.int64)], self.max_length)

    def with_kl_chunks(self, order: np.ndarray, chunk_sizes: list[int],
                       chunks_per_group: list[int] | None = None) -> UnpairedDataset:
        """The items in ``order``, cut into consecutive chunks of ``chunk_sizes``; within each chunk an item's KL
        completion is the previous item's completion, the first item's the chunk's last (TRL's
        ``add_kl_completion_ids`` over batches of the dataset in order). ``chunks_per_group``: how many chunks
        each source group of a weighted mixture has (its chunks come one group after another)."""
        positions = self.positions[np.asarray(order, dtype=np.int64)]
        partners = np.empty_like(positions)
        start = 0
        for size in chunk_sizes:
            chunk = positions[start:start + size]
            partners[start:start + size] = np.roll(chunk, 1)
            start += size
        return UnpairedDataset(self.tables, positions, self.max_length, partners, list(chunk_sizes),
                               chunks_per_group or [len(chunk_sizes)])

    def lengths(self) -> np.ndarray:
        """Tokens of each item's longer sequence (prompt + completion, or + KL completion), as batched."""
        prompt, completion = self.part_lengths("prompt"), self.part_lengths("completion")
        if self.kl_positions is not None:
            completion = np.maximum(completion, self.part_lengths("completion", self.kl_positions))
        total = prompt + completion
        return total if self.max_length is None else np.minimum(total, self.max_length)

    def labels(self) -> np.ndarray:
        """Every item's label (True: desirable), in order."""
        return self.column("label", bool)

    def fingerprint(self) -> str:
        """As :meth:`TokenDataset.fingerprint`, and each item's KL partner (by its ``index``)."""
        digest = xxhash.xxh3_128(super().fingerprint().encode())
        if self.kl_positions is not None:
            digest.update(self.column("index", positions=self.kl_positions).tobytes())
        return digest.hexdigest()

    def _columns(self) -> tuple[str, ...]:
        return ("label",)

    def _settings(self) -> str:
        return f"max_length={self.max_length}"


class PromptDataset(Dataset):
    """Prompts to complete, held in memory (sampling reads few next to training data): items ``{"index",
    "prompt_ids", "prompt", "tools", "columns"}``, from one list per source group."""

    def __init__(self, groups: list[list[dict]], positions: np.ndarray | None = None):
        self.groups = groups
        self.items = [item for group in groups for item in group]
        self.positions = np.arange(len(self.items)) if positions is None else np.asarray(positions)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> dict:
        return self.items[self.positions[i]]

    def lengths(self) -> np.ndarray:
        return np.array([len(self[i]["prompt_ids"]) for i in range(len(self))], dtype=np.int64)

    def column(self, name: str) -> np.ndarray:
        return np.array([self[i][name] for i in range(len(self))])

    def group_sizes(self) -> list[int]:
        starts = np.cumsum([0] + [len(group) for group in self.groups])
        return np.bincount(np.searchsorted(starts, self.positions, side="right") - 1,
                           minlength=len(self.groups)).tolist()

    def select(self, positions: np.ndarray) -> PromptDataset:
        return PromptDataset(self.groups, self.positions[np.asarray(positions, dtype=np.int64)])
