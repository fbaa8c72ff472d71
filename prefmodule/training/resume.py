"""A fit resumed mid-epoch goes on where it stopped: the training loader's position (its epoch and the batches
already trained, in every checkpoint through Lightning's stateful-loader support) counted and handed back.
"""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer

from prefmodule.data.samplers import ResumableLoader
from prefmodule.private.lightning import apply_pending_loader_states


class DataPosition(Callback):
    """Counts the training batches that reach the model (the position a mid-epoch checkpoint resumes from; Lightning
    fetches a batch ahead, so the loader cannot count them itself) and restores the position on resume."""

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        restore_data_position(trainer)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        loader = trainer.train_dataloader
        if isinstance(loader, ResumableLoader):
            loader.trained += 1


def restore_data_position(trainer: Trainer) -> None:
    """Hand the restored position in the training data to its loader, when Lightning would drop it.

    Lightning applies a checkpoint's loader state when it sets the training data up; a module whose
    ``configure_optimizers`` asks ``trainer.estimated_stepping_batches`` (with ``max_epochs`` set) has it set
    up before the checkpoint is restored, and the resumed epoch then starts again from its first batch.
    """
    apply_pending_loader_states(trainer)
