"""The end of ``fit``, one callback per thing it leaves, in this order: the Hugging Face export with its model card
(:class:`ExportModel`, the CLI's ``export`` group), the upload to the Hub (:class:`PushToHub`, ``push_to_hub``), the
report, and one line that says where everything went."""

from __future__ import annotations

import os
import time

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from prefmodule.errors import ConfigError
from prefmodule.outputs.hub import HubSettings, push_to_hub
from prefmodule.outputs.loggers import log_dir, metrics_location
from prefmodule.outputs.modelcard import batch_layout, write_model_card
from prefmodule.outputs.report import write_report


def hf_folder(trainer: Trainer) -> str:
    """Where ``fit`` exports the policy: ``<log dir>/hf_model``. Call it on every rank (see ``log_dir``)."""
    return os.path.join(log_dir(trainer), "hf_model")


class ExportModel(Callback):
    """Save the policy and tokenizer in Hugging Face format to ``<log dir>/hf_model`` after ``fit``, with a model
    card (``README.md``); every rank takes part (sharded weights are gathered to rank 0, which writes).

    Args:
        enabled: ``False`` leaves no export (the checkpoints remain).
        merge_adapters: with LoRA, merge the adapters into a CPU copy of the base weights; ``False`` saves the
            adapters alone (``adapter_model.safetensors``, loaded with ``peft.AutoPeftModelForCausalLM``).
    """

    def __init__(self, enabled: bool = True, merge_adapters: bool = True):
        self.enabled = enabled
        self.merge_adapters = merge_adapters

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.enabled:
            return
        folder = hf_folder(trainer)  # on every rank: the log dir is broadcast
        pl_module.export_hf(folder, self.merge_adapters)
        if not trainer.is_global_zero:
            return
        upload = next((c for c in trainer.callbacks if isinstance(c, PushToHub) and c.settings), None)
        write_model_card(folder, pl_module, trainer, upload.settings.repo_id if upload else None)
        if upload is not None:  # here rather than in its own hook: the callbacks' order cannot put it first
            upload.url = push_to_hub(folder, upload.settings)


class PushToHub(Callback):
    """Upload the export, with its card, to a Hub repository after ``fit``
    (:class:`~prefmodule.outputs.hub.HubSettings`): :class:`ExportModel` uploads once it has written. The token
    comes from ``HF_TOKEN`` or ``hf auth login``.

    Args:
        repo_id: the repository (``owner/name``), created if missing; ``None`` uploads nothing.
        private: a new repository is private unless set to false.
    """

    def __init__(self, repo_id: str | None = None, private: bool = True):
        self.settings = HubSettings(repo_id, private) if repo_id is not None else None
        self.url: str | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and self.settings and not any(isinstance(c, ExportModel) and c.enabled
                                                        for c in trainer.callbacks):
            raise ConfigError(f"push_to_hub.repo_id={self.settings.repo_id!r} uploads the export, and "
                              "export.enabled=false leaves none: drop one of the two")


class WriteReport(Callback):
    """Write ``<log dir>/report.html`` from the run's ``metrics.csv`` and samples (none for a run with neither)."""

    def __init__(self):
        self.path: str | None = None

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        run_dir = log_dir(trainer)
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.save()  # the report reads metrics.csv
        if any(os.path.isfile(os.path.join(run_dir, name)) for name in ("metrics.csv", "samples.jsonl")):
            self.path = write_report(run_dir)


class FitSummary(Callback):
    """After ``fit``, one line: how long it took, the validation accuracy (or loss), and where the checkpoint, the
    Hugging Face export, the metrics and the report went."""

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start = time.perf_counter()

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        hf_dir = hf_folder(trainer)
        if not trainer.is_global_zero:
            return
        exported = any(isinstance(c, ExportModel) and c.enabled for c in trainer.callbacks)
        pushed = next((c.url for c in trainer.callbacks if isinstance(c, PushToHub) and c.url), None)
        report = next((c.path for c in trainer.callbacks if isinstance(c, WriteReport) and c.path), None)
        hf_model = (hf_dir + (f" (pushed to {pushed})" if pushed else "")) if exported else "(export.enabled=false)"
        checkpoints = trainer.checkpoint_callbacks
        ckpt = next((c.best_model_path for c in checkpoints if c.best_model_path), "") or next(
            (c.last_model_path for c in checkpoints if c.last_model_path), "")  # the best, else the newest
        metrics = ", ".join(metrics_location(logger) for logger in trainer.loggers) or "(no logger)"
        name = next((n for n in ("val/rewards/accuracies", "val/accuracy", "val/reward", "val/loss")
                     if n in trainer.callback_metrics), "val/rewards/accuracies")
        value = trainer.callback_metrics.get(name)
        minutes = (time.perf_counter() - self._start) / 60
        rank_zero_info(
            f"prefmodule: fit done in {minutes:.1f} min | {name}={f'{value.item():.3f}' if value is not None else 'n/a'} | "
            f"batches: {batch_layout(pl_module, trainer)} | checkpoint: {ckpt or '(none)'} | HF model: {hf_model} | metrics: {metrics} | "
            f"report: {report or '(nothing to report: no metrics.csv, no samples)'}"
        )


def fit_end_callbacks(trainer: Trainer | None) -> list[Callback]:
    """What ``fit`` leaves, in order: the export (unless the trainer has its own :class:`ExportModel`, as the
    CLI's ``export`` group gives it), the report and the summary."""
    given = trainer.callbacks if trainer is not None else []
    export = [] if any(isinstance(c, ExportModel) for c in given) else [ExportModel()]
    return [*export, WriteReport(), FitSummary()]
