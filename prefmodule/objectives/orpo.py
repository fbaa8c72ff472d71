"""ORPO (Hong et al., 2024): SFT plus an odds-ratio penalty, no reference model."""

from __future__ import annotations

import torch.nn.functional as F

from prefmodule.data.batches import PairBatch
from prefmodule.models.logps import SequenceStats
from prefmodule.objectives.losses import nll_loss, orpo_loss
from prefmodule.objectives.base import PreferenceModule
from prefmodule.objectives.outputs import PairOutputs


class ORPOModule(PreferenceModule):
    """``L = NLL(y_w) + beta * -log sigmoid(log odds(y_w) - log odds(y_l))`` on length-normalised log-probs.

    Args:
        beta: weight of the odds-ratio term (the paper's lambda; 0.1 as TRL, the paper used 0.1–0.25).
        **kwargs: see :class:`PreferenceModule`.
    """

    citation = ("ORPO", "Hong et al., 2024, ORPO: Monolithic Preference Optimization without Reference Model",
                "2403.07691")

    length_normalized = True

    def extra_metrics(self, stage: str) -> tuple[str, ...]:
        return ("nll_loss", "log_odds_ratio", "log_odds_chosen")

    def __init__(self, model: str, beta: float = 0.1, **kwargs):
        super().__init__(model=model, **kwargs)

    def objective_outputs(self, batch: PairBatch, policy: SequenceStats, reference: None) -> PairOutputs:
        chosen, rejected = policy.split()
        odds_losses, log_odds = orpo_loss(chosen.avg_logps, rejected.avg_logps, beta=self.hparams.beta)
        nll = nll_loss(chosen.logps, chosen.lengths)
        extra = {
            "nll_loss": nll,
            "log_odds_ratio": F.logsigmoid(log_odds),
            "log_odds_chosen": log_odds,
        }
        return PairOutputs(
            loss=nll + odds_losses.mean(),
            chosen=chosen,
            rejected=rejected,
            chosen_rewards=self.hparams.beta * chosen.avg_logps.detach(),
            rejected_rewards=self.hparams.beta * rejected.avg_logps.detach(),
            extra=extra,
        )
