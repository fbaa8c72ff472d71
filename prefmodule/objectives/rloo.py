"""RLOO (Ahmadian et al., 2024, Back to Basics: REINFORCE Style Optimization, arXiv 2402.14740): groups of
completions sampled each step, the leave-one-out baseline, the KL to the reference as a reward penalty, as TRL
1.16's ``RLOOTrainer``."""

from __future__ import annotations

from torch import Tensor

from prefmodule.objectives.losses.policy_gradient import (
    GroupAdvantages, PolicyGradientLoss, RLOOAdvantages, RLOOLoss, check_grpo_options,
)
from prefmodule.objectives.policy_gradient import PolicyGradientModule


class RLOOModule(PolicyGradientModule):
    """REINFORCE Leave-One-Out on prompts (``configs/rloo.yaml``): sampling, scoring, metrics and data as
    :class:`~prefmodule.objectives.grpo.GRPOModule`; the advantages
    (:func:`~prefmodule.objectives.losses.rloo_advantages`) subtract from each completion's reward the mean of the
    other completions of its prompt, after the KL penalty:

        r'_i = r_i - beta * sum_t (log pi_old(y_t) - log pi_ref(y_t)),     A_i = r'_i - mean_{j != i} r'_j

    and the loss (:func:`~prefmodule.objectives.losses.rloo_loss`) clips the ratio of whole-completion
    probabilities, ``-min(rho A, clip(rho, 1 - epsilon, 1 + epsilon_high) A)`` averaged over completions. ``kl`` is
    logged as the mean per-token log-ratio of the sampling policy to the reference (``beta > 0``).

    Args:
        num_generations: completions per prompt (TRL's default 2).
        beta: weight of the KL penalty in the reward (TRL's default 0.05); 0 holds no reference model.
        normalize_advantages: normalise the advantages over the batch (all ranks' completions).
        **kwargs: as :class:`~prefmodule.objectives.grpo.GRPOModule` (``reward``, ``reward_weights``,
            ``max_new_tokens``, ``temperature``, ``epsilon``, ``epsilon_high``, ``num_iterations``,
            ``mask_truncated_completions``, ``reference``, ...).
    """

    citation = ("RLOO", "Ahmadian et al., 2024, Back to Basics: Revisiting REINFORCE Style Optimization for "
                "Learning from Human Feedback in LLMs", "2402.14740")

    def __init__(self, model: str, reward: str | list[str], reward_weights: list[float] | None = None,
                 num_generations: int = 2, max_new_tokens: int = 512, temperature: float = 1.0, top_p: float = 1.0,
                 beta: float = 0.05, epsilon: float = 0.2, epsilon_high: float | None = None,
                 normalize_advantages: bool = False, num_iterations: int = 1,
                 mask_truncated_completions: bool = False, generation_seed: int = 0, **kwargs):
        check_grpo_options(epsilon=epsilon, epsilon_high=epsilon_high, beta=beta, num_generations=num_generations)
        super().__init__(model, reward, reward_weights, num_generations, max_new_tokens, temperature, top_p, beta,
                         epsilon, epsilon_high, num_iterations, mask_truncated_completions, generation_seed, **kwargs)
        self.advantages = RLOOAdvantages(num_generations, tuple(self.scores.weights), beta, normalize_advantages)
        self.loss = RLOOLoss(epsilon, epsilon_high)

    @property
    def kl_in_reward(self) -> bool:
        return self.hparams.beta > 0

    def group_advantages(self, rewards: Tensor, kl: Tensor | None) -> GroupAdvantages:
        return self.advantages(rewards, kl)

    def policy_loss(self, logps: Tensor, old_logps: Tensor | None, ref_logps: Tensor | None, advantages: Tensor,
                    mask: Tensor, num_items: Tensor) -> PolicyGradientLoss:
        return self.loss(logps, old_logps, advantages, mask)
