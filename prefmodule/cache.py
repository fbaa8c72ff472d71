"""The on-disk cache of everything computed once and reused: tokenised data (``data/``) and precomputed
reference log-probs (``reference/``), so that a second run starts without computing them again.

An entry is a folder named by a key that hashes everything its content depends on (:func:`cache_key`; for
data: the bytes of the source files or the Hub dataset's name, subset, split, revision and fingerprint, the
tokenizer's identity and every tokenisation setting; for a reference: its weights' fingerprint, precision,
every row's token ids and the scoring settings). Its columns are ``.npy`` files streamed to disk chunk by chunk
(memory stays bounded whatever the size of the data) in a temporary folder renamed into place at the end, so
a killed run never leaves a half-written entry.

Reading an entry runs no code: ``numpy.load(..., allow_pickle=False)`` memory-maps plain integer arrays
(an object array, e.g. a planted pickle, is refused) and ``meta.json`` is JSON. An entry is used only if
every array matches the checksum in its ``meta.json``; a corrupt, stale or unreadable entry is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import xxhash
from numpy.lib import format as npy

VERSION = 3  # bump when tokenisation or the layout changes


def cache_key(**parts) -> str:
    """A short hash of ``parts`` (JSON-serialisable values)."""
    text = json.dumps({"version": VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def checksum(values: np.ndarray) -> str:
    return xxhash.xxh3_128_hexdigest(np.ascontiguousarray(values).data)


class CacheWriteError(OSError):
    """The cache entry could not be written (no space left, permission denied, ...); the message names the path."""


class MemoryColumns:
    """Columns grown chunk by chunk in memory: where the cache cannot be written."""

    def __init__(self):
        self.chunks: dict[str, list[np.ndarray]] = {}

    def append(self, name: str, values: np.ndarray) -> None:
        self.chunks.setdefault(name, []).append(np.asarray(values))

    def finish(self, meta: dict) -> dict[str, np.ndarray]:
        return {name: np.concatenate(chunks) for name, chunks in self.chunks.items()}

    def abort(self) -> None:
        self.chunks.clear()


class EntryWriter(MemoryColumns):
    """A cache entry written column by column: each a ``.npy`` file whose header gets its final length at the end.

    Any ``OSError`` (no space left, permission denied) comes out of ``__init__``, ``append`` or ``finish`` as
    a :class:`CacheWriteError` naming the path; the caller removes the staging folder with ``abort``.
    """

    def __init__(self, directory: str | os.PathLike, key: str, what: str = "the cache"):
        self.what = what
        self.root = Path(directory).expanduser()
        self.final = self.root / key
        self.key = key
        self.files: dict[str, tuple] = {}  # name -> (file, dtype, count, running checksum)
        self.staging = self.root / f".{key}.{uuid.uuid4().hex}.tmp"
        with self._naming(self.root):
            self.root.mkdir(parents=True, exist_ok=True)
            self.staging.mkdir()

    @contextmanager
    def _naming(self, path: Path):
        try:
            yield
        except CacheWriteError:
            raise
        except OSError as error:
            raise CacheWriteError(f"cannot write {self.what} at {path}: {error.strerror or error}") from error

    def append(self, name: str, values: np.ndarray) -> None:
        with self._naming(self.root):
            self._append(name, values)

    def _append(self, name: str, values: np.ndarray) -> None:
        values = np.ascontiguousarray(values)
        if name not in self.files:
            handle = open(self.staging / f"{name}.npy", "wb")
            npy.write_array_header_1_0(handle, self._header(values.dtype, 0))
            self.files[name] = (handle, values.dtype, 0, xxhash.xxh3_128())
        handle, dtype, count, digest = self.files[name]
        values = values.astype(dtype, copy=False)
        handle.write(values.data)
        digest.update(values.data)
        self.files[name] = (handle, dtype, count + len(values), digest)

    def finish(self, meta: dict) -> dict[str, np.ndarray]:
        """Write the headers and ``meta.json``, move the entry into place; returns its arrays, memory-mapped."""
        with self._naming(self.final):
            return self._finish(meta)

    def _finish(self, meta: dict) -> dict[str, np.ndarray]:
        checksums = {}
        for name, (handle, dtype, count, digest) in self.files.items():
            handle.seek(0)
            npy.write_array_header_1_0(handle, self._header(dtype, count))  # same size: the header is padded
            handle.close()
            checksums[name] = digest.hexdigest()
        (self.staging / "meta.json").write_text(json.dumps({**meta, "key": self.key, "version": VERSION,
                                                            "checksums": checksums}))
        shutil.rmtree(self.final, ignore_errors=True)  # an unusable entry being rebuilt
        try:
            os.replace(self.staging, self.final)
        except OSError:
            if not self.final.is_dir():  # else another process has just written the same entry
                raise
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)
        loaded = load(self.root, self.key)
        if isinstance(loaded, str):
            raise OSError(f"the cache entry just written cannot be read back: {loaded}")
        return loaded[0]

    def abort(self) -> None:
        for handle, *_ in self.files.values():
            try:
                handle.close()
            except OSError:  # the buffered tail could not be flushed either: the folder goes anyway
                pass
        shutil.rmtree(self.staging, ignore_errors=True)

    @staticmethod
    def _header(dtype: np.dtype, count: int) -> dict:
        return {"descr": npy.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": (count,)}


def load(directory: str | os.PathLike, key: str) -> tuple[dict[str, np.ndarray], dict] | str:
    """Entry ``key`` as ``(arrays, meta)``, or why it cannot be used (missing, corrupt, other version)."""
    folder = Path(directory).expanduser() / key
    if not folder.is_dir():
        return "miss"
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("version") != VERSION or meta.get("key") != key:
            return f"written by another version ({folder})"
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r", allow_pickle=False)
                  for name in meta["checksums"]}
        for name, values in arrays.items():
            if checksum(values) != meta["checksums"][name]:
                return f"corrupt: {name}.npy does not match its checksum ({folder})"
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"unreadable: {error} ({folder})"
    return arrays, meta
