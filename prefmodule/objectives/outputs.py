"""What an objective computes for a batch, and the per-item values its metrics average: pairs (chosen vs rejected)
or unpaired rows (desirable vs undesirable, KTO)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from prefmodule.models.logps import SequenceStats


@dataclass
class PairOutputs:
    """An objective on a batch of pairs."""

    loss: Tensor  # scalar, differentiable
    chosen: SequenceStats
    rejected: SequenceStats
    chosen_rewards: Tensor  # [pairs], detached
    rejected_rewards: Tensor  # [pairs], detached
    extra: dict[str, Tensor] = field(default_factory=dict)  # the objective's own metrics

    def metric_values(self, length_normalized: bool) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``(values, weights)`` of the metrics, by TRL's names: each value is averaged over its items, with the
        weight its name has in ``weights`` (1 per item otherwise). ``logps/*`` are per-token averages when
        ``length_normalized``, sums otherwise."""
        chosen, rejected = self.chosen, self.rejected
        values = {
            "loss": self.loss.detach(),
            "rewards/chosen": self.chosen_rewards,
            "rewards/rejected": self.rejected_rewards,
            "rewards/accuracies": (self.chosen_rewards > self.rejected_rewards).float(),
            "rewards/margins": self.chosen_rewards - self.rejected_rewards,
            "logps/chosen": logged_logps(chosen, length_normalized).detach(),
            "logps/rejected": logged_logps(rejected, length_normalized).detach(),
            "logits/chosen": chosen.logits / chosen.lengths.clamp(min=1),
            "logits/rejected": rejected.logits / rejected.lengths.clamp(min=1),
            **{name: value.detach() for name, value in self.extra.items()},
        }
        # Token-weighted logits means, as TRL's; the batch loss weighs by its number of pairs. The NLL (a token
        # mean over the batch) weighs by its tokens: its epoch value is then the token mean of all pairs, however
        # they were batched or split across ranks.
        weights = {
            "loss": torch.tensor(float(self.chosen_rewards.numel()), device=chosen.logps.device),
            "logits/chosen": chosen.lengths.float(),
            "logits/rejected": rejected.lengths.float(),
            "nll_loss": chosen.lengths.sum().float(),
        }
        return values, weights

    @property
    def items(self) -> int:
        return self.chosen_rewards.numel()


@dataclass
class RowOutputs:
    """An objective on a batch of unpaired rows (KTO), split into its desirable and undesirable rows."""

    loss: Tensor  # scalar, differentiable
    desirable: SequenceStats
    undesirable: SequenceStats
    desirable_rewards: Tensor  # [desirable rows], detached
    undesirable_rewards: Tensor  # [undesirable rows], detached
    extra: dict[str, Tensor] = field(default_factory=dict)

    def metric_values(self, length_normalized: bool) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """As TRL's ``KTOTrainer`` names them: ``rewards/chosen`` and ``logps/chosen`` are the desirable rows',
        ``*/rejected`` the undesirable rows', ``rewards/margins`` the difference of the two mean rewards (see
        :class:`~prefmodule.objectives.metrics.RewardGap`); the loss and ``kl`` weigh by rows."""
        desirable, undesirable = self.desirable, self.undesirable
        rows = torch.tensor(float(self.items), device=self.loss.device)
        values = {
            "loss": self.loss.detach(),
            "rewards/chosen": self.desirable_rewards,
            "rewards/rejected": self.undesirable_rewards,
            "rewards/margins": (self.desirable_rewards, self.undesirable_rewards),
            "logps/chosen": logged_logps(desirable, length_normalized).detach(),
            "logps/rejected": logged_logps(undesirable, length_normalized).detach(),
            "logits/chosen": desirable.logits / desirable.lengths.clamp(min=1),
            "logits/rejected": undesirable.logits / undesirable.lengths.clamp(min=1),
            **{name: value.detach() for name, value in self.extra.items()},
        }
        weights = {"loss": rows, "kl": rows, "logits/chosen": desirable.lengths.float(),
                   "logits/rejected": undesirable.lengths.float()}
        return values, weights

    @property
    def items(self) -> int:
        return self.desirable_rewards.numel() + self.undesirable_rewards.numel()


def logged_logps(stats: SequenceStats, length_normalized: bool) -> Tensor:
    return stats.avg_logps if length_normalized else stats.logps
