"""Reward models: the Bradley-Terry loss on the scores of chosen and rejected."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from prefmodule.objectives.losses.common import upcast


def bradley_terry_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    margin: Tensor | None = None,
    center_rewards_coefficient: float | None = None,
) -> Tensor:
    """A reward model's Bradley-Terry loss per pair (Ouyang et al., 2022, arXiv 2203.02155, Eq. 1), with the
    Llama 2 margin (Touvron et al., 2023, arXiv 2307.09288, Eq. 2) and reward centering (Eisenstein et al., 2023,
    arXiv 2312.09244), as TRL's ``RewardTrainer``:

        L = -log sigmoid(r_w - r_l - m) + c * (r_w + r_l)^2

    ``r_w``, ``r_l``: the rewards of the chosen and rejected responses ``[B]``; ``m``: each pair's margin (0 when
    ``None``); ``c``: ``center_rewards_coefficient`` (no centering when ``None``). Its mean over pairs is TRL's loss
    (``-mean log sigmoid(...) + c * mean((r_w + r_l)^2)``).

    Gradient: ``dL/dr_w = -sigmoid(r_l - r_w + m) + 2c (r_w + r_l)``, ``dL/dr_l = sigmoid(r_l - r_w + m) + 2c (r_w + r_l)``.
    """
    chosen, rejected = upcast(chosen_rewards), upcast(rejected_rewards)
    difference = chosen - rejected if margin is None else chosen - rejected - margin.to(chosen)
    losses = -F.logsigmoid(difference)
    if center_rewards_coefficient:
        losses = losses + center_rewards_coefficient * (chosen + rejected) ** 2
    return losses
