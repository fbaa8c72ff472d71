"""Checkpoints a long run can count on, and resuming from the newest one.

Lightning's :class:`ModelCheckpoint` does the saving, the rotation and ``last.ckpt``;
:class:`RunCheckpoint` adds what it lacks:

- a save after every validation *and* every ``every_minutes`` (or ``every_steps``): Lightning's triggers
  are exclusive, and none fires when fit ends between two of them (``max_steps``, ``max_time``, a stop
  requested by a callback or by SIGTERM);
- writes under a temporary name, renamed once complete: Lightning fills a sharded checkpoint's folder in
  place, and moves a file from the system's temporary folder, a copy a kill can tear when that folder is
  on another disk;
- ``ckpt_path="last"`` over the whole run folder: Lightning only looks in the new run's version folder.

A resumed fit logs into a new ``version_N`` folder: Lightning's loggers start their files afresh
(``CSVLogger`` would delete the earlier ``metrics.csv``); its steps continue from the checkpoint's.

Checked on Lightning 2.6: the callbacks override ``ModelCheckpoint``'s protected ``_save_checkpoint``,
``_find_last_checkpoints`` and ``_save_topk_checkpoint`` (it has no public hook for where a file is written or
which checkpoint is the last); the rest of its private steps they use are in :mod:`prefmodule.private.lightning`.
"""

from __future__ import annotations

import importlib
import io
import os
import pickle
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from weakref import proxy

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from prefmodule.errors import ConfigError, MissingFileError, UserError, writing
from prefmodule.private.lightning import record_saved, save_now, save_topk_checkpoint

PARTIAL = ".partial"  # a checkpoint being written; renamed to its final name once complete
SHARDED_META = "meta.pt"  # Lightning's file of the trainer state in a sharded (folder) checkpoint


@contextmanager
def replacing(path: str | os.PathLike, owner: bool = True) -> Iterator[str]:
    """A temporary name beside ``path`` (``path + ".partial"``) to write a file or a folder under: once the block
    ends it is flushed to the disk and renamed ``path``; if the block fails it is removed (freeing the space a full
    disk needs) and ``path`` stays as it was. Only the ``owner`` process (rank 0 where every rank writes a shard)
    clears, renames and removes."""
    path = os.fspath(path)
    partial = path + PARTIAL
    if owner:
        _remove(partial)
    try:
        yield partial
        if owner:
            _fsync(partial)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)  # a sharded checkpoint of the same name (os.replace keeps no folder)
            os.replace(partial, path)
    except BaseException:
        if owner:
            _remove(partial)
        raise


class AtomicCheckpoint(ModelCheckpoint):
    """:class:`ModelCheckpoint` writing each checkpoint under a temporary name, renamed once complete; a
    failure to write (disk full, no permission) is a :class:`~prefmodule.errors.WriteError` naming the path."""

    def _save_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        with writing(filepath, "a checkpoint"), replacing(filepath, trainer.is_global_zero) as partial:
            trainer.save_checkpoint(partial, self.save_weights_only)  # every rank; ends with a barrier
        trainer.strategy.barrier("prefmodule.checkpoint_renamed")
        record_saved(self, trainer, filepath)
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))


class RunCheckpoint(AtomicCheckpoint):
    """The run's checkpoints: after each validation, every ``every_minutes`` of training (or every
    ``every_steps`` optimizer steps), and when fit ends however it stopped (``max_steps``, ``max_epochs``,
    ``max_time``, a callback, SIGTERM). The newest ``keep`` are kept; ``last.ckpt`` links to the newest.

    Files: ``<log dir>/checkpoints/epoch=E-step=S.ckpt``. ``ckpt_path="last"`` takes the newest complete
    checkpoint of the whole run folder (``default_root_dir``, every version folder); a torn or unreadable
    one is reported and the one before it used.

    Args:
        every_minutes: minutes of training between two saves (besides those at validation); ``None``: none.
        every_steps: optimizer steps between two saves instead of ``every_minutes``.
        keep: how many of the newest checkpoints to keep (``last.ckpt`` links to one of them).
        dirpath: where to write; default ``<log dir>/checkpoints``.
    """

    def __init__(self, every_minutes: float | None = 30.0, every_steps: int | None = None, keep: int = 2,
                 dirpath: str | None = None):
        if every_minutes is not None and not every_minutes > 0:
            raise ConfigError(f"every_minutes={every_minutes!r}: must be > 0 (minutes of training between two "
                              "checkpoints), or null for checkpoints at validation and at the end only.")
        if every_steps is not None and (not isinstance(every_steps, int) or every_steps < 1):
            raise ConfigError(f"every_steps={every_steps!r}: must be a whole number >= 1 (optimizer steps between "
                              "two checkpoints), or null to save by time (every_minutes).")
        if not isinstance(keep, int) or keep < 1:
            raise ConfigError(f"keep={keep!r}: must be a whole number >= 1 (the newest checkpoints kept).")
        interval = timedelta(minutes=every_minutes) if every_minutes is not None and every_steps is None else None
        super().__init__(dirpath=dirpath, filename="{epoch}-{step}", monitor="step", mode="max", save_top_k=keep,
                         save_last="link", every_n_train_steps=every_steps, train_time_interval=interval)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if trainer.ckpt_path is None and trainer.is_global_zero:
            earlier = [path for path in run_checkpoints(trainer.default_root_dir)
                       if Path(self.dirpath).resolve() not in path.parents]
            if earlier:
                rank_zero_info(f"prefmodule: {trainer.default_root_dir} holds checkpoints of an earlier fit (newest: "
                               f"{earlier[0]}); this one starts from scratch. To resume it instead: --ckpt_path=last")

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.should_stop or 0 <= trainer.max_steps <= trainer.global_step:
            save_now(self, trainer)  # the last step: saved here, mid-epoch, so a resume goes on within the epoch

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        save_now(self, trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        save_now(self, trainer)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):  # raised between two steps: the state is whole
            save_now(self, trainer)

    def _find_last_checkpoints(self, trainer: Trainer) -> set[str]:  # protected hook (Lightning 2.6)
        newest = newest_checkpoint(trainer.default_root_dir)
        return {str(newest)} if newest else set()

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            rank_zero_info(f"prefmodule: resuming {trainer.ckpt_path}: {describe(checkpoint)}")


class BestCheckpoint(AtomicCheckpoint):
    """The checkpoint with the lowest ``val/loss`` (``best-epoch=E-step=S.ckpt``); none without validation."""

    def __init__(self, monitor: str = "val/loss", mode: str = "min", dirpath: str | None = None):
        super().__init__(dirpath=dirpath, filename="best-{epoch}-{step}", monitor=monitor, mode=mode, save_top_k=1,
                         auto_insert_metric_name=True)

    def _save_topk_checkpoint(self, trainer: Trainer, monitor_candidates: dict) -> None:
        if self.monitor in monitor_candidates:
            save_topk_checkpoint(self, trainer, monitor_candidates)


def default_checkpoints(trainer: Trainer | None) -> list[ModelCheckpoint]:
    """The checkpoint callbacks a module brings: the best and :class:`RunCheckpoint`, where the trainer has
    only Lightning's default ``ModelCheckpoint`` (they replace it) or some of ours. A trainer with a
    checkpoint callback of its own, or ``enable_checkpointing=False``, keeps what it has."""
    given = trainer.checkpoint_callbacks if trainer is not None else []
    if not given or any(not _is_lightning_default(cb) and not isinstance(cb, AtomicCheckpoint) for cb in given):
        return []
    return [kind() for kind in (BestCheckpoint, RunCheckpoint) if not any(isinstance(cb, kind) for cb in given)]


def _is_lightning_default(callback: ModelCheckpoint) -> bool:
    default = ModelCheckpoint()
    return type(callback) is ModelCheckpoint and all(
        getattr(callback, name) == getattr(default, name)
        for name in ("dirpath", "filename", "monitor", "save_top_k", "save_last", "state_key"))


# ----- finding the checkpoint to resume from ---------------------------------------------------------
def run_checkpoints(root: str | os.PathLike) -> list[Path]:
    """The checkpoints written under a run folder (in any version folder), newest first; links resolved.

    Where Lightning puts them: ``<root>/checkpoints`` without a logger, ``<root>/<name>/<version>/checkpoints``
    with one (``<root>/lightning_logs/version_N/checkpoints``), and nowhere deeper."""
    found = {path.resolve() for depth in ("", "*/", "*/*/") for path in Path(root).glob(f"{depth}checkpoints/*.ckpt")}
    return sorted((path for path in found if path.exists()), key=lambda path: path.stat().st_mtime, reverse=True)


def newest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run folder; each torn or unreadable one before it is reported."""
    for path in run_checkpoints(root):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        rank_zero_info(f"prefmodule: warning: skipping checkpoint {path}: {problem}; trying the one before it.")
    return None


def resolve_checkpoint(ckpt_path: str | None, root: str | os.PathLike) -> str | None:
    """``ckpt_path`` as the trainer should load it: ``"last"`` is the newest complete checkpoint under
    ``root`` (``None`` when there is none yet: the fit starts from scratch); a path must exist and be
    readable without running code."""
    if ckpt_path == "last":
        newest = newest_checkpoint(root)
        if newest is None:
            rank_zero_info(f"prefmodule: no checkpoint under {root} yet: starting from scratch.")
        return None if newest is None else str(newest)
    if ckpt_path is None or ckpt_path in ("best", "hpc", "registry") or "://" in str(ckpt_path):
        return ckpt_path
    if not os.path.exists(ckpt_path):
        raise MissingFileError(f"ckpt_path={ckpt_path!r}: no such file or folder. Pass a checkpoint written by a "
                               "fit (`<log dir>/checkpoints/*.ckpt`), or `last` for the newest one of the run folder.")
    problem = checkpoint_problem(Path(ckpt_path))
    if problem:
        raise UserError(f"ckpt_path={ckpt_path!r} cannot be used: {problem}.")
    return ckpt_path


def checkpoint_class(path: str | os.PathLike) -> str | None:
    """The class path of the module a checkpoint holds, as the CLI saved it (``prefmodule.DPOModule``), read
    without its weights (memory-mapped; a sharded checkpoint's ``meta.pt``); ``None`` when it does not say."""
    path = Path(path)
    state = torch.load(path / SHARDED_META if path.is_dir() else path, map_location="cpu", mmap=not path.is_dir(),
                       weights_only=True)
    class_path = (state.get("hyper_parameters") or {}).get("_class_path")
    return class_path if isinstance(class_path, str) else None


def import_class(class_path: str) -> type | str:
    """The class ``class_path`` names (``prefmodule.DPOModule``), or the path itself when it does not import."""
    module, _, name = class_path.rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return class_path
    return found if isinstance(found, type) else class_path


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete checkpoint that loads without running code, or ``None``.

    Only the pickled parts are read (tensors are memory-mapped or skipped), all with ``weights_only``."""
    try:
        if not path.is_dir():
            torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            return None
        if not (path / SHARDED_META).is_file():
            return f"no {SHARDED_META}: a sharded checkpoint whose writing did not finish"
        torch.load(path / SHARDED_META, map_location="cpu", weights_only=True)
        return _sharded_problem(path)
    except pickle.UnpicklingError as error:
        return f"it holds Python objects that are not plain data, refused (weights_only=True): {_first_line(error)}"
    except Exception as error:  # a torn zip, a missing record, an I/O error
        return f"unreadable ({type(error).__name__}: {_first_line(error)})"


def _sharded_problem(path: Path) -> str | None:
    """The shards of a ``torch.distributed.checkpoint`` folder: all there, whole, their pickled values plain data."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    with open(path / ".metadata", "rb") as handle:
        metadata = _MetadataUnpickler(handle).load()
    for index, item in metadata.storage_data.items():
        shard = path / item.relative_path
        if not shard.is_file() or shard.stat().st_size < item.offset + item.length:
            return f"shard {item.relative_path} is missing or truncated"
        if isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            with open(shard, "rb") as handle:  # torch.distributed.checkpoint unpickles these without restriction
                handle.seek(item.offset)
                torch.load(io.BytesIO(handle.read(item.length)), weights_only=True)
    return None


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a ``.metadata`` file allowing only the classes of ``torch.distributed.checkpoint``, torch's
    sizes, dtypes and layouts, and paths (the "restricting globals" recipe of Python's pickle docs): PyTorch
    reads that file with an unrestricted ``pickle.load``."""

    ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
               ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("collections", "OrderedDict"),
               ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}

    def find_class(self, module: str, name: str):
        value = super().find_class(module, name) if module.startswith("torch") or (module, name) in self.ALLOWED \
            else None
        metadata_class = module == "torch.distributed.checkpoint.metadata" and isinstance(value, type)
        if not ((module, name) in self.ALLOWED or metadata_class
                or isinstance(value, (torch.dtype, torch.layout, torch.memory_format))):
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint's .metadata")
        return value


def describe(checkpoint: dict) -> str:
    """What a checkpoint holds, for the resume message: step, epoch and position in the training data."""
    text = f"global step {checkpoint.get('global_step')}, epoch {checkpoint.get('epoch')}"
    loops = checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {}).get("combined_loader") or []
    position = loops[0] if loops and isinstance(loops[0], dict) and "batches" in loops[0] else None
    if position is not None:
        text += f", {position['batches']} batches of epoch {position['epoch']} already trained (continuing after them)"
    return text


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:300]


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def _fsync(path: str) -> None:
    """Flush a finished checkpoint (a file, or a folder's files) to the disk before it gets its final name."""
    files = [os.path.join(folder, name) for folder, _, names in os.walk(path) for name in names] \
        if os.path.isdir(path) else [path]
    for name in files:
        with open(name, "rb") as handle:
            os.fsync(handle.fileno())

