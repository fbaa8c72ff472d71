"""KTO (Ethayarajh et al., 2024): unpaired rows, each a desirable or undesirable completion, against a
frozen reference model."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from prefmodule.data.batches import PairBatch, RowBatch
from prefmodule.data.contract import BatchFormat
from prefmodule.errors import ConfigError
from prefmodule.models.logps import SequenceStats
from prefmodule.objectives.losses import KTOLoss, kto_kl
from prefmodule.objectives.outputs import PairOutputs, RowOutputs
from prefmodule.objectives.dpo import APO
from prefmodule.objectives.reference import ReferenceModule
from prefmodule.private.lightning import attached_trainer


@dataclass
class RowScores:
    """What KTO computes for a batch of rows."""

    losses: Tensor  # [rows], weighted
    rewards: Tensor  # [rows], beta * (logp - ref_logp), detached
    completions: SequenceStats  # [rows]
    desirable: Tensor  # [rows], bool
    kl: Tensor  # the reference point z0, a scalar


class KTOModule(ReferenceModule):
    """Kahneman-Tversky Optimization on unpaired rows ``(prompt, completion, label)``.

    ``kto``: a desirable row's loss is ``w_D * (1 - sigmoid(beta * (r - z0)))``, an undesirable one's
    ``w_U * (1 - sigmoid(beta * (z0 - r)))``, with ``r`` the log-ratio to the reference and ``z0`` the
    batch's KL estimate from each prompt paired with the previous row's completion (see
    ``prefmodule.objectives.losses.kto_loss``, ``kto_kl``). ``apo_zero_unpaired`` drops ``z0`` (no KL completions).

    Batches are :class:`~prefmodule.data.batches.RowBatch` (the datamodule builds them as this module's
    ``batch_format`` says: unpaired rows, KL completions). A :class:`~prefmodule.data.batches.PairBatch`
    (``predict`` on a paired file, the samples) is scored as its chosen rows (desirable) and rejected rows
    (undesirable), with no reference point: its predictions say which answer the model prefers.

    Metrics, as TRL's ``KTOTrainer``: ``loss``, ``kl`` (z0), ``rewards/chosen`` / ``rewards/rejected``
    (mean reward of the desirable / undesirable rows), ``rewards/margins`` (their difference),
    ``logps/*`` (summed), ``logits/*`` (mean response-token logit).

    Args:
        beta: scale of the log-ratios (TRL's default 0.1).
        loss_type: ``kto`` or ``apo_zero_unpaired``.
        desirable_weight, undesirable_weight: ``w_D``, ``w_U``; keep ``w_D * n_D / (w_U * n_U)`` in [1, 4/3]
            for ``n_D`` desirable and ``n_U`` undesirable training rows (a warning says when not).
        **kwargs: see :class:`ReferenceModule` (``reference``, ``ref_model``, ...) and :class:`PreferenceModule`.
    """

    citation = ("KTO", "Ethayarajh et al., 2024, KTO: Model Alignment as Prospect Theoretic Optimization",
                "2402.01306")
    loss_citations = {"apo_zero_unpaired": APO}

    unpaired = True
    predicts_either = True

    def __init__(
        self,
        model: str,
        beta: float = 0.1,
        loss_type: Literal["kto", "apo_zero_unpaired"] = "kto",
        desirable_weight: float = 1.0,
        undesirable_weight: float = 1.0,
        **kwargs,
    ):
        super().__init__(model=model, **kwargs)
        try:
            self.loss = KTOLoss(beta, loss_type, desirable_weight, undesirable_weight)
        except ValueError as error:
            raise ConfigError(str(error)) from None

    @property
    def kl_completions(self) -> bool:
        """Whether batches carry a KL completion per row (``kto``'s reference point needs them)."""
        return self.loss.loss_type == "kto"

    def batch_format(self) -> BatchFormat:
        return dataclasses.replace(super().batch_format(), kl_completions=self.kl_completions)

    def extra_metrics(self, stage: str) -> tuple[str, ...]:
        return ("kl",)

    def score_rows(self, batch: RowBatch | PairBatch, stats: SequenceStats, reference: Tensor) -> RowScores:
        """KTO on ``batch`` from the policy's ``stats`` of its sequences and the ``reference`` log-probs
        (``[rows, 2]``: completion, KL completion; or ``[rows, 1]``)."""
        kl = stats.logps.new_zeros(())
        if isinstance(batch, PairBatch):  # the chosen rows, then the rejected ones
            desirable = torch.arange(len(stats.logps), device=stats.logps.device) < batch.index.numel()
            completions, ref_logps = stats, reference.T.reshape(-1)
        elif batch.kl_completions:
            desirable = batch.label
            completions, kl_rows = stats.split()
            ref_logps = reference[:, 0]
            gather = self.all_gather if attached_trainer(self) is not None else lambda value: value  # all ranks' means
            kl = kto_kl(kl_rows.logps, reference[:, 1], gather)
        else:
            desirable, completions, ref_logps = batch.label, stats, reference[:, 0]
        losses, rewards = self.loss(completions.logps, ref_logps, desirable, kl)
        return RowScores(losses, rewards, completions, desirable, kl)

    def objective_outputs(self, batch: RowBatch | PairBatch, policy: SequenceStats,
                          reference: Tensor) -> RowOutputs | PairOutputs:
        """The batch's loss over its desirable and its undesirable rows; on a batch of pairs (``predict``, the
        samples), each answer's reward, chosen as desirable and rejected as undesirable."""
        rows = self.score_rows(batch, policy, reference)
        if isinstance(batch, PairBatch):  # the chosen rows, then the rejected ones
            (chosen, rejected), (chosen_rewards, rejected_rewards) = rows.completions.split(), rows.rewards.chunk(2)
            return PairOutputs(rows.losses.mean(), chosen, rejected, chosen_rewards, rejected_rewards)
        d = rows.desirable
        return RowOutputs(rows.losses.mean(), rows.completions.select(d), rows.completions.select(~d),
                          rows.rewards[d], rows.rewards[~d], {"kl": rows.kl})

    def predict_step(self, batch: RowBatch | PairBatch, batch_idx: int) -> list[dict]:
        """Pairs: as every objective (``preferred`` by implicit reward). Unpaired rows: each row's reward."""
        if isinstance(batch, PairBatch):
            return super().predict_step(batch, batch_idx)
        rows = self.score_rows(batch, self.model_stats(self.policy, batch.sequences), self.reference_logps(batch))
        return [
            {"index": index, "label": label, "logps": logps, "reward": reward}
            for index, label, logps, reward in zip(batch.index.tolist(), rows.desirable.tolist(),
                                                   rows.completions.logps.tolist(), rows.rewards.tolist())
        ]

    def on_train_start(self) -> None:
        super().on_train_start()
        loader = self.trainer.train_dataloader
        if self.kl_completions and getattr(loader, "batch_size", None) == 1:
            raise ConfigError("loss_type='kto' estimates its reference point from the other rows of a batch: "
                              "use batch_size > 1 (or loss_type='apo_zero_unpaired').")
        labels = training_labels(getattr(loader, "dataset", None))
        advice = labels and kto_weight_advice(sum(labels), len(labels) - sum(labels), self.loss.desirable_weight,
                                              self.loss.undesirable_weight)
        if advice:
            rank_zero_warn(advice)


def training_labels(dataset) -> list[bool] | None:
    """Each training row's label: the dataset's ``labels()`` if it has them, else its items' ``"label"``; ``None``
    for a dataset that holds neither."""
    if callable(getattr(dataset, "labels", None)):
        return [bool(label) for label in dataset.labels()]
    try:
        return [bool(dataset[i]["label"]) for i in range(len(dataset))]
    except (TypeError, KeyError, IndexError):
        return None


def kto_weight_advice(desirable: int, undesirable: int, desirable_weight: float,
                      undesirable_weight: float) -> str | None:
    """A warning when ``w_D * n_D / (w_U * n_U)`` lies outside [1, 4/3] (Ethayarajh et al., 2024, Eq. 8; TRL
    warns likewise), with the ranges of either weight that bring it back; ``None`` when it lies inside."""
    desirable, undesirable = max(desirable, 1), max(undesirable, 1)
    ratio = desirable_weight * desirable / (undesirable_weight * undesirable)
    if 1.0 <= ratio <= 4 / 3:
        return None
    balance = undesirable_weight * undesirable / desirable  # the desirable_weight at ratio 1
    return (f"KTO: desirable_weight * desirable rows / (undesirable_weight * undesirable rows) = {desirable_weight} * "
            f"{desirable} / ({undesirable_weight} * {undesirable}) = {ratio:.3g}, outside the recommended [1, 4/3]. "
            f"Set EITHER desirable_weight in [{balance:.3g}, {balance * 4 / 3:.3g}] OR undesirable_weight in "
            f"[{desirable_weight * desirable / undesirable * 3 / 4:.3g}, "
            f"{desirable_weight * desirable / undesirable:.3g}] (not both).")
