"""Throughput and model FLOPs utilisation: Lightning's ``ThroughputMonitor``, counting pairs and tokens.

Checked on Lightning 2.6: :class:`Throughput` sets ``ThroughputMonitor``'s protected ``kwargs``.
"""

from __future__ import annotations

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ThroughputMonitor
from lightning.pytorch.trainer.states import RunningStage

from prefmodule.data.batches import Batch
from prefmodule.private.lightning import stage_throughput


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
        super().__init__(batch_size_fn=lambda batch: batch.index.numel(), length_fn=tokens)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # ThroughputMonitor's protected kwargs of its Throughput objects (Lightning 2.6)
        self.kwargs["window_size"] = trainer.log_every_n_steps * trainer.accumulate_grad_batches + 1
        super().setup(trainer, pl_module, stage)

    # ThroughputMonitor reads each batch's FLOPs from the module when the batch ends.
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        count_flops(trainer, pl_module, batch)

    def on_validation_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int,
                                  dataloader_idx: int = 0) -> None:
        count_flops(trainer, pl_module, batch)

    def on_test_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int,
                            dataloader_idx: int = 0) -> None:
        count_flops(trainer, pl_module, batch)

    def on_predict_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int,
                               dataloader_idx: int = 0) -> None:
        count_flops(trainer, pl_module, batch)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not trainer.is_global_zero:  # ThroughputMonitor counts on rank 0 only
            return
        rate = stage_throughput(self, RunningStage.TRAINING).compute().get("device/items_per_sec")
        if rate is not None:
            pl_module.log("train/tokens_per_sec", rate * trainer.world_size, prog_bar=True, on_step=True,
                          on_epoch=False, batch_size=1, rank_zero_only=True)


def tokens(batch: Batch) -> int:
    """Non-padding tokens of a batch (packed rows have no padding); of a batch of prompts (the on-policy
    objectives), its prompts' tokens."""
    return batch.tokens()


def count_flops(trainer: Trainer, pl_module: LightningModule, batch) -> None:
    """Give the module the FLOPs of ``batch`` (its ``flops_per_batch``), where ``ThroughputMonitor`` reads them."""
    pl_module.flops_per_batch = flops_per_token(pl_module, trainer.training) * tokens(batch)


def flops_per_token(module: LightningModule, training: bool) -> int:
    """Model FLOPs per token, as :class:`Throughput` says."""
    policy = sum(p.numel() for p in module.policy.parameters())
    trainable = sum(p.numel() for p in module.policy.parameters() if p.requires_grad)
    reference = module.reference_parameters()
    return (4 * policy + 2 * trainable if training else 2 * policy) + 2 * reference
