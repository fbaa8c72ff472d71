"""From source rows to tokenised columns, streamed: read and check, tokenise in worker processes, write in order.

Memory stays bounded whatever the size of the data: the main process reads and checks rows one at a time and
hands them out in chunks of ``CHUNK`` rows (at most two chunks per worker in flight); each worker renders and
tokenises its chunk into flat arrays, which the main process appends to the cache entry's files in order.
Workers are forked (spawned where fork does not exist), so they start with the tokenizer already loaded.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
from collections import Counter, deque
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np

from prefmodule.data.formats import (
    DETECTION_ROWS, MAX_REPORTED, BadRow, DataValidationError, Format, PairsFromRatings, check_row, make_checker,
    unpair,
)
from prefmodule.data.records import Columns, Pair, RowDropped, RowError
from prefmodule.data.sources import BrokenRow, Source
from prefmodule.data.tokenize import (
    PROMPT_FILLS_MAX_LENGTH, Encoder, Limits, RowFailure, cut_prompt, tokenize_records,
)
from prefmodule.errors import ConfigError, DataError
from prefmodule.progress import progress

CHUNK = 512
UNPAIR_BLOCK = 1000  # TRL's ``unpair_preference_dataset`` maps batches of 1,000 pairs (``datasets``' default)
PAIR_PARTS = ("prompt", "chosen", "rejected")
UNPAIRED_PARTS = ("prompt", "completion")
EMPTY_PROMPT = "empty prompt"  # a prompt to complete that says nothing: dropped and counted


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
    if getattr(checker, "prompts", False):
        raise DataError(f"{label}: {checker.name} rows hold prompts without responses, and {objective} trains on "
                        "responses. Prompts train Online DPO (`--model=prefmodule.OnlineDPOModule`) or give pairs "
                        "sampled from a policy (`predict --config configs/sample_pairs.yaml`).")
    _check_chat(checker, chat, label)
    report = Report(checker.name, checker.conversational)
    layout = Layout(settings.unpaired, _has_column(checker, first, "score_chosen") or checker.name.startswith("ratings"),
                    _has_column(checker, first, "margin"))
    writer = ColumnWriter(columns, layout)
    total = sum(count for count in (_count(s) for s in sources) if count is not None) or None
    limits = Limits(settings.max_length, settings.max_prompt_length, settings.truncation_mode)
    workers = workers or default_workers()
    with _pool(workers, encoder, limits, layout) as pool:
        stream = progress(itertools.chain(first, rows), f"tokenising {label}", total=total, unit="rows")
        pending = deque()
        for chunk in _chunks(_items(stream, checker, settings.unpaired, report, on_bad_rows), CHUNK):
            pending.append(pool.submit(_tokenised, chunk))
            while len(pending) > 2 * workers:
                writer.write(*pending.popleft().result(), report)
        while pending:
            writer.write(*pending.popleft().result(), report)
    if report.bad_count and on_bad_rows == "error":
        raise DataValidationError(report.bad, report.rows, report.bad_count)
    return report.meta(writer.items)


def prompt_items(sources: list[Source], settings: Settings, encoder: Encoder, label: str,
                 on_bad_rows: str = "error") -> tuple[list[dict], dict]:
    """The prompts of ``sources`` (a ``prompts`` file, or the prompts of any other format's rows), checked and
    tokenised in memory (no cache: prompts to sample from are few next to training data): items
    ``{"index", "prompt_ids", "prompt", "tools", "columns"}``, the prompt as the data holds it (text or messages),
    its ids rendered as generation starts from them (a chat template's generation prompt included), cut to
    ``max_prompt_length``, and the row's other columns as they are (all but the prompt's and the completion's, as
    TRL hands a reward function its dataset's columns: an ``answer`` to check); and the pass's ``meta`` (rows
    read, format, bad and dropped rows)."""
    rows = _located_rows(sources)
    first = list(itertools.islice(rows, DETECTION_ROWS))
    chat = bool(encoder.chat_template or encoder.tokenizer.chat_template)
    checker = make_checker([row for *_, row in first], settings.format, settings.columns, settings.tags, chat,
                           settings.pairs_from_ratings, settings.seed)
    _check_chat(checker, chat, label)
    report = Report(checker.name, checker.conversational)
    tokenizer, bos = encoder.tokenizer, encoder.tokenizer.bos_token_id
    names = Columns(settings.columns)
    own = {names("prompt"), names("completion")}
    items, seen = [], set()
    for index, _, record, where, row in _items(progress(itertools.chain(first, rows), f"reading {label}",
                                                        unit="rows"), checker, False, report, on_bad_rows, rows=True):
        prompt, tools = record.prompt, record.tools
        if _empty_prompt(prompt):  # nothing to complete
            report.dropped[EMPTY_PROMPT] += 1
            continue
        key = repr(prompt)  # a pair's two rows, or a file of pairs, give each prompt once
        if key in seen:
            report.dropped["repeated prompt"] += 1
            continue
        seen.add(key)
        try:
            text = prompt if isinstance(prompt, str) else encoder.render(prompt, tools, generation_prompt=True)
        except Exception as error:  # a chat template's own check, or one it trips over
            report.add_bad(BadRow(where[0], where[1], None, f"the chat template cannot render this row: {error}",
                                  "chat template failed", where[2]))
            continue
        ids = cut_prompt(tokenizer(text, add_special_tokens=isinstance(prompt, str))["input_ids"],
                         settings.max_prompt_length, settings.truncation_mode, bos)
        if settings.max_length is not None and len(ids) >= settings.max_length:
            report.dropped[PROMPT_FILLS_MAX_LENGTH] += 1
            continue
        items.append({"index": index, "prompt_ids": ids, "prompt": prompt, "tools": tools,
                      "columns": {name: value for name, value in row.items() if name not in own}})
    if report.bad_count and on_bad_rows == "error":
        raise DataValidationError(report.bad, report.rows, report.bad_count)
    return items, report.meta(len(items))


def _empty_prompt(prompt: str | list) -> bool:
    """A text of whitespace alone, or messages none of which says anything."""
    if isinstance(prompt, str):
        return not prompt.strip()
    return not any(message.get("content") not in (None, "", []) and str(message.get("content")).strip()
                   for message in prompt)


def _check_chat(checker, chat: bool, label: str) -> None:
    if checker.conversational and not chat:
        raise ConfigError(f"{label}: {checker.name} data needs a chat template and the tokenizer has none; set "
                          "`data.chat_template` (Jinja text or a .jinja file).")


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


def _has_column(checker, first: list, name: str) -> bool:
    """Whether pairs carry the column ``name`` (``score_chosen``, ``margin``): present in one of the first rows."""
    column = None if checker.unpaired else getattr(checker, "column", None)
    return column is not None and any(isinstance(row, dict) and row.get(column(name)) is not None for *_, row in first)


def _items(stream, checker, unpaired: bool, report: Report, on_bad_rows: str, rows: bool = False):
    """``(index, side, record, where)`` of every usable row, in order (a pair as two unpaired rows when ``unpaired``);
    ``where`` locates the row for messages: ``(source, number, unit)``. With ``rows`` (never with ``unpaired``),
    the source row comes last: ``(index, side, record, where, row)``."""
    block: list[tuple] = []
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
            continue  # the run stops at the end: check every row, tokenise no more
        where = (source.label, number, source.unit)
        if unpaired and isinstance(record, Pair):
            block.append((index, record, where))
            if len(block) == UNPAIR_BLOCK:
                yield from _unpaired(block)
                block = []
        else:
            yield (index, 0, record, where, row) if rows else (index, 0, record, where)
    yield from _unpaired(block)


def _unpaired(block: list[tuple]):
    rows = unpair([pair for _, pair, _ in block])
    for (index, _, where), row in zip(block + block, rows):
        yield index, row.side, row, where


def _chunks(items, size: int):
    while chunk := list(itertools.islice(items, size)):
        yield chunk


# ----- workers ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """Which columns an entry has: pairs (optionally with scores and margins) or unpaired rows."""

    unpaired: bool
    scored: bool
    margins: bool = False

    @property
    def parts(self) -> tuple[str, ...]:
        return UNPAIRED_PARTS if self.unpaired else PAIR_PARTS


_worker: dict = {}  # what each worker process tokenises with, set once when it starts


def _start_worker(encoder: Encoder, limits: Limits, layout: Layout) -> None:
    _worker.update(encoder=encoder, limits=limits, layout=layout)


class _Inline:
    """One worker: tokenise in this process, as the pool would."""

    def __init__(self, *setup):
        _start_worker(*setup)

    def submit(self, function, *args) -> Future:
        future = Future()
        future.set_result(function(*args))
        return future

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def _pool(workers: int, encoder: Encoder, limits: Limits, layout: Layout):
    if workers <= 1:
        return _Inline(encoder, limits, layout)
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method), initializer=_start_worker,
                               initargs=(encoder, limits, layout))
    pool.submit(int).result()  # start the workers now, before the progress bar starts its thread
    return pool


def _tokenised(chunk: list) -> tuple[dict[str, np.ndarray], list, Counter]:
    """(In a worker.) A chunk's kept items as flat arrays, the rows its chat template refused, the drops by reason."""
    results = tokenize_records(_worker["encoder"], [record for _, _, record, _ in chunk], _worker["limits"])
    layout = _worker["layout"]
    kept, failed, dropped = [], [], Counter()
    for item, result in zip(chunk, results):
        if isinstance(result, RowFailure):
            failed.append((item[3], result.reason))
        elif isinstance(result, str):
            dropped[result] += 1
        else:
            kept.append((item, result))
    arrays = {"index": np.array([index for (index, *_), _ in kept], dtype=np.int64)}
    if layout.unpaired:
        arrays["side"] = np.array([side for (_, side, *_), _ in kept], dtype=np.int8)
        arrays["label"] = np.array([record.label for (_, _, record, _), _ in kept], dtype=np.uint8)
    elif layout.scored:
        scores = np.array([record.scores or (np.nan, np.nan) for (_, _, record, _), _ in kept],
                          dtype=np.float32).reshape(-1, 2)
        arrays["score_chosen"], arrays["score_rejected"] = scores[:, 0], scores[:, 1]
    if layout.margins:
        arrays["margin"] = np.array([record.margin if record.margin is not None else np.nan
                                     for (_, _, record, _), _ in kept], dtype=np.float32)
    for part in layout.parts:
        ids = [result[f"{part}_ids"] for _, result in kept]
        arrays[f"{part}_lengths"] = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        arrays[f"{part}_tokens"] = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32,
                                               count=int(arrays[f"{part}_lengths"].sum()))
    return arrays, failed, dropped


class ColumnWriter:
    """Appends tokenised chunks to the columns of a cache entry (ids back to back, with running offsets)."""

    def __init__(self, columns, layout: Layout):
        self.columns, self.layout = columns, layout
        self.ends = dict.fromkeys(layout.parts, 0)
        self.items = 0
        for part in layout.parts:
            columns.append(f"{part}_offsets", np.zeros(1, dtype=np.int64))
        empty = {"index": np.zeros(0, np.int64), "side": np.zeros(0, np.int8), "label": np.zeros(0, np.uint8),
                 "score_chosen": np.zeros(0, np.float32), "score_rejected": np.zeros(0, np.float32),
                 "margin": np.zeros(0, np.float32)}
        names = ["index", *(("side", "label") if layout.unpaired else ("score_chosen", "score_rejected")
                            if layout.scored else ()), *(("margin",) if layout.margins else ())]
        for name in names:  # every column exists, even when no row is kept
            columns.append(name, empty[name])
        for part in layout.parts:
            columns.append(f"{part}_tokens", np.zeros(0, np.int32))

    def write(self, arrays: dict[str, np.ndarray], failed: list, dropped: Counter, report: Report) -> None:
        for (source, number, unit), reason in failed:
            report.add_bad(BadRow(source, number, None, reason, "chat template failed", unit))
        report.dropped.update(dropped)
        self.items += len(arrays["index"])
        for name, values in arrays.items():
            if name.endswith("_lengths"):
                part = name.removesuffix("_lengths")
                self.columns.append(f"{part}_offsets", self.ends[part] + np.cumsum(values))
                self.ends[part] += int(values.sum())
            else:
                self.columns.append(name, values)
