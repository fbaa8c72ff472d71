"""The frozen reference model of DPO, KTO and any objective scored against one, held one of four ways.

One small class per ``reference:`` mode, each answering two questions for the module that holds it:
what to keep in memory (``build``) and what the reference log-probs of a batch are (``logps``):

- :class:`CopyReference` (``copy``): a frozen copy of the starting policy, or of ``ref_model``.
- :class:`AdapterReference` (``adapter``): the LoRA policy with its adapters disabled; nothing kept.
- :class:`PrecomputedReference` (``precomputed``): one pass per split before its stage, cached on disk;
  training holds no reference at all.
- :class:`SyncReference` (``sync``): TR-DPO's copy that takes a share of the policy every few steps.

The log-probs of a batch are ``[rows, sequences per row]``: a pair's ``(chosen, rejected)``, an
unpaired row's ``(completion, KL completion)`` or ``(completion,)``, row ``i`` for ``index[i]``.

A precomputed cache entry (:mod:`prefmodule.cache`, as tokenised data) holds one split's ``[rows, sequences per
row]`` table, row ``i`` for the row with ``index == i``. Its name is a hash of everything the values depend on: the reference weights
(fingerprinted from their files' names, sizes, modification times and safetensors headers, never by
reading the weights), the dtype and precision they ran in, every row's token ids with their
prompt/response split (which covers the data and whatever the tokenisation settings did to it), and
the objective's own scoring settings (``logps_settings``, e.g. LD-DPO's ``ld_alpha``). The loss
(``beta``, ``loss_type``, ...) is not part of it.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import json
import math
import os
import struct
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn
from torch.utils.data import DataLoader

from prefmodule import cache
from prefmodule.data.batches import PairBatch, RowBatch, Sequences
from prefmodule.errors import ConfigError
from prefmodule.models.attention import enable_packed_attention
from prefmodule.models.loading import load_causal_lm
from prefmodule.models.logps import SequenceStats
from prefmodule.models.sharding import shard
from prefmodule.paths import resolve
from prefmodule.progress import progress

REFERENCES = ("copy", "adapter", "precomputed", "sync")
# Lightning's running stage -> the data split its batches come from.
SPLIT_OF_RUNNING_STAGE = {"train": "train", "sanity_check": "val", "validate": "val", "test": "test", "predict": "predict"}

# The frozen reference is in eval mode by design; Lightning's start-of-fit notice about it is noise.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")


# ----- loading and scoring ----------------------------------------------------------------------------
def load_reference_model(source: str, module) -> nn.Module:
    """``source`` loaded as ``module`` loads its policy (dtype, remote code, attention), frozen and in eval mode.

    The one place a reference model is read from disk: a sharded or meta-device loader replaces this function.
    """
    model = load_causal_lm(source, module.model_settings)
    enable_packed_attention(model)
    return frozen(model)


def frozen(model: nn.Module) -> nn.Module:
    model.config.use_cache = False
    return model.requires_grad_(False).eval()


def score(module, model: nn.Module, batch: PairBatch | RowBatch) -> Tensor:
    """``[rows, sequences per row]`` log-probs of ``batch`` under ``model``, without gradients."""
    return as_table(stats_without_grad(module, model, batch.sequences).logps, batch)


def stats_without_grad(module, model: nn.Module, sequences: Sequences) -> SequenceStats:
    """The statistics of ``sequences`` under ``model`` (per token too), without gradients."""
    with torch.no_grad():
        return module.model_stats(model, sequences)


def as_table(logps: Tensor, batch: PairBatch | RowBatch) -> Tensor:
    """``[sequences]`` log-probs as ``[rows, sequences per row]``: the batch holds all first sequences, then all
    second ones."""
    return logps.view(-1, batch.index.numel()).T


@contextmanager
def base_model(policy: nn.Module) -> Iterator[nn.Module]:
    """The LoRA ``policy`` with its adapters disabled, in eval mode (no dropout); its mode is restored after."""
    training = policy.training
    policy.eval()
    try:
        with policy.disable_adapter():
            yield policy
    finally:
        policy.train(training)


# ----- the four modes -----------------------------------------------------------------------------------
class Reference:
    """Where an objective's reference log-probs come from. ``source``: the reference's weights
    (``ref_model``), ``None`` for the policy's starting weights."""

    saved = False  # whether the kept model changes during training and belongs in checkpoints
    runs_policy = False  # whether the reference forward runs the policy itself (its adapters disabled)
    scores_new_text = True  # whether any text can be scored (a precomputed table holds the data's only)

    def __init__(self, source: str | None = None):
        self.source = source

    def build(self, module, policy: nn.Module) -> nn.Module | None:
        """The frozen model ``module`` keeps as ``ref_model`` (called with the freshly loaded policy)."""
        return None

    def logps(self, module, batch: PairBatch | RowBatch) -> Tensor:
        """``[rows, sequences per row]`` reference log-probs of ``batch``."""
        return as_table(self.stats(module, batch.sequences).logps, batch)

    def stats(self, module, sequences: Sequences) -> SequenceStats:
        """The reference's statistics of ``sequences``, per token too (``token_logps``): what scores
        completions sampled while training (GRPO's per-token KL). Only the modes that hold a model have them."""
        raise ConfigError("model.reference='precomputed' holds no model to score new completions with: use copy "
                          "or adapter (with lora)")

    def prepare(self, module, *splits: str) -> None:
        """Called at the start of the stages that read ``splits``."""

    def callbacks(self) -> list[Callback]:
        return []


class CopyReference(Reference):
    """A frozen copy of the starting policy (or ``ref_model`` loaded from its source) kept in memory."""

    def build(self, module, policy: nn.Module) -> nn.Module:
        return load_reference_model(self.source, module) if self.source else frozen(copy.deepcopy(policy))

    def stats(self, module, sequences: Sequences) -> SequenceStats:
        return stats_without_grad(module, module.ref_model, sequences)


class SyncReference(CopyReference):
    """TR-DPO (Gorbatovski et al., 2024, arXiv 2404.09656): the copy takes ``alpha`` of the policy after
    every ``steps``-th optimizer step, ``ref <- (1 - alpha) * ref + alpha * policy``."""

    saved = True

    def __init__(self, steps: int, alpha: float):
        super().__init__(None)
        self.steps, self.alpha = steps, alpha

    def callbacks(self) -> list[Callback]:
        return [SoftUpdate(self.steps, self.alpha)]


class AdapterReference(Reference):
    """The policy's base model: its LoRA adapters disabled for the reference forward."""

    runs_policy = True

    def stats(self, module, sequences: Sequences) -> SequenceStats:
        with base_model(module.policy) as model:
            return stats_without_grad(module, model, sequences)


class PrecomputedReference(Reference):
    """The reference log-probs of each split, computed in one pass at the start of its stage (or read
    from ``cache_dir``), then looked up by ``index``; no reference model is held while training.

    The pass scores with the LoRA policy's adapters disabled when there is no ``ref_model``, else with
    ``ref_model`` (or the policy's source) loaded for the pass and released after it. The pass holds two
    copies of the weights at most, less than training holds with gradients and optimizer state.
    """

    scores_new_text = False

    def __init__(self, source: str | None, cache_dir: str | os.PathLike):
        super().__init__(source)
        self.cache_dir = cache_dir
        self.tables: dict[str, Tensor] = {}  # split -> [rows, sequences per row], row i for index i

    def logps(self, module, batch: PairBatch | RowBatch) -> Tensor:
        split = SPLIT_OF_RUNNING_STAGE[module.trainer.state.stage.value]
        if split not in self.tables:
            raise RuntimeError(f"no precomputed reference log-probs for the {split!r} split: they are computed at the "
                               "start of fit/validate/test/predict from the trainer's datamodule.")
        index = batch.index.cpu()
        values = self.tables[split][index]
        if values.isnan().any():
            raise RuntimeError(f"{split}: rows {index[values.isnan().any(1)].tolist()} have no precomputed "
                               "reference log-probs; the data changed after they were computed.")
        return values.to(module.device)

    def prepare(self, module, *splits: str) -> None:
        """Fill ``tables`` for ``splits`` the trainer's datamodule has, from the cache or one pass each."""
        trainer = module.trainer
        if trainer.datamodule is None:
            raise ConfigError("reference='precomputed' reads the data through a datamodule: pass `datamodule=`.")
        loaders = {split: loader for split in splits if split not in self.tables
                   and (loader := split_loader(trainer.datamodule, split))}
        with ExitStack() as stack:
            model = None  # loaded for the first split the cache does not answer
            for split, loader in loaders.items():
                key = parts = None
                if trainer.is_global_zero:  # rank 0 decides, so every rank takes the same branch
                    parts = self.cache_key(module, loader)
                    key = cache.cache_key(reference_logps=parts)
                table = trainer.strategy.broadcast(load_table(self.cache_dir, key) if key is not None else None)
                if table is not None:
                    rank_zero_info(f"prefmodule: reference log-probs of {split} reused from "
                                   f"{Path(self.cache_dir).expanduser() / key}")
                else:
                    if model is None:
                        model = stack.enter_context(self.scoring_model(module))
                    with trainer.precision_plugin.forward_context():
                        table = logps_table(
                            lambda batch: score(module, model, trainer.strategy.batch_to_device(batch)),
                            shard_loader(loader, trainer.global_rank, trainer.world_size), module.all_gather,
                            f"reference log-probs of {split}",
                        )
                    if key is not None:
                        path = save_table(self.cache_dir, key, table, parts)
                        rank_zero_info(f"prefmodule: reference log-probs of {split} ({len(loader.dataset)} rows) "
                                       f"-> {path}")
                self.tables[split] = table

    def cache_key(self, module, loader: DataLoader) -> dict:
        return {
            "reference": weights_fingerprint(self.source or module.model_name),
            "dtype": module.model_settings.dtype,
            "precision": str(module.trainer.precision),
            "pairs": pairs_fingerprint(loader.dataset),
            **module.logps_settings(),
        }

    @contextmanager
    def scoring_model(self, module) -> Iterator[nn.Module]:
        if self.source is None and module.lora is not None:
            with base_model(module.policy) as model:
                yield model
            return
        trainer = module.trainer
        model = load_reference_model(self.source or module.model_name, module)
        model = shard(trainer.precision_plugin.convert_module(model).to(module.device), trainer.strategy)
        try:
            yield model
        finally:
            del model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def make_reference(mode: str, source: str | None, sync_steps: int, sync_alpha: float,
                   cache_dir: str | os.PathLike) -> Reference:
    if mode == "copy":
        return CopyReference(source)
    if mode == "adapter":
        return AdapterReference(source)
    if mode == "precomputed":
        return PrecomputedReference(source, cache_dir)
    if mode == "sync":
        return SyncReference(sync_steps, sync_alpha)
    raise ConfigError(f"reference must be one of {REFERENCES}, got {mode!r}")


# ----- TR-DPO's soft update -------------------------------------------------------------------------------
def soft_update(reference: nn.Module, policy: nn.Module, alpha: float) -> None:
    """``reference <- (1 - alpha) * reference + alpha * policy``, parameter by parameter."""
    with torch.no_grad():
        for ref_param, param in zip(reference.parameters(), policy.parameters(), strict=True):
            ref_param.mul_(1.0 - alpha).add_(param, alpha=alpha)


class SoftUpdate(Callback):
    """After every ``steps``-th optimizer step, ``pl_module.ref_model`` takes ``alpha`` of the policy.

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


# ----- the precomputed cache ---------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/prefmodule/reference_logps`` (``~/.cache/...`` by default)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "prefmodule" / "reference_logps"


def split_loader(datamodule, split: str) -> DataLoader | None:
    hook = f"{split}_dataloader"
    return getattr(datamodule, hook)() if is_overridden(hook, datamodule) else None


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
    """A hash of every tokenised row of a split (its ``index``, prompt and response token ids)."""
    if hasattr(dataset, "fingerprint"):
        return dataset.fingerprint()
    digest = hashlib.sha256()
    for i in range(len(dataset)):
        digest.update(json.dumps(dataset[i], sort_keys=True, default=Tensor.tolist).encode())
    return digest.hexdigest()


def load_table(directory: str | os.PathLike, key: str) -> Tensor | None:
    """The ``[rows, sequences per row]`` table of cache entry ``key``, or ``None`` (missing, corrupt: computed again)."""
    found = cache.load(directory, key)
    if isinstance(found, str):
        return None
    arrays, meta = found
    return torch.from_numpy(np.array(arrays["logps"])).view(-1, meta["columns"])


def save_table(directory: str | os.PathLike, key: str, table: Tensor, parts: dict) -> Path:
    """Write ``table`` as cache entry ``key`` (atomically: a concurrent or killed run never leaves half of it)."""
    writer = cache.EntryWriter(directory, key, "the reference log-probs cache")
    try:
        writer.append("logps", table.reshape(-1).numpy())
        writer.finish({"columns": table.shape[1], "rows": table.shape[0], "parts": parts})
    except BaseException:
        writer.abort()
        raise
    return writer.final


def shard_loader(loader: DataLoader, rank: int, world_size: int) -> DataLoader:
    """The rows of ``loader`` in order, an equal share per rank (padded by repeating rows, as
    ``DistributedSampler`` does), so every rank runs the same number of batches.

    Its own generator leaves the global RNG as it was: a seeded run shuffles the same whether the
    reference pass ran or the cache answered.
    """
    count = len(loader.dataset)
    order = (list(range(count)) * world_size)[: math.ceil(count / world_size) * world_size]
    batch_size = loader.batch_size or getattr(loader.batch_sampler, "batch_size", 1)
    return DataLoader(loader.dataset, batch_size=batch_size, sampler=order[rank::world_size],
                      collate_fn=loader.collate_fn, num_workers=loader.num_workers, generator=torch.Generator())


def logps_table(score: Callable[[PairBatch | RowBatch], Tensor], loader: DataLoader, gather: Callable[[dict], dict],
                description: str = "reference log-probs") -> Tensor:
    """``[max index + 1, k]`` float32 on CPU: ``score(batch) -> [rows, k]`` for every batch of this rank's
    ``loader`` (behind a progress bar on rank 0), gathered over ranks with ``gather``; NaN for an index no
    row has."""
    indices, logps = [], []
    for batch in progress(loader, description, total=len(loader), unit="batch"):
        logps.append(score(batch))
        indices.append(batch.index.to(logps[-1].device))
    columns = logps[0].shape[1]
    gathered = gather({"index": torch.cat(indices), "logps": torch.cat(logps)})
    index, values = gathered["index"].reshape(-1).cpu(), gathered["logps"].reshape(-1, columns).float().cpu()
    table = torch.full((int(index.max()) + 1, columns), float("nan"))
    table[index] = values
    return table
