"""The shared base of every objective: policy loading, the concatenated forward, metrics,
optimiser and schedule, predictions and the Hugging Face export."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from transformers import get_scheduler

from prefmodule.models.attention import enable_packed_attention, packed_inputs, takes_sequence_bounds
from prefmodule.training.checkpoints import restore_data_position
from prefmodule.models.checks import check_causal_lm, check_settings, check_source
from prefmodule.errors import ConfigError, writing
from prefmodule.training.guard import check_finite_weights, default_guard, step_skipped
from prefmodule.models.loading import (
    empty_causal_lm, load_balancing_loss, load_causal_lm, load_tokenizer, lora_arguments, lora_config, router_aux_loss_coef,
    router_logits_kwargs, stand_in,
)
from prefmodule.models.logps import SequenceStats, chunked_sequence_stats, head_logits_transform, sequence_stats
from prefmodule.objectives.metrics import PreferenceMetrics
from prefmodule.outputs.modelcard import HubSettings
from prefmodule.outputs.samples import SampleSettings
from prefmodule.models.sharding import cpu_copy, finish_forward, gather_unsharded, is_sharded, reshard, shard

STAGES = ("train", "val", "test")
PROGRESS_BAR_METRICS = ("loss", "rewards/accuracies")
# ``lr_schedule`` -> ``transformers.get_scheduler`` name, and its default ``lr_schedule_kwargs``
LR_SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup",
                "cosine_with_min_lr": "cosine_with_min_lr", "warmup_stable_decay": "warmup_stable_decay"}
LR_SCHEDULE_DEFAULTS = {"cosine_with_min_lr": {"min_lr_rate": 0.1}, "warmup_stable_decay": {"num_decay_steps": 0.1}}


@dataclass
class PairOutputs:
    """What an objective computes for a batch of pairs."""

    loss: Tensor  # scalar, differentiable
    chosen: SequenceStats
    rejected: SequenceStats
    chosen_rewards: Tensor  # [pairs], detached
    rejected_rewards: Tensor  # [pairs], detached
    extra: dict[str, Tensor] = field(default_factory=dict)  # objective-specific metrics


class PreferenceModule(LightningModule):
    """Base for preference objectives. Subclasses implement :meth:`pair_outputs`; the base runs the forward passes
    and adds a mixture-of-experts policy's load-balancing loss to every objective's loss.

    Args:
        model: local path, ``asset://`` name or Hugging Face hub id of a causal LM.
        tokenizer: defaults to ``model``'s tokenizer.
        beta: the objective's temperature / weight (see each subclass).
        lr, weight_decay: AdamW settings, used unless ``optimizer`` is given.
        warmup: linear warm-up length, a fraction of all steps if < 1, else a step count.
        lr_schedule: shape after warm-up, through ``transformers.get_scheduler``: ``linear`` or ``cosine`` decay to 0,
            ``constant``, ``cosine_with_min_lr`` (cosine down to a floor, ``min_lr_rate`` times ``lr``, default 0.1),
            ``warmup_stable_decay`` (constant, then a cosine decay over the last ``num_decay_steps``, a fraction of
            all steps if < 1, default 0.1).
        lr_schedule_kwargs: the schedule's own options (``get_scheduler``'s ``scheduler_specific_kwargs``, TRL's
            ``lr_scheduler_kwargs``), e.g. ``{min_lr_rate: 0.05}`` or ``{num_decay_steps: 0.2, decay_type: linear}``.
        optimizer: any optimizer class (``class_path`` in YAML); called with the trainable parameters.
        lora: train LoRA adapters instead of the full policy: the arguments of ``peft.LoraConfig`` (``r``,
            ``lora_alpha``, ``lora_dropout``, ``target_modules`` (default ``all-linear``), ``use_dora``,
            ``use_rslora``, ``modules_to_save``, ...), or a ``LoraConfig``.
        gradient_checkpointing: recompute the policy's activations in backward.
        logps_chunk_size: response tokens per chunk when computing log-probs from the final hidden states
            through the LM head, never materialising ``[batch, seq, vocab]`` logits; 0 takes the full logits.
        dtype: dtype the weights are loaded in; keep float32 and use ``--trainer.precision`` for mixed precision.
        attn_implementation: Hugging Face's ``attn_implementation`` (``sdpa``, ``flash_attention_2``, ``eager``, ...);
            default: the model's own choice. Same values either way; packed batches need ``sdpa`` or flash attention.
        router_aux_loss_coef: weight of a mixture-of-experts policy's load-balancing loss in the objective
            (default: the model config's ``router_aux_loss_coef``; 0 leaves it out). Ignored for dense models.
        predictions_path: where ``predict`` writes one JSON line per pair (default ``<log dir>/predictions.jsonl``).
        export_hf: save the policy and tokenizer in Hugging Face format at ``<log dir>/hf_model`` after ``fit``,
            with a model card (``README.md``).
        export_merged: with ``lora``, the export merges the adapters into the base weights; ``False`` saves the
            adapters alone (``adapter_model.safetensors``, loaded with ``peft.AutoPeftModelForCausalLM``).
        samples: completions of held-out prompts at the start of ``fit`` and at each validation
            (``{num_prompts, max_new_tokens, temperature}``, see :class:`~prefmodule.outputs.samples.SampleSettings`); ``None``
            turns them off.
        push_to_hub: upload the exported model to this Hub repository after ``fit`` (``{repo_id, private}``, see
            :class:`~prefmodule.outputs.modelcard.HubSettings`).
    """

    length_normalized = False  # log ``logps/*`` as per-token averages (ORPO, SimPO) or sums (DPO)
    unpaired = False  # batches of unpaired rows (KTO) rather than pairs; the datamodule reads it
    # Run-time choices stay out of hparams: LightningCLI lays a checkpoint's hparams over the command line.
    runtime_args = ("optimizer", "predictions_path", "export_hf", "export_merged", "logps_chunk_size",
                    "attn_implementation", "samples", "push_to_hub")

    def __init__(
        self,
        model: str,
        tokenizer: str | None = None,
        beta: float = 0.1,
        lr: float = 1e-6,
        weight_decay: float = 0.0,
        warmup: float = 0.1,
        lr_schedule: Literal["linear", "cosine", "constant", "cosine_with_min_lr", "warmup_stable_decay"] = "linear",
        lr_schedule_kwargs: dict | None = None,
        optimizer: OptimizerCallable | None = None,
        lora: dict | None = None,
        gradient_checkpointing: bool = False,
        logps_chunk_size: int = 512,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        trust_remote_code: bool = False,
        attn_implementation: str | None = None,
        router_aux_loss_coef: float | None = None,
        predictions_path: str | None = None,
        export_hf: bool = True,
        export_merged: bool = True,
        samples: SampleSettings | dict | None = SampleSettings(),
        push_to_hub: HubSettings | dict | None = None,
    ):
        super().__init__()
        check_settings(beta, lr, weight_decay, warmup, logps_chunk_size, dtype, attn_implementation)
        if router_aux_loss_coef is not None and router_aux_loss_coef < 0:
            raise ConfigError(f"model.router_aux_loss_coef={router_aux_loss_coef!r}: must be >= 0 (0 turns the MoE "
                              "load-balancing loss off; unset takes the model config's).")
        self.lora = lora_config(lora)
        check_causal_lm("model", model, trust_remote_code)  # from its config.json, before any weights load
        if tokenizer is not None:
            check_source("tokenizer", tokenizer)
        self.save_hyperparameters(ignore=list(self.runtime_args))
        if lora is not None and not isinstance(lora, dict):
            self.hparams.lora = lora_arguments(self.lora)  # plain data: checkpoints load with weights_only=True
        self.logps_chunk_size = logps_chunk_size
        self.head_transform = None  # set in ``configure_model`` when the model allows chunked log-probs
        self.predictions_path = predictions_path
        self.export_hf_after_fit = export_hf
        self.samples = SampleSettings(**samples) if isinstance(samples, dict) else samples
        self.push_to_hub = HubSettings(**push_to_hub) if isinstance(push_to_hub, dict) else push_to_hub
        self.export_merged = export_merged
        self.model_name = model
        self.attn_implementation = attn_implementation
        self.beta = beta
        self.optimizer_factory = optimizer
        self.tokenizer = load_tokenizer(tokenizer or model, trust_remote_code)
        self.policy: nn.Module | None = None
        # Keyed "<stage>_metrics": a bare "train" key would shadow ``nn.Module.train``.
        self.stage_metrics = nn.ModuleDict({f"{s}_metrics": PreferenceMetrics(paired=not self.unpaired)
                                            for s in STAGES})

    # ----- model construction ---------------------------------------------------------------
    def configure_model(self) -> None:
        """Load the policy, and shard it under FSDP2 (idempotent: Lightning may call it more than once).

        Under FSDP2 the policy (and a copy of it as reference) is built on the meta device and each rank
        reads only its own shards from the safetensors files (``strategies.shard``); the probes that
        follow (packed attention, the LM head) then run on a small stand-in of the architecture.
        """
        if self.policy is not None:
            return
        strategy = self._trainer.strategy if self._trainer is not None else None
        settings = (self.hparams.dtype, self.hparams.trust_remote_code, self.attn_implementation)
        policy = empty_causal_lm(self.model_name, *settings) if self._streams(strategy) else None
        if policy is None:
            policy = load_causal_lm(self.model_name, *settings)
        self.configure_reference(policy)
        if self.lora is not None:
            from peft import get_peft_model

            policy = get_peft_model(policy, self.lora)
        if self.hparams.gradient_checkpointing:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.policy = policy.train()  # from_pretrained returns eval mode; Lightning keeps modes as found
        for model in [child for child in self.children() if hasattr(child, "config")]:  # the policy, a reference
            shard(model, strategy)
            # A sharded model is probed through a small stand-in of its architecture: no weights gathered.
            probe = (stand_in(model) or model) if is_sharded(model) else model
            enable_packed_attention(model, probe)
            if model is self.policy and self.logps_chunk_size > 0:
                self.head_transform = head_logits_transform(probe)
            reshard(model)  # if the probes ran on the sharded model itself
        if self.logps_chunk_size > 0 and self.head_transform is None:
            rank_zero_warn(f"{self.model_name}: its logits are not its LM head applied to its decoder's last hidden "
                           "state (or a scale or soft-cap of that): log-probs come from the full logits "
                           "(logps_chunk_size ignored).")

    def _streams(self, strategy) -> bool:
        """Whether the policy is built empty and filled from its files once sharded: under FSDP2, unless a
        LoRA initialisation needs the full base weights (DoRA, PiSSA, ...)."""
        from lightning.pytorch.strategies import ModelParallelStrategy

        plain_lora = self.lora is None or (not self.lora.use_dora and self.lora.init_lora_weights in (True, False,
                                                                                                      "gaussian"))
        return isinstance(strategy, ModelParallelStrategy) and plain_lora

    @property
    def chunked_logps(self) -> bool:
        """Whether log-probs come from the decoder's hidden states through the LM head in chunks."""
        return self.head_transform is not None

    def configure_reference(self, policy: nn.Module) -> None:
        """Hook for objectives with a reference model, called with the freshly loaded policy (on the meta
        device under FSDP2: a copy of it is filled from the same files when sharded)."""

    @property
    def packed_attention(self) -> bool:
        """Whether every model this module runs attends to packed rows per sequence, with no quadratic
        mask; the datamodule (``padding_free=None``) packs batches then."""
        models = [child for child in self.children() if hasattr(child, "config")]
        return bool(models) and all(takes_sequence_bounds(model) for model in models)

    # ----- forward ----------------------------------------------------------------------------
    def sequence_stats(self, model: nn.Module, batch: dict[str, Tensor], sum_sq_probs: bool = False) -> SequenceStats:
        """``model``'s statistics of the concatenated chosen + rejected sequences of ``batch`` (padded or packed),
        never asking a mixture-of-experts model for its router logits (a reference, a scoring pass)."""
        return self.scored_stats(self.forward_stats(model, batch, sum_sq_probs, router_loss=False)[0])

    def policy_forward(self, batch: dict[str, Tensor]) -> tuple[SequenceStats, Tensor | None]:
        """The policy's statistics of ``batch`` and, beside them, its mixture-of-experts load-balancing loss
        (``None`` for a dense policy, or when its weight is 0)."""
        stats, aux_loss = self.forward_stats(self.policy, batch, self.sum_sq_probs,
                                             router_loss=self.router_loss_weight(self.policy) > 0)
        return self.scored_stats(stats), aux_loss

    def forward_stats(self, model: nn.Module, batch: dict[str, Tensor], sum_sq_probs: bool = False,
                      router_loss: bool = False) -> tuple[SequenceStats, Tensor | None]:
        """One forward over the sequences of ``batch``: its own statistics (before :meth:`scored_stats`) and, with
        ``router_loss``, the load-balancing loss of its router logits. With ``logps_chunk_size`` the decoder and the
        LM head run separately (see ``chunked_sequence_stats``). ``sum_sq_probs`` also sums ``log sum_v p_v^2``
        over each response (WPO)."""
        if "sequence_ids" in batch:  # packed
            num_sequences = self.sequences_per_index(batch) * batch["index"].numel()
            inputs = packed_inputs(model, batch["position_ids"], batch["sequence_ids"])
            sequences = dict(sequence_ids=batch["sequence_ids"], num_sequences=num_sequences)
        else:
            inputs, sequences = dict(attention_mask=batch["attention_mask"]), {}
        inputs.update(input_ids=batch["input_ids"], use_cache=False, **router_logits_kwargs(model, router_loss))
        if self.chunked_logps:
            outputs = model.get_decoder()(**inputs)
            stats = chunked_sequence_stats(outputs.last_hidden_state, model.get_output_embeddings(), batch["labels"],
                                           self.logps_chunk_size, **sequences, transform=self.head_transform,
                                           sum_sq_probs=sum_sq_probs)
            aux_loss = load_balancing_loss(model, outputs.router_logits, inputs["attention_mask"]) if router_loss else None
        else:
            outputs = model(**inputs)
            stats = sequence_stats(outputs.logits, batch["labels"], sum_sq_probs=sum_sq_probs, **sequences)
            aux_loss = outputs.aux_loss if router_loss else None
        if not torch.is_grad_enabled():
            finish_forward(model)  # no backward will close a sharded tied head's forward
        return stats, aux_loss

    @property
    def sum_sq_probs(self) -> bool:
        """Whether the policy's forward also sums ``log sum_v p_v^2`` per response (WPO's weights)."""
        return False

    def scored_stats(self, stats: SequenceStats) -> SequenceStats:
        """The statistics the objective scores, from those of a forward (policy and reference alike): as they are,
        unless an objective reweighs the tokens (LD-DPO)."""
        return stats

    def sequences_per_index(self, batch: dict[str, Tensor]) -> int:
        """How many sequences ``batch`` holds per entry of its ``index``: a pair's chosen and rejected."""
        return 2

    def router_loss_weight(self, model: nn.Module) -> float:
        """The weight of ``model``'s MoE load-balancing loss in the objective (0: none, or a dense model)."""
        coef = router_aux_loss_coef(model)
        if coef is None:
            return 0.0
        return coef if self.hparams.router_aux_loss_coef is None else self.hparams.router_aux_loss_coef

    def reference_logps(self, batch: dict[str, Tensor]) -> Tensor | None:
        """``[rows, sequences per row]`` reference log-probs of ``batch``; ``None`` for a reference-free objective."""
        return None

    def batch_outputs(self, batch: dict[str, Tensor]) -> tuple[PairOutputs, Tensor | None]:
        """The objective on ``batch``, and beside it the policy's router loss (``None`` for a dense policy)."""
        reference = self.reference_logps(batch)  # first: its activations are freed before the policy's exist
        policy, aux_loss = self.policy_forward(batch)
        return self.pair_outputs(batch, policy, reference), aux_loss

    def pair_outputs(self, batch: dict[str, Tensor], policy: SequenceStats, reference: Tensor | None) -> PairOutputs:
        """The objective on ``batch`` from the policy's statistics of its sequences and, for objectives with a
        reference, the reference's ``[rows, sequences per row]`` log-probs."""
        raise NotImplementedError

    # ----- steps --------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._step(batch, "test")

    def _step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        outputs, aux_loss = self.batch_outputs(batch)
        if aux_loss is not None:  # as transformers' MoE models add it to their language-modelling loss
            outputs.loss = outputs.loss + self.router_loss_weight(self.policy) * aux_loss
            outputs.extra["aux_loss"] = aux_loss.detach()
        values, weights = self._metric_values(outputs)
        key = f"{stage}_metrics"
        per_step = stage == "train"
        self.stage_metrics[key].update(values, weights, per_step=per_step)
        for name, (metric, attribute) in self.stage_metrics[key].metrics().items():
            self.log(
                f"{stage}/{name}", metric, on_step=per_step, on_epoch=not per_step,
                prog_bar=name in PROGRESS_BAR_METRICS, batch_size=outputs.chosen_rewards.numel(),
                metric_attribute=f"stage_metrics.{key}.{attribute}",
            )
        return outputs.loss

    def _metric_values(self, outputs: PairOutputs) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        chosen, rejected = outputs.chosen, outputs.rejected
        pairs = outputs.chosen_rewards.numel()
        values = {
            "loss": outputs.loss.detach(),
            "rewards/chosen": outputs.chosen_rewards,
            "rewards/rejected": outputs.rejected_rewards,
            "logps/chosen": self._logged_logps(chosen).detach(),
            "logps/rejected": self._logged_logps(rejected).detach(),
            "logits/chosen": chosen.logits / chosen.lengths.clamp(min=1),
            "logits/rejected": rejected.logits / rejected.lengths.clamp(min=1),
            **{name: value.detach() for name, value in outputs.extra.items()},
        }
        # Token-weighted logits means, as TRL's; the batch loss weighs by its number of pairs. The NLL
        # (a token mean over the batch) weighs by its tokens: its epoch value is then the token mean of
        # all pairs, however they were batched or split across ranks.
        weights = {
            "loss": torch.tensor(float(pairs), device=chosen.logps.device),
            "logits/chosen": chosen.lengths.float(),
            "logits/rejected": rejected.lengths.float(),
            "nll_loss": chosen.lengths.sum().float(),
        }
        return values, weights

    def _logged_logps(self, stats: SequenceStats) -> Tensor:
        return stats.avg_logps if self.length_normalized else stats.logps

    def on_train_start(self) -> None:
        restore_data_position(self.trainer)  # a resumed fit goes on mid-epoch where it stopped

    def on_train_epoch_end(self) -> None:
        self.stage_metrics["train_metrics"].reset()

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> list[dict]:
        outputs, _ = self.batch_outputs(batch)
        rows = zip(
            batch["index"].tolist(),
            self._logged_logps(outputs.chosen).tolist(),
            self._logged_logps(outputs.rejected).tolist(),
            outputs.chosen_rewards.tolist(),
            outputs.rejected_rewards.tolist(),
        )
        return [
            {
                "index": index,
                "chosen_logps": chosen_logps,
                "rejected_logps": rejected_logps,
                "chosen_reward": chosen_reward,
                "rejected_reward": rejected_reward,
                "preferred": "chosen" if chosen_reward > rejected_reward else "rejected",
            }
            for index, chosen_logps, rejected_logps, chosen_reward, rejected_reward in rows
        ]

    # ----- optimisation ---------------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        if self.optimizer_factory is not None:
            optimizer = self.optimizer_factory(params)
        else:
            # fused: one kernel for all parameters (10x faster on CPU than the per-parameter loop), same values
            optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay,
                                          fused=True)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        options = {**LR_SCHEDULE_DEFAULTS.get(self.hparams.lr_schedule, {}), **(self.hparams.lr_schedule_kwargs or {})}
        if "num_decay_steps" in options:
            options["num_decay_steps"] = steps(options["num_decay_steps"], total)
        scheduler = get_scheduler(LR_SCHEDULES[self.hparams.lr_schedule], optimizer, steps(self.hparams.warmup, total),
                                  total, scheduler_specific_kwargs=options)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "train/lr"}}

    def lr_scheduler_step(self, scheduler, metric) -> None:
        if not step_skipped(self.trainer):  # the non-finite guard dropped this step's update: the schedule waits too
            super().lr_scheduler_step(scheduler, metric)

    # ----- callbacks, checkpoints, export -------------------------------------------------------
    def configure_callbacks(self):
        from lightning.pytorch.callbacks import LearningRateMonitor

        from prefmodule.training.callbacks import FitSummary, PredictionWriter, SampleWriter, Throughput
        from prefmodule.training.checkpoints import default_checkpoints

        callbacks = [SampleWriter(self.samples)] if self.samples is not None else []  # first: before the clocks start
        callbacks += [Throughput(), FitSummary(), PredictionWriter(self.predictions_path)]
        if self._trainer is not None and self._trainer.loggers:  # it refuses to run without a logger
            callbacks.append(LearningRateMonitor(logging_interval="step"))
        return callbacks + default_checkpoints(self._trainer) + default_guard(self._trainer)

    def export_hf(self, path: str, merge_adapters: bool | None = None) -> None:
        """Save the policy and tokenizer with ``save_pretrained`` as the base model had them (config with its
        ``use_cache``, generation config, tied weights), with the chat template the data was rendered with
        (``data.chat_template``, read from the trainer's datamodule) saved in the tokenizer.

        LoRA adapters are merged into a CPU copy of the weights (``merge_adapters``, default ``export_merged``),
        or saved alone. Global rank 0 writes. Sharded (FSDP) weights are gathered to it first: then every
        rank must call this.
        """
        merge = self.export_merged if merge_adapters is None else merge_adapters
        lora = hasattr(self.policy, "merge_and_unload")
        sharded = is_sharded(self.policy)
        check_finite_weights(self.policy, path, sharded)  # never export a diverged policy
        if sharded:
            model = gather_unsharded(self, "policy", self.hparams.trust_remote_code)
        else:
            model = cpu_copy(self.policy, self.hparams.trust_remote_code) if lora and merge else self.policy
        if self.global_rank != 0:
            return
        if lora and merge:
            model = model.merge_and_unload(safe_merge=True)  # new tensors for the merged layers: no in-place sum
        tokenizer = copy.copy(self.tokenizer)
        template = self.training_chat_template()
        if template is not None:
            tokenizer.chat_template = template
        with writing(path, "the Hugging Face export"):
            model.save_pretrained(path)
            tokenizer.save_pretrained(path)

    def training_chat_template(self) -> str | None:
        """The ``chat_template`` the trainer's datamodule renders conversations with, if it sets one."""
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        chat_template = getattr(datamodule, "_chat_template", None)
        return chat_template() if callable(chat_template) else None


def steps(value: float, total: int) -> int:
    """A step count given as a fraction of ``total`` steps (< 1) or as a count."""
    return int(value * total) if value < 1 else int(value)
