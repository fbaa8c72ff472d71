"""The end of ``fit``, one callback per thing it leaves, in this order: the Hugging Face export, its model card,
the upload to the Hub, the report, and one line that says where everything went."""

from __future__ import annotations

import os
import time

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from prefmodule.outputs.hub import HubSettings, push_to_hub
from prefmodule.outputs.loggers import log_dir, metrics_location
from prefmodule.outputs.modelcard import batch_layout, write_model_card
from prefmodule.outputs.report import write_report


def hf_folder(trainer: Trainer) -> str:
    """Where ``fit`` exports the policy: ``<log dir>/hf_model``. Call it on every rank (see ``log_dir``)."""
    return os.path.join(log_dir(trainer), "hf_model")


class ExportModel(Callback):
    """Save the policy and tokenizer in Hugging Face format to ``<log dir>/hf_model`` (every rank takes part:
    sharded weights are gathered to rank 0, which writes)."""

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pl_module.export_hf(hf_folder(trainer))


class WriteModelCard(Callback):
    """Write the export's model card (``hf_model/README.md``)."""

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        folder = hf_folder(trainer)  # on every rank: the log dir is broadcast
        if trainer.is_global_zero:
            write_model_card(folder, pl_module, trainer)


class PushToHub(Callback):
    """Upload the export, with its card, to a Hub repository (:class:`~prefmodule.outputs.hub.HubSettings`)."""

    def __init__(self, settings: HubSettings):
        self.settings = settings
        self.url: str | None = None

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        folder = hf_folder(trainer)  # on every rank: the log dir is broadcast
        if trainer.is_global_zero:
            self.url = push_to_hub(folder, self.settings)


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
        exported = any(isinstance(c, ExportModel) for c in trainer.callbacks)
        pushed = next((c.url for c in trainer.callbacks if isinstance(c, PushToHub) and c.url), None)
        report = next((c.path for c in trainer.callbacks if isinstance(c, WriteReport) and c.path), None)
        hf_model = (hf_dir + (f" (pushed to {pushed})" if pushed else "")) if exported else "(export_hf disabled)"
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
            f"batches: {batch_layout(pl_module)} | checkpoint: {ckpt or '(none)'} | HF model: {hf_model} | metrics: {metrics} | "
            f"report: {report or '(nothing to report: no metrics.csv, no samples)'}"
        )


def fit_end_callbacks(export: bool, hub: HubSettings | None) -> list[Callback]:
    """What ``fit`` leaves, in order: export, card and upload (when exporting), report, summary."""
    leaves: list[Callback] = [ExportModel(), WriteModelCard()] if export else []
    if export and hub is not None:
        leaves.append(PushToHub(hub))
    return [*leaves, WriteReport(), FitSummary()]
