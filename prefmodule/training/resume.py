"""A fit resumed mid-epoch goes on where it stopped: the training loader's position (its epoch and the batches
already trained, in every checkpoint through Lightning's stateful-loader support) counted and handed back.

Checked on Lightning 2.6: the restore reads the ``FitLoop``'s private loader state (see
:func:`restore_data_position`).
"""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer

from prefmodule.data.samplers import ResumableLoader


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
    loop = trainer.fit_loop
    # Private FitLoop state (Lightning 2.6): the loader states a checkpoint brought, not yet applied.
    if loop._combined_loader_states_to_load and loop._combined_loader is not None and loop._data_fetcher is not None:
        loop._load_combined_loader_states()
        iter(loop._data_fetcher)  # a new iterator, from the restored position (as ``FitLoop.setup_data`` does)
