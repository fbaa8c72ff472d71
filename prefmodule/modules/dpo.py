"""DPO (Rafailov et al., 2023) and its relatives, against a frozen reference model."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from prefmodule.hf import load_causal_lm
from prefmodule.losses import dpo_loss, nll_loss
from prefmodule.modules.base import PairOutputs, PreferenceModule


class DPOModule(PreferenceModule):
    """Direct Preference Optimization: ``-log sigmoid(beta * (logratio_w - logratio_l))`` and variants.

    Args:
        ref_model: path or hub id of the reference; by default a frozen copy of the starting policy.
        beta: strength of the implicit KL penalty towards the reference (typical 0.1).
        loss_type: one name, or a list combined with ``loss_weights`` (see ``prefmodule.losses``).
        label_smoothing: assumed label-noise rate ``eps`` (cDPO with ``sigmoid``, ``robust``, ``exo_pair``, ``aot``).
        sft_weight: weight of an added NLL term on the chosen response (RPO); 0 turns it off.
        discopop_tau: temperature of the ``discopop`` loss.
        **kwargs: see :class:`PreferenceModule`.
    """

    def __init__(
        self,
        model: str,
        ref_model: str | None = None,
        beta: float = 0.1,
        loss_type: str | list[str] = "sigmoid",
        loss_weights: list[float] | None = None,
        label_smoothing: float = 0.0,
        sft_weight: float = 0.0,
        discopop_tau: float = 0.05,
        **kwargs,
    ):
        super().__init__(model=model, beta=beta, **kwargs)
        self.ref_model: nn.Module | None = None
        self.loss_kwargs = dict(
            beta=beta, loss_type=loss_type, loss_weights=loss_weights,
            label_smoothing=label_smoothing, discopop_tau=discopop_tau,
        )
        self._check_loss_settings()

    def _check_loss_settings(self) -> None:
        """Fail at construction, not at the first step, on an unknown loss type or bad weights."""
        probe = torch.tensor([-1.0, -2.0])
        dpo_loss(probe, probe, probe, probe, chosen_lengths=probe.abs(), rejected_lengths=probe.abs(),
                 **self.loss_kwargs)

    def configure_reference(self, policy: nn.Module) -> None:
        if self.hparams.ref_model is not None:
            reference = load_causal_lm(self.hparams.ref_model, self.hparams.dtype, self.hparams.trust_remote_code)
        else:
            reference = copy.deepcopy(policy)
        reference.requires_grad_(False)
        self.ref_model = reference.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.ref_model is not None:
            self.ref_model.eval()  # the reference never leaves eval mode (no dropout)
        return self

    def pair_outputs(self, batch: dict[str, Tensor]) -> PairOutputs:
        chosen, rejected = self.sequence_stats(self.policy, batch).split()
        with torch.no_grad():
            ref_chosen, ref_rejected = self.sequence_stats(self.ref_model, batch).split()
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen.logps, rejected.logps, ref_chosen.logps, ref_rejected.logps,
            chosen_lengths=chosen.lengths, rejected_lengths=rejected.lengths, **self.loss_kwargs,
        )
        loss = losses.mean()
        extra = {}
        if self.hparams.sft_weight > 0:
            extra["nll_loss"] = nll_loss(chosen.logps, chosen.lengths)
            loss = loss + self.hparams.sft_weight * extra["nll_loss"]
        return PairOutputs(loss, chosen, rejected, chosen_rewards, rejected_rewards, extra)

    # The reference is rebuilt from its source in ``configure_model``: never written to checkpoints.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("ref_model.")]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.ref_model is not None:
            checkpoint["state_dict"].update(
                {f"ref_model.{k}": v for k, v in self.ref_model.state_dict().items()}
            )
