"""Learning-rate schedules through ``transformers.get_scheduler``: the Hugging Face Trainer's (and TRL's) warm-up
convention (the first step at 0), then each shape, with the defaults of the two floor-and-decay shapes."""

import math

import lightning as L
import pytest
import torch

from prefmodule import ORPOModule

from conftest import TINY_MODEL

WARMUP = [0.0, 0.5]  # warmup=2 of 10 steps: step / warmup_steps


def cosine(progress: float) -> float:
    return 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("schedule, kwargs, after_warmup", [
    ("linear", None, [(10 - s) / 8 for s in range(2, 10)]),
    ("cosine", None, [cosine((s - 2) / 8) for s in range(2, 10)]),
    ("constant", None, [1.0] * 8),
    ("cosine_with_min_lr", None, [0.1 + 0.9 * cosine((s - 2) / 8) for s in range(2, 10)]),  # floor: 10% of lr
    ("cosine_with_min_lr", {"min_lr_rate": 0.5}, [0.5 + 0.5 * cosine((s - 2) / 8) for s in range(2, 10)]),
    ("warmup_stable_decay", {"num_decay_steps": 0.4}, [1.0] * 4 + [cosine(k / 4) for k in range(4)]),
    ("warmup_stable_decay", {"num_decay_steps": 2, "decay_type": "linear"}, [1.0] * 6 + [1.0, 0.5]),
])
def test_schedule_values(schedule, kwargs, after_warmup):
    module = ORPOModule(model=TINY_MODEL, lr=1.0, warmup=0.2, lr_schedule=schedule, lr_schedule_kwargs=kwargs)
    module.policy = torch.nn.Linear(2, 2)  # only its parameters matter here
    module.trainer = L.Trainer(max_steps=10, max_epochs=-1, logger=False)
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["name"] == "train/lr"
    rates = []
    for _ in range(10):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    torch.testing.assert_close(rates, WARMUP + after_warmup, rtol=1e-12, atol=1e-12)
