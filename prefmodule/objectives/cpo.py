"""CPO (Xu et al., 2024) and AlphaPO (Gupta et al., 2025): reference-free preference losses plus NLL."""

from __future__ import annotations

from typing import Literal


from prefmodule.errors import ConfigError
from prefmodule.data.batches import PairBatch
from prefmodule.models.logps import SequenceStats
from prefmodule.objectives.base import PreferenceModule
from prefmodule.objectives.losses import check_cpo_options, cpo_loss, nll_loss
from prefmodule.objectives.outputs import PairOutputs, logged_logps


class CPOModule(PreferenceModule):
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
        if cpo_alpha < 0:
            raise ConfigError(f"cpo_alpha must be >= 0, got {cpo_alpha}")
        try:
            check_cpo_options(loss_type, label_smoothing)
        except ValueError as error:
            raise ConfigError(str(error)) from None

    @property
    def length_normalized(self) -> bool:
        """``ipo`` and ``simpo`` score per-token average log-probs, the others summed ones (as TRL)."""
        return self.hparams.loss_type in ("ipo", "simpo")

    def extra_metrics(self, stage: str) -> tuple[str, ...]:
        return ("nll_loss",)

    def objective_outputs(self, batch: PairBatch, policy: SequenceStats, reference: None) -> PairOutputs:
        chosen, rejected = policy.split()
        hp = self.hparams
        losses, chosen_rewards, rejected_rewards = cpo_loss(
            logged_logps(chosen, self.length_normalized), logged_logps(rejected, self.length_normalized), beta=hp.beta,
            loss_type=hp.loss_type, label_smoothing=hp.label_smoothing, gamma=hp.simpo_gamma, alpha=hp.alpha)
        nll = nll_loss(chosen.logps, chosen.lengths)
        loss = losses.mean() + self.hparams.cpo_alpha * nll
        return PairOutputs(loss, chosen, rejected, chosen_rewards, rejected_rewards, {"nll_loss": nll})
