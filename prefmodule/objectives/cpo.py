"""CPO (Xu et al., 2024) and AlphaPO (Gupta et al., 2025): reference-free preference losses plus NLL."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from prefmodule.errors import ConfigError
from prefmodule.models.logps import SequenceStats
from prefmodule.objectives.losses import cpo_loss, nll_loss
from prefmodule.objectives.base import PairOutputs, PreferenceModule


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
        super().__init__(model=model, beta=beta, **kwargs)
        if cpo_alpha < 0:
            raise ConfigError(f"cpo_alpha must be >= 0, got {cpo_alpha}")
        self.loss_kwargs = dict(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing, gamma=simpo_gamma,
                                alpha=alpha)
        try:  # fail at construction, not at the first step
            probe = torch.tensor([-1.0])
            cpo_loss(probe, probe, **self.loss_kwargs)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        self.length_normalized = loss_type in ("ipo", "simpo")

    def pair_outputs(self, batch: dict[str, Tensor], policy: SequenceStats, reference: None) -> PairOutputs:
        chosen, rejected = policy.split()
        losses, chosen_rewards, rejected_rewards = cpo_loss(
            self._logged_logps(chosen), self._logged_logps(rejected), **self.loss_kwargs
        )
        nll = nll_loss(chosen.logps, chosen.lengths)
        loss = losses.mean() + self.hparams.cpo_alpha * nll
        return PairOutputs(loss, chosen, rejected, chosen_rewards, rejected_rewards, {"nll_loss": nll})
