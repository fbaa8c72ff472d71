"""Reference-free losses on the policy's own log-probs: ORPO's odds ratio, CPO (and AlphaPO), SimPO and the NLL
term they add."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from prefmodule.objectives.losses.common import upcast
from prefmodule.objectives.losses.dpo import conservative_logistic


_LN_HALF = -math.log(2.0)


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, accurate over the whole range (Maechler, 2012):

        log(-expm1(x))   if x > -ln 2   (near 0, where 1 - exp(x) cancels)
        log1p(-exp(x))   otherwise      (exp(x) small)

    Returns ``-inf`` at ``x = 0``. Gradients are NaN-free for ``x < 0``: the ``log1p`` branch only
    ever sees ``x <= -ln 2`` so the branch ``torch.where`` discards cannot produce ``0/0`` (TRL's
    ``log1mexp`` evaluates ``log1p(-exp(x))`` at every ``x`` and its gradient is NaN as ``x -> 0`` in float32).
    """
    near_zero = x > _LN_HALF
    far = torch.log1p(-torch.exp(x.clamp(max=_LN_HALF)))
    near = torch.log(-torch.expm1(torch.where(near_zero, x, torch.full_like(x, _LN_HALF))))
    return torch.where(near_zero, near, far)


ORPO_MAX_AVG_LOGP = -1e-12
"""ORPO clamps average log-probs to at most this value, see ``orpo_loss``."""


def orpo_loss(chosen_avg_logps: Tensor, rejected_avg_logps: Tensor, *, beta: float = 0.1) -> tuple[Tensor, Tensor]:
    """ORPO's odds-ratio term (Hong et al., 2024, arXiv 2403.07691, Eqs. 4-7), per pair.

    With ``a = avg log P(y_w|x)``, ``b = avg log P(y_l|x)`` (length-normalised, < 0) and
    ``odds(y) = P / (1 - P)``:

        log_odds = log(odds_w / odds_l) = (a - b) - (log(1 - e^a) - log(1 - e^b))
        L_OR     = -beta * log sigmoid(log_odds)

    ``beta`` is the paper's ``lambda`` (TRL's ``beta``, default 0.1). The full ORPO objective is
    ``nll_loss(chosen tokens) + L_OR.mean()``; TRL returns ``+beta * log sigmoid`` and subtracts it,
    the value is the same.

    ``a`` and ``b`` are clamped to ``<= -1e-12`` (``ORPO_MAX_AVG_LOGP``) first: at exactly 0 (every
    token predicted with probability 1.0 in float32) ``log(1 - e^0) = -inf`` and ``log_odds = +inf``
    with NaN gradients. The clamp leaves every value in ``[-inf, -1e-12]`` unchanged; at 0 it uses
    ``log(1 - e^a) = log(1e-12) ~ -27.6`` instead of ``-inf``, so loss and ``log_odds`` stay finite,
    and the clamped side gets zero gradient.

    Returns:
        ``(losses [B], log_odds [B])``, at least float32. Log ``log_odds.mean()`` as ``log_odds_chosen``
        and ``F.logsigmoid(log_odds).mean()`` as ``log_odds_ratio`` (TRL's names).
    """
    a = upcast(chosen_avg_logps).clamp(max=ORPO_MAX_AVG_LOGP)
    b = upcast(rejected_avg_logps).clamp(max=ORPO_MAX_AVG_LOGP)
    log_odds = (a - b) - (log1mexp(a) - log1mexp(b))
    losses = -beta * F.logsigmoid(log_odds)
    return losses, log_odds


CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")


def alphapo_rewards(logps: Tensor, alpha: float) -> Tensor:
    """AlphaPO's reward shape (Gupta et al., 2025, arXiv 2501.03884): ``r = (1 - p^-alpha) / alpha`` with
    ``p = exp(logps)``, i.e. ``-expm1(-alpha * logps) / alpha``; ``alpha = 0`` is ``logps`` itself (its limit).

    Difference from TRL 1.16's ``CPOTrainer``: TRL forms ``exp(logps) ** -alpha``, which is ``inf`` once
    ``exp(logps)`` underflows (summed log-probs below about -100 in float32); this form stays finite.
    """
    return logps if alpha == 0 else -torch.expm1(-alpha * logps) / alpha


def check_cpo_options(loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> None:
    """:func:`cpo_loss`'s options checked (``ValueError`` naming what is wrong)."""
    if loss_type not in CPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {CPO_LOSS_TYPES}, got {loss_type!r}")
    if loss_type in ("hinge", "ipo") and label_smoothing:
        raise ValueError(f"loss_type={loss_type!r} takes no label_smoothing (got {label_smoothing})")


@dataclass(frozen=True)
class CPOLoss:
    """:func:`cpo_loss` with its options, checked once when built (``ValueError`` naming what is wrong)."""

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    gamma: float = 0.5
    alpha: float = 0.0

    def __post_init__(self):
        check_cpo_options(self.loss_type, self.label_smoothing)

    @property
    def length_normalized(self) -> bool:
        """Whether it takes per-token average log-probs (``ipo``, ``simpo``) rather than summed ones (as TRL)."""
        return self.loss_type in ("ipo", "simpo")

    def __call__(self, chosen_logps: Tensor, rejected_logps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        chosen_rewards = alphapo_rewards(upcast(chosen_logps), self.alpha)
        rejected_rewards = alphapo_rewards(upcast(rejected_logps), self.alpha)
        margin = chosen_rewards - rejected_rewards
        if self.loss_type == "hinge":
            losses = torch.relu(1 - self.beta * margin)
        elif self.loss_type == "ipo":
            losses = (margin - 1 / (2 * self.beta)) ** 2
        else:
            gamma = self.gamma if self.loss_type == "simpo" else 0.0
            losses = conservative_logistic(self.beta * margin - gamma, self.label_smoothing)
        return losses, self.beta * chosen_rewards.detach(), self.beta * rejected_rewards.detach()


def cpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    gamma: float = 0.5,
    alpha: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Reference-free preference losses of TRL's ``CPOTrainer``, per pair, on the policy's own log-probs.

    With ``r = alphapo_rewards(logp, alpha)`` (``r = logp`` for ``alpha = 0``) and ``d = r_w - r_l``:

        sigmoid:  -(1 - eps) log sigmoid(beta * d) - eps log sigmoid(-beta * d)          CPO, Xu et al., 2024,
                                                                                         arXiv 2401.08417, Eq. 3
        simpo:    the same with z = beta * d - gamma                                     SimPO, Meng et al., 2024,
                                                                                         arXiv 2405.14734, Eq. 6
        hinge:    relu(1 - beta * d)                                                     (SLiC-style)
        ipo:      (d - 1 / (2 beta))^2                                                   (IPO-style)

    Pass summed log-probs for ``sigmoid`` and ``hinge`` and per-token averages for ``ipo`` and ``simpo``, as
    TRL does. CPO adds ``cpo_alpha * nll_loss(chosen)`` (see ``nll_loss``); AlphaPO is ``simpo`` with ``alpha``.
    ``hinge`` and ``ipo`` take no ``label_smoothing`` (TRL ignores it with a warning; here it is an error).

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``[B]``; rewards are ``beta * r``, detached.
    """
    return CPOLoss(beta, loss_type, label_smoothing, gamma, alpha)(chosen_logps, rejected_logps)


def simpo_loss(
    chosen_avg_logps: Tensor,
    rejected_avg_logps: Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """SimPO (Meng et al., 2024, arXiv 2405.14734, Eq. 6): reference-free, length-normalised DPO with a margin.

        z = beta * a - beta * b - gamma,    a, b = avg log P(y_w|x), avg log P(y_l|x)
        L = -(1 - eps) log sigmoid(z) - eps log sigmoid(-z)

    ``cpo_loss(a, b, loss_type="simpo")``. ``gamma`` is the target reward margin in reward units, the same
    quantity as TRL ``CPOConfig``'s ``simpo_gamma`` (TRL subtracts ``simpo_gamma / beta`` from ``a - b`` and
    then multiplies by ``beta``, i.e. exactly this ``z``). The paper's defaults are around ``beta = 2.0``,
    ``gamma = 0.5`` (TRL's CPO ``beta`` default is 0.1, tuned for CPO, not SimPO). ``eps = label_smoothing``
    as in TRL.

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``[B]``; rewards are ``beta * avg_logp``, detached.
    """
    return cpo_loss(chosen_avg_logps, rejected_avg_logps, beta=beta, loss_type="simpo", gamma=gamma,
                    label_smoothing=label_smoothing)


def nll_loss(response_logps: Tensor, response_lengths: Tensor) -> Tensor:
    """Mean negative log-likelihood per response token, pooled over the batch (the SFT loss):

        L_SFT = - sum_i log pi(y_i | x_i) / sum_i |y_i|

    from each sequence's summed log-prob and token count. This token mean is TRL ORPO's
    cross-entropy and DPO's ``sft`` term. Scalar, float32; 0 for a batch without response tokens.
    Used for ORPO's ``L_SFT`` and the RPO term of DPO and SimPO (``sft_weight``).
    """
    return -upcast(response_logps).sum() / response_lengths.sum().clamp(min=1)
