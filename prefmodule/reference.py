"""DPO's reference beyond a frozen copy: the precomputed log-probs cache and the TR-DPO soft update.

A cache file holds one split's reference log-probs as a ``[pairs, 2]`` tensor (chosen, rejected),
row ``i`` for the pair with ``index == i``. Its name is a hash of everything the values depend
on: the reference weights (fingerprinted from their files' names, sizes, modification times and
safetensors headers, never by reading the weights), the dtype and precision they ran in, and
every pair's token ids with their prompt/response split, which covers the data and whatever the
tokenisation settings did to it. The loss (``beta``, ``loss_type``, ...) is not part of it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections.abc import Callable
from pathlib import Path

import torch
from lightning.pytorch import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader

from prefmodule.paths import resolve

CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/prefmodule/reference_logps`` (``~/.cache/...`` by default)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "prefmodule" / "reference_logps"


def soft_update(reference: nn.Module, policy: nn.Module, alpha: float) -> None:
    """``reference <- (1 - alpha) * reference + alpha * policy``, parameter by parameter."""
    with torch.no_grad():
        for ref_param, param in zip(reference.parameters(), policy.parameters(), strict=True):
            ref_param.mul_(1.0 - alpha).add_(param, alpha=alpha)


class SyncReference(Callback):
    """TR-DPO: after every ``steps``-th optimizer step, ``pl_module.ref_model`` takes ``alpha`` of the policy.

    As TRL's ``SyncRefModelCallback``: the update follows the step at once, so validation and
    checkpoints of that step (Lightning runs ``ModelCheckpoint`` last) see the updated reference.
    """

    def __init__(self, steps: int, alpha: float):
        self.steps, self.alpha = steps, alpha
        self.synced_at = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.synced_at = trainer.global_step  # a resumed run's checkpoint already holds its last update

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step  # unchanged over the batches of an accumulated step: update once
        if step % self.steps == 0 and step > self.synced_at:
            soft_update(pl_module.ref_model, pl_module.policy, self.alpha)
            self.synced_at = step


def weights_fingerprint(name_or_path: str) -> str:
    """A fingerprint of a model's files (a local folder, an ``asset://`` name or a cached hub id)."""
    location = resolve(name_or_path)
    if not os.path.isdir(location):
        from huggingface_hub import snapshot_download

        location = snapshot_download(location, local_files_only=True)
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(location).iterdir() if p.is_file() and not p.name.startswith(".")):
        stat = path.stat()
        digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
        if path.suffix == ".safetensors":
            with path.open("rb") as handle:
                (header_size,) = struct.unpack("<Q", handle.read(8))
                digest.update(handle.read(header_size))
    return digest.hexdigest()


def pairs_fingerprint(dataset) -> str:
    """A hash of every tokenised pair of a split (its ``index``, prompt and response token ids)."""
    if hasattr(dataset, "fingerprint"):
        return dataset.fingerprint()
    digest = hashlib.sha256()
    for i in range(len(dataset)):
        digest.update(json.dumps(dataset[i], sort_keys=True, default=Tensor.tolist).encode())
    return digest.hexdigest()


def cache_file(directory: str | os.PathLike, parts: dict) -> Path:
    """The cache file for the values ``parts`` (a JSON-able dict) determine."""
    key = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True).encode()).hexdigest()
    return Path(directory) / f"{key[:32]}.pt"


def load_table(path: Path) -> Tensor | None:
    return torch.load(path, weights_only=True)["logps"] if path.is_file() else None


def save_table(path: Path, table: Tensor, parts: dict) -> None:
    """Write atomically, so a concurrent or killed run never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save({"logps": table, "parts": parts}, partial)
    os.replace(partial, path)


def shard_loader(loader: DataLoader, rank: int, world_size: int) -> DataLoader:
    """The pairs of ``loader`` in order, an equal share per rank (padded by repeating pairs, as
    ``DistributedSampler`` does), so every rank runs the same number of batches.

    Its own generator leaves the global RNG as it was: a seeded run shuffles the same whether the
    reference pass ran or the cache answered.
    """
    count = len(loader.dataset)
    order = (list(range(count)) * world_size)[: math.ceil(count / world_size) * world_size]
    batch_size = loader.batch_size or getattr(loader.batch_sampler, "batch_size", 1)
    return DataLoader(loader.dataset, batch_size=batch_size, sampler=order[rank::world_size],
                      collate_fn=loader.collate_fn, num_workers=loader.num_workers, generator=torch.Generator())


def logps_table(score: Callable[[dict], Tensor], loader: DataLoader, gather: Callable[[dict], dict]) -> Tensor:
    """``[max index + 1, 2]`` float32 on CPU: ``score(batch) -> [pairs, 2]`` for every batch of this
    rank's ``loader``, gathered over ranks with ``gather``; NaN for an index no pair has."""
    indices, logps = [], []
    for batch in loader:
        logps.append(score(batch))
        indices.append(batch["index"].to(logps[-1].device))
    gathered = gather({"index": torch.cat(indices), "logps": torch.cat(logps)})
    index, values = gathered["index"].reshape(-1).cpu(), gathered["logps"].reshape(-1, 2).float().cpu()
    table = torch.full((int(index.max()) + 1, 2), float("nan"))
    table[index] = values
    return table
