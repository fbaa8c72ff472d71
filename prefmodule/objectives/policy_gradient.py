"""Policy gradient from rewards on prompts (GRPO, RLOO): the one place that samples groups of completions, scores
them, keeps a generation batch for ``num_iterations`` uses, runs the policy over it and logs TRL's metrics. The
objectives differ in their advantages and their loss only (:mod:`prefmodule.objectives.losses.policy_gradient`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor, nn
from torchmetrics import MetricCollection

from prefmodule.data.batches import PromptBatch, Sequences
from prefmodule.data.contract import BatchFormat
from prefmodule.errors import ConfigError, require
from prefmodule.models.generation import GenerationSettings
from prefmodule.models.logps import SequenceStats
from prefmodule.objectives.losses.policy_gradient import GroupAdvantages, PolicyGradientLoss
from prefmodule.objectives.metrics import Mean, Std
from prefmodule.reference.modes import stats_without_grad
from prefmodule.objectives.reference import ReferenceModule
from prefmodule.private.lightning import attached_trainer
from prefmodule.sampling.pairs import CompletionScores, completed_rows, completion_texts, sample_completions
from prefmodule.sampling.scorers import naming_rows

# A step's metrics, TRL's names: those of the generation batch, then those of the loss.
ROLLOUT_METRICS = ("reward", "reward_std", "frac_reward_zero_std", "completions/mean_length",
                   "completions/clipped_ratio")
LOSS_METRICS = ("loss", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean")
STD_METRICS = ("reward_std",)


@dataclass
class Rollout:
    """A generation batch: each prompt's completions laid out as the data's batches (``sequences``: one sequence per
    completion, prompt after prompt), their ``[completions, rewards]`` scores, and what the loss needs besides
    the policy's own log-probs; kept while the batch is trained on again (``num_iterations``)."""

    sequences: Sequences  # the prompt + completion sequences (padded or packed)
    rewards: Tensor  # [completions, rewards], NaN where a function answered None
    ended: Tensor  # [completions] bool: the completion ended with an end token
    old_logps: Tensor | None  # per completion token (flat), the sampling policy's; None: the current policy
    ref_logps: Tensor | None  # per completion token (flat), the reference's (beta > 0)
    values: dict[str, Tensor] = field(default_factory=dict)  # the generation batch's metric values
    advantages: Tensor | None = None  # [completions], once computed (at the first use)
    uses: int = 0

    def on(self, device: torch.device) -> Rollout:
        """The same rollout with its tensors on ``device`` (one restored from a checkpoint is on the CPU)."""
        return move_data_to_device(self, device)

    def state(self) -> dict:
        """Plain data for a checkpoint (tensors on the CPU)."""
        state = move_data_to_device(self, "cpu")
        return {f.name: vars(value) if isinstance(value, Sequences) else value
                for f in dataclasses.fields(self) for value in [getattr(state, f.name)]}

    @classmethod
    def restored(cls, state: dict) -> Rollout:
        """The rollout :meth:`state` saved."""
        return cls(**{**state, "sequences": Sequences(**state["sequences"])})


@dataclass
class RolloutOutputs:
    """The objective on a generation batch: the loss, and the metric values by TRL's names, each averaged over its
    items (completions or tokens) with the weight ``weights`` gives it (1 per item otherwise)."""

    loss: Tensor  # scalar, differentiable
    values: dict[str, Tensor]
    weights: dict[str, Tensor]
    items: int  # completions
    extra: dict[str, Tensor] = field(default_factory=dict)  # the base's own (``aux_loss``)

    def metric_values(self, length_normalized: bool = False) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        values = {"loss": self.loss.detach(), **self.values, **{k: v.detach() for k, v in self.extra.items()}}
        return values, {"loss": torch.tensor(float(self.items), device=self.loss.device), **self.weights}


class PolicyGradientModule(ReferenceModule):
    """The shared part of GRPO and RLOO (see :class:`~prefmodule.objectives.grpo.GRPOModule`): the data holds
    prompts (any format; a row's other columns reach the reward functions as keyword arguments), each step draws
    ``num_generations`` completions of every prompt of the batch from the current policy, scores them, and trains
    on them ``num_iterations`` times. ``batch_size`` counts prompts: a step trains ``batch_size * num_generations``
    completions, and under DDP each rank samples whole groups of its own prompts (each prompt once per epoch).

    Subclasses give :meth:`group_advantages` and :meth:`policy_loss`.
    """

    beta_may_be_zero = True

    def __init__(self, model: str, reward: str | list[str], reward_weights: list[float] | None = None,
                 num_generations: int = 8, max_new_tokens: int = 512, temperature: float = 1.0, top_p: float = 1.0,
                 beta: float = 0.0, epsilon: float = 0.2, epsilon_high: float | None = None, num_iterations: int = 1,
                 mask_truncated_completions: bool = False, generation_seed: int = 0, **kwargs):
        super().__init__(model=model, **kwargs)
        require(isinstance(num_iterations, int) and num_iterations >= 1, "model.num_iterations", num_iterations,
                "must be a whole number >= 1 (how many times each generation batch is trained on)")
        if self.reference.saved or not self.reference.scores_new_text:
            raise ConfigError(f"model.reference={self.hparams.reference!r}: the KL term scores completions sampled "
                              "while training, with a fixed reference: use copy, or adapter (with lora).")
        self.generation = GenerationSettings(num_generations, max_new_tokens, temperature, top_p, generation_seed)
        self.scores = CompletionScores(reward, weights=reward_weights, allow_none=True)
        self.rollouts: dict[tuple[int, ...], Rollout] = {}  # generation batches still to be trained on again
        self.sampled_tokens = 0  # completion tokens this process sampled in training (train/sampled_tokens: all)

    @property
    def num_generations(self) -> int:
        return self.generation.num_completions

    # ----- the objective's two parts -------------------------------------------------------------------------
    def group_advantages(self, rewards: Tensor, kl: Tensor | None) -> GroupAdvantages:
        """``[completions]`` advantages of a whole batch of groups (every rank's), from its ``[completions,
        rewards]`` rewards and, when the objective asks for it (:attr:`kl_in_reward`), each completion's summed
        log-ratio of the sampling policy to the reference."""
        raise NotImplementedError

    def policy_loss(self, logps: Tensor, old_logps: Tensor | None, ref_logps: Tensor | None, advantages: Tensor,
                    mask: Tensor, num_items: Tensor) -> PolicyGradientLoss:
        """The loss on ``[completions, T]`` per-token log-probs (``mask`` over the completion tokens);
        ``num_items``: completion tokens of the generation batch per process."""
        raise NotImplementedError

    @property
    def kl_in_reward(self) -> bool:
        """Whether the advantages take the KL to the reference (RLOO's reward penalty)."""
        return False

    @property
    def needs_old_logps(self) -> bool:
        """Whether the sampling policy's log-probs are computed when the batch is drawn (else, with one use, the
        loss takes the current policy's, detached: the same values)."""
        return self.hparams.num_iterations > 1

    # ----- models and data -------------------------------------------------------------------------------------
    def configure_reference(self, policy: nn.Module) -> None:
        if self.hparams.beta > 0:  # beta 0: no reference model at all
            super().configure_reference(policy)

    def reference_parameters(self) -> int:
        return super().reference_parameters() if self.hparams.beta > 0 else 0

    def batch_format(self) -> BatchFormat:
        return dataclasses.replace(super().batch_format(), prompts=True, repeats=self.hparams.num_iterations)

    @property
    def token_entropy(self) -> bool:
        return True

    # ----- steps -------------------------------------------------------------------------------------------
    def training_step(self, batch: PromptBatch, batch_idx: int) -> Tensor:
        loss = self._step(batch, "train")
        self.log("train/sampled_tokens", float(self.sampled_tokens), on_step=True, on_epoch=False, reduce_fx="sum",
                 sync_dist=True, batch_size=1)
        return loss

    def predict_step(self, batch: PromptBatch, batch_idx: int):
        raise ConfigError(f"{type(self).__name__} trains; to sample completions from a policy, predict with "
                          "SamplePairsModule (configs/sample_pairs.yaml)")

    def batch_outputs(self, batch: PromptBatch) -> tuple[RolloutOutputs, Tensor | None]:
        """The objective on a batch of prompts: its generation batch (sampled now, or kept from an earlier use),
        the policy's forward over it, the advantages (at the first use) and the loss."""
        rollout = self.rollout(batch)
        stats, aux_loss = self.policy_forward(rollout.sequences)
        logps, mask = stats.padded()
        if self.hparams.mask_truncated_completions:  # TRL's option: a completion cut at max_new_tokens teaches nothing
            mask = mask & rollout.ended[:, None]
        if rollout.advantages is None:
            self.add_advantages(rollout, stats)
        old = None if rollout.old_logps is None else stats.padded(rollout.old_logps)[0]
        ref = None if rollout.ref_logps is None else stats.padded(rollout.ref_logps)[0]
        result = self.policy_loss(logps, old, ref, rollout.advantages, mask, self.tokens_per_process(mask))
        return self.outputs(rollout, result, stats, mask), aux_loss

    def rollout(self, batch: PromptBatch) -> Rollout:
        """The generation batch of ``batch``: kept from an earlier use while ``num_iterations`` allows (training
        only), else sampled and scored now."""
        key = tuple(batch.index.tolist())
        rollout = self.rollouts.pop(key, None) if self.training else None
        rollout = self.sample_rollout(batch) if rollout is None else rollout.on(self.device)
        rollout.uses += 1
        if self.training and rollout.uses < self.hparams.num_iterations:
            self.rollouts[key] = rollout
        return rollout

    def sample_rollout(self, batch: PromptBatch) -> Rollout:
        """``num_generations`` completions of each prompt of ``batch`` (seeded by the batch's first row and the
        optimizer step), scored, laid out as the data's batches, with the sampling policy's and the reference's
        per-token log-probs when the loss needs them."""
        n = self.num_generations
        step = self.trainer.global_step if attached_trainer(self) is not None else 0
        seed = self.generation.seed + int(batch.index[0]) + 1_000_003 * step
        completions = sample_completions(self, batch.prompt_ids, self.generation, seed)
        texts, ended = completion_texts(self, completions)
        prompts, columns = completed_rows(batch.prompt, batch.columns, n)
        with naming_rows(batch.index.tolist(), n):
            rewards = self.scores.per_reward(prompts, texts, self.device, completion_ids=completions, **columns)
        sequences = move_data_to_device(self.data_collator().layout(
            [(batch.prompt_ids[i // n], completion) for i, completion in enumerate(completions)]), self.device)
        lengths = torch.tensor([len(completion) for completion in completions], device=self.device)
        if self.training:
            self.sampled_tokens += int(lengths.sum())
        old = stats_without_grad(self, self.policy, sequences).token_logps if self.needs_old_logps else None
        ref = self.reference.stats(self, sequences).token_logps if self.hparams.beta > 0 else None
        ended = torch.tensor(ended, device=self.device)
        values = {"completions/mean_length": lengths.float(), "completions/clipped_ratio": (~ended).float()}
        for k, name in enumerate(self.scores.names):
            values[f"rewards/{name}/mean"] = values[f"rewards/{name}/std"] = rewards[:, k]
        return Rollout(sequences, rewards, ended, old, ref, values)

    def add_advantages(self, rollout: Rollout, stats: SequenceStats) -> None:
        """The rollout's advantages, over every rank's groups (TRL gathers the rewards first: a batch's std, GDPO's
        and RLOO's normalisation span all ranks), and the metrics that come with them."""
        kl = None
        if self.kl_in_reward:  # RLOO: sum_t (log pi_old - log pi_ref), the first-order estimate
            old = stats.token_logps.detach() if rollout.old_logps is None else rollout.old_logps
            per_token, mask = stats.padded(old - rollout.ref_logps)
            kl = per_token.sum(1)
            rollout.values["kl"] = per_token[mask]
        rewards, own = self.gathered(rollout.rewards)
        advantages = self.group_advantages(rewards, None if kl is None else self.gathered(kl)[0])
        rollout.advantages = advantages.advantages[own].float()
        rollout.values.update({"reward": advantages.rewards[own].float(),
                               "reward_std": advantages.rewards[own].float(),
                               "frac_reward_zero_std": advantages.std_is_zero[own].float()})

    def gathered(self, values: Tensor) -> tuple[Tensor, slice]:
        """``values`` (``[rows, ...]``) of every rank, rank after rank (ranks may hold different numbers of
        rows), and the slice of them that is this rank's."""
        trainer = attached_trainer(self)
        if trainer is None or trainer.world_size == 1:
            return values, slice(None)
        counts = self.all_gather(torch.tensor(values.shape[0], device=values.device)).tolist()
        padded = values.new_zeros((max(counts), *values.shape[1:]))
        padded[: values.shape[0]] = values
        every = self.all_gather(padded)
        start = sum(counts[: trainer.global_rank])
        return torch.cat([rows[:count] for rows, count in zip(every, counts)]), slice(start, start + values.shape[0])

    def tokens_per_process(self, mask: Tensor) -> Tensor:
        """Completion tokens of the generation batch per process (DAPO's normaliser, as TRL: all ranks' count over
        the number of ranks)."""
        tokens = mask.sum().float()
        trainer = attached_trainer(self)
        if trainer is None or trainer.world_size == 1:
            return tokens
        return self.all_gather(tokens).sum() / trainer.world_size

    def outputs(self, rollout: Rollout, result: PolicyGradientLoss, stats: SequenceStats,
                mask: Tensor) -> RolloutOutputs:
        """The loss and the step's metric values: the generation batch's, then the loss's (token means weighted by
        their tokens, sequence-level clip ratios by their completions)."""
        statistics = result.metrics(mask)
        per_sequence = result.is_low_clipped.shape[1] == 1
        counted = torch.tensor(float(mask.shape[0]), device=mask.device) if per_sequence else mask.sum().float()
        entropy = stats.padded(stats.token_entropy)[0][mask]
        values = {**rollout.values, "entropy": entropy,
                  **{name: statistics[name] for name in self.loss_statistics()}}
        weights = {name: mask.sum().float() if name == "kl" else counted for name in self.loss_statistics()}
        return RolloutOutputs(result.loss, values, weights, items=mask.shape[0])

    def loss_statistics(self) -> tuple[str, ...]:
        """The names of the loss's statistics logged (:meth:`PolicyGradientLoss.metrics`)."""
        return ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean") + (
            ("kl",) if self.logs_kl else ())

    @property
    def logs_kl(self) -> bool:
        """Whether the loss reports a per-token KL (GRPO with ``beta > 0``)."""
        return False

    def completion_rewards(self, items: list[dict], completions: list[list[int]]) -> list[float | None]:
        """The weighted reward of one completion of each prompt item (the samples' ``reward``; ``None`` where no
        reward could judge it)."""
        texts, ended = completion_texts(self, completions)
        prompts, columns = completed_rows([item["prompt"] for item in items],
                                          [item.get("columns") for item in items], 1)
        with naming_rows([item["index"] for item in items], 1):
            rewards = self.scores.per_reward(prompts, texts, self.device, completion_ids=completions, **columns)
        scores = self.scores.combined(rewards, ended).masked_fill(rewards.isnan().all(1), float("nan"))
        return [None if math.isnan(score) else score for score in scores.tolist()]

    @property
    def trained_on(self) -> str:
        return f"prompts, rewarded by {', '.join(f'`{name}`' for name in self.scores.names)}"

    # ----- metrics -------------------------------------------------------------------------------------------
    def metric_names(self) -> tuple[str, ...]:
        rewards = tuple(f"rewards/{name}/{kind}" for name in self.scores.names for kind in ("mean", "std"))
        return (*LOSS_METRICS, *ROLLOUT_METRICS, *rewards, *(("kl",) if self.logs_kl or self.kl_in_reward else ()))

    def metric_collection(self, extra: tuple[str, ...]) -> MetricCollection:
        """TRL's metrics: means over completions or tokens (NaN rewards left out), the reward std's over the
        completions (``reward_std``, ``rewards/<name>/std``)."""
        def kind(name: str):
            return Std(name) if name in STD_METRICS or name.endswith("/std") else Mean(name, nan_strategy="ignore")

        return MetricCollection({name: kind(name) for name in (*self.metric_names(), *extra)}, compute_groups=False)

    # ----- checkpoints: the generation batches still to be trained on, and the sampled token count ------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["prefmodule_rollouts"] = {"sampled_tokens": self.sampled_tokens, "rollouts": [
            (list(key), rollout.state()) for key, rollout in self.rollouts.items()]}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("prefmodule_rollouts")
        if saved is not None:
            self.sampled_tokens = saved["sampled_tokens"]
            self.rollouts = {tuple(key): Rollout.restored(state) for key, state in saved["rollouts"]}
