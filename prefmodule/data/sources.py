"""Where preference rows come from: local files or a Hugging Face dataset.

A split's data is one name or a list of names, each of them
- a local ``.jsonl``, ``.json``, ``.parquet`` or ``.csv`` file (or ``asset://...``),
- a glob such as ``data/train-*.parquet`` (matches read in sorted order),
- a Hugging Face dataset ``owner/name``, optionally ``owner/name?split=test&subset=default&revision=main``,
  or a local copy of one (a folder), loaded through ``datasets.load_dataset``.

Rows come out with the number a user finds them by: the line for JSONL and CSV, the 0-based row
(``rows[N]``, ``dataset[N]``) for JSON lists, Parquet and Hub datasets. A JSONL line that is not
valid JSON is a row too, holding a :class:`BrokenJSON`, so validation can name it.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from prefmodule.paths import resolve

SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
HUB_NAME = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
HUB_OPTIONS = ("split", "subset", "revision")


@dataclass(frozen=True)
class BrokenJSON:
    """A line (or whole file) that does not parse as JSON."""

    message: str


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
        digest = hashlib.sha256(os.path.abspath(self.path).encode())
        with open(self.path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return f"file:{digest.hexdigest()}"

    def rows(self) -> Iterator[tuple[int, object]]:
        reader = {".jsonl": _jsonl_rows, ".json": _json_rows, ".parquet": _parquet_rows, ".csv": _csv_rows}
        return reader[Path(self.path).suffix](self.path)


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
        return f"hub:{self.name}:{self.subset}:{self.split}:{self.revision}:{self.dataset._fingerprint}"

    def rows(self) -> Iterator[tuple[int, object]]:
        return enumerate(self.dataset.to_list())


Source = FileSource | HubSource


def find_sources(spec: str | list[str], default_split: str) -> list[Source]:
    """Resolve a split's data (one name or several) to its sources; ``default_split`` is used for Hub names
    given without ``?split=``."""
    names = [spec] if isinstance(spec, str) else list(spec)
    if not names:
        raise ValueError("no data given: pass a file, a glob, or a Hugging Face dataset name")
    return [source for name in names for source in _find(name, default_split)]


def _find(name: str, default_split: str) -> list[Source]:
    location = resolve(name)
    if os.path.isfile(location):
        return [FileSource(_check_suffix(location))]
    hub_name, _, query = location.partition("?")
    is_hub = os.path.isdir(hub_name) or bool(HUB_NAME.match(hub_name) and not hub_name.endswith(SUFFIXES)
                                              and not name.startswith("asset://"))
    if glob.has_magic(location) and not (is_hub and query):
        matches = sorted(path for path in glob.glob(location) if os.path.isfile(path))
        if not matches:
            raise FileNotFoundError(f"{name!r}: no file matches this pattern")
        return [FileSource(_check_suffix(path)) for path in matches]
    if not is_hub:
        raise FileNotFoundError(f"data file not found: {name!r}")
    options = {key: values[-1] for key, values in parse_qs(query, keep_blank_values=True).items()}
    unknown = sorted(set(options) - set(HUB_OPTIONS))
    if unknown:
        raise ValueError(f"{name!r}: unknown option(s) {unknown}; a Hub dataset takes {list(HUB_OPTIONS)}")
    return [HubSource(hub_name, options.get("split") or default_split, options.get("subset") or None,
                      options.get("revision") or None)]


def _check_suffix(path: str) -> str:
    if not path.endswith(SUFFIXES):
        raise ValueError(f"{path}: unsupported file type; use one of {', '.join(SUFFIXES)}")
    return path


def _jsonl_rows(path: str) -> Iterator[tuple[int, object]]:
    with open(path, encoding="utf-8") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                yield number, json.loads(text)
            except json.JSONDecodeError as error:
                yield number, BrokenJSON(f"invalid JSON ({error.msg})")


def _json_rows(path: str) -> Iterator[tuple[int, object]]:
    text = Path(path).read_text(encoding="utf-8")
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as error:
        if error.msg == "Extra data":  # JSON Lines saved as .json: numbered as rows all the same
            yield from enumerate(row for _, row in _jsonl_rows(path))
            return
        yield 0, BrokenJSON(f"invalid JSON at line {error.lineno} column {error.colno} ({error.msg})")
        return
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of rows (or JSON Lines), got a {type(rows).__name__}")
    yield from enumerate(rows)


def _parquet_rows(path: str) -> Iterator[tuple[int, object]]:
    import pyarrow.parquet as pq

    return enumerate(pq.read_table(path).to_pylist())


def _csv_rows(path: str) -> Iterator[tuple[int, object]]:
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        line = reader.line_num + 1
        for row in reader:
            yield line, row
            line = reader.line_num + 1


def load_hub_dataset(source: HubSource):
    """``datasets.load_dataset`` for ``source``, failing at once (not after minutes of retries) without network."""
    import datasets
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE
    if not offline and not os.path.isdir(source.name) and not _hub_reachable(constants.ENDPOINT):
        raise ConnectionError(_offline_message(source, f"the Hugging Face Hub ({constants.ENDPOINT}) cannot be "
                                                       "reached from this machine"))
    try:
        return datasets.load_dataset(source.name, source.subset, split=source.split, revision=source.revision)
    except ConnectionError as error:
        reason = ("HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache" if offline
                  else f"the Hub could not be reached ({error})")
        raise ConnectionError(_offline_message(source, reason)) from error


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
