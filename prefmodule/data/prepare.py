"""From source rows to tokenised columns, streamed: read, check, tokenise in worker threads, write in order.

Memory stays bounded whatever the size of the data: rows are read one at a time, tokenised in chunks of
``CHUNK`` rows (at most two chunks per worker in flight) and appended to the cache entry's files as they
come. The tokenizer's Rust core releases the GIL, so worker threads tokenise in parallel while the main
thread reads and checks the next rows.
"""

from __future__ import annotations

import itertools
import os
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np

from prefmodule.data.formats import (
    DETECTION_ROWS, MAX_REPORTED, BadRow, DataValidationError, Format, PairsFromRatings, check_row, make_checker,
    unpair,
)
from prefmodule.data.records import Pair, RowDropped, RowError
from prefmodule.data.sources import BrokenRow, Source
from prefmodule.data.tokenize import Encoder, Limits, tokenize_records
from prefmodule.errors import ConfigError, DataError
from prefmodule.progress import progress

CHUNK = 1024
UNPAIR_BLOCK = 1000  # TRL's ``unpair_preference_dataset`` maps batches of 1,000 pairs (``datasets``' default)
PAIR_PARTS = ("prompt", "chosen", "rejected")
UNPAIRED_PARTS = ("prompt", "completion")


@dataclass
class Settings:
    """Everything the tokenised columns depend on besides the data and the tokenizer (part of the cache key)."""

    format: Format = "auto"
    columns: dict[str, str] | None = None
    tags: dict[str, str] | None = None
    pairs_from_ratings: PairsFromRatings = "best_worst"
    seed: int = 0
    max_length: int | None = None
    max_prompt_length: int | None = None
    truncation_mode: str = "keep_end"
    unpaired: bool = False  # items for an unpaired objective (KTO): paired data is split into two rows per pair


def default_workers() -> int:
    return min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1, 8)


def prepare(sources: list[Source], settings: Settings, encoder: Encoder, columns, label: str,
            on_bad_rows: str = "error", workers: int | None = None, objective: str = "this objective") -> dict:
    """Read, check and tokenise every row of ``sources`` into ``columns`` (a cache entry writer, or memory);
    returns the entry's ``meta`` (rows read, format, bad and dropped rows). ``label`` names the data in messages."""
    rows = _located_rows(sources)
    first = list(itertools.islice(rows, DETECTION_ROWS))
    chat = bool(encoder.chat_template or encoder.tokenizer.chat_template)
    checker = make_checker([row for *_, row in first], settings.format, settings.columns, settings.tags, chat,
                           settings.pairs_from_ratings, settings.seed)
    if checker.unpaired and not settings.unpaired:
        raise DataError(f"{label}: {checker.name} rows (one response with a true/false label) are unpaired data, "
                        f"and {objective} trains on pairs (prompt, chosen, rejected). Unpaired rows train KTO "
                        "(`--model=prefmodule.KTOModule`).")
    if checker.conversational and not chat:
        raise ConfigError(f"{label}: {checker.name} data needs a chat template and the tokenizer has none; set "
                          "`data.chat_template` (Jinja text or a .jinja file).")
    report = Report(checker.name, checker.conversational)
    writer = ColumnWriter(columns, settings.unpaired, _scored(checker, first))
    total = sum(count for count in (_count(s) for s in sources) if count is not None) or None
    stream = progress(itertools.chain(first, rows), f"tokenising {label}", total=total, unit="rows")
    items = _items(stream, checker, settings.unpaired, report, on_bad_rows)
    limits = Limits(settings.max_length, settings.max_prompt_length, settings.truncation_mode)
    with ThreadPoolExecutor(workers or default_workers(), thread_name_prefix="tokenise") as pool:
        pending = deque()
        for chunk in _chunks(items, CHUNK):
            pending.append(pool.submit(_tokenised, encoder, chunk, limits))
            while len(pending) > 2 * pool._max_workers:
                writer.write(*pending.popleft().result(), report)
        while pending:
            writer.write(*pending.popleft().result(), report)
    if report.bad_count and on_bad_rows == "error":
        raise DataValidationError(report.bad, report.rows, report.bad_count)
    return report.meta(writer.items)


class Report:
    """What a pass over the rows found: counts, the first bad rows, the drops by reason."""

    def __init__(self, format: str, conversational: bool):
        self.format, self.conversational = format, conversational
        self.rows = self.bad_count = 0
        self.bad: list[BadRow] = []
        self.dropped = Counter()

    def add_bad(self, bad: BadRow) -> None:
        self.bad_count += 1
        self.dropped[bad.kind] += 1
        if len(self.bad) < MAX_REPORTED:
            self.bad.append(bad)

    def meta(self, items: int) -> dict:
        return {"rows": self.rows, "items": items, "format": self.format, "conversational": self.conversational,
                "bad": [asdict(b) for b in self.bad], "bad_count": self.bad_count, "dropped": dict(self.dropped)}


def _located_rows(sources: list[Source]):
    """``(source, number, row)`` of every row; a source none of whose rows parses is not a data file at all."""
    for source in sources:
        parsed = broken = 0
        first_problem = None
        for number, row in source.rows():
            if isinstance(row, BrokenRow):
                broken += 1
                first_problem = first_problem or f"{source.unit} {number}: {row.message}"
            else:
                parsed += 1
            yield source, number, row
        if broken and not parsed:
            raise DataError(f"{source.label}: not a {_kind(source)} file: none of its {broken} rows can be read "
                            f"({first_problem}). Is it the right file?")


def _kind(source: Source) -> str:
    return {"jsonl": "JSON Lines", "json": "JSON", "csv": "CSV"}.get(source.label.rsplit(".", 1)[-1], "data")


def _count(source: Source) -> int | None:
    try:
        return source.count()
    except OSError:
        return None


def _scored(checker, first: list) -> bool:
    """Whether pairs carry ``score_chosen``/``score_rejected``: rated data, or those columns in the first rows."""
    if checker.unpaired:
        return False
    if checker.name.startswith("ratings"):
        return True
    column = getattr(checker, "column", None)
    return column is not None and any(isinstance(row, dict) and row.get(column("score_chosen")) is not None
                                      for *_, row in first)


def _items(stream, checker, unpaired: bool, report: Report, on_bad_rows: str):
    """``(index, side, record)`` of every usable row, in order (a pair as two unpaired rows when ``unpaired``)."""
    block: list[tuple[int, Pair]] = []
    for source, number, row in stream:
        index = report.rows
        report.rows += 1
        try:
            record = check_row(checker, row)
        except RowError as error:
            report.add_bad(BadRow(source.label, number, error.field, error.reason, error.kind, source.unit))
            continue
        except RowDropped as drop:
            report.dropped[drop.kind] += 1
            continue
        if report.bad_count and on_bad_rows == "error":
            continue  # the run stops at the end: check every row, tokenise none
        if unpaired and isinstance(record, Pair):
            block.append((index, record))
            if len(block) == UNPAIR_BLOCK:
                yield from _unpaired(block)
                block = []
        else:
            yield index, 0, record
    yield from _unpaired(block)


def _unpaired(block: list[tuple[int, Pair]]):
    indices = [index for index, _ in block]
    for index, row in zip(indices + indices, unpair([pair for _, pair in block])):
        yield index, row.side, row


def _chunks(items, size: int):
    while chunk := list(itertools.islice(items, size)):
        yield chunk


def _tokenised(encoder: Encoder, chunk: list, limits: Limits) -> tuple[list, list]:
    """(In a worker thread.) The chunk's items and their ids or drop reasons."""
    return chunk, tokenize_records(encoder, [record for *_, record in chunk], limits)


class ColumnWriter:
    """Appends tokenised chunks to the columns of a cache entry (ids back to back, with running offsets)."""

    def __init__(self, columns, unpaired: bool, scored: bool):
        self.columns, self.unpaired, self.scored = columns, unpaired, scored
        self.parts = UNPAIRED_PARTS if unpaired else PAIR_PARTS
        self.ends = dict.fromkeys(self.parts, 0)
        self.items = 0
        for part in self.parts:
            columns.append(f"{part}_offsets", np.zeros(1, dtype=np.int64))
        self.write([], [], None)  # every column exists, even when no row is kept

    def write(self, chunk: list, results: list, report: Report | None) -> None:
        kept = []
        for item, result in zip(chunk, results):
            if isinstance(result, str):
                report.dropped[result] += 1
            else:
                kept.append((item, result))
        self.items += len(kept)
        self.columns.append("index", np.array([index for (index, _, _), _ in kept], dtype=np.int64))
        if self.unpaired:
            self.columns.append("side", np.array([side for (_, side, _), _ in kept], dtype=np.int8))
            self.columns.append("label", np.array([record.label for (_, _, record), _ in kept], dtype=np.uint8))
        elif self.scored:
            scores = np.array([record.scores or (np.nan, np.nan) for (_, _, record), _ in kept],
                              dtype=np.float32).reshape(-1, 2)
            self.columns.append("score_chosen", scores[:, 0])
            self.columns.append("score_rejected", scores[:, 1])
        for part in self.parts:
            ids = [result[f"{part}_ids"] for _, result in kept]
            lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
            tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
            self.columns.append(f"{part}_tokens", tokens)
            self.columns.append(f"{part}_offsets", self.ends[part] + np.cumsum(lengths))
            self.ends[part] += int(lengths.sum())
