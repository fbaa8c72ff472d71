"""Callbacks every preference module brings: generated samples, throughput, the end-of-fit export, model
card, report and summary, and the writer of ``predict`` results."""

from __future__ import annotations

import json
import logging
import os
import time

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, ThroughputMonitor
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from prefmodule.outputs.loggers import log_samples_table, metrics_location
from prefmodule.outputs.samples import SampleSettings, generate_samples, held_out_pairs


def log_dir(trainer: Trainer) -> str:
    """The run's folder (metrics, samples, report, HF export): the first logger's version folder, where
    Lightning's ``ModelCheckpoint`` puts ``checkpoints/`` too; ``default_root_dir`` without a logger.

    Call it on every rank (the path is broadcast from rank 0).
    """
    if not trainer.loggers:
        return trainer.default_root_dir
    logger = trainer.loggers[0]
    if isinstance(logger, (CSVLogger, TensorBoardLogger)):
        return trainer.log_dir
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return trainer.strategy.broadcast(os.path.join(logger.save_dir or trainer.default_root_dir, str(logger.name), version))


def silence_lightning_tips() -> None:
    """Drop Lightning's promotional "💡 Tip: ..." lines (litlogger, litmodels) from its rank-zero log."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(lambda record: not str(record.msg).startswith("💡 Tip"))


class SampleWriter(Callback):
    """At the start of ``fit`` and at each validation in it, the policy completes a few held-out prompts of
    the validation data (see :class:`~prefmodule.outputs.samples.SampleSettings`): rows appended to
    ``<log dir>/samples.jsonl`` (``step``, ``index``, ``prompt``, ``message``, ``completion``, ``reward``,
    ``chosen``, ``rejected``), shown as a table by the loggers that take one, and the first one printed (a chat
    prompt by its last user message).

    Generation runs before Lightning's validation starts its clock, so throughput is unaffected.
    """

    def __init__(self, settings: SampleSettings):
        self.settings = settings

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.write(trainer, pl_module)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self.write(trainer, pl_module)

    def write(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if isinstance(trainer.strategy, FSDPStrategy):
            rank_zero_warn("prefmodule: no samples under FSDP1 (its root unit gathers weights only inside a step); "
                           "FSDP2 (configs/strategies/fsdp2.yaml) generates them.")
            return
        pairs = held_out_pairs(trainer, self.settings.num_prompts)
        if not pairs:
            return
        start = time.perf_counter()
        rows = generate_samples(trainer, pl_module, pairs, self.settings)
        path = os.path.join(log_dir(trainer), "samples.jsonl")
        if not trainer.is_global_zero:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "a") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
        for logger in trainer.loggers:
            log_samples_table(logger, rows, trainer.global_step, path)
        first = rows[0]
        reward = f" (reward {first['reward']:.3f})" if first["reward"] is not None else ""
        rank_zero_info(f"prefmodule: samples at step {trainer.global_step} ({len(rows)} prompts, "
                       f"{time.perf_counter() - start:.1f} s) -> {path} | {_short(first['message'] or first['prompt'])!r} -> "
                       f"{_short(first['completion'])!r}{reward}")


def _short(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


class Throughput(ThroughputMonitor):
    """Lightning's ``ThroughputMonitor`` counting pairs (its samples) and non-padding tokens (its items), with the
    FLOPs of each batch for MFU; ``train/tokens_per_sec`` (all ranks) also goes to the progress bar.

    Lightning logs, every ``log_every_n_steps``: ``train/device/samples_per_sec`` (pairs),
    ``train/device/items_per_sec`` (tokens), ``train/device/flops_per_sec`` and, on devices whose peak it
    knows, ``train/device/mfu``; without ``device/``, the same summed over ranks. Rates average over the
    last ``log_every_n_steps`` steps. FLOPs per token are the usual 2 per parameter and token for a forward
    and 4 for a backward (Kaplan et al. 2020, arXiv 2001.08361), attention's length term left out:
    training ``2N + 2N + 2N_trainable`` (forward; backward through the activations; weight gradients of the
    trainable parameters: ``6N`` without LoRA) plus ``2N_ref`` for a reference model run alongside;
    evaluation ``2N + 2N_ref``. Recomputation (activation checkpointing) is not counted, as MFU requires.
    """

    def __init__(self):
        super().__init__(batch_size_fn=lambda batch: batch["index"].numel(), length_fn=tokens)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.kwargs["window_size"] = trainer.log_every_n_steps * trainer.accumulate_grad_batches + 1
        super().setup(trainer, pl_module, stage)

    def _update(self, trainer: Trainer, pl_module: LightningModule, batch, iter_num: int) -> None:
        # ThroughputMonitor reads the batch's FLOPs from the module.
        pl_module.flops_per_batch = flops_per_token(pl_module, trainer.training) * tokens(batch)
        super()._update(trainer, pl_module, batch, iter_num)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not trainer.is_global_zero:  # ThroughputMonitor counts on rank 0 only
            return
        rate = self._throughputs[RunningStage.TRAINING].compute().get("device/items_per_sec")
        if rate is not None:
            pl_module.log("train/tokens_per_sec", rate * trainer.world_size, prog_bar=True, on_step=True,
                          on_epoch=False, batch_size=1, rank_zero_only=True)


def tokens(batch: dict) -> int:
    """Non-padding tokens of a batch (packed rows have no padding: their mask is all ones)."""
    return int(batch["attention_mask"].sum())


def flops_per_token(module: LightningModule, training: bool) -> int:
    """Model FLOPs per token, as :class:`Throughput` says."""
    policy = sum(p.numel() for p in module.policy.parameters())
    trainable = sum(p.numel() for p in module.policy.parameters() if p.requires_grad)
    reference = getattr(module, "ref_model", None)
    if reference is not None:
        reference = sum(p.numel() for p in reference.parameters())
    else:  # the policy with its adapters disabled serves as the reference
        reference = policy if module.hparams.get("reference") == "adapter" else 0
    return (4 * policy + 2 * trainable if training else 2 * policy) + 2 * reference


class FitSummary(Callback):
    """After ``fit``: export the policy in Hugging Face format with a model card (and push it to the Hub if
    asked), write the report, and print one line saying where everything went."""

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start = time.perf_counter()

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from prefmodule.outputs.modelcard import push_to_hub, write_model_card
        from prefmodule.outputs.report import write_report

        run_dir = log_dir(trainer)
        hf_dir = os.path.join(run_dir, "hf_model")
        if pl_module.export_hf_after_fit:
            pl_module.export_hf(hf_dir)  # on every rank: sharded weights are gathered to rank 0, which writes
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.save()  # the report reads metrics.csv
        reported = any(os.path.isfile(os.path.join(run_dir, name)) for name in ("metrics.csv", "samples.jsonl"))
        report = write_report(run_dir) if reported else "(nothing to report: no metrics.csv, no samples)"
        if pl_module.export_hf_after_fit:
            write_model_card(hf_dir, pl_module, trainer)
            if pl_module.push_to_hub is not None:
                hf_dir += f" (pushed to {push_to_hub(hf_dir, pl_module.push_to_hub)})"
        else:
            hf_dir = "(export_hf disabled)"
        checkpoints = trainer.checkpoint_callbacks
        ckpt = next((c.best_model_path for c in checkpoints if c.best_model_path), "") or next(
            (c.last_model_path for c in checkpoints if c.last_model_path), "")  # the best, else the newest
        metrics = ", ".join(metrics_location(logger) for logger in trainer.loggers) or "(no logger)"
        name = next((n for n in ("val/rewards/accuracies", "val/loss") if n in trainer.callback_metrics),
                    "val/rewards/accuracies")
        value = trainer.callback_metrics.get(name)
        minutes = (time.perf_counter() - self._start) / 60
        rank_zero_info(
            f"prefmodule: fit done in {minutes:.1f} min | {name}={f'{value.item():.3f}' if value is not None else 'n/a'} | "
            f"checkpoint: {ckpt or '(none)'} | HF model: {hf_dir} | metrics: {metrics} | report: {report}"
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
        if rows and "preferred" not in rows[0]:  # unpaired rows: a reward each
            rank_zero_info(f"prefmodule: scored {len(rows)} rows -> {path}")
            return
        preferred = sum(row["preferred"] == "chosen" for row in rows)
        rank_zero_info(f"prefmodule: scored {len(rows)} pairs ({preferred} prefer chosen) -> {path}")
