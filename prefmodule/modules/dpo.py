"""DPO (Rafailov et al., 2023) and its relatives, against a frozen reference model held one of four ways."""

from __future__ import annotations

import copy
import gc
import time
import warnings
from contextlib import contextmanager, nullcontext
from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn

from prefmodule.attention import enable_packed_attention
from prefmodule.errors import ConfigError
from prefmodule.hf import load_causal_lm
from prefmodule.losses import dpo_loss, nll_loss
from prefmodule.modules.base import PairOutputs, PreferenceModule
from prefmodule.reference import (
    SyncReference, cache_file, default_cache_dir, load_table, logps_table, pairs_fingerprint, save_table, shard_loader,
    weights_fingerprint,
)
from prefmodule.strategies import shard

REFERENCES = ("copy", "adapter", "precomputed", "sync")

# The frozen reference is in eval mode by design; Lightning's start-of-fit notice about it is noise.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
# Lightning's running stage -> the data split its batches come from.
STAGE_SPLITS = {"train": "train", "sanity_check": "val", "validate": "val", "test": "test", "predict": "predict"}


class DPOModule(PreferenceModule):
    """Direct Preference Optimization: ``-log sigmoid(beta * (logratio_w - logratio_l))`` and variants.

    Args:
        ref_model: path or hub id of the reference (``copy``, ``precomputed``); by default the starting policy.
        reference: how the reference is held.
            ``copy``: a frozen copy in memory.
            ``adapter``: with ``lora``, the policy with its adapters disabled; no second model in memory.
            ``precomputed``: at the start of each stage, the reference log-probs of its split (train
            and val for ``fit``) come from a cache file in ``ref_cache_dir`` or from one pass, then
            written there; the reference is released before the first step, so training holds the
            policy alone. The pass scores with the policy itself while it still holds its starting
            weights (or its adapters can be disabled), else loads ``ref_model`` / ``model`` again.
            ``sync``: TR-DPO, a copy softly updated every ``sync_steps`` optimizer steps,
            ``ref <- (1 - sync_alpha) * ref + sync_alpha * policy``.
        beta: strength of the implicit KL penalty towards the reference (typical 0.1).
        loss_type: one name, or a list combined with ``loss_weights`` (see ``prefmodule.losses``).
        label_smoothing: assumed label-noise rate ``eps`` (cDPO with ``sigmoid``, ``robust``, ``exo_pair``, ``aot``).
        sft_weight: weight of an added NLL term on the chosen response (RPO); 0 turns it off.
        discopop_tau: temperature of the ``discopop`` loss.
        sync_steps, sync_alpha: TR-DPO's update period and mixing weight (TRL's ``ref_model_sync_steps``,
            ``ref_model_mixup_alpha``).
        ref_cache_dir: where ``precomputed`` keeps its files (default ``~/.cache/prefmodule/reference_logps``).
        **kwargs: see :class:`PreferenceModule`.
    """

    runtime_args = PreferenceModule.runtime_args + ("ref_cache_dir",)

    def __init__(
        self,
        model: str,
        ref_model: str | None = None,
        reference: Literal["copy", "adapter", "precomputed", "sync"] = "copy",
        beta: float = 0.1,
        loss_type: str | list[str] = "sigmoid",
        loss_weights: list[float] | None = None,
        label_smoothing: float = 0.0,
        sft_weight: float = 0.0,
        discopop_tau: float = 0.05,
        sync_steps: int = 512,
        sync_alpha: float = 0.6,
        ref_cache_dir: str | None = None,
        **kwargs,
    ):
        super().__init__(model=model, beta=beta, **kwargs)
        self._check_reference_settings()
        self.ref_model: nn.Module | None = None
        self.ref_cache_dir = ref_cache_dir or default_cache_dir()
        self.ref_logps: dict[str, Tensor] = {}  # ``precomputed``: split -> [pairs, 2] (chosen, rejected)
        self.policy_is_start = False  # whether the policy still holds its starting weights
        self.loss_kwargs = dict(
            beta=beta, loss_type=loss_type, loss_weights=loss_weights,
            label_smoothing=label_smoothing, discopop_tau=discopop_tau,
        )
        self._check_loss_settings()

    def _check_reference_settings(self) -> None:
        hp = self.hparams
        if hp.reference not in REFERENCES:
            raise ValueError(f"reference must be one of {REFERENCES}, got {hp.reference!r}")
        if hp.reference == "adapter" and (self.lora is None or hp.ref_model is not None):
            raise ConfigError(f"model.reference='adapter' with lora={hp.lora!r}, ref_model={hp.ref_model!r}: the "
                              "adapter reference is the policy with its LoRA adapters disabled, so it needs `lora` "
                              "(e.g. lora: {r: 8}) and takes no `ref_model`. Without LoRA use reference: copy or "
                              "precomputed.")
        if hp.reference == "sync" and (self.lora is not None or hp.ref_model is not None):
            raise ValueError("reference='sync' (TR-DPO) mixes the full policy into a copy of its starting weights: it "
                             "works without `lora` and `ref_model`.")
        if hp.sync_steps < 1 or not 0.0 < hp.sync_alpha <= 1.0:
            raise ValueError(f"need sync_steps >= 1 and 0 < sync_alpha <= 1, got {hp.sync_steps}, {hp.sync_alpha}")

    def _check_loss_settings(self) -> None:
        """Fail at construction, not at the first step, on an unknown loss type or bad weights."""
        probe = torch.tensor([-1.0, -2.0])
        dpo_loss(probe, probe, probe, probe, chosen_lengths=probe.abs(), rejected_lengths=probe.abs(),
                 **self.loss_kwargs)

    # ----- the reference ------------------------------------------------------------------------
    def configure_reference(self, policy: nn.Module) -> None:
        self.policy_is_start = True
        if self.hparams.reference in ("copy", "sync"):
            self.ref_model = self._load_reference() if self.hparams.ref_model else self._frozen(copy.deepcopy(policy))

    def _load_reference(self) -> nn.Module:
        source = self.hparams.ref_model or self.model_name
        reference = load_causal_lm(source, self.hparams.dtype, self.hparams.trust_remote_code,
                                   self.attn_implementation)
        enable_packed_attention(reference)
        return self._frozen(reference)

    @staticmethod
    def _frozen(model: nn.Module) -> nn.Module:
        model.config.use_cache = False
        return model.requires_grad_(False).eval()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.ref_model is not None:
            self.ref_model.eval()  # the reference never leaves eval mode (no dropout)
        return self

    @contextmanager
    def reference_model(self):
        """The model that scores the reference: the frozen copy, else the policy in eval mode with its
        adapters disabled (``adapter``, or ``precomputed`` while the policy still is the reference)."""
        if self.ref_model is not None:
            yield self.ref_model
            return
        policy, training = self.policy, self.policy.training
        policy.eval()
        try:
            with policy.disable_adapter() if self.lora is not None else nullcontext():
                yield policy
        finally:
            policy.train(training)

    def live_reference_logps(self, batch: dict[str, Tensor]) -> Tensor:
        """``[pairs, 2]`` reference log-probs (chosen, rejected) of ``batch``, computed now."""
        with torch.no_grad(), self.reference_model() as model:
            chosen, rejected = self.sequence_stats(model, batch).split()
        return torch.stack([chosen.logps, rejected.logps], dim=1)

    def reference_logps(self, batch: dict[str, Tensor]) -> Tensor:
        if self.hparams.reference != "precomputed":
            return self.live_reference_logps(batch)
        split = STAGE_SPLITS[self.trainer.state.stage.value]
        if split not in self.ref_logps:
            raise RuntimeError(f"no precomputed reference log-probs for the {split!r} split: they are computed at the "
                               "start of fit/validate/test/predict from the trainer's datamodule.")
        index = batch["index"].cpu()
        values = self.ref_logps[split][index]
        if values.isnan().any():
            raise RuntimeError(f"{split}: pairs {index[values.isnan().any(1)].tolist()} have no precomputed "
                               "reference log-probs; the data changed after they were computed.")
        return values.to(self.device)

    def pair_outputs(self, batch: dict[str, Tensor]) -> PairOutputs:
        reference = self.reference_logps(batch)  # first: its activations are freed before the policy's exist
        chosen, rejected = self.sequence_stats(self.policy, batch).split()
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen.logps, rejected.logps, reference[:, 0], reference[:, 1],
            chosen_lengths=chosen.lengths, rejected_lengths=rejected.lengths, **self.loss_kwargs,
        )
        loss = losses.mean()
        extra = {}
        if self.hparams.sft_weight > 0:
            extra["nll_loss"] = nll_loss(chosen.logps, chosen.lengths)
            loss = loss + self.hparams.sft_weight * extra["nll_loss"]
        return PairOutputs(loss, chosen, rejected, chosen_rewards, rejected_rewards, extra)

    # ----- precomputed: one reference pass per split, before its stage --------------------------------
    def on_fit_start(self) -> None:
        self.precompute_reference_logps("train", "val")

    def on_validation_start(self) -> None:
        self.precompute_reference_logps("val")  # a no-op within fit, done in ``on_fit_start``

    def on_test_start(self) -> None:
        self.precompute_reference_logps("test")

    def on_predict_start(self) -> None:
        self.precompute_reference_logps("predict")

    def precompute_reference_logps(self, *splits: str) -> None:
        """Fill ``ref_logps`` for ``splits`` from the cache or one reference pass, then release the reference."""
        if self.hparams.reference != "precomputed":
            return
        for split in splits:
            if split not in self.ref_logps:
                self._precompute(split)
        if self.ref_model is not None:
            self.ref_model = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _precompute(self, split: str) -> None:
        trainer = self.trainer
        if trainer.datamodule is None:
            raise ValueError("reference='precomputed' reads the data through a datamodule: pass `datamodule=`.")
        hook = f"{split}_dataloader"
        loader = getattr(trainer.datamodule, hook)() if is_overridden(hook, trainer.datamodule) else None
        if not loader:
            return
        start = time.perf_counter()
        path = parts = None
        if trainer.is_global_zero:  # rank 0 decides, so every rank takes the same branch
            parts = {
                "reference": weights_fingerprint(self.hparams.ref_model or self.model_name),
                "dtype": self.hparams.dtype,
                "precision": str(trainer.precision),
                "pairs": pairs_fingerprint(loader.dataset),
            }
            path = cache_file(self.ref_cache_dir, parts)
        table = trainer.strategy.broadcast(load_table(path) if path is not None else None)
        if table is not None:
            rank_zero_info(f"prefmodule: reference log-probs of {split} reused from {path}")
        else:
            starting_policy = self.lora is not None or self.policy_is_start
            if self.ref_model is None and (self.hparams.ref_model is not None or not starting_policy):
                self.ref_model = shard(self._load_reference().to(self.device), trainer.strategy)
            with trainer.precision_plugin.forward_context():
                table = logps_table(
                    lambda batch: self.live_reference_logps(trainer.strategy.batch_to_device(batch)),
                    shard_loader(loader, trainer.global_rank, trainer.world_size), self.all_gather,
                )
            if path is not None:
                save_table(path, table, parts)
            rank_zero_info(f"prefmodule: reference log-probs of {split} ({len(loader.dataset)} pairs) computed in "
                           f"{time.perf_counter() - start:.1f} s -> {path}")
        self.ref_logps[split] = table

    def on_train_batch_start(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.policy_is_start = False

    def configure_callbacks(self):
        callbacks = super().configure_callbacks()
        if self.hparams.reference == "sync":
            callbacks.append(SyncReference(self.hparams.sync_steps, self.hparams.sync_alpha))
        return callbacks

    # ----- checkpoints ------------------------------------------------------------------------------
    # The reference is rebuilt from its source in ``configure_model``: left out of the module's state,
    # hence of every strategy's checkpoints (sharded ones too), unless training changes it (``sync``).
    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        state = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        if self.hparams.reference != "sync":
            for key in [k for k in state if k.startswith(f"{prefix}ref_model.")]:
                del state[key]
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Strict for the policy; a checkpoint without the reference keeps the reference as built."""
        if self.ref_model is not None and self.hparams.reference != "sync":
            state_dict = {**self.ref_model.state_dict(prefix="ref_model."), **state_dict}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.policy_is_start = False
