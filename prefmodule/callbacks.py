"""Callbacks every preference module brings: throughput, the end-of-fit summary with the
Hugging Face export, and the writer of ``predict`` results."""

from __future__ import annotations

import json
import os
import time

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info


def log_dir(trainer: Trainer) -> str:
    """The run's log directory: the logger's version folder, else ``default_root_dir``."""
    return trainer.log_dir or trainer.default_root_dir


class TokensPerSecond(Callback):
    """Logs ``train/tokens_per_sec``: non-padding tokens of all ranks over the wall time between steps."""

    def __init__(self):
        self._last: float | None = None

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        now = time.perf_counter()
        if self._last is not None:
            tokens = batch["attention_mask"].sum() * trainer.world_size
            pl_module.log("train/tokens_per_sec", tokens.float() / (now - self._last), prog_bar=True,
                          on_step=True, on_epoch=False, batch_size=1)
        self._last = now


class FitSummary(Callback):
    """After ``fit``: export the policy in Hugging Face format and print where everything went."""

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start = time.perf_counter()

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        run_dir = log_dir(trainer)
        hf_dir = os.path.join(run_dir, "hf_model")
        if pl_module.export_hf_after_fit:
            pl_module.export_hf(hf_dir)  # on every rank: sharded weights are gathered to rank 0, which writes
        else:
            hf_dir = "(export_hf disabled)"
        checkpoint = trainer.checkpoint_callback
        ckpt = (checkpoint.best_model_path or checkpoint.last_model_path) if checkpoint else ""
        metrics = os.path.join(trainer.logger.log_dir, "metrics.csv") if trainer.logger else "(no logger)"
        accuracy = trainer.callback_metrics.get("val/rewards/accuracies")
        accuracy = f"{accuracy.item():.3f}" if accuracy is not None else "n/a"
        minutes = (time.perf_counter() - self._start) / 60
        rank_zero_info(
            f"prefmodule: fit done in {minutes:.1f} min | val/rewards/accuracies={accuracy} | "
            f"checkpoint: {ckpt or '(none)'} | HF model: {hf_dir} | metrics: {metrics}"
        )


class PredictionWriter(BasePredictionWriter):
    """Writes one JSON line per scored pair, in dataset order, to ``path`` (default ``<log dir>/predictions.jsonl``)."""

    def __init__(self, path: str | None = None):
        super().__init__(write_interval="epoch")
        self.path = path

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        path = self.path or os.path.join(log_dir(trainer), "predictions.jsonl")
        rows = [row for batch in predictions for row in batch]
        if trainer.world_size > 1:
            gathered = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, rows)
            rows = [row for part in gathered for row in part]
        # A distributed sampler repeats a few pairs to even out the ranks: keep each pair once.
        rows = sorted({row["index"]: row for row in rows}.values(), key=lambda row: row["index"])
        if not trainer.is_global_zero:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
        preferred = sum(row["preferred"] == "chosen" for row in rows)
        rank_zero_info(f"prefmodule: scored {len(rows)} pairs ({preferred} prefer chosen) -> {path}")
