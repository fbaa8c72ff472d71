"""The non-finite guard: a step whose loss or gradient norm is NaN or infinite changes nothing.

Such a step's gradients are dropped before the optimizer runs, so the weights and the optimizer state
stay as they were (Adam's moments and step count included: ``torch.optim`` skips parameters without a
gradient), and the module holds the LR schedule back with it. Lightning still counts the step
(``global_step``), so a run with skipped steps ends at ``max_steps`` with fewer updates.
"""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from prefmodule.data.batches import Batch
from prefmodule.training.checkpoints import newest_checkpoint
from prefmodule.errors import ConfigError, NonFiniteError


class NonFiniteGuard(Callback):
    """Skips an optimizer step whose loss or gradient norm is not finite, counts it
    (``train/skipped_steps``) and names its pairs (the batches' ``index``); after ``max_in_a_row`` such steps
    in a row, stops the fit with a :class:`~prefmodule.errors.NonFiniteError`.

    Every rank takes the same decision (it is reduced across them). Under a ``GradScaler`` (``16-mixed`` on
    CUDA) non-finite gradients are the scaler's to skip; the guard then watches the loss only.

    Args:
        max_in_a_row: consecutive non-finite steps after which training stops.
    """

    def __init__(self, max_in_a_row: int = 10):
        if not isinstance(max_in_a_row, int) or max_in_a_row < 1:
            raise ConfigError(f"max_in_a_row={max_in_a_row!r}: must be a whole number >= 1 (consecutive non-finite "
                              "steps skipped before training stops).")
        self.max_in_a_row = max_in_a_row
        self.skipped = 0  # steps skipped in this run (kept in checkpoints)
        self.in_a_row = 0
        self.skipping = False  # whether the current step's update is dropped (the schedule waits too)
        self._loss_finite: Tensor | bool = True  # over the micro-batches of the current step
        self._pairs: list[Tensor] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        if isinstance(batch, Batch):
            self._pairs.append(batch.index.detach().cpu())

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        self._loss_finite = torch.isfinite(loss.detach()).all() & self._loss_finite  # no device sync here

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        pairs, self._pairs = self._pairs, []
        loss_finite, self._loss_finite = bool(self._loss_finite), True
        norm = None if getattr(trainer.precision_plugin, "scaler", None) is not None else gradient_norm(optimizer)
        finite = trainer.strategy.reduce_boolean_decision(loss_finite and (norm is None or bool(norm.isfinite())))
        self.skipping = not finite
        if finite:
            self.in_a_row = 0
        else:
            optimizer.zero_grad(set_to_none=True)  # the optimizer now skips every parameter
            self.skipped += 1
            self.in_a_row += 1
            self._report(trainer, loss_finite, norm, pairs)
        pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False, batch_size=1)
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteError(self._stop_message(trainer))

    def _report(self, trainer: Trainer, loss_finite: bool, norm: Tensor | None, pairs: list[Tensor]) -> None:
        indices = torch.cat(pairs).tolist() if pairs else []
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            gathered = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, indices)
            indices = [index for part in gathered for index in part]
        what = "loss" if not loss_finite else f"gradient norm ({norm.item()})"
        rank_zero_info(f"prefmodule: warning: step {trainer.global_step + 1} skipped, its {what} is not finite: "
                       f"weights, optimizer and LR schedule unchanged. Its pairs (data rows): {sorted(indices)}. "
                       f"{self.in_a_row} in a row (training stops at {self.max_in_a_row}).")

    def _stop_message(self, trainer: Trainer) -> str:
        first = trainer.global_step + 2 - self.in_a_row  # the first skipped step of the streak (1-based)
        lrs = sorted({group["lr"] for optimizer in trainer.optimizers for group in optimizer.param_groups})
        newest = newest_checkpoint(trainer.default_root_dir)
        where = (f"The newest checkpoint, {newest}, holds these weights (--ckpt_path=last resumes from it)." if newest
                 else "No checkpoint was written yet.")
        return (f"training stopped: the loss or gradient norm was non-finite (NaN or infinite) at {self.in_a_row} "
                f"optimizer steps in a row (steps {first}-{trainer.global_step + 1}); each was skipped, so the weights "
                f"are those before step {first}. Try gradient clipping (--trainer.gradient_clip_val=1.0), a lower "
                f"learning rate in a new fit (now {', '.join(f'{lr:g}' for lr in lrs)}; a resumed fit restores the "
                "optimizer's), bf16-mixed instead of 16-mixed precision, or check the pairs named in the warnings "
                f"above. {where}")

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.skipped, self.in_a_row = state_dict["skipped"], state_dict["in_a_row"]


def gradient_norm(optimizer) -> Tensor:
    """The total 2-norm of the gradients the optimizer is about to apply (sharded ones gathered)."""
    grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def step_skipped(trainer: Trainer | None) -> bool:
    """Whether a :class:`NonFiniteGuard` dropped the current optimizer step."""
    return trainer is not None and any(isinstance(cb, NonFiniteGuard) and cb.skipping for cb in trainer.callbacks)


def default_guard(trainer: Trainer | None) -> list[NonFiniteGuard]:
    """A :class:`NonFiniteGuard` unless the trainer has one (configured by the user)."""
    given = trainer is not None and any(isinstance(cb, NonFiniteGuard) for cb in trainer.callbacks)
    return [] if given else [NonFiniteGuard()]
