"""SimPO (Meng et al., 2024): reference-free, length-normalised, with a target margin."""

from __future__ import annotations


from prefmodule.data.batches import PairBatch
from prefmodule.models.logps import SequenceStats
from prefmodule.objectives.losses import nll_loss, simpo_loss
from prefmodule.objectives.base import PreferenceModule
from prefmodule.objectives.outputs import PairOutputs


class SimPOModule(PreferenceModule):
    """``L = -log sigmoid(beta * avglogp(y_w) - beta * avglogp(y_l) - gamma)``.

    Args:
        beta: reward scale (the paper uses 2.0–2.5).
        gamma: target reward margin (the paper uses 0.5–1.6 with beta 2.0–2.5).
        label_smoothing: assumed label-noise rate, as in cDPO.
        sft_weight: weight of an added NLL term on the chosen response (as CPO's ``cpo_alpha``).
        **kwargs: see :class:`PreferenceModule`.
    """

    length_normalized = True

    def __init__(self, model: str, beta: float = 2.0, gamma: float = 0.5, label_smoothing: float = 0.0,
                 sft_weight: float = 0.0, **kwargs):
        super().__init__(model=model, **kwargs)

    def extra_metrics(self, stage: str) -> tuple[str, ...]:
        return ("nll_loss",) if self.hparams.sft_weight > 0 else ()

    def objective_outputs(self, batch: PairBatch, policy: SequenceStats, reference: None) -> PairOutputs:
        chosen, rejected = policy.split()
        losses, chosen_rewards, rejected_rewards = simpo_loss(
            chosen.avg_logps, rejected.avg_logps, beta=self.hparams.beta, gamma=self.hparams.gamma,
            label_smoothing=self.hparams.label_smoothing,
        )
        loss = losses.mean()
        extra = {}
        if self.hparams.sft_weight > 0:
            extra["nll_loss"] = nll_loss(chosen.logps, chosen.lengths)
            loss = loss + self.hparams.sft_weight * extra["nll_loss"]
        return PairOutputs(loss, chosen, rejected, chosen_rewards.detach(), rejected_rewards.detach(), extra)
