"""Preference metrics as a ``torchmetrics.MetricCollection`` per stage, logged under TRL's names.

Every metric is a weighted mean of one of a step's values (:class:`Mean`), kept as sums, so values accumulate
exactly over an epoch and synchronise across ranks: an epoch's ``rewards/accuracies`` is the fraction of all its
pairs, not a mean of per-batch fractions. Unpaired rows' ``rewards/margins`` is a difference of two means
(:class:`RewardGap`).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import MaxMetric, MeanMetric, Metric, MetricCollection, MinMetric

# Logged by every objective, pairs or unpaired rows; ``rewards/accuracies`` for pairs only.
COMMON = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
          "logits/chosen", "logits/rejected")


class Named:
    """A torchmetrics aggregation of the step value named ``name`` (an item's value, or a batch's); a mean weighs
    each by the weight the step gives that name (1 per item otherwise)."""

    def __init__(self, name: str, **kwargs):
        super().__init__(**kwargs)
        self.name = name

    def update(self, values: dict[str, Tensor], weights: dict[str, Tensor]) -> None:
        value = values[self.name].float()
        if isinstance(self, MeanMetric):
            super().update(value, weights.get(self.name, 1.0))
        else:
            super().update(value)


class Mean(Named, MeanMetric):
    """The (weighted) mean of a step value over an epoch."""


class Min(Named, MinMetric):
    """The smallest item of a step value over an epoch."""


class Max(Named, MaxMetric):
    """The largest item of a step value over an epoch."""


class Std(Named, Metric):
    """The standard deviation of a step value's items over an epoch, NaN items left out, with Bessel's correction
    (TRL's ``nanstd``); NaN until two items were seen. Kept as sums, so it accumulates and syncs exactly."""

    full_state_update = False

    def __init__(self, name: str, **kwargs):
        super().__init__(name, **kwargs)
        for state in ("count", "total", "squares"):
            self.add_state(state, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: dict[str, Tensor], weights: dict[str, Tensor]) -> None:
        value = values[self.name].detach().double().reshape(-1)
        value = value[~value.isnan()]
        self.count += value.numel()
        self.total += value.sum()
        self.squares += value.square().sum()

    def compute(self) -> Tensor:
        variance = (self.squares - self.total.square() / self.count) / (self.count - 1)
        return variance.clamp(min=0).sqrt().float() if self.count > 1 else torch.tensor(float("nan"))


class RewardGap(Metric):
    """Mean reward of the desirable rows minus mean reward of the undesirable ones (unpaired data, as TRL's KTO
    ``rewards/margins``); NaN until both kinds were seen."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, name: str = "rewards/margins", **kwargs):
        super().__init__(**kwargs)
        self.name = name
        for state in ("chosen_sum", "chosen_count", "rejected_sum", "rejected_count"):
            self.add_state(state, default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, values: dict[str, Tensor], weights: dict[str, Tensor]) -> None:
        desirable, undesirable = values[self.name]
        self.chosen_sum += desirable.float().sum()
        self.chosen_count += desirable.numel()
        self.rejected_sum += undesirable.float().sum()
        self.rejected_count += undesirable.numel()

    def compute(self) -> Tensor:
        return self.chosen_sum / self.chosen_count - self.rejected_sum / self.rejected_count


def preference_metrics(extra: tuple[str, ...] = (), paired: bool = True) -> MetricCollection:
    """The metrics of one stage: :data:`COMMON` (and ``rewards/accuracies`` for pairs) and the objective's
    ``extra`` names. Clone it per stage with ``prefix="train/"`` etc.; ``update(values, weights)`` takes a step's
    ``metric_values``."""
    names = [*COMMON, *(("rewards/accuracies",) if paired else ()), *extra]
    metrics = {name: (RewardGap(name) if name == "rewards/margins" and not paired else Mean(name)) for name in names}
    return MetricCollection(metrics, compute_groups=False)  # each reads its own value: nothing to share
