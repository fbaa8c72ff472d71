"""Where preference rows come from: local files or a Hugging Face dataset, read as a stream.

A split's data is one name or a list of names, each of them
- a local ``.jsonl``, ``.json``, ``.parquet`` or ``.csv`` file (or ``asset://...``),
- a glob such as ``data/train-*.parquet`` (matches read in sorted order),
- a Hugging Face dataset ``owner/name``, optionally ``owner/name?split=test&subset=default&revision=main``,
  or a local copy of one (a folder), loaded through ``datasets.load_dataset``.

Rows come out one at a time (never a whole file as Python objects, except a JSON list file, which is one
JSON value), with the number a user finds them by: the line for JSONL and CSV, the 0-based row
(``rows[N]``, ``dataset[N]``) for JSON lists, Parquet and Hub datasets. A line that is not UTF-8 or not
JSON is a row too, holding a :class:`BrokenRow`, so validation can name it.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import xxhash

from prefmodule.errors import ConfigError, DataError, MissingFileError, UserError
from prefmodule.paths import resolve
from prefmodule.private.datasets import dataset_fingerprint

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
HUB_NAME = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
HUB_OPTIONS = ("split", "subset", "revision")
PARQUET_BATCH = 1024


class DatasetUnavailable(UserError, ConnectionError):
    """A Hugging Face dataset that cannot be loaded here (offline, or the Hub is unreachable)."""


@dataclass(frozen=True)
class BrokenRow:
    """A line (or whole file) that cannot be read as a row: not UTF-8, or not JSON."""

    message: str
    kind: str = "invalid JSON"


@dataclass(frozen=True)
class FileSource:
    """A local JSONL, JSON, Parquet or CSV file."""

    path: str

    @property
    def label(self) -> str:
        return self.path

    @property
    def unit(self) -> str:
        """How rows are numbered: ``line`` (1-based, as an editor shows it) or ``row`` (0-based)."""
        return "line" if self.path.endswith((".jsonl", ".csv")) else "row"

    def fingerprint(self) -> str:
        """A hash of the file's bytes (xxh3, ~GB/s: a million pairs are fingerprinted in well under a second)."""
        digest = xxhash.xxh3_128(os.path.abspath(self.path).encode())
        with open(self.path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
        return f"file:{digest.hexdigest()}"

    def rows(self) -> Iterator[tuple[int, object]]:
        reader = {".jsonl": _jsonl_rows, ".json": _json_rows, ".parquet": _parquet_rows, ".csv": _csv_rows}
        return reader[Path(self.path).suffix](self.path)

    def count(self) -> int | None:
        """How many rows there are (lines for JSONL and CSV, a CSV header and multi-line cells included), if cheap."""
        if self.path.endswith(".parquet"):
            return _parquet_file(self.path).metadata.num_rows
        if self.path.endswith(".json"):
            return None
        with open(self.path, "rb") as handle:
            return sum(block.count(b"\n") for block in iter(lambda: handle.read(1 << 24), b""))


@dataclass(frozen=True)
class HubSource:
    """A dataset ``datasets.load_dataset`` opens: a Hub name, or a local copy of a Hub dataset (a folder)."""

    name: str
    split: str
    subset: str | None = None
    revision: str | None = None

    @property
    def label(self) -> str:
        return f"{self.name}:{self.split}"

    unit = "row"

    @cached_property
    def dataset(self):
        return load_hub_dataset(self)

    def fingerprint(self) -> str:
        return f"hub:{self.name}:{self.subset}:{self.split}:{self.revision}:{dataset_fingerprint(self.dataset)}"

    def rows(self) -> Iterator[tuple[int, object]]:
        return enumerate(iter(self.dataset))

    def count(self) -> int:
        return len(self.dataset)


Source = FileSource | HubSource


def find_sources(spec: str | list[str], default_split: str) -> list[Source]:
    """Resolve a split's data (one name or several) to its sources; ``default_split`` is used for Hub names
    given without ``?split=``. Nothing is read yet."""
    names = [spec] if isinstance(spec, str) else list(spec)
    if not names:
        raise ConfigError("no data given: pass a file, a glob, or a Hugging Face dataset name")
    return [source for name in names for source in _find(name, default_split)]


def _find(name: str, default_split: str) -> list[Source]:
    if not isinstance(name, str):
        raise ConfigError(f"data: expected a file, a glob or a dataset name, got {name!r}")
    try:
        location = resolve(name)
    except FileNotFoundError as error:
        raise MissingFileError(str(error)) from None
    if os.path.isfile(location):
        return [FileSource(_check_suffix(location))]
    hub_name, _, query = location.partition("?")
    is_hub = os.path.isdir(hub_name) or bool(HUB_NAME.match(hub_name) and not hub_name.endswith(SUFFIXES)
                                              and not name.startswith("asset://"))
    if glob.has_magic(location) and not (is_hub and query):
        matches = sorted(path for path in glob.glob(location) if os.path.isfile(path))
        if not matches:
            raise MissingFileError(f"{name!r}: no file matches this pattern")
        return [FileSource(_check_suffix(path)) for path in matches]
    if not is_hub:
        raise MissingFileError(f"data file not found: {name!r}")
    options = {key: values[-1] for key, values in parse_qs(query, keep_blank_values=True).items()}
    unknown = sorted(set(options) - set(HUB_OPTIONS))
    if unknown:
        raise ConfigError(f"{name!r}: unknown option(s) {unknown}; a Hub dataset takes {list(HUB_OPTIONS)}")
    return [HubSource(hub_name, options.get("split") or default_split, options.get("subset") or None,
                      options.get("revision") or None)]


def _check_suffix(path: str) -> str:
    if not path.endswith(SUFFIXES):
        raise ConfigError(f"{path}: unsupported file type; use one of {', '.join(SUFFIXES)}")
    return path


# ----- readers -------------------------------------------------------------------------------------------
def parse_json(text: str) -> object:
    """One JSON value, or a :class:`BrokenRow` saying why it is not one."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        return BrokenRow(f"invalid JSON ({error.msg}: column {error.colno})")
    except RecursionError:
        return BrokenRow("invalid JSON (nested too deeply)")
    if ("\\ud" in text or "\\uD" in text) and _has_surrogates(json.dumps(value, ensure_ascii=False)):
        return BrokenRow("not UTF-8 text (an escaped lone surrogate, \\ud800-\\udfff)", "invalid UTF-8")
    return value


def _jsonl_rows(path: str) -> Iterator[tuple[int, object]]:
    with open(path, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                text = line.rstrip(b"\r\n").decode("utf-8")
            except UnicodeDecodeError as error:
                yield number, BrokenRow(f"not UTF-8 text (byte {line[error.start]:#04x} at column {error.start + 1})",
                                        "invalid UTF-8")
                continue
            if text.strip():
                yield number, parse_json(text)


def _json_rows(path: str) -> Iterator[tuple[int, object]]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not a JSON file: not UTF-8 text (byte {error.start})") from None
    rows = parse_json(text)
    if isinstance(rows, BrokenRow) and rows.kind == "invalid UTF-8":  # name the rows, not the file
        rows = [parse_json(json.dumps(row)) for row in json.loads(text)]
    if isinstance(rows, BrokenRow) and "Extra data" in rows.message:  # JSON Lines saved as .json: rows all the same
        yield from enumerate(row for _, row in _jsonl_rows(path))
        return
    if isinstance(rows, BrokenRow):
        yield 0, rows
        return
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of rows (or JSON Lines), got a {type(rows).__name__}")
    yield from enumerate(rows)


def _parquet_file(path: str):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as error:  # pyarrow raises its own ArrowInvalid, OSError, ...
        raise DataError(f"{path}: not a Parquet file ({error})") from None


def _parquet_rows(path: str) -> Iterator[tuple[int, object]]:
    number = 0
    for batch in _parquet_file(path).iter_batches(batch_size=PARQUET_BATCH):
        for row in batch.to_pylist():
            yield number, row
            number += 1


def _csv_rows(path: str) -> Iterator[tuple[int, object]]:
    csv.field_size_limit(2**31 - 1)  # a 10 MB cell is a row, not a crash (the most a C long holds everywhere)
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as handle:
        reader = csv.DictReader(handle)
        line = reader.line_num + 1
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as error:
                yield line, BrokenRow(f"invalid CSV ({error})", "invalid CSV")
            else:
                bad = next((v for v in row.values() if isinstance(v, str) and _has_surrogates(v)), None)
                yield line, (BrokenRow("not UTF-8 text", "invalid UTF-8") if bad is not None else row)
            line = reader.line_num + 1


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


# ----- Hub ---------------------------------------------------------------------------------------------
def load_hub_dataset(source: HubSource):
    """``datasets.load_dataset`` for ``source``, failing at once (not after minutes of retries) without network."""
    import datasets
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE
    if not offline and not os.path.isdir(source.name) and not _hub_reachable(constants.ENDPOINT):
        raise DatasetUnavailable(_offline_message(source, f"the Hugging Face Hub ({constants.ENDPOINT}) cannot be "
                                                          "reached from this machine"))
    try:
        return datasets.load_dataset(source.name, source.subset, split=source.split, revision=source.revision)
    except ConnectionError as error:
        reason = ("HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache" if offline
                  else f"the Hub could not be reached ({error})")
        raise DatasetUnavailable(_offline_message(source, reason)) from error


def _hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _offline_message(source: HubSource, reason: str) -> str:
    return (
        f"Cannot load the Hugging Face dataset {source.name!r} (split {source.split!r}): {reason}. "
        "Pass local files instead, e.g. `data.train: path/to/train.jsonl` (JSONL, JSON, Parquet or CSV, one file, "
        f"a list or a glob); to save one where the Hub is reachable: "
        f"`datasets.load_dataset({source.name!r}, split={source.split!r}).to_json('train.jsonl')`."
    )
