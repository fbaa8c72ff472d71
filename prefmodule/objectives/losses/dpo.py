"""The DPO family: the loss types of Hugging Face TRL's ``DPOTrainer`` in a registry, and the weights and
reshapings some of them take (WPO, LD-DPO, beta-DPO, f-divergences)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from prefmodule.objectives.losses.common import upcast


F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
SCORE_LOSS_TYPES = frozenset({"sigmoid", "robust", "hinge", "ipo", "exo_pair", "discopop", "sigmoid_norm"})
"""The loss types built on the chosen-minus-rejected score ``delta``: the only ones an f-divergence or the
DPO-Positive penalty changes (as TRL, which rejects ``f_divergence_type`` for the others)."""


def f_divergence_score(logratios: Tensor, f_divergence: str, alpha: float = 0.5) -> Tensor:
    """``f'(u)`` at the likelihood ratio ``u = pi / pi_ref`` (f-DPO, Wang et al., 2023, arXiv 2309.16240),
    from ``logratios = log u``, as TRL 1.16's ``DPOTrainer``:

        reverse_kl:        log u
        forward_kl:        1 - 1/u
        js_divergence:     log(2u / (1 + u)) = log 2 + log sigmoid(log u)
        alpha_divergence:  (u^(alpha - 1) - 1) / (alpha - 1)     (log u at alpha = 1)

    For ``alpha_divergence`` the exponent ``(alpha - 1) log u`` is clamped to <= 80 (TRL's float32 bound),
    so ``exp`` stays finite. ``alpha`` is TRL's coefficient: the paper's alpha-divergence with coefficient ``a``
    (Table 1: ``f'(u) = (1 - u^-a) / a``, reverse KL as ``a -> 0``, forward KL as ``a -> 1``) is this one at
    ``alpha = 1 - a``; the two agree at the default 0.5.
    """
    if f_divergence == "reverse_kl":
        return logratios
    if f_divergence == "forward_kl":
        return 1 - torch.exp(-logratios)
    if f_divergence == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if f_divergence == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:  # the limit is log u
            return logratios
        return torch.expm1(((alpha - 1.0) * logratios).clamp(max=80.0)) / (alpha - 1.0)
    raise ValueError(f"f_divergence_type must be one of {F_DIVERGENCES}, got {f_divergence!r}")


@dataclass(frozen=True)
class PairLogps:
    """Summed log-probs of one batch of pairs under the policy and the reference, shape ``[B]``.

    ``chosen_lengths`` / ``rejected_lengths`` count the response tokens of each sequence; only the
    length-normalised types (``ipo``, ``sigmoid_norm``) need them. ``f_divergence`` (with ``f_alpha``)
    and ``dpop_lambda`` shape the scores the margin ``delta`` is built from.
    """

    policy_chosen: Tensor
    policy_rejected: Tensor
    ref_chosen: Tensor
    ref_rejected: Tensor
    chosen_lengths: Tensor | None = None
    rejected_lengths: Tensor | None = None
    f_divergence: str = "reverse_kl"
    f_alpha: float = 0.5
    dpop_lambda: float = 0.0

    @property
    def chosen_logratios(self) -> Tensor:
        return self.policy_chosen - self.ref_chosen

    @property
    def rejected_logratios(self) -> Tensor:
        return self.policy_rejected - self.ref_rejected

    @property
    def chosen_scores(self) -> Tensor:
        """``f'(pi/pi_ref)`` of the chosen response (its log-ratio for standard DPO), less DPO-Positive's
        penalty ``lambda * max(0, ref_logp_w - logp_w)``."""
        score = f_divergence_score(self.chosen_logratios, self.f_divergence, self.f_alpha)
        if self.dpop_lambda:
            score = score - self.dpop_lambda * torch.relu(-self.chosen_logratios)
        return score

    @property
    def rejected_scores(self) -> Tensor:
        return f_divergence_score(self.rejected_logratios, self.f_divergence, self.f_alpha)

    @property
    def delta(self) -> Tensor:
        """``chosen_scores - rejected_scores``: for standard DPO ``(logp_w - ref_logp_w) - (logp_l - ref_logp_l)``,
        DPO's ``h / beta``."""
        return self.chosen_scores - self.rejected_scores

    def per_token_delta(self, loss_type: str) -> Tensor:
        """``delta`` with each score divided by its response length (clamped to >= 1)."""
        if self.chosen_lengths is None or self.rejected_lengths is None:
            raise ValueError(
                f"loss_type={loss_type!r} averages the log-ratios per token: pass `chosen_lengths` and "
                "`rejected_lengths` (number of response tokens of each sequence) to dpo_loss."
            )
        chosen_len = self.chosen_lengths.to(self.policy_chosen).clamp(min=1.0)
        rejected_len = self.rejected_lengths.to(self.policy_chosen).clamp(min=1.0)
        return self.chosen_scores / chosen_len - self.rejected_scores / rejected_len


# A DPO loss type maps (pairs, hyperparameters) to per-pair losses [B]. Every function receives
# the keyword hyperparameters beta, label_smoothing and discopop_tau and ignores those it has no use for.
DPOLossFn = Callable[..., Tensor]

DPO_LOSSES: dict[str, DPOLossFn] = {}
"""The live registry of DPO loss types: name -> ``fn(pairs: PairLogps, *, beta, label_smoothing,
discopop_tau) -> Tensor[B]``. Add one with ``@register_dpo_loss("name")``."""


def register_dpo_loss(name: str) -> Callable[[DPOLossFn], DPOLossFn]:
    """Decorator that registers a DPO loss type under ``name`` (usable as ``loss_type=name``)."""

    def decorator(fn: DPOLossFn) -> DPOLossFn:
        if name in DPO_LOSSES:
            raise ValueError(f"DPO loss type {name!r} is already registered")
        DPO_LOSSES[name] = fn
        return fn

    return decorator


def conservative_logistic(logits: Tensor, label_smoothing: float) -> Tensor:
    """``-(1 - eps) log sigmoid(z) - eps log sigmoid(-z)``: the logistic loss when a fraction ``eps``
    of the preference labels may be flipped (cDPO). Equals ``-log sigmoid(z)`` for ``eps = 0``."""
    return -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


@register_dpo_loss("sigmoid")
def _sigmoid(pairs: PairLogps, *, beta: float, label_smoothing: float, **_) -> Tensor:
    """DPO (Rafailov et al., 2023, arXiv 2305.18290), and cDPO when ``label_smoothing > 0``.

        L = -(1 - eps) log sigmoid(beta * delta) - eps log sigmoid(-beta * delta)

    With ``eps = 0`` this is exactly TRL's ``sigmoid``. Difference from TRL 1.16: TRL's ``sigmoid``
    ignores ``label_smoothing``; here ``eps > 0`` gives conservative DPO (Mitchell, 2023, "A note on
    DPO with noisy preferences").
    """
    return conservative_logistic(beta * pairs.delta, label_smoothing)


@register_dpo_loss("robust")
def _robust(pairs: PairLogps, *, beta: float, label_smoothing: float, **_) -> Tensor:
    """Robust DPO (Chowdhury et al., 2024, arXiv 2403.00409): an unbiased loss under label noise ``eps``.

        L = (-(1 - eps) log sigmoid(beta * delta) + eps log sigmoid(-beta * delta)) / (1 - 2 eps)

    Needs ``0 <= eps < 0.5`` (TRL only warns; here it is an error, see ``dpo_loss``).
    """
    logits = beta * pairs.delta
    clean = -(1 - label_smoothing) * F.logsigmoid(logits)
    flipped = -label_smoothing * F.logsigmoid(-logits)
    return (clean - flipped) / (1 - 2 * label_smoothing)


@register_dpo_loss("hinge")
def _hinge(pairs: PairLogps, *, beta: float, **_) -> Tensor:
    """Hinge loss on the normalised likelihood, as in SLiC (Zhao et al., 2023, arXiv 2305.10425).

        L = relu(1 - beta * delta)
    """
    return torch.relu(1 - beta * pairs.delta)


@register_dpo_loss("ipo")
def _ipo(pairs: PairLogps, *, beta: float, **_) -> Tensor:
    """IPO (Azar et al., 2023, arXiv 2310.12036, Eq. 17), ``beta`` playing the paper's ``tau``.

        L = (delta_avg - 1 / (2 beta))^2

    where ``delta_avg`` uses per-token average log-ratios (each summed log-ratio divided by its
    response length, clamped to >= 1), as TRL does. Requires ``chosen_lengths``/``rejected_lengths``.
    """
    return (pairs.per_token_delta("ipo") - 1 / (2 * beta)) ** 2


@register_dpo_loss("exo_pair")
def _exo_pair(pairs: PairLogps, *, beta: float, label_smoothing: float, **_) -> Tensor:
    """EXO, pairwise form (Ji et al., 2024, arXiv 2402.00856, Eq. 16).

    ``KL(q || p)`` between the policy's distribution over the pair ``q = softmax(beta * logratios)`` =
    ``[sigmoid(beta*delta), sigmoid(-beta*delta)]`` and the smoothed label ``p = [1 - eps, eps]``:

        L = q_w (log q_w - log(1 - eps)) + q_l (log q_l - log eps)

    Needs ``eps = label_smoothing > 0`` (the paper recommends 1e-3); ``dpo_loss`` raises otherwise, as TRL does.
    """
    logits = beta * pairs.delta
    log_q_chosen, log_q_rejected = F.logsigmoid(logits), F.logsigmoid(-logits)
    return log_q_chosen.exp() * (log_q_chosen - math.log1p(-label_smoothing)) + log_q_rejected.exp() * (
        log_q_rejected - math.log(label_smoothing)
    )


@register_dpo_loss("nca_pair")
def _nca_pair(pairs: PairLogps, *, beta: float, **_) -> Tensor:
    """NCA, pairwise form (Chen et al., 2024, arXiv 2402.05369), on absolute rewards ``r = beta * logratio``.

        L = -log sigmoid(r_w) - 0.5 log sigmoid(-r_w) - 0.5 log sigmoid(-r_l)
    """
    chosen_rewards = beta * pairs.chosen_logratios
    rejected_rewards = beta * pairs.rejected_logratios
    return -F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards) - 0.5 * F.logsigmoid(-rejected_rewards)


@register_dpo_loss("bco_pair")
def _bco_pair(pairs: PairLogps, *, beta: float, **_) -> Tensor:
    """BCO, pairwise form (Jung et al., 2024, arXiv 2404.04656): binary classification of each response.

        L = -log sigmoid(r_w) - log sigmoid(-r_l),    r = beta * logratio

    As in TRL's DPOTrainer, without BCO's running reward shift.
    """
    return -F.logsigmoid(beta * pairs.chosen_logratios) - F.logsigmoid(-beta * pairs.rejected_logratios)


@register_dpo_loss("sppo_hard")
def _sppo_hard(pairs: PairLogps, *, beta: float, **_) -> Tensor:
    """SPPO with hard probabilities (Wu et al., 2024, arXiv 2405.00675, Eq. 4.7 with P = 1 / 0).

        L = (chosen_logratio - 1 / (2 beta))^2 + (rejected_logratio + 1 / (2 beta))^2
    """
    return (pairs.chosen_logratios - 0.5 / beta) ** 2 + (pairs.rejected_logratios + 0.5 / beta) ** 2


@register_dpo_loss("aot")
def _aot(pairs: PairLogps, *, beta: float, label_smoothing: float, **_) -> Tensor:
    """AOT, paired (Melnyk et al., 2024, arXiv 2406.05882): distributional alignment via optimal transport.

    Sorts the policy's ``logp_w - logp_l`` and the reference's ``ref_logp_w - ref_logp_l`` over the
    batch, then applies the (label-smoothed) logistic loss to their quantile-wise difference:

        L_k = -(1 - eps) log sigmoid(beta * d_k) - eps log sigmoid(-beta * d_k),
        d_k = sort(logp_w - logp_l)_k - sort(ref_logp_w - ref_logp_l)_k

    Entry ``k`` of the result belongs to the ``k``-th quantile, not to pair ``k``: only the batch
    mean is meaningful, and it depends on the (per-device) batch.
    """
    policy_sorted, _ = torch.sort(pairs.policy_chosen - pairs.policy_rejected, dim=0)
    ref_sorted, _ = torch.sort(pairs.ref_chosen - pairs.ref_rejected, dim=0)
    return conservative_logistic(beta * (policy_sorted - ref_sorted), label_smoothing)


@register_dpo_loss("aot_unpaired")
def _aot_unpaired(pairs: PairLogps, *, beta: float, label_smoothing: float, **_) -> Tensor:
    """AOT, unpaired (Melnyk et al., 2024, arXiv 2406.05882): chosen and rejected log-ratios sorted separately.

        L_k = -(1 - eps) log sigmoid(beta * d_k) - eps log sigmoid(-beta * d_k),
        d_k = sort(chosen_logratio)_k - sort(rejected_logratio)_k

    As for ``aot``, entries are quantiles, not pairs; only the batch mean is meaningful.
    """
    chosen_sorted, _ = torch.sort(pairs.chosen_logratios, dim=0)
    rejected_sorted, _ = torch.sort(pairs.rejected_logratios, dim=0)
    return conservative_logistic(beta * (chosen_sorted - rejected_sorted), label_smoothing)


@register_dpo_loss("apo_zero")
def _apo_zero(pairs: PairLogps, *, beta: float, **_) -> Tensor:
    """APO-zero (D'Oosterlinck et al., 2024, arXiv 2408.06266, Eq. 7): for chosen answers better than the
    model's own; raises the chosen likelihood and lowers the rejected one.

        L = (1 - sigmoid(r_w)) + sigmoid(r_l),    r = beta * logratio
    """
    return (1 - torch.sigmoid(beta * pairs.chosen_logratios)) + torch.sigmoid(beta * pairs.rejected_logratios)


@register_dpo_loss("apo_down")
def _apo_down(pairs: PairLogps, *, beta: float, **_) -> Tensor:
    """APO-down (D'Oosterlinck et al., 2024, arXiv 2408.06266, Eq. 8): for chosen answers worse than the
    model's own; lowers both likelihoods, the rejected one more.

        L = sigmoid(r_w) + (1 - sigmoid(r_w - r_l)),    r = beta * logratio
    """
    logratio_margin = pairs.chosen_logratios - pairs.rejected_logratios
    return torch.sigmoid(beta * pairs.chosen_logratios) + (1 - torch.sigmoid(beta * logratio_margin))


@register_dpo_loss("discopop")
def _discopop(pairs: PairLogps, *, beta: float, discopop_tau: float, **_) -> Tensor:
    """DiscoPOP / log-ratio modulated loss (Chris Lu et al., 2024, arXiv 2406.08414, Eq. 5).

        z = beta * delta,   m = sigmoid(z / tau)
        L = (1 - m) * (-log sigmoid(z)) + m * exp(-z)

    ``tau = discopop_tau`` (default 0.05, as in the paper and TRL). Difference from TRL 1.16: the
    exponential term is evaluated as ``exp(-z + log sigmoid(z / tau))``, equal to ``m * exp(-z)``
    but finite where TRL's ``exp(-z) * m`` gives ``inf * 0 = nan`` (``z`` below about -88 in float32).
    """
    logits = beta * pairs.delta
    modulation = torch.sigmoid(logits / discopop_tau)
    logistic_term = -F.logsigmoid(logits) * (1 - modulation)
    exp_term = torch.exp(-logits + F.logsigmoid(logits / discopop_tau))
    return logistic_term + exp_term


@register_dpo_loss("sigmoid_norm")
def _sigmoid_norm(pairs: PairLogps, *, beta: float, **_) -> Tensor:
    """Length-normalised DPO (as TRL's ``sigmoid_norm``; cf. the length normalisation of SimPO,
    Meng et al., 2024, arXiv 2405.14734, and LN-DPO).

        L = -log sigmoid(beta * delta_avg)

    ``delta_avg`` as in ``ipo``. Requires ``chosen_lengths``/``rejected_lengths``.
    """
    return -F.logsigmoid(beta * pairs.per_token_delta("sigmoid_norm"))


DPO_LOSS_TYPES: tuple[str, ...] = tuple(DPO_LOSSES)
"""Names of the built-in DPO loss types. ``DPO_LOSSES`` also holds any registered later."""


def check_dpo_options(loss_type: str | Sequence[str] = "sigmoid", loss_weights: Sequence[float] | None = None,
                      label_smoothing: float = 0.0, f_divergence_type: str = "reverse_kl",
                      dpop_lambda: float = 0.0) -> tuple[list[str], list[float]]:
    """:func:`dpo_loss`'s options checked (``ValueError`` naming what is wrong); returns the loss types and their
    weights as lists."""
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = [1.0] * len(loss_types) if loss_weights is None else [float(w) for w in loss_weights]
    if not loss_types:
        raise ValueError("loss_type must name at least one DPO loss type")
    if len(weights) != len(loss_types):
        raise ValueError(
            f"loss_weights has {len(weights)} entries but loss_type has {len(loss_types)}: {loss_types}"
        )
    unknown = [name for name in loss_types if name not in DPO_LOSSES]
    if unknown:
        raise ValueError(f"Unknown DPO loss_type {unknown}; valid names are {sorted(DPO_LOSSES)}")
    if "robust" in loss_types and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"loss_type='robust' needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    if "exo_pair" in loss_types and not 0.0 < label_smoothing < 1.0:
        raise ValueError(
            f"loss_type='exo_pair' needs 0 < label_smoothing < 1 (the EXO paper recommends 1e-3), got {label_smoothing}"
        )
    if f_divergence_type not in F_DIVERGENCES:
        raise ValueError(f"f_divergence_type must be one of {F_DIVERGENCES}, got {f_divergence_type!r}")
    for option, changed in (("f_divergence_type", f_divergence_type != "reverse_kl"), ("dpop_lambda", dpop_lambda)):
        if changed and not set(loss_types) <= SCORE_LOSS_TYPES:
            raise ValueError(f"{option} shapes the chosen-minus-rejected score: it works with the loss types "
                             f"{sorted(SCORE_LOSS_TYPES)}, not {sorted(set(loss_types) - SCORE_LOSS_TYPES)}")
    if dpop_lambda < 0:
        raise ValueError(f"dpop_lambda must be >= 0, got {dpop_lambda}")
    return loss_types, weights


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    discopop_tau: float = 0.05,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    dpop_lambda: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """DPO-family loss per pair, from summed response log-probs of policy and reference (shape ``[B]``).

    Args:
        policy_chosen_logps, policy_rejected_logps: ``log pi_theta(y|x)`` summed over response tokens.
        ref_chosen_logps, ref_rejected_logps: the same under the frozen reference model.
        beta: DPO's ``beta`` (strength of the implicit KL penalty; IPO's ``tau``); a scalar tensor works
            too (beta-DPO's batch beta).
        loss_type: one name from ``DPO_LOSSES`` (see ``DPO_LOSS_TYPES``), or a list of names whose
            per-pair losses are summed with ``loss_weights`` (e.g. MPO-style combinations).
        loss_weights: one weight per name in ``loss_type`` (default: all 1.0).
        label_smoothing: ``eps``, the assumed fraction of flipped labels; used by ``sigmoid`` (cDPO),
            ``robust`` (needs ``0 <= eps < 0.5``), ``exo_pair`` (needs ``eps > 0``), ``aot``, ``aot_unpaired``.
        chosen_lengths, rejected_lengths: response token counts ``[B]``; required by ``ipo`` and
            ``sigmoid_norm``.
        discopop_tau: temperature of the ``discopop`` modulation.
        f_divergence_type: f-DPO's divergence (Wang et al., 2023, arXiv 2309.16240), one of
            ``F_DIVERGENCES``: each log-ratio becomes ``f'(pi/pi_ref)`` (see ``f_divergence_score``) in
            the score-based types (``SCORE_LOSS_TYPES``); ``reverse_kl`` is standard DPO.
        f_alpha_divergence_coef: ``alpha`` of ``alpha_divergence`` (TRL's default 0.5).
        dpop_lambda: DPO-Positive (Pal et al., 2024, arXiv 2402.13228, Eq. 3): the chosen score loses
            ``lambda * max(0, ref_logp_w - logp_w)``, penalising any drop of the chosen likelihood below the
            reference's; with ``sigmoid``, ``L = -log sigmoid(beta * (delta - lambda * max(0, ref_logp_w - logp_w)))``.
            The paper uses lambda = 50 (500 for some tasks); 0 turns it off.

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each ``[B]`` and at least float32.
        ``losses`` is the weighted sum over ``loss_type``; reduce it with ``.mean()``.
        ``chosen_rewards = beta * (logp_w - ref_logp_w)`` (and likewise rejected) are detached,
        as TRL logs them.

    TRL's ``sft`` loss type is not here: it needs per-token log-probs; use ``nll_loss`` on the
    chosen tokens with a weight (RPO). TRL's ``use_weighting`` (WPO) multiplies these losses by
    ``wpo_weights``; its ``ld_alpha`` (LD-DPO) changes the log-probs passed in (``ld_logps``).
    """
    options = DPOLoss(loss_type, loss_weights, label_smoothing, discopop_tau, f_divergence_type,
                      f_alpha_divergence_coef, dpop_lambda)
    return options(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=beta,
                   chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)


@dataclass(frozen=True)
class DPOLoss:
    """:func:`dpo_loss` with its options (the same names), checked once when built (``ValueError`` naming what is
    wrong); called with the log-probs, ``beta`` and the response lengths."""

    loss_type: str | Sequence[str] = "sigmoid"
    loss_weights: Sequence[float] | None = None
    label_smoothing: float = 0.0
    discopop_tau: float = 0.05
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    dpop_lambda: float = 0.0
    terms: tuple[tuple[str, float], ...] = field(init=False)  # (loss type, weight)

    def __post_init__(self):
        loss_types, weights = check_dpo_options(self.loss_type, self.loss_weights, self.label_smoothing,
                                                self.f_divergence_type, self.dpop_lambda)
        object.__setattr__(self, "terms", tuple(zip(loss_types, weights)))

    def __call__(self, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
                 ref_rejected_logps: Tensor, *, beta: float | Tensor = 0.1, chosen_lengths: Tensor | None = None,
                 rejected_lengths: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        logps = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
        shapes = {tuple(t.shape) for t in logps}
        if len(shapes) != 1:
            raise ValueError(f"policy/reference chosen/rejected log-probs must all have the same shape [B], got "
                             f"{shapes}")
        pairs = PairLogps(
            policy_chosen=upcast(policy_chosen_logps),
            policy_rejected=upcast(policy_rejected_logps),
            ref_chosen=upcast(ref_chosen_logps),
            ref_rejected=upcast(ref_rejected_logps),
            chosen_lengths=None if chosen_lengths is None else torch.as_tensor(chosen_lengths),
            rejected_lengths=None if rejected_lengths is None else torch.as_tensor(rejected_lengths),
            f_divergence=self.f_divergence_type,
            f_alpha=self.f_alpha_divergence_coef,
            dpop_lambda=self.dpop_lambda,
        )
        losses = sum(
            weight * DPO_LOSSES[name](pairs, beta=beta, label_smoothing=self.label_smoothing,
                                      discopop_tau=self.discopop_tau)
            for name, weight in self.terms
        )
        return losses, beta * pairs.chosen_logratios.detach(), beta * pairs.rejected_logratios.detach()


def wpo_weights(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_log_sum_sq: Tensor,
    rejected_log_sum_sq: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
) -> Tensor:
    """WPO's pair weights (Zhou et al., 2024, arXiv 2406.11827, Eq. 2, with its sampling alignment), as TRL's
    ``use_weighting``: how likely the policy itself is to generate the pair, per token,

        w(y)      = exp( (1/|y|) sum_t [ log pi(y_t | x, y_<t) - log sum_v pi(v | x, y_<t)^2 ] )
        weight    = w(y_w) * w(y_l)        (no gradient)

    from each response's summed log-prob, its summed ``log sum_v p_v^2`` (``SequenceStats.log_sum_sq_probs``)
    and its token count (clamped to >= 1). Multiply the per-pair DPO losses by it. ``[B]``, detached.
    """
    def weight(logps: Tensor, log_sum_sq: Tensor, lengths: Tensor) -> Tensor:
        aligned = upcast(logps).detach() - upcast(log_sum_sq).detach()
        return torch.exp(aligned / lengths.to(aligned).clamp(min=1.0))

    return weight(chosen_logps, chosen_log_sum_sq, chosen_lengths) * weight(rejected_logps, rejected_log_sum_sq,
                                                                            rejected_lengths)


def ld_logps(logps: Tensor, public_logps: Tensor, alpha: float) -> Tensor:
    """LD-DPO's length-desensitised log-prob (Liu et al., 2024, arXiv 2409.06411), as TRL's ``ld_alpha``:

        logp_LD(y) = logp(y_<=l) + alpha * (logp(y) - logp(y_<=l))

    where ``logp(y_<=l)`` (``public_logps``) sums the first ``l`` response tokens, ``l`` the public length: the
    shorter of the pair's two responses. ``alpha = 1`` is plain DPO, ``alpha = 0`` ignores tokens past ``l``.
    Apply it to policy and reference log-probs alike.
    """
    return public_logps + alpha * (logps - public_logps)


def beta_dpo_running_stats(gaps: Tensor, mean: Tensor, std: Tensor, momentum: float = 0.9) -> tuple[Tensor, Tensor]:
    """beta-DPO's running estimate of the reward discrepancy (Wu et al., 2024, arXiv 2407.08639, Sec. 4):

        M_0   <- m * M_0   + (1 - m) * mean_i M_i
        sigma <- m * sigma + (1 - m) * std_i M_i

    over the (all-ranks) batch's margins ``M_i = gaps`` = ``delta``, the log-ratio margins. As the authors'
    code: both start at 0, each training batch updates them before it is filtered, ``m = 0.9``, and the
    standard deviation is the unbiased one (the biased one for a single pair). Detached.
    """
    gaps = upcast(gaps).detach()
    batch_std = gaps.std(correction=1 if gaps.numel() > 1 else 0)
    return momentum * mean + (1 - momentum) * gaps.mean(), momentum * std + (1 - momentum) * batch_std


def beta_dpo_filter(gaps: Tensor, mean: Tensor, std: Tensor, keep: int, uniform: Tensor) -> Tensor:
    """beta-DPO's data filter: which ``keep`` pairs of the batch train, drawn without replacement with

        p_i  proportional to  exp(-(M_i - M_0)^2 / (2 sigma^2))

    so outliers of the margin distribution, too easy or too hard, rarely train. Drawn by the Gumbel-top-k trick
    (the ``keep`` largest ``log p_i - log(-log U_i)``, ``U_i = uniform`` in (0, 1)): the same distribution as
    sequential sampling without replacement (the authors' ``torch.multinomial``), but finite in log space
    when every ``p_i`` underflows, and uniform when ``sigma = 0`` (all margins equal, as at the first step).
    Returns a bool mask ``[B]``.
    """
    z = (upcast(gaps) - mean) / std.clamp(min=torch.finfo(torch.float32).tiny)
    log_p = torch.where(gaps == mean, torch.zeros_like(z), -0.5 * z**2)
    keys = log_p - torch.log(-torch.log(uniform.to(log_p)))
    mask = torch.zeros_like(gaps, dtype=torch.bool)
    mask[keys.topk(keep).indices] = True
    return mask


def beta_dpo_beta(beta: float, alpha: float, gaps: Tensor, selected: Tensor, mean: Tensor) -> Tensor:
    """beta-DPO's batch beta (Wu et al., 2024, arXiv 2407.08639, Eq. 7):

        beta_batch = beta * (1 + alpha * (mean over the selected pairs of M_i - M_0)),   clamped to >= 1e-3

    larger for batches whose margins run above the running mean (informative pairs), smaller below. Detached.
    """
    return (beta * (1 + alpha * (upcast(gaps)[selected].mean() - mean))).clamp(min=1e-3).detach()
