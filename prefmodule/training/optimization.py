"""The optimizer and the learning-rate schedule: AdamW (or any optimizer class) and ``transformers.get_scheduler``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import get_scheduler

from prefmodule.errors import finite, require

# ``lr_schedule`` -> ``transformers.get_scheduler`` name, and its default ``lr_schedule_kwargs``
LR_SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup",
                "cosine_with_min_lr": "cosine_with_min_lr", "warmup_stable_decay": "warmup_stable_decay"}
LR_SCHEDULE_DEFAULTS = {"cosine_with_min_lr": {"min_lr_rate": 0.1}, "warmup_stable_decay": {"num_decay_steps": 0.1}}


@dataclass
class OptimizerSettings:
    """AdamW's learning rate and weight decay, the warm-up and the schedule after it (``model.*`` options).

    ``warmup``: a fraction of all steps if < 1, else a step count. ``lr_schedule``: a key of :data:`LR_SCHEDULES`;
    ``lr_schedule_kwargs``: the schedule's own options (``get_scheduler``'s ``scheduler_specific_kwargs``), where
    ``num_decay_steps`` may be a fraction of all steps too.
    """

    lr: float = 1e-6
    weight_decay: float = 0.0
    warmup: float = 0.1
    lr_schedule: str = "linear"
    lr_schedule_kwargs: dict | None = None

    def __post_init__(self):
        require(finite(self.lr) and self.lr > 0, "model.lr", self.lr,
                "must be > 0 (the peak learning rate, e.g. 5e-7 for DPO on a 7B model)")
        require(finite(self.weight_decay) and self.weight_decay >= 0, "model.weight_decay", self.weight_decay,
                "must be >= 0")
        require(finite(self.warmup) and (0 <= self.warmup < 1 or (self.warmup >= 1 and float(self.warmup).is_integer())),
                "model.warmup", self.warmup, "must be a fraction of all steps in [0, 1) or a whole number of steps")
        require(self.lr_schedule in LR_SCHEDULES, "model.lr_schedule", self.lr_schedule,
                f"must be one of {list(LR_SCHEDULES)}")


def configure_optimizer(params: list[nn.Parameter], settings: OptimizerSettings, total_steps: int,
                        optimizer: Callable | None = None) -> dict:
    """Lightning's ``configure_optimizers`` answer for ``params``: the optimizer (``optimizer(params)``, or AdamW)
    and the schedule stepped every optimizer step, logged as ``train/lr``."""
    if optimizer is not None:
        optimizer = optimizer(params)
    else:
        # fused: one kernel for all parameters (10x faster on CPU than the per-parameter loop), same values
        optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay, fused=True)
    total = max(1, total_steps)
    options = {**LR_SCHEDULE_DEFAULTS.get(settings.lr_schedule, {}), **(settings.lr_schedule_kwargs or {})}
    if "num_decay_steps" in options:
        options["num_decay_steps"] = steps(options["num_decay_steps"], total)
    scheduler = get_scheduler(LR_SCHEDULES[settings.lr_schedule], optimizer, steps(settings.warmup, total), total,
                              scheduler_specific_kwargs=options)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "train/lr"}}


def steps(value: float, total: int) -> int:
    """A step count given as a fraction of ``total`` steps (< 1) or as a count."""
    return int(value * total) if value < 1 else int(value)
