"""Reward models: a causal LM with a scalar head, trained on preference pairs so that the chosen response scores
higher (Bradley-Terry; Ouyang et al., 2022, arXiv 2203.02155; Llama 2, arXiv 2307.09288), as TRL's ``RewardTrainer``."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from lightning.pytorch.strategies import Strategy
from torch import Tensor, nn
from torchmetrics import MetricCollection

from prefmodule.data.batches import PairBatch, RowBatch, Sequences
from prefmodule.errors import finite, require
from prefmodule.models.loading import load_reward_model
from prefmodule.models.scoring import sequence_rewards
from prefmodule.objectives.base import PreferenceModule
from prefmodule.objectives.losses import bradley_terry_loss
from prefmodule.objectives.metrics import Max, Mean, Min

REWARD_METRICS = {"loss": Mean, "accuracy": Mean, "margin": Mean, "min_reward": Min, "mean_reward": Mean,
                  "max_reward": Max}


@dataclass
class RewardOutputs:
    """A reward model on a batch of pairs: each response's reward."""

    loss: Tensor  # scalar, differentiable
    chosen_rewards: Tensor  # [pairs], detached
    rejected_rewards: Tensor  # [pairs], detached
    extra: dict[str, Tensor] = field(default_factory=dict)

    def metric_values(self, length_normalized: bool = False) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """TRL's names: ``accuracy`` (share of pairs with ``r_w > r_l``), ``margin`` (mean ``r_w - r_l``),
        ``min_reward``, ``mean_reward``, ``max_reward`` over every response; the loss weighs by pairs."""
        chosen, rejected = self.chosen_rewards, self.rejected_rewards
        rewards = torch.cat([chosen, rejected])
        values = {"loss": self.loss.detach(), "accuracy": (chosen > rejected).float(), "margin": chosen - rejected,
                  "min_reward": rewards, "mean_reward": rewards, "max_reward": rewards,
                  **{name: value.detach() for name, value in self.extra.items()}}
        return values, {"loss": torch.tensor(float(self.items), device=chosen.device)}

    @property
    def items(self) -> int:
        return self.chosen_rewards.numel()


class RewardModule(PreferenceModule):
    """A reward model ``r(x, y)``: ``AutoModelForSequenceClassification`` with one label, reading the last token of
    ``x + y``, trained with ``-log sigmoid(r(x, y_w) - r(x, y_l) - margin) + c * (r(x, y_w) + r(x, y_l))^2``
    (:func:`~prefmodule.objectives.losses.bradley_terry_loss`).

    ``model`` is a causal LM checkpoint (a new score head is added, initialised from the seed) or a reward
    checkpoint (its head kept). The data's optional ``margin`` column is each pair's margin (0 where absent).
    Metrics, as TRL's ``RewardTrainer``: ``loss``, ``accuracy``, ``margin``, ``min_reward``, ``mean_reward``,
    ``max_reward``. ``predict`` scores each pair's two responses, or each unpaired row's response. The export is a
    sequence-classification folder. A reward model does not generate: ``samples`` are off.

    Args:
        center_rewards_coefficient: ``c``, the reward-centering weight (Eisenstein et al., 2023, arXiv 2312.09244;
            0.01 is usual); ``None`` or 0 leaves it out.
        **kwargs: see :class:`PreferenceModule` (``lora`` trains the adapters and the new score head).
    """

    citation = ("Reward model", "Ouyang et al., 2022, Training language models to follow instructions with human "
                "feedback", "2203.02155")

    model_task = "reward"
    token_logps = False  # no LM head: nothing to chunk
    writes_text = False  # no samples: a reward model scores text, it does not write it
    predicts_either = True

    def __init__(self, model: str, center_rewards_coefficient: float | None = None, **kwargs):
        super().__init__(model=model, **kwargs)
        require(center_rewards_coefficient is None or (finite(center_rewards_coefficient)
                                                       and center_rewards_coefficient >= 0),
                "model.center_rewards_coefficient", center_rewards_coefficient, "must be >= 0 (0.01 is usual; null "
                "or 0 leaves reward centering out)")

    def load_model(self, strategy: Strategy | None) -> nn.Module:
        return load_reward_model(self.model_settings, self.tokenizer.pad_token_id)

    def rewards(self, sequences: Sequences, router_loss: bool = False) -> tuple[Tensor, Tensor | None]:
        """``[sequences.count]`` rewards of the policy, and its router loss."""
        return sequence_rewards(self.policy, sequences, router_loss)

    def batch_outputs(self, batch: PairBatch) -> tuple[RewardOutputs, Tensor | None]:
        rewards, aux_loss = self.rewards(batch.sequences, router_loss=self.router_loss_weight(self.policy) > 0)
        chosen, rejected = rewards.chunk(2)
        margin = batch.margin
        losses = bradley_terry_loss(chosen, rejected, None if margin is None else margin.nan_to_num(0.0),
                                    self.hparams.center_rewards_coefficient)
        return RewardOutputs(losses.mean(), chosen.detach(), rejected.detach()), aux_loss

    def metric_collection(self, extra: tuple[str, ...]) -> MetricCollection:
        kinds = {**REWARD_METRICS, **dict.fromkeys(extra, Mean)}
        return MetricCollection({name: kind(name) for name, kind in kinds.items()}, compute_groups=False)

    def predict_step(self, batch: PairBatch | RowBatch, batch_idx: int) -> list[dict]:
        """Pairs: each response's reward and which one scores higher. Unpaired rows: each row's reward."""
        rewards, _ = self.rewards(batch.sequences)
        if isinstance(batch, RowBatch):
            return [{"index": index, "label": label, "reward": reward} for index, label, reward in
                    zip(batch.index.tolist(), batch.label.tolist(), rewards.tolist())]
        chosen, rejected = rewards.chunk(2)
        return [{"index": index, "chosen_reward": c, "rejected_reward": r, "preferred": "chosen" if c > r else "rejected"}
                for index, c, r in zip(batch.index.tolist(), chosen.tolist(), rejected.tolist())]
