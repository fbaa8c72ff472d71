"""Policy gradient from rewards: GRPO and RLOO advantages and clipped surrogate losses.

Pure functions of tensors, as the rest of the losses package: a batch of ``N = groups * G`` completions, the
``G`` completions of one prompt consecutive. The formulas are those of Hugging Face TRL 1.16's
``GRPOTrainer`` (``_generate_and_score_completions`` for the advantages, ``_compute_loss`` for the loss) and
``RLOOTrainer`` (the same two methods), restricted to one process, gradient accumulation 1, no vLLM
importance-sampling correction, no entropy mask, no ``delta`` clamp, no off-policy mask.

* GRPO (Shao et al., 2024, DeepSeekMath, arXiv 2402.03300): group-normalised advantages and a PPO-style clipped
  ratio (Schulman et al., 2017, arXiv 1707.06347) with the k3 KL estimator added per token.
* Dr. GRPO (Liu et al., 2025, arXiv 2503.20783): no std scaling (``scale_rewards="none"``), ``loss_type="dr_grpo"``.
* DAPO (Yu et al., 2025, arXiv 2503.14476): clip-higher (``epsilon_high``) and token-level aggregation over the
  generation batch (``loss_type="dapo"``).
* GSPO (Zheng et al., 2025, arXiv 2507.18071): one ratio per sequence (``importance_sampling_level="sequence"``).
* GDPO (``aggregation="normalize_then_sum"``): each reward normalised in its group before the weighted sum.
* RLOO (Ahmadian et al., 2024, arXiv 2402.14740): leave-one-out baseline, KL as a reward penalty, a clipped
  ratio of whole-sequence probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from prefmodule.errors import finite, require
from prefmodule.objectives.losses.common import upcast

GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
REWARD_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")

_STD_EPS = 1e-4  # TRL's constant in the std division (not a tunable option there either)


def nanstd(x: Tensor, dim: int | None = None, keepdim: bool = False) -> Tensor:
    """Standard deviation ignoring NaNs, with Bessel's correction; NaN where fewer than two values are not NaN.

    The same arithmetic as ``trl.trainer.utils.nanstd`` (torch has no ``nanstd``)."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    variance = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    count = torch.sum(~torch.isnan(x), dim=dim, keepdim=True)
    correction = torch.where(count > 1, count / (count - 1), torch.full_like(variance, float("nan")))
    std = torch.sqrt(variance * correction)
    if keepdim:
        return std
    return std.squeeze() if dim is None else std.squeeze(dim)


@dataclass
class GroupAdvantages:
    """What :func:`grpo_advantages` and :func:`rloo_advantages` return, each ``[N]``."""

    advantages: Tensor  # 0 where unscorable (every reward None) or where the baseline is undefined
    rewards: Tensor  # weighted sum of the raw rewards (no KL penalty), NaN where every reward is None: for logging
    std_is_zero: Tensor  # bool: the std used for scaling is ~0 (TRL's frac_reward_zero_std is its mean)


def _weighted_rewards(rewards_per_func: Tensor, num_generations: int,
                      reward_weights: Tensor | Sequence[float] | None) -> tuple[Tensor, Tensor, Tensor]:
    """``(rewards_per_func [N, F] upcast, weights [F], weighted sum [N] with NaN where unscorable)``."""
    r = upcast(rewards_per_func.detach())
    if r.dim() == 1:
        r = r.unsqueeze(1)
    if r.dim() != 2:
        raise ValueError(f"rewards_per_func must be [N, F], got shape {tuple(rewards_per_func.shape)}")
    if r.size(0) % num_generations:
        raise ValueError(f"{r.size(0)} completions do not split into groups of num_generations={num_generations}")
    if reward_weights is None:
        weights = torch.ones(r.size(1), dtype=r.dtype, device=r.device)
    else:
        weights = torch.as_tensor(reward_weights).to(device=r.device, dtype=r.dtype)
    if weights.shape != (r.size(1),):
        raise ValueError(f"reward_weights has shape {tuple(weights.shape)}, expected ({r.size(1)},): one per reward")
    unscorable = torch.isnan(r).all(dim=1)
    rewards = (r * weights.unsqueeze(0)).nansum(dim=1).masked_fill(unscorable, float("nan"))
    return r, weights, rewards


def grpo_advantages(rewards_per_func: Tensor, num_generations: int, reward_weights: Tensor | None = None,
                    scale_rewards: str = "group", aggregation: str = "sum_then_normalize") -> GroupAdvantages:
    """GRPO's group-relative advantages, as TRL 1.16's ``GRPOTrainer._generate_and_score_completions``.

    ``rewards_per_func`` is ``[N, F]`` (a ``[N]`` tensor is one reward), NaN where a reward function returned
    None; ``reward_weights`` ``[F]`` (default all 1). A row where every reward is NaN is *unscorable*: it is left
    out of the means and stds and its advantage is 0. With ``r_i = sum_k w_k r_ik`` (NaN terms skipped) and the
    NaN-ignoring ``mean``/``std`` (Bessel-corrected) over the ``G`` completions of ``i``'s group:

        sum_then_normalize, group:  A_i = (r_i - mean_group r) / (std_group r + 1e-4)
        sum_then_normalize, batch:  A_i = (r_i - mean_group r) / (std_batch r + 1e-4)
        sum_then_normalize, none:   A_i =  r_i - mean_group r                              (Dr. GRPO)
        normalize_then_sum (GDPO):  s_ik = (r_ik - mean_group r_k) / (std_group r_k + 1e-4),
                                    s_i = sum_k w_k s_ik,   A_i = (s_i - mean_batch s) / (std_batch s + 1e-4)

    ``scale_rewards`` plays no part in ``normalize_then_sum`` (as in TRL). ``std_is_zero`` flags the rows whose
    scaling std (group, batch or, for ``none``, the group's, as TRL logs it) is ~0; a NaN std (fewer than two
    scorable rewards) is not flagged, as in TRL. A NaN advantage (unscorable row, single scorable completion in
    its group) becomes 0. No gradient flows through the result.
    """
    return GRPOAdvantages(num_generations, reward_weights, scale_rewards, aggregation)(rewards_per_func)


def _check_num_generations(num_generations: int) -> None:
    if not isinstance(num_generations, int) or isinstance(num_generations, bool) or num_generations < 1:
        raise ValueError(f"num_generations must be an integer >= 1, got {num_generations!r}")


@dataclass(frozen=True)
class GRPOAdvantages:
    """:func:`grpo_advantages` with its options, checked once when built (``ValueError`` naming what is wrong);
    called with the rewards."""

    num_generations: int
    reward_weights: Tensor | Sequence[float] | None = None
    scale_rewards: str = "group"
    aggregation: str = "sum_then_normalize"

    def __post_init__(self):
        _check_num_generations(self.num_generations)
        if self.scale_rewards not in SCALE_REWARDS:
            raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {self.scale_rewards!r}")
        if self.aggregation not in REWARD_AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {REWARD_AGGREGATIONS}, got {self.aggregation!r}")

    def __call__(self, rewards_per_func: Tensor) -> GroupAdvantages:
        g, scale = self.num_generations, self.scale_rewards
        r, weights, rewards = _weighted_rewards(rewards_per_func, g, self.reward_weights)
        if self.aggregation == "sum_then_normalize":
            mean = torch.nanmean(rewards.view(-1, g), dim=1).repeat_interleave(g)
            if scale in ("group", "none"):
                std = nanstd(rewards.view(-1, g), dim=1).repeat_interleave(g) if g > 1 else torch.zeros_like(rewards)
            else:
                std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
            advantages = rewards - mean
            if scale != "none":
                advantages = advantages / (std + _STD_EPS)
        else:
            unscorable = torch.isnan(rewards)
            grouped = r.view(-1, g, r.size(1))
            mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
            std_k = nanstd(grouped, dim=1, keepdim=True) if g > 1 else torch.zeros_like(mean_k)
            normalized = ((grouped - mean_k) / (std_k + _STD_EPS)).view(-1, r.size(1))
            summed = (normalized * weights.unsqueeze(0)).nansum(dim=1).masked_fill(unscorable, float("nan"))
            std = nanstd(summed).expand_as(summed) if summed.numel() > 1 else torch.zeros_like(summed)
            advantages = (summed - torch.nanmean(summed)) / (std + _STD_EPS)
        std_is_zero = torch.isclose(std, torch.zeros_like(std))
        return GroupAdvantages(torch.nan_to_num(advantages, nan=0.0), rewards, std_is_zero)


def rloo_advantages(rewards_per_func: Tensor, num_generations: int, reward_weights: Tensor | None = None,
                    kl: Tensor | None = None, beta: float = 0.0, normalize: bool = False) -> GroupAdvantages:
    """RLOO's leave-one-out advantages, as TRL 1.16's ``RLOOTrainer._generate_and_score_completions``.

    With ``r_i = sum_k w_k r_ik`` (NaN terms skipped; NaN where every reward is None) and the KL penalty
    ``kl_i = sum_t (log pi_old(y_t) - log pi_ref(y_t))`` over the completion's tokens (``[N]``, needed when
    ``beta != 0``; the first-order estimator of the RLOO paper, which may be negative):

        r'_i = r_i - beta * kl_i
        A_i  = r'_i - (sum_{j != i, j scorable} r'_j) / (n_scorable - 1)        over i's group
        A    = (A - mean A) / (std A + 1e-4)    over the batch's scorable rows, when ``normalize``

    NaN advantages (unscorable rows, a group with one scorable completion) become 0. ``rewards`` holds ``r``
    (without the KL term, as TRL logs ``reward``); ``std_is_zero`` flags rows whose group std of ``r'`` is ~0.
    TRL's ``reward_clip_range`` is not supported here. No gradient flows through the result.
    """
    return RLOOAdvantages(num_generations, reward_weights, beta, normalize)(rewards_per_func, kl)


@dataclass(frozen=True)
class RLOOAdvantages:
    """:func:`rloo_advantages` with its options, checked once when built (``ValueError`` naming what is wrong);
    called with the rewards and, when ``beta != 0``, the KL."""

    num_generations: int
    reward_weights: Tensor | Sequence[float] | None = None
    beta: float = 0.0
    normalize: bool = False

    def __post_init__(self):
        _check_num_generations(self.num_generations)

    def __call__(self, rewards_per_func: Tensor, kl: Tensor | None = None) -> GroupAdvantages:
        g = self.num_generations
        _, _, rewards = _weighted_rewards(rewards_per_func, g, self.reward_weights)
        penalised = rewards
        if self.beta != 0.0:
            if kl is None:
                raise ValueError("rloo_advantages with beta != 0 needs kl (the summed log pi_old - log pi_ref)")
            penalised = rewards - self.beta * upcast(kl.detach()).to(rewards.device).view(-1)
        grouped = penalised.view(-1, g)
        std = nanstd(grouped, dim=1) if g > 1 else torch.zeros_like(grouped[:, 0])
        if g > 1:
            scorable = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
            baselines = (torch.nansum(grouped, dim=1, keepdim=True) - grouped) / (scorable - 1)
            advantages = penalised - baselines.view(-1)
        else:
            advantages = torch.zeros_like(penalised)
        if self.normalize:
            advantages = (advantages - torch.nanmean(advantages)) / (nanstd(advantages) + _STD_EPS)
        std_is_zero = torch.isclose(std, torch.zeros_like(std)).repeat_interleave(g)
        return GroupAdvantages(torch.nan_to_num(advantages, nan=0.0), rewards, std_is_zero)


@dataclass
class PolicyGradientLoss:
    """What :func:`grpo_loss` and :func:`rloo_loss` return. ``ratio`` and the clip flags are detached."""

    loss: Tensor  # scalar
    per_token_kl: Tensor | None  # [B, T] (None when beta == 0); k3, with gradient
    is_low_clipped: Tensor  # [B, T] (token level) or [B, 1] (sequence level) bool: ratio < 1 - eps_low and A < 0
    is_high_clipped: Tensor  # same shape: ratio > 1 + eps_high and A > 0
    ratio: Tensor  # coef_1 = exp(log-ratio), same shape

    def metrics(self, mask: Tensor) -> dict[str, Tensor]:
        """TRL's ``kl`` and ``clip_ratio/*`` metrics over this (one process's) batch, as 0-dim tensors.

        Token-level flags are averaged over the mask's tokens, sequence-level ones over the sequences
        (``clip_ratio/low_min`` and ``high_max`` take the per-sequence means). A multi-process trainer should
        gather the per-sequence values and sums before reducing, as TRL does; these are the local values."""
        mask = upcast(mask.detach())

        def masked_mean(x: Tensor) -> Tensor:
            x = upcast(x.detach())
            if x.size(1) == 1:
                return x.mean()
            return (x * mask).sum() / mask.sum().clamp(min=1.0)

        def seq_mean(x: Tensor) -> Tensor:
            x = upcast(x.detach())
            return x.squeeze(1) if x.size(1) == 1 else (x * mask).sum(-1) / mask.sum(-1)

        low, high = self.is_low_clipped, self.is_high_clipped
        out = {
            "clip_ratio/low_mean": masked_mean(low),
            "clip_ratio/high_mean": masked_mean(high),
            "clip_ratio/region_mean": masked_mean(low | high),
            "clip_ratio/low_min": _nan_reduce(seq_mean(low), torch.min),
            "clip_ratio/high_max": _nan_reduce(seq_mean(high), torch.max),
        }
        if self.per_token_kl is not None:
            out["kl"] = masked_mean(self.per_token_kl)
        return out


def _nan_reduce(x: Tensor, reduce) -> Tensor:
    """``trl.trainer.utils.nanmin``/``nanmax``: the min/max over the non-NaN values, NaN when there are none."""
    kept = x[~torch.isnan(x)]
    return reduce(kept) if kept.numel() else torch.tensor(float("nan"), dtype=x.dtype, device=x.device)


def _clipped_surrogate(coef_1: Tensor, advantages: Tensor, epsilon: float,
                       epsilon_high: float | None) -> tuple[Tensor, Tensor, Tensor]:
    """``(-min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A), is_low_clipped, is_high_clipped)``."""
    eps_low, eps_high = epsilon, epsilon if epsilon_high is None else epsilon_high
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    ratio = coef_1.detach()
    is_low_clipped = (ratio < 1 - eps_low) & (advantages < 0)
    is_high_clipped = (ratio > 1 + eps_high) & (advantages > 0)
    return per_token_loss, is_low_clipped, is_high_clipped


def grpo_loss(logps: Tensor, old_logps: Tensor | None, ref_logps: Tensor | None, advantages: Tensor, mask: Tensor,
              *, loss_type: str = "dapo", beta: float = 0.0, epsilon: float = 0.2, epsilon_high: float | None = None,
              importance_sampling_level: str = "token", max_completion_length: int | None = None,
              num_items_in_batch: Tensor | float | None = None) -> PolicyGradientLoss:
    """GRPO's clipped surrogate with a k3 KL term, as TRL 1.16's ``GRPOTrainer._compute_loss``.

    ``logps``, ``old_logps``, ``ref_logps`` are ``[B, T]`` per-token log-probs of the completion tokens under the
    policy, the sampling policy and the reference; ``old_logps=None`` means the sampling policy is the current
    one (``num_iterations=1``): ``old = logps.detach()``, so ``rho = 1`` in value but not in gradient.
    ``advantages`` ``[B]`` (:func:`grpo_advantages`), ``mask`` ``[B, T]`` 0/1 over completion tokens.

        token level:     rho_t = exp(logp_t - old_t)
        sequence level:  rho   = exp(sum_t m_t (logp_t - old_t) / max(1, sum_t m_t))         (GSPO)
        l_t  = -min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) + beta * KL_t,  eps_low = epsilon,
               eps_high = epsilon_high (default epsilon)
        KL_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1                                      (k3; only if beta != 0)

    Aggregated over the masked tokens by ``loss_type``:

        grpo:     mean over completions of (sum_t m_t l_t / max(1, sum_t m_t))
        bnpo:     sum m l / max(1, sum m)
        dr_grpo:  sum m l / (B * max_completion_length)         (default max_completion_length: T)
        dapo:     sum m l / max(1, num_items_in_batch)          (default num_items_in_batch: sum m)

    ``num_items_in_batch`` is the number of completion tokens of the whole generation batch, so that the losses
    of the micro-batches that share a generation batch sum to the DAPO loss of that batch (TRL divides the
    generation batch's count by ``num_processes * steps_per_generation / gradient_accumulation_steps``: with one
    process and ``steps_per_generation = gradient_accumulation_steps`` that is this count itself). The other
    loss types are per micro-batch; TRL also divides them by the gradient-accumulation steps, which Lightning
    does itself, so they are not divided here. Masked positions must hold finite values.
    """
    return GRPOLoss(loss_type, beta, epsilon, epsilon_high, importance_sampling_level, max_completion_length)(
        logps, old_logps, ref_logps, advantages, mask, num_items_in_batch)


@dataclass(frozen=True)
class GRPOLoss:
    """:func:`grpo_loss` with its options, checked once when built (``ValueError`` naming what is wrong); called
    with the log-probs, advantages, mask and ``num_items_in_batch``."""

    loss_type: str = "dapo"
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None
    importance_sampling_level: str = "token"
    max_completion_length: int | None = None

    def __post_init__(self):
        if self.loss_type not in GRPO_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {GRPO_LOSS_TYPES}, got {self.loss_type!r}")
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, "
                             f"got {self.importance_sampling_level!r}")

    def __call__(self, logps: Tensor, old_logps: Tensor | None, ref_logps: Tensor | None, advantages: Tensor,
                 mask: Tensor, num_items_in_batch: Tensor | float | None = None) -> PolicyGradientLoss:
        beta = self.beta
        logps = upcast(logps)
        old_logps = logps.detach() if old_logps is None else upcast(old_logps)
        mask = mask.to(logps.dtype)
        advantages = upcast(advantages).to(logps.device)
        if advantages.dim() == 1:
            advantages = advantages.unsqueeze(1)

        log_ratio = logps - old_logps
        if self.importance_sampling_level == "token":
            log_importance_weights = log_ratio
        else:
            log_importance_weights = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
        coef_1 = torch.exp(log_importance_weights)

        per_token_kl = None
        if beta != 0.0:
            if ref_logps is None:
                raise ValueError("grpo_loss with beta != 0 needs ref_logps")
            ref_logps = upcast(ref_logps)
            per_token_kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1

        per_token_loss, is_low_clipped, is_high_clipped = _clipped_surrogate(coef_1, advantages, self.epsilon,
                                                                             self.epsilon_high)
        if per_token_kl is not None:
            per_token_loss = per_token_loss + beta * per_token_kl

        if self.loss_type == "grpo":
            loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
        elif self.loss_type == "bnpo":
            loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
        elif self.loss_type == "dr_grpo":
            length = mask.size(1) if self.max_completion_length is None else self.max_completion_length
            loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * length)
        else:
            normalizer = mask.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch)
            loss = (per_token_loss * mask).sum() / normalizer.to(logps).clamp(min=1.0)
        return PolicyGradientLoss(loss, per_token_kl, is_low_clipped, is_high_clipped, coef_1.detach())


def rloo_loss(logps: Tensor, old_logps: Tensor | None, advantages: Tensor, mask: Tensor, *, epsilon: float = 0.2,
              epsilon_high: float | None = None) -> PolicyGradientLoss:
    """RLOO's clipped surrogate on whole sequences, as TRL 1.16's ``RLOOTrainer._compute_loss``.

    With summed log-probs ``logp = sum_t m_t logp_t`` and ``old = sum_t m_t old_t`` (``old_logps=None``: the
    current policy, detached; ``[B, T]`` inputs, ``mask`` ``[B, T]``, ``advantages`` ``[B]``
    from :func:`rloo_advantages`):

        rho = exp(logp - old),   loss = mean_i -min(rho_i A_i, clip(rho_i, 1 - eps_low, 1 + eps_high) A_i)

    The KL to the reference is in the advantages (a reward penalty), not in the loss: ``per_token_kl`` is None.
    ``ratio`` and the clip flags are ``[B, 1]``.
    """
    return RLOOLoss(epsilon, epsilon_high)(logps, old_logps, advantages, mask)


@dataclass(frozen=True)
class RLOOLoss:
    """:func:`rloo_loss` with its options; called with the log-probs, advantages and mask."""

    epsilon: float = 0.2
    epsilon_high: float | None = None

    def __call__(self, logps: Tensor, old_logps: Tensor | None, advantages: Tensor, mask: Tensor) -> PolicyGradientLoss:
        logps = upcast(logps)
        old_logps = logps.detach() if old_logps is None else upcast(old_logps)
        mask = mask.to(logps.dtype)
        advantages = upcast(advantages).to(logps.device).view(-1, 1)
        coef_1 = torch.exp((logps * mask).sum(1, keepdim=True) - (old_logps * mask).sum(1, keepdim=True))
        per_sequence_loss, is_low_clipped, is_high_clipped = _clipped_surrogate(coef_1, advantages, self.epsilon,
                                                                                self.epsilon_high)
        return PolicyGradientLoss(per_sequence_loss.mean(), None, is_low_clipped, is_high_clipped, coef_1.detach())


def check_grpo_options(loss_type: str = "dapo", scale_rewards: str = "group",
                       aggregation: str = "sum_then_normalize", importance_sampling_level: str = "token",
                       epsilon: float = 0.2, epsilon_high: float | None = None, beta: float = 0.0,
                       num_generations: int = 8) -> None:
    """The GRPO/RLOO options checked: a :class:`~prefmodule.errors.ConfigError` naming the option (``model.<name>``).

    RLOO passes only what it has (``epsilon``, ``epsilon_high``, ``beta``, ``num_generations``); the defaults pass.
    Stricter than TRL: ``scale_rewards`` other than ``group`` with ``normalize_then_sum`` is an error (TRL ignores
    it), and ``epsilon`` must lie in (0, 1) so that the lower clip bound ``1 - epsilon`` is a positive ratio.
    """
    require(loss_type in GRPO_LOSS_TYPES, "model.loss_type", loss_type, f"must be one of {list(GRPO_LOSS_TYPES)}")
    require(scale_rewards in SCALE_REWARDS, "model.scale_rewards", scale_rewards,
            f"must be one of {list(SCALE_REWARDS)}")
    require(aggregation in REWARD_AGGREGATIONS, "model.multi_objective_aggregation", aggregation,
            f"must be one of {list(REWARD_AGGREGATIONS)}")
    require(aggregation == "sum_then_normalize" or scale_rewards == "group", "model.scale_rewards", scale_rewards,
            "applies to multi_objective_aggregation='sum_then_normalize' only (normalize_then_sum scales each "
            "reward by its group's std and the sum by the batch's); leave it at 'group'")
    require(importance_sampling_level in IMPORTANCE_SAMPLING_LEVELS, "model.importance_sampling_level",
            importance_sampling_level, f"must be one of {list(IMPORTANCE_SAMPLING_LEVELS)}")
    require(finite(epsilon) and 0 < epsilon < 1, "model.epsilon", epsilon,
            "must be in (0, 1): the ratio is clipped to [1 - epsilon, 1 + epsilon_high]")
    require(epsilon_high is None or (finite(epsilon_high) and epsilon_high > 0), "model.epsilon_high", epsilon_high,
            "must be > 0 (DAPO's clip-higher uses 0.28), or null for epsilon")
    require(finite(beta) and beta >= 0, "model.beta", beta,
            "must be >= 0 (the weight of the KL to the reference; 0 needs no reference model)")
    require(isinstance(num_generations, int) and not isinstance(num_generations, bool) and num_generations >= 2,
            "model.num_generations", num_generations,
            "must be an integer >= 2 (completions per prompt: the advantages compare a prompt's completions)")
