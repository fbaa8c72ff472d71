"""DPO (Rafailov et al., 2023) and its relatives, against a frozen reference model."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from prefmodule.data.batches import PairBatch
from prefmodule.errors import ConfigError
from prefmodule.models.logps import SequenceStats
from prefmodule.objectives.losses import (
    DPOLoss, beta_dpo_beta, beta_dpo_filter, beta_dpo_running_stats, ld_logps, nll_loss, wpo_weights,
)
from prefmodule.objectives.outputs import PairOutputs
from prefmodule.objectives.reference import ReferenceModule

APO = ("APO", "D'Oosterlinck et al., 2024, Anchored Preference Optimization", "2408.06266")
AOT = ("AOT", "Melnyk et al., 2024, Distributional Preference Alignment of LLMs via Optimal Transport", "2406.05882")
DPO_LOSS_CITATIONS = {  # a loss type with a paper of its own: (name, paper, arXiv id), for the model card
    "robust": ("robust DPO", "Chowdhury et al., 2024, Provably Robust DPO", "2403.00409"),
    "hinge": ("SLiC hinge", "Zhao et al., 2023, SLiC-HF", "2305.10425"),
    "ipo": ("IPO", "Azar et al., 2023, A General Theoretical Paradigm to Understand Learning from Human Preferences",
            "2310.12036"),
    "exo_pair": ("EXO", "Ji et al., 2024, Towards Efficient Exact Optimization of Language Model Alignment",
                 "2402.00856"),
    "nca_pair": ("NCA", "Chen et al., 2024, Noise Contrastive Alignment of Language Models", "2402.05369"),
    "bco_pair": ("BCO", "Jung et al., 2024, Binary Classifier Optimization", "2404.04656"),
    "sppo_hard": ("SPPO", "Wu et al., 2024, Self-Play Preference Optimization", "2405.00675"),
    "aot": AOT,
    "aot_unpaired": AOT,
    "apo_zero": APO,
    "apo_down": APO,
    "discopop": ("DiscoPOP", "Lu et al., 2024, Discovering Preference Optimization Algorithms", "2406.08414"),
}


@dataclass
class BetaDPOSettings:
    """beta-DPO (Wu et al., 2024, arXiv 2407.08639): a beta per batch and a margin-based data filter.

    ``alpha``: how strongly the batch's mean margin moves beta (the paper's alpha; 0.6 in its example run).
    ``filter_ratio``: share of each batch's pairs left out, the margin outliers (the paper's rho, 0.2).
    ``momentum``: of the running mean and standard deviation of the margins (0.9 as the authors' code).
    """

    alpha: float = 0.6
    filter_ratio: float = 0.2
    momentum: float = 0.9

    def __post_init__(self):
        if not 0.0 <= self.filter_ratio < 1.0 or not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"beta_dpo needs 0 <= filter_ratio < 1 and 0 <= momentum < 1, got {self}")


class DPOModule(ReferenceModule):
    """Direct Preference Optimization: ``-log sigmoid(beta * (logratio_w - logratio_l))`` and variants.

    Args:
        beta: strength of the implicit KL penalty towards the reference (typical 0.1).
        loss_type: one name, or a list combined with ``loss_weights`` (see ``prefmodule.objectives.losses``).
        label_smoothing: assumed label-noise rate ``eps`` (cDPO with ``sigmoid``, ``robust``, ``exo_pair``, ``aot``).
        sft_weight: weight of an added NLL term on the chosen response (RPO); 0 turns it off.
        discopop_tau: temperature of the ``discopop`` loss.
        use_weighting: WPO (Zhou et al., 2024, arXiv 2406.11827): weigh each pair by how likely the policy is
            to generate it, per token (``prefmodule.objectives.losses.wpo_weights``), as TRL's ``use_weighting``.
        ld_alpha: LD-DPO (Liu et al., 2024, arXiv 2409.06411): response tokens past the shorter response of the
            pair count with this weight in every log-prob, policy and reference (``prefmodule.objectives.losses.ld_logps``).
        f_divergence_type, f_alpha_divergence_coef: f-DPO (Wang et al., 2023, arXiv 2309.16240): the divergence
            from the reference the loss regularises (``reverse_kl`` is DPO), as TRL's options of these names.
        dpop_lambda: DPO-Positive (Pal et al., 2024, arXiv 2402.13228): penalise the chosen log-prob falling
            below the reference's, with this weight (the paper uses 50); 0 turns it off.
        beta_dpo: beta-DPO (:class:`BetaDPOSettings`), e.g. ``{alpha: 0.6, filter_ratio: 0.2}``: in training, each
            batch gets its own beta from its margins and drops its margin outliers; validation uses ``beta``.
        **kwargs: see :class:`ReferenceModule` (``reference``, ``ref_model``, ...) and :class:`PreferenceModule`.
    """

    citation = ("DPO", "Rafailov et al., 2023, Direct Preference Optimization", "2305.18290")
    loss_citations = DPO_LOSS_CITATIONS

    def __init__(
        self,
        model: str,
        beta: float = 0.1,
        loss_type: str | list[str] = "sigmoid",
        loss_weights: list[float] | None = None,
        label_smoothing: float = 0.0,
        sft_weight: float = 0.0,
        discopop_tau: float = 0.05,
        use_weighting: bool = False,
        ld_alpha: float | None = None,
        f_divergence_type: Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"] = "reverse_kl",
        f_alpha_divergence_coef: float = 0.5,
        dpop_lambda: float = 0.0,
        beta_dpo: BetaDPOSettings | dict | None = None,
        **kwargs,
    ):
        super().__init__(model=model, **kwargs)
        try:
            self.loss = DPOLoss(loss_type, loss_weights, label_smoothing, discopop_tau, f_divergence_type,
                                f_alpha_divergence_coef, dpop_lambda)
        except ValueError as error:
            raise ConfigError(str(error)) from None
        if ld_alpha is not None and not 0.0 <= ld_alpha <= 1.0:
            raise ConfigError(f"ld_alpha must be in [0, 1] (1 is plain DPO), got {ld_alpha}")
        self.beta_dpo = BetaDPOSettings(**beta_dpo) if isinstance(beta_dpo, dict) else beta_dpo
        if self.beta_dpo is not None:
            # The running mean and standard deviation of the margins, saved with checkpoints.
            self.register_buffer("beta_dpo_margin_stats", torch.zeros(2))

    def extra_metrics(self, stage: str) -> tuple[str, ...]:
        return (("nll_loss",) if self.hparams.sft_weight > 0 else ()) + (
            ("beta",) if self.beta_dpo is not None and stage == "train" else ())

    def logps_settings(self) -> dict:
        return {} if self.hparams.ld_alpha is None else {"ld_alpha": self.hparams.ld_alpha}

    @property
    def sum_sq_probs(self) -> bool:
        return self.hparams.use_weighting

    def reweighted(self, stats: SequenceStats) -> SequenceStats:
        """With ``ld_alpha``, LD-DPO's log-probs, whose tokens past the pair's public length (its shorter response)
        count ``ld_alpha``."""
        if self.hparams.ld_alpha is None:
            return stats
        chosen_lengths, rejected_lengths = stats.lengths.chunk(2)
        public_lengths = torch.minimum(chosen_lengths, rejected_lengths).repeat(2)
        return dataclasses.replace(stats, logps=ld_logps(stats.logps, stats.prefix_logps(public_lengths),
                                                         self.hparams.ld_alpha))

    def objective_outputs(self, batch: PairBatch, policy: SequenceStats, reference: Tensor) -> PairOutputs:
        chosen, rejected = policy.split()
        chosen_logratios = chosen.logps - reference[:, 0]
        rejected_logratios = rejected.logps - reference[:, 1]
        beta, selected, extra = self.hparams.beta, None, {}
        if self.beta_dpo is not None and self.training:
            beta, selected = self.beta_dpo_batch((chosen_logratios - rejected_logratios).detach())
            extra["beta"] = beta
        losses, chosen_rewards, rejected_rewards = self.loss(
            chosen.logps, rejected.logps, reference[:, 0], reference[:, 1], beta=beta,
            chosen_lengths=chosen.lengths, rejected_lengths=rejected.lengths)
        if self.hparams.use_weighting:
            losses = losses * wpo_weights(chosen.logps, rejected.logps, chosen.log_sum_sq_probs,
                                          rejected.log_sum_sq_probs, chosen.lengths, rejected.lengths)
        loss = losses.mean() if selected is None else losses[selected].sum() / selected.sum().clamp(min=1)
        if self.hparams.sft_weight > 0:
            extra["nll_loss"] = nll_loss(chosen.logps, chosen.lengths)
            loss = loss + self.hparams.sft_weight * extra["nll_loss"]
        return PairOutputs(loss, chosen, rejected, chosen_rewards, rejected_rewards, extra)

    def beta_dpo_batch(self, margins: Tensor) -> tuple[Tensor, Tensor]:
        """beta-DPO on this training batch: update the running margin statistics with all ranks' margins, draw
        the pairs that train, and their beta. Returns ``(beta, this rank's selected pairs)``."""
        settings = self.beta_dpo
        gaps = self.all_gather(margins).reshape(-1)  # all ranks' pairs, in rank order
        mean, std = beta_dpo_running_stats(gaps, *self.beta_dpo_margin_stats, momentum=settings.momentum)
        self.beta_dpo_margin_stats.copy_(torch.stack([mean, std]))
        keep = max(1, int(gaps.numel() * (1 - settings.filter_ratio)))
        # The same draw on every rank, and a new one every batch: seeded by the batch's number in the run.
        generator = torch.Generator().manual_seed(self.trainer.fit_loop.total_batch_idx)
        uniform = torch.rand(gaps.numel(), generator=generator).to(gaps.device)
        selected = beta_dpo_filter(gaps, mean, std, keep, uniform)
        beta = beta_dpo_beta(self.hparams.beta, settings.alpha, gaps, selected, mean)
        return beta, selected.view(-1, margins.numel())[self.global_rank]
