"""GRPO (Shao et al., 2024, DeepSeekMath, arXiv 2402.03300) and its variants DAPO, Dr. GRPO and GSPO: groups of
completions sampled each step, scored by rewards, and a clipped policy gradient on group-relative advantages, as
TRL 1.16's ``GRPOTrainer``."""

from __future__ import annotations

from torch import Tensor

from prefmodule.objectives.losses.policy_gradient import (
    GRPOAdvantages, GRPOLoss, GroupAdvantages, PolicyGradientLoss, check_grpo_options,
)
from prefmodule.objectives.policy_gradient import PolicyGradientModule


class GRPOModule(PolicyGradientModule):
    """Group Relative Policy Optimization on prompts (``configs/grpo.yaml``).

    Each training step draws ``num_generations`` (G) completions of every prompt of the batch from the current
    policy (KV-cached ``generate``, out of the autograd graph), scores each with every ``reward`` (a reward model
    or a function ``module:function``; a function also receives the row's other columns as keyword arguments, and
    may answer ``None`` for a completion it cannot judge), and forms group-relative advantages
    (:func:`~prefmodule.objectives.losses.grpo_advantages`):

        A_i = (r_i - mean_group r) / (std r + 1e-4),    r_i = sum_k w_k r_ik

    The loss (:func:`~prefmodule.objectives.losses.grpo_loss`) is the clipped importance ratio of each completion
    token against the policy that sampled it, ``-min(rho A, clip(rho, 1 - epsilon, 1 + epsilon_high) A)``, plus
    ``beta`` times the k3 KL to the reference per token, aggregated by ``loss_type``. Validation samples and scores
    the held-out prompts the same way (its ``val/reward`` is the held-out reward).

    Metrics, TRL's names: ``reward``, ``reward_std``, ``rewards/<name>/mean`` and ``/std``,
    ``frac_reward_zero_std``, ``completions/mean_length``, ``completions/clipped_ratio``, ``entropy`` (per
    completion token), ``clip_ratio/low_mean``, ``clip_ratio/high_mean``, ``clip_ratio/region_mean``, ``kl`` (with
    ``beta > 0``), and ``train/sampled_tokens`` (completion tokens sampled so far, all ranks).

    Args:
        reward: one reward or a list: a reward model (a ``RewardModule`` export folder or ``.ckpt``, or any
            one-label sequence-classification folder) or a function ``module:function`` /
            ``path/to/file.py:function`` called as ``function(prompts, completions, **columns) -> list[float | None]``.
        reward_weights: one weight per reward (default 1 each).
        num_generations: G, completions per prompt (TRL's default 8); ``data.batch_size`` counts prompts.
        max_new_tokens: the most tokens of a completion (TRL's ``max_completion_length``, default 512).
        temperature, top_p: how completions are drawn (TRL's defaults 1.0, 1.0; temperature must be > 0).
        beta: weight of the KL to the reference (TRL's default 0.0: no reference model is held). With ``beta > 0``
            the reference is a frozen copy of the starting policy, or with ``lora`` and ``reference: adapter`` the
            policy with its adapters disabled.
        epsilon, epsilon_high: the clip range ``[1 - epsilon, 1 + epsilon_high]`` (``epsilon_high`` defaults to
            ``epsilon``; DAPO's clip-higher uses 0.28).
        loss_type: ``dapo`` (TRL's default: token sum over the generation batch's tokens), ``grpo`` (mean per
            completion, then over completions), ``bnpo`` (token mean of the batch), ``dr_grpo`` (token sum over
            completions times ``max_new_tokens``).
        importance_sampling_level: ``token``, or ``sequence`` (GSPO: one ratio per completion, the geometric mean).
        scale_rewards: divide the centred reward by the ``group``'s std, the ``batch``'s, or ``none`` (Dr. GRPO).
        multi_objective_aggregation: with several rewards, ``sum_then_normalize`` (weighted sum, then the group
            advantage) or ``normalize_then_sum`` (GDPO: each reward normalised in its group, the weighted sum
            normalised over the batch).
        num_iterations: times each generation batch is trained on (TRL's mu), against the log-probs of the
            policy that sampled it, computed once; the data loader repeats each batch (each optimizer step's
            micro-batches) that many times in a row.
        mask_truncated_completions: leave completions that did not end within ``max_new_tokens`` out of the loss.
        generation_seed: seeds each batch's sampling, with its first prompt's row and the optimizer step.
        **kwargs: see :class:`~prefmodule.objectives.reference.ReferenceModule` (``reference``) and
            :class:`~prefmodule.objectives.base.PreferenceModule` (``lr`` (TRL's default 1e-6), ``lora``, ...).

    Differences from TRL: ``data.batch_size`` counts prompts, not completions; a step's completions are sampled
    for its own batch (TRL's ``steps_per_generation`` = gradient accumulation steps: with accumulation, TRL's DAPO
    normaliser spans the accumulated batches, here each micro-batch's tokens); no vLLM, tools or multimodal input.
    """

    citation = ("GRPO", "Shao et al., 2024, DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open "
                "Language Models", "2402.03300")

    def __init__(self, model: str, reward: str | list[str], reward_weights: list[float] | None = None,
                 num_generations: int = 8, max_new_tokens: int = 512, temperature: float = 1.0, top_p: float = 1.0,
                 beta: float = 0.0, epsilon: float = 0.2, epsilon_high: float | None = None,
                 loss_type: str = "dapo", importance_sampling_level: str = "token", scale_rewards: str = "group",
                 multi_objective_aggregation: str = "sum_then_normalize", num_iterations: int = 1,
                 mask_truncated_completions: bool = False, generation_seed: int = 0, **kwargs):
        check_grpo_options(loss_type, scale_rewards, multi_objective_aggregation, importance_sampling_level, epsilon,
                           epsilon_high, beta, num_generations)
        super().__init__(model, reward, reward_weights, num_generations, max_new_tokens, temperature, top_p, beta,
                         epsilon, epsilon_high, num_iterations, mask_truncated_completions, generation_seed, **kwargs)
        self.advantages = GRPOAdvantages(num_generations, tuple(self.scores.weights), scale_rewards,
                                         multi_objective_aggregation)
        self.loss = GRPOLoss(loss_type, beta, epsilon, epsilon_high, importance_sampling_level, max_new_tokens)

    @property
    def logs_kl(self) -> bool:
        return self.hparams.beta > 0

    def group_advantages(self, rewards: Tensor, kl: Tensor | None) -> GroupAdvantages:
        return self.advantages(rewards)

    def policy_loss(self, logps: Tensor, old_logps: Tensor | None, ref_logps: Tensor | None, advantages: Tensor,
                    mask: Tensor, num_items: Tensor) -> PolicyGradientLoss:
        return self.loss(logps, old_logps, ref_logps, advantages, mask, num_items)
