"""CPO (Xu et al., 2024), AlphaPO (Gupta et al., 2025) and SimPO (Meng et al., 2024): reference-free preference
losses on the policy's own log-probs, plus an NLL term on the chosen response."""

from __future__ import annotations

from typing import Literal

from prefmodule.data.batches import PairBatch
from prefmodule.errors import ConfigError
from prefmodule.models.logps import SequenceStats
from prefmodule.objectives.base import PreferenceModule
from prefmodule.objectives.losses import CPOLoss, nll_loss
from prefmodule.objectives.outputs import PairOutputs, logged_logps


class ReferenceFreeModule(PreferenceModule):
    """The one objective behind :class:`CPOModule` and :class:`SimPOModule`, which name its settings as their
    papers do: a :class:`~prefmodule.objectives.losses.CPOLoss` on the policy's own log-probs plus ``nll_weight``
    times the NLL of the chosen response (both set by :meth:`set_loss`, checked once)."""

    loss: CPOLoss
    nll_weight: float

    def set_loss(self, loss: dict, nll_weight: float, nll_option: str) -> None:
        """The objective's ``loss`` (:class:`CPOLoss`'s arguments) and NLL weight, set by the option ``nll_option``."""
        if nll_weight < 0:
            raise ConfigError(f"{nll_option} must be >= 0, got {nll_weight}")
        try:
            self.loss = CPOLoss(**loss)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        self.nll_weight = nll_weight

    @property
    def length_normalized(self) -> bool:
        """``ipo`` and ``simpo`` score per-token average log-probs, the others summed ones (as TRL)."""
        return self.loss.length_normalized

    def extra_metrics(self, stage: str) -> tuple[str, ...]:
        return ("nll_loss",)

    def objective_outputs(self, batch: PairBatch, policy: SequenceStats, reference: None) -> PairOutputs:
        chosen, rejected = policy.split()
        losses, chosen_rewards, rejected_rewards = self.loss(logged_logps(chosen, self.length_normalized),
                                                             logged_logps(rejected, self.length_normalized))
        nll = nll_loss(chosen.logps, chosen.lengths)
        loss = losses.mean() + self.nll_weight * nll if self.nll_weight > 0 else losses.mean()
        return PairOutputs(loss, chosen, rejected, chosen_rewards, rejected_rewards, {"nll_loss": nll})


class CPOModule(ReferenceFreeModule):
    """Contrastive Preference Optimization: ``L = -log sigmoid(beta * (logp_w - logp_l)) + cpo_alpha * NLL(y_w)``,
    and the hinge, IPO and SimPO forms of TRL's ``CPOTrainer`` (see ``prefmodule.objectives.losses.cpo_loss``).

    Args:
        beta: scale of the reward margin (TRL's default 0.1).
        loss_type: ``sigmoid`` (CPO), ``hinge``, ``ipo`` or ``simpo``; ``ipo`` and ``simpo`` use per-token average
            log-probs, the others summed ones (as TRL).
        label_smoothing: assumed label-noise rate, as in cDPO (``sigmoid``, ``simpo``).
        cpo_alpha: weight of the NLL on the chosen response (TRL's default 1.0; 0 for AlphaPO's recipe).
        simpo_gamma: target reward margin of ``simpo``.
        alpha: AlphaPO's reward shape ``r = (1 - p^-alpha) / alpha`` (Gupta et al., 2025, arXiv 2501.03884); 0 is the
            plain log-prob. The paper's recipe is ``loss_type: simpo`` with ``cpo_alpha: 0``.
        **kwargs: see :class:`PreferenceModule`.
    """

    citation = ("CPO", "Xu et al., 2024, Contrastive Preference Optimization", "2401.08417")
    alpha_citation = ("AlphaPO", "Gupta et al., 2025, AlphaPO: Reward Shape Matters for LLM Alignment", "2501.03884")

    def __init__(
        self,
        model: str,
        beta: float = 0.1,
        loss_type: Literal["sigmoid", "hinge", "ipo", "simpo"] = "sigmoid",
        label_smoothing: float = 0.0,
        cpo_alpha: float = 1.0,
        simpo_gamma: float = 0.5,
        alpha: float = 0.0,
        **kwargs,
    ):
        super().__init__(model=model, **kwargs)
        self.set_loss(dict(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, gamma=simpo_gamma,
                           alpha=alpha), cpo_alpha, "cpo_alpha")

    def cited(self) -> tuple[str, str, str] | None:
        return self.alpha_citation if self.hparams.alpha else super().cited()
