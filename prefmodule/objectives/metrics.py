"""Preference metrics as ``torchmetrics.Metric``s, logged under TRL's names.

Every metric keeps sums, so values accumulate exactly over an epoch and synchronise across
ranks: an epoch's ``rewards/accuracies`` is the fraction of all its pairs, not a mean of
per-batch fractions.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric


class RewardAccuracy(Metric):
    """Fraction of pairs whose chosen reward exceeds the rejected reward (``r_w > r_l``)."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, chosen_rewards: Tensor, rejected_rewards: Tensor) -> None:
        self.correct += (chosen_rewards > rejected_rewards).sum()
        self.total += chosen_rewards.numel()

    def compute(self) -> Tensor:
        return self.correct / self.total.clamp(min=1)


class RewardMargin(Metric):
    """Mean reward margin ``r_w - r_l`` over pairs."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("margin_sum", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, chosen_rewards: Tensor, rejected_rewards: Tensor) -> None:
        self.margin_sum += (chosen_rewards - rejected_rewards).float().sum()
        self.total += chosen_rewards.numel()

    def compute(self) -> Tensor:
        return self.margin_sum / self.total.clamp(min=1)


class RewardGap(Metric):
    """Mean reward of the desirable rows minus mean reward of the undesirable ones (unpaired data, as TRL's
    KTO ``rewards/margins``); NaN until both kinds were seen."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        for name in ("chosen_sum", "chosen_count", "rejected_sum", "rejected_count"):
            self.add_state(name, default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, chosen_rewards: Tensor, rejected_rewards: Tensor) -> None:
        self.chosen_sum += chosen_rewards.float().sum()
        self.chosen_count += chosen_rewards.numel()
        self.rejected_sum += rejected_rewards.float().sum()
        self.rejected_count += rejected_rewards.numel()

    def compute(self) -> Tensor:
        return self.chosen_sum / self.chosen_count - self.rejected_sum / self.rejected_count


class PreferenceMetrics(nn.Module):
    """All metrics of one stage. ``update`` takes the step's detached per-pair outputs.

    Every other value becomes a (weighted) mean, created the first time its name is seen, so an
    objective logs its own metrics (ORPO's ``nll_loss``, ``log_odds_ratio``, ...) by returning them.
    ``paired=False`` (unpaired rows, KTO): ``rewards/chosen`` and ``rewards/rejected`` hold the desirable
    and undesirable rows' rewards, ``rewards/margins`` is the difference of their means, and there is no
    ``rewards/accuracies``.
    """

    def __init__(self, paired: bool = True):
        super().__init__()
        self.accuracy = RewardAccuracy() if paired else None
        self.margin = RewardMargin() if paired else RewardGap()
        self.means = nn.ModuleDict()

    def update(self, values: dict[str, Tensor], weights: dict[str, Tensor] | None = None,
               per_step: bool = False) -> None:
        """Accumulate the step's per-pair ``values`` (name -> tensor).

        ``weights`` optionally weighs a mean (token counts for the logits means). With
        ``per_step`` the metrics are called (``forward``), which also keeps the batch's own
        value for step-level logging.
        """
        weights = weights or {}

        def apply(metric: Metric, *args) -> None:
            metric(*args) if per_step else metric.update(*args)

        if self.accuracy is not None:
            apply(self.accuracy, values["rewards/chosen"], values["rewards/rejected"])
        apply(self.margin, values["rewards/chosen"], values["rewards/rejected"])
        for name, value in values.items():
            key = _key(name)
            if key not in self.means:
                self.means[key] = MeanMetric().to(value.device)
            apply(self.means[key], value.float(), weights.get(name, 1.0))

    def reset(self) -> None:
        for metric in (self.accuracy, self.margin, *self.means.values()):
            if metric is not None:
                metric.reset()

    def metrics(self) -> dict[str, tuple[Metric, str]]:
        """Name -> (metric, its attribute path below this module), for ``LightningModule.log``."""
        named = {_name(k): (m, f"means.{k}") for k, m in self.means.items()}
        if self.accuracy is not None:
            named["rewards/accuracies"] = (self.accuracy, "accuracy")
        named["rewards/margins"] = (self.margin, "margin")
        return named


# ModuleDict keys cannot contain "/" or "."
def _key(name: str) -> str:
    return name.replace("/", "__")


def _name(key: str) -> str:
    return key.replace("__", "/")
