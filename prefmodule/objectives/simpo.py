"""SimPO (Meng et al., 2024): reference-free, length-normalised, with a target margin."""

from __future__ import annotations

from prefmodule.objectives.cpo import ReferenceFreeModule


class SimPOModule(ReferenceFreeModule):
    """``L = -log sigmoid(beta * avglogp(y_w) - beta * avglogp(y_l) - gamma)``: CPO's ``simpo`` loss type
    (``CPOModule(loss_type="simpo", simpo_gamma=gamma, cpo_alpha=sft_weight)``) with the paper's names and
    defaults.

    Args:
        beta: reward scale (the paper uses 2.0–2.5).
        gamma: target reward margin (the paper uses 0.5–1.6 with beta 2.0–2.5).
        label_smoothing: assumed label-noise rate, as in cDPO.
        sft_weight: weight of an added NLL term on the chosen response (as CPO's ``cpo_alpha``).
        **kwargs: see :class:`PreferenceModule`.
    """

    citation = ("SimPO", "Meng et al., 2024, SimPO: Simple Preference Optimization with a Reference-Free Reward",
                "2405.14734")

    def __init__(self, model: str, beta: float = 2.0, gamma: float = 0.5, label_smoothing: float = 0.0,
                 sft_weight: float = 0.0, **kwargs):
        super().__init__(model=model, **kwargs)
        self.set_loss(dict(beta=beta, loss_type="simpo", label_smoothing=label_smoothing, gamma=gamma),
                      sft_weight, "sft_weight")
