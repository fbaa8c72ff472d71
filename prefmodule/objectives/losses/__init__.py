"""Preference-optimisation losses as pure functions of per-pair (or, for KTO, per-row) log-probabilities.

Every function here takes tensors of shape ``[B]`` (one value per preference pair or unpaired row) and
returns tensors of shape ``[B]``; nothing here knows about models, data or Lightning. Inputs are upcast to
at least float32 (float64 stays float64, so ``torch.autograd.gradcheck`` works), whatever the
model's precision.

GRPO and RLOO (``policy_gradient``) take ``[B, T]`` per-token log-probs of sampled completions and ``[N]``
rewards or advantages instead; see that module.

Notation. For a pair ``(x, y_w, y_l)``:

* ``logp_w = log pi_theta(y_w|x)`` and ``logp_l`` are **summed** response log-probs (DPO family);
  ``ref_logp_w``, ``ref_logp_l`` the same under the frozen reference model.
* ``chosen_logratio = logp_w - ref_logp_w``, ``rejected_logratio = logp_l - ref_logp_l``,
  ``delta = chosen_logratio - rejected_logratio`` and ``logits = beta * delta``.
* ``a = avg log P(y_w|x)``, ``b = avg log P(y_l|x)`` are **length-normalised** log-probs (ORPO,
  SimPO), i.e. the log of the geometric-mean token probability.
* KTO's rows ``(x, y, desirable)`` have ``r = log pi_theta(y|x) - log pi_ref(y|x)``.

DPO loss types live in a registry (``DPO_LOSSES``) filled by ``@register_dpo_loss(name)``; their
semantics and defaults follow Hugging Face TRL 1.16's ``DPOTrainer`` (``_compute_loss``), with the
differences listed in each docstring.
"""

from prefmodule.objectives.losses.bradley_terry import bradley_terry_loss
from prefmodule.objectives.losses.dpo import (
    DPO_LOSS_TYPES,
    DPO_LOSSES,
    F_DIVERGENCES,
    DPOLoss,
    SCORE_LOSS_TYPES,
    PairLogps,
    beta_dpo_beta,
    beta_dpo_filter,
    beta_dpo_running_stats,
    check_dpo_options,
    dpo_loss,
    f_divergence_score,
    ld_logps,
    register_dpo_loss,
    wpo_weights,
)
from prefmodule.objectives.losses.kto import KTO_LOSS_TYPES, KTOLoss, kto_kl, kto_loss
from prefmodule.objectives.losses.odds_ratio import (
    CPO_LOSS_TYPES,
    CPOLoss,
    alphapo_rewards,
    check_cpo_options,
    cpo_loss,
    log1mexp,
    nll_loss,
    orpo_loss,
    simpo_loss,
)
from prefmodule.objectives.losses.policy_gradient import (
    GRPO_LOSS_TYPES,
    IMPORTANCE_SAMPLING_LEVELS,
    REWARD_AGGREGATIONS,
    SCALE_REWARDS,
    GRPOAdvantages,
    GRPOLoss,
    GroupAdvantages,
    PolicyGradientLoss,
    RLOOAdvantages,
    RLOOLoss,
    check_grpo_options,
    grpo_advantages,
    grpo_loss,
    rloo_advantages,
    rloo_loss,
)

__all__ = [
    "CPO_LOSS_TYPES",
    "CPOLoss",
    "DPO_LOSSES",
    "DPO_LOSS_TYPES",
    "DPOLoss",
    "F_DIVERGENCES",
    "GRPO_LOSS_TYPES",
    "GRPOAdvantages",
    "GRPOLoss",
    "GroupAdvantages",
    "IMPORTANCE_SAMPLING_LEVELS",
    "KTO_LOSS_TYPES",
    "KTOLoss",
    "PairLogps",
    "PolicyGradientLoss",
    "REWARD_AGGREGATIONS",
    "RLOOAdvantages",
    "RLOOLoss",
    "SCALE_REWARDS",
    "SCORE_LOSS_TYPES",
    "alphapo_rewards",
    "beta_dpo_beta",
    "beta_dpo_filter",
    "beta_dpo_running_stats",
    "bradley_terry_loss",
    "check_cpo_options",
    "check_dpo_options",
    "check_grpo_options",
    "cpo_loss",
    "dpo_loss",
    "f_divergence_score",
    "grpo_advantages",
    "grpo_loss",
    "kto_kl",
    "kto_loss",
    "ld_logps",
    "log1mexp",
    "nll_loss",
    "orpo_loss",
    "register_dpo_loss",
    "rloo_advantages",
    "rloo_loss",
    "simpo_loss",
    "wpo_weights",
]
