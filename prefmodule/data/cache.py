"""The on-disk cache of tokenised splits, so that a second run starts without re-tokenising.

An entry is a folder named by a key that hashes everything its content depends on: the bytes of
the source files (or the Hub dataset's name, subset, split, revision and fingerprint), the
tokenizer's identity (its vocabulary, merges, special tokens and chat template, not its path) and
every tokenisation setting. It is written to a temporary folder and renamed into place, and read
back only if its arrays match the checksums in its ``meta.json``: a corrupt or stale entry is
never used, only rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from prefmodule.data.dataset import PairDataset

VERSION = 1  # bump when tokenisation or the layout changes
DEFAULT_DIR = "~/.cache/prefmodule/data"


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase, chat_template: str | None = None) -> str:
    """A hash of what makes ``tokenizer`` produce its ids, whatever path it was loaded from."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    special = {name: str(value) for name, value in tokenizer.special_tokens_map.items()}
    digest.update(json.dumps([special, chat_template or tokenizer.chat_template], sort_keys=True).encode())
    return digest.hexdigest()


def cache_key(**parts) -> str:
    """A short hash of ``parts`` (JSON-serialisable values)."""
    text = json.dumps({"version": VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _checksum(values: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(values).data).hexdigest()


def save(directory: str | os.PathLike, key: str, dataset: PairDataset, meta: dict) -> Path:
    """Write ``dataset`` (all its pairs) and ``meta`` as entry ``key``; returns the entry's folder."""
    root = Path(directory).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    final = root / key
    staging = root / f".{key}.{uuid.uuid4().hex}.tmp"
    staging.mkdir()
    try:
        for name, values in dataset.arrays.items():
            np.save(staging / f"{name}.npy", values)
        checksums = {name: _checksum(values) for name, values in dataset.arrays.items()}
        (staging / "meta.json").write_text(json.dumps({**meta, "key": key, "version": VERSION,
                                                       "checksums": checksums}))
        shutil.rmtree(final, ignore_errors=True)  # an unusable entry being rebuilt
        try:
            os.replace(staging, final)
        except OSError:
            if not final.is_dir():  # else another process has just written the same entry
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def load(directory: str | os.PathLike, key: str) -> tuple[PairDataset, dict] | str:
    """Entry ``key`` as ``(dataset, meta)``, or why it cannot be used (missing, corrupt, other version)."""
    folder = Path(directory).expanduser() / key
    if not folder.is_dir():
        return "miss"
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("version") != VERSION or meta.get("key") != key:
            return f"written by another version ({folder})"
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in meta["checksums"]}
        for name, values in arrays.items():
            if _checksum(values) != meta["checksums"][name]:
                return f"corrupt: {name}.npy does not match its checksum ({folder})"
    except (OSError, ValueError, KeyError) as error:
        return f"unreadable: {error} ({folder})"
    return PairDataset(arrays), meta
