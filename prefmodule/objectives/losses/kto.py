"""KTO on unpaired rows: the reference point and the loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from prefmodule.objectives.losses.common import upcast


KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def kto_kl(policy_kl_logps: Tensor, ref_kl_logps: Tensor, gather: Callable[[Tensor], Tensor] = lambda t: t) -> Tensor:
    """KTO's reference point (Ethayarajh et al., 2024, arXiv 2402.01306, Eq. 7), estimated as TRL's ``KTOTrainer``:

        z_0 = max(0, mean over ranks of mean_i [log pi(y'_i | x_i) - log pi_ref(y'_i | x_i)])     (no gradient)

    on mismatched pairs: each prompt ``x_i`` with another row's completion ``y'_i`` (the previous row's, within
    the batch). ``gather`` collects each rank's scalar mean (e.g. ``LightningModule.all_gather``). A scalar.
    """
    return gather((upcast(policy_kl_logps) - upcast(ref_kl_logps)).mean().detach()).mean().clamp(min=0)


def kto_loss(
    logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl: Tensor | float = 0.0,
    *,
    beta: float = 0.1,
    loss_type: str = "kto",
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """KTO (Ethayarajh et al., 2024, arXiv 2402.01306, Eq. 7) per row of unpaired data, as TRL's ``KTOTrainer``.

    With ``r = log pi(y|x) - log pi_ref(y|x)`` (summed log-probs) and the reference point ``z_0 = kl``
    (``kto_kl``):

        kto, desirable:                  w_D * (1 - sigmoid(beta * (r - z_0)))
        kto, undesirable:                w_U * (1 - sigmoid(beta * (z_0 - r)))
        apo_zero_unpaired, desirable:    w_D * (1 - sigmoid(beta * r))          APO-zero (D'Oosterlinck et al.,
        apo_zero_unpaired, undesirable:  w_U * sigmoid(beta * r)                2024, arXiv 2408.06266), unpaired

    ``desirable`` is a bool ``[n]`` (the row's label). Reduce with ``.mean()`` over the rows. The paper asks
    ``w_D * n_D / (w_U * n_U)`` to lie in [1, 4/3] (``n_D``, ``n_U``: desirable and undesirable rows).

    Returns:
        ``(losses, rewards)``, each ``[n]``; ``rewards = beta * r``, detached.
    """
    return KTOLoss(beta, loss_type, desirable_weight, undesirable_weight)(logps, ref_logps, desirable, kl)


@dataclass(frozen=True)
class KTOLoss:
    """:func:`kto_loss` with its options, checked once when built (``ValueError`` naming what is wrong); called
    with the log-probs, the labels and the reference point."""

    beta: float = 0.1
    loss_type: str = "kto"
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    def __post_init__(self):
        if self.loss_type not in KTO_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {KTO_LOSS_TYPES}, got {self.loss_type!r}")
        if self.desirable_weight <= 0 or self.undesirable_weight <= 0:
            raise ValueError(f"desirable_weight and undesirable_weight must be > 0, got {self.desirable_weight}, "
                             f"{self.undesirable_weight}")

    def __call__(self, logps: Tensor, ref_logps: Tensor, desirable: Tensor,
                 kl: Tensor | float = 0.0) -> tuple[Tensor, Tensor]:
        beta = self.beta
        logratios = upcast(logps) - upcast(ref_logps)
        desirable = desirable.to(torch.bool)
        if self.loss_type == "kto":
            margin = torch.where(desirable, logratios - kl, kl - logratios)
            losses = 1 - torch.sigmoid(beta * margin)
        else:
            losses = torch.where(desirable, 1 - torch.sigmoid(beta * logratios), torch.sigmoid(beta * logratios))
        weights = torch.where(desirable, self.desirable_weight, self.undesirable_weight).to(losses)
        return weights * losses, beta * logratios.detach()
