"""The base of objectives scored against a frozen reference model (DPO, KTO, GRPO with a KL term): Lightning's
hooks wired to one :class:`prefmodule.reference.modes.Reference`."""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from prefmodule.data.batches import PairBatch, RowBatch
from prefmodule.errors import ConfigError
from prefmodule.objectives.base import PreferenceModule
from prefmodule.reference.modes import REFERENCES, default_cache_dir, make_reference


class ReferenceModule(PreferenceModule):
    """A :class:`PreferenceModule` whose loss compares the policy with a frozen reference.

    Args:
        ref_model: path or hub id of the reference (``copy``, ``precomputed``); by default the starting policy.
        reference: how the reference is held.
            ``copy``: a frozen copy in memory.
            ``adapter``: with ``lora``, the policy with its adapters disabled; no second model in memory.
            ``precomputed``: at the start of each stage, the reference log-probs of its split (train
            and val for ``fit``) come from a cache file in ``ref_cache_dir`` or from one pass, then
            written there; no reference is held while training. The pass scores with the policy's
            adapters disabled (``lora`` without ``ref_model``), else with ``ref_model`` (or ``model``)
            loaded for the pass: always the starting weights, never a partly trained policy.
            ``sync``: TR-DPO, a copy softly updated every ``sync_steps`` optimizer steps,
            ``ref <- (1 - sync_alpha) * ref + sync_alpha * policy``.
        sync_steps, sync_alpha: TR-DPO's update period and mixing weight (TRL's ``ref_model_sync_steps``,
            ``ref_model_mixup_alpha``).
        ref_cache_dir: where ``precomputed`` keeps its files (default ``~/.cache/prefmodule/reference_logps``).
        **kwargs: see :class:`PreferenceModule`.
    """

    run_time = PreferenceModule.run_time + ("ref_cache_dir",)

    def __init__(
        self,
        model: str,
        ref_model: str | None = None,
        reference: Literal["copy", "adapter", "precomputed", "sync"] = "copy",
        sync_steps: int = 512,
        sync_alpha: float = 0.6,
        ref_cache_dir: str | None = None,
        **kwargs,
    ):
        super().__init__(model=model, **kwargs)
        if reference not in REFERENCES:
            raise ConfigError(f"reference must be one of {REFERENCES}, got {reference!r}")
        if reference == "adapter" and (self.lora is None or ref_model is not None):
            raise ConfigError(f"model.reference='adapter' with lora={self.model_settings.lora_arguments!r}, ref_model={ref_model!r}: the "
                              "adapter reference is the policy with its LoRA adapters disabled, so it needs `lora` "
                              "(e.g. lora: {r: 8}) and takes no `ref_model`. Without LoRA use reference: copy or "
                              "precomputed.")
        if reference == "sync" and (self.lora is not None or ref_model is not None):
            raise ConfigError("reference='sync' (TR-DPO) mixes the full policy into a copy of its starting weights: "
                              "it works without `lora` and `ref_model`.")
        if sync_steps < 1 or not 0.0 < sync_alpha <= 1.0:
            raise ConfigError(f"need sync_steps >= 1 and 0 < sync_alpha <= 1, got {sync_steps}, {sync_alpha}")
        self.reference = make_reference(reference, ref_model, sync_steps, sync_alpha,
                                        ref_cache_dir or default_cache_dir())
        self.ref_model: nn.Module | None = None  # the model ``copy`` and ``sync`` keep

    def configure_reference(self, policy: nn.Module) -> None:
        self.ref_model = self.reference.build(self, policy)

    def reference_models(self) -> list[nn.Module]:
        return [] if self.ref_model is None else [self.ref_model]

    @property
    def scores_new_text(self) -> bool:
        """Whether the objective can score text its data does not hold (a precomputed reference cannot)."""
        return self.reference.scores_new_text

    def reference_parameters(self) -> int:
        """Parameters of the reference's forward while training: its copy, or the policy with adapters off."""
        if self.ref_model is not None:
            return sum(p.numel() for p in self.ref_model.parameters())
        return sum(p.numel() for p in self.policy.parameters()) if self.reference.runs_policy else 0

    def logps_settings(self) -> dict:
        """Settings besides the weights and the data that change the log-probs this objective scores
        (part of the precomputed reference's cache key)."""
        return {}

    def reference_logps(self, batch: PairBatch | RowBatch) -> Tensor:
        """``[rows, sequences per row]`` reference log-probs of ``batch``: a pair's (chosen, rejected)."""
        return self.reference.logps(self, batch)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.ref_model is not None:
            self.ref_model.eval()  # the reference never leaves eval mode (no dropout)
        return self

    # ----- precomputed: one reference pass per split, before its stage --------------------------------
    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.reference.prepare(self, "train", "val")

    def on_validation_start(self) -> None:
        super().on_validation_start()
        self.reference.prepare(self, "val")  # a no-op within fit, done in ``on_fit_start``

    def on_test_start(self) -> None:
        super().on_test_start()
        self.reference.prepare(self, "test")

    def on_predict_start(self) -> None:
        super().on_predict_start()
        self.reference.prepare(self, "predict")

    def configure_callbacks(self):
        return super().configure_callbacks() + self.reference.callbacks()

    # ----- checkpoints ------------------------------------------------------------------------------
    # The reference is rebuilt from its source in ``configure_model``: left out of the module's state,
    # hence of every strategy's checkpoints (sharded ones too), unless training changes it (``sync``).
    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        state = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        if not self.reference.saved:
            for key in [k for k in state if k.startswith(f"{prefix}ref_model.")]:
                del state[key]
        return state

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Strict for the policy; a checkpoint without the reference keeps the reference as built."""
        if self.ref_model is not None and not self.reference.saved:
            state_dict = {**self.ref_model.state_dict(prefix="ref_model."), **state_dict}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
