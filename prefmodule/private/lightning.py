"""Lightning's private names that prefmodule uses, one function each (checked on Lightning 2.6); and
:func:`attached_trainer`, the public stand-in for reading a module's private ``_trainer``."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ThroughputMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.trainer.states import RunningStage


def attached_trainer(module: LightningModule) -> Trainer | None:
    """The module's trainer, ``None`` if detached, without its private ``_trainer``: the public property raises."""
    try:
        return module.trainer
    except RuntimeError:
        return None


def prepare_subcommand_parser(cli: LightningCLI, klass: type, subcommand: str,
                              **kwargs: Any) -> LightningArgumentParser:
    """LightningCLI's ``_prepare_subcommand_parser``: no public hook sees a subcommand's parser before parsing."""
    return LightningCLI._prepare_subcommand_parser(cli, klass, subcommand, **kwargs)


def parse_ckpt_path(cli: LightningCLI) -> None:
    """LightningCLI's ``_parse_ckpt_path``, for an override of it (``parse_arguments`` is the public way there)."""
    LightningCLI._parse_ckpt_path(cli)


def instantiate_trainer(cli: LightningCLI, config: dict[str, Any], callbacks: list) -> Trainer:
    """LightningCLI's ``_instantiate_trainer``, for an override of it (``instantiate_trainer`` is the public way)."""
    return LightningCLI._instantiate_trainer(cli, config, callbacks)


def save_topk_checkpoint(callback: ModelCheckpoint, trainer: Trainer, monitor_candidates: dict) -> None:
    """ModelCheckpoint's ``_save_topk_checkpoint``, for an override of it: its top-k save has no public entry."""
    ModelCheckpoint._save_topk_checkpoint(callback, trainer, monitor_candidates)


def save_now(callback: ModelCheckpoint, trainer: Trainer) -> None:
    """ModelCheckpoint's private save sequence, outside its triggers: it has no public way to save now."""
    if not callback._should_skip_saving_checkpoint(trainer):
        candidates = callback._monitor_candidates(trainer)
        callback._save_topk_checkpoint(trainer, candidates)
        callback._save_last_checkpoint(trainer, candidates)


def record_saved(callback: ModelCheckpoint, trainer: Trainer, filepath: str) -> None:
    """Set the private state ModelCheckpoint keeps after a save (it reads it back): none of it is public."""
    callback._last_global_step_saved = trainer.global_step
    callback._last_checkpoint_saved = filepath


def stage_throughput(monitor: ThroughputMonitor, stage: RunningStage):
    """ThroughputMonitor's private ``Throughput`` of a stage: it offers its rates only as logs, now and then."""
    return monitor._throughputs[stage]


def apply_pending_loader_states(trainer: Trainer) -> None:
    """Apply the loader state a restored checkpoint left pending in the private ``FitLoop`` state: no public way."""
    loop = trainer.fit_loop
    if loop._combined_loader_states_to_load and loop._combined_loader is not None and loop._data_fetcher is not None:
        loop._load_combined_loader_states()
        iter(loop._data_fetcher)  # a new iterator, from the restored position (as ``FitLoop.setup_data`` does)
