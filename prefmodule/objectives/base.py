"""The shared base of every objective: the policy's forward, the router loss, the steps and their metrics; the
settings of the model and of the optimizer in their own dataclass, each checked when built. What a run leaves
behind (samples, the export and its card, the Hub upload, predictions) are callbacks of their own
(:mod:`prefmodule.training.callbacks`), settings of the run rather than of the objective."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import MetricCollection

from prefmodule.data.batches import PairBatch, RowBatch, Sequences
from prefmodule.data.collate import PreferenceCollator
from prefmodule.data.contract import BatchFormat
from prefmodule.errors import ConfigError, finite, require
from prefmodule.models.attention import PackedAttention, takes_sequence_bounds
from prefmodule.models.export import export_policy
from prefmodule.models.loading import load_tokenizer
from prefmodule.models.logps import LogitsTransform, SequenceStats
from prefmodule.models.moe import router_aux_loss_coef
from prefmodule.models.scoring import forward_stats
from prefmodule.models.settings import ModelSettings
from prefmodule.models.setup import compile_layers, load_policy, place, trainable
from prefmodule.objectives.metrics import preference_metrics
from prefmodule.objectives.outputs import PairOutputs, RowOutputs, logged_logps
from prefmodule.private.lightning import attached_trainer
from prefmodule.training.callbacks import module_callbacks
from prefmodule.training.guard import step_skipped
from prefmodule.training.optimization import OptimizerSettings, configure_optimizer

STAGES = ("train", "val", "test")
PROGRESS_BAR_METRICS = ("loss", "rewards/accuracies", "reward")
# Run-time choices stay out of hparams: LightningCLI lays a checkpoint's hparams over the command line.
RUN_TIME = ("optimizer", "logps_chunk_size", "attn_implementation", "compile_layers")


class PreferenceModule(LightningModule):
    """Base for preference objectives. Subclasses implement :meth:`objective_outputs`; the base runs the forward passes
    and adds a mixture-of-experts policy's load-balancing loss to every objective's loss.

    Args:
        model: local path, ``asset://`` name or Hugging Face hub id of a causal LM.
        tokenizer: defaults to ``model``'s tokenizer.
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
        gradient_checkpointing: recompute the policy's activations in backward: ``true`` those of whole decoder
            blocks, ``mlp`` those of their MLPs alone (with ``compile_layers``, SmolLM2's decoder kept half the
            memory of eager at +8% time; BENCHMARKS.md).
        compile_layers: ``torch.compile`` the policy's decoder layers (regional, dynamic shapes): on a CPU a quarter
            less peak memory at the same step time on SmolLM2, after ~40 s of compilation (BENCHMARKS.md).
        logps_chunk_size: response tokens per chunk when computing log-probs from the final hidden states
            through the LM head, never materialising ``[batch, seq, vocab]`` logits; 0 takes the full logits.
        dtype: dtype the weights are loaded in; keep float32 and use ``--trainer.precision`` for mixed precision.
        attn_implementation: Hugging Face's ``attn_implementation`` (``sdpa``, ``flash_attention_2``, ``eager``, ...);
            default: the model's own choice. Same values either way; packed batches need ``sdpa`` or flash attention.
        router_aux_loss_coef: weight of a mixture-of-experts policy's load-balancing loss in the objective
            (default: the model config's ``router_aux_loss_coef``; 0 leaves it out). Ignored for dense models.

    The options keep their flat names (``model.lr``, ``model.lora``, ...) and are grouped right away into
    ``self.model_settings`` and ``self.optimizer_settings``.

    Before Lightning's data hooks run, :meth:`connect` tells the datamodule what the objective needs (the CLI
    does it before every subcommand; from Python: ``trainer.fit(module, datamodule=module.connect(data))``).
    """

    length_normalized = False  # log ``logps/*`` as per-token averages (ORPO, SimPO) or sums (DPO)
    unpaired = False  # batches of unpaired rows (KTO) rather than pairs
    predicts_either = False  # ``predict`` takes pairs and unpaired rows as the data holds them (else as it trains)
    model_task = "causal_lm"  # the model's head: an LM head, or ``reward`` (a score)
    token_logps = True  # the objective scores response tokens through the LM head (may be chunked)
    scores_new_text = True  # the objective can score completions its data does not hold (samples' rewards)
    trained_on = "preference pairs"  # what the model card says the model was aligned on
    beta_may_be_zero = False  # ``beta`` weighs a KL term that 0 leaves out (GRPO, RLOO) rather than a temperature
    citation: tuple[str, str, str] | None = None  # the objective's (name, paper, arXiv id), for the model card
    loss_citations: dict[str, tuple[str, str, str]] = {}  # a ``loss_type`` with a paper of its own
    writes_text = True  # the policy completes prompts (the samples); a reward model scores them
    run_time = RUN_TIME

    def __init__(
        self,
        model: str,
        tokenizer: str | None = None,
        lr: float = 1e-6,
        weight_decay: float = 0.0,
        warmup: float = 0.1,
        lr_schedule: Literal["linear", "cosine", "constant", "cosine_with_min_lr", "warmup_stable_decay"] = "linear",
        lr_schedule_kwargs: dict | None = None,
        optimizer: OptimizerCallable | None = None,
        lora: dict | None = None,
        gradient_checkpointing: bool | Literal["mlp"] = False,
        compile_layers: bool = False,
        logps_chunk_size: int = 512,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        trust_remote_code: bool = False,
        attn_implementation: str | None = None,
        router_aux_loss_coef: float | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=list(self.run_time))  # the objective's own arguments too
        beta = self.hparams.get("beta")
        if self.beta_may_be_zero:
            require(beta is None or (finite(beta) and beta >= 0), "model.beta", beta, "must be >= 0 (the weight of "
                    "the KL to the reference; 0 leaves it and the reference model out)")
        else:
            require(beta is None or (finite(beta) and beta > 0), "model.beta", beta, "must be > 0 (the objective's "
                    "temperature or weight; DPO typically 0.1)")
        self.optimizer_settings = OptimizerSettings(lr, weight_decay, warmup, lr_schedule, lr_schedule_kwargs)
        self.model_settings = ModelSettings(model, tokenizer, dtype, trust_remote_code, attn_implementation, lora,
                                            gradient_checkpointing, logps_chunk_size, router_aux_loss_coef,
                                            self.model_task, compile_layers)
        self.optimizer_factory = optimizer
        if lora is not None and not isinstance(lora, dict):
            self.hparams.lora = self.model_settings.lora_arguments  # plain data: checkpoints load weights_only
        self.tokenizer = load_tokenizer(tokenizer or model, trust_remote_code)
        self.policy: nn.Module | None = None
        self.head_transform: LogitsTransform | None = None  # set by ``configure_model`` when the head allows chunks
        self.metrics: nn.ModuleDict | None = None  # a MetricCollection per stage, once the policy is known
        self.chat_template: str | None = None  # the data's, saved with the export (:meth:`connect`)
        self.collator: Callable[[], PreferenceCollator] | None = None  # builds the data's collator (:meth:`connect`)
        self.packing = PackedAttention(False, "the models are not loaded yet")  # set by ``configure_model``

    @property
    def model_name(self) -> str:
        return self.model_settings.model

    @property
    def lora(self):
        return self.model_settings.lora

    # ----- models ---------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Load the policy (and a reference), add adapters, shard and probe them for the strategy (once: Lightning
        may call this for every stage)."""
        if self.policy is None:
            strategy = getattr(attached_trainer(self), "strategy", None)
            policy = self.load_model(strategy)
            self.configure_reference(policy)  # a copy of the starting weights, before adapters are added
            self.policy = trainable(policy, self.model_settings)
            chunked = self.token_logps and self.model_settings.logps_chunk_size > 0
            self.head_transform, packing = place(self.policy, strategy, probe_head=chunked)
            if self.model_settings.compile_layers and not compile_layers(self.policy):
                raise ConfigError(f"model.compile_layers=true: {self.model_name} names no repeated blocks "
                                  "(_no_split_modules) to compile")
            checks = [packing, *(place(reference, strategy)[1] for reference in self.reference_models())]
            self.packing = next((check for check in checks if not check), packing)
            if chunked and self.head_transform is None:
                rank_zero_warn(f"{self.model_name}: its logits are not its LM head applied to its decoder's last "
                               "hidden state (or a scale or soft-cap of that): log-probs come from the full logits "
                               "(logps_chunk_size ignored).")
            self.metrics = self.stage_metrics()

    def load_model(self, strategy: Strategy | None) -> nn.Module:
        """The starting policy, built for ``strategy`` (:func:`~prefmodule.models.setup.load_policy`)."""
        return load_policy(self.model_settings, strategy)

    def configure_reference(self, policy: nn.Module) -> None:
        """Hook for objectives with a reference model, called with the freshly loaded policy (on the meta
        device under FSDP2: a copy of it is filled from the same files when sharded)."""

    def reference_models(self) -> list[nn.Module]:
        """The reference models this module holds (placed for the strategy like the policy)."""
        return []

    def connect(self, datamodule: LightningDataModule) -> LightningDataModule:
        """Tell ``datamodule`` what this objective needs (:meth:`batch_format`, through its ``connect``), before
        Lightning's data hooks read and tokenise the data, and keep its answer (the chat template the export saves,
        the collator for batches the objective builds itself). Returns ``datamodule``. The CLI calls it before
        every subcommand; from Python: ``trainer.fit(module, datamodule=module.connect(data))``. A datamodule of
        one's own, without ``connect``, is returned as it is."""
        if not callable(getattr(datamodule, "connect", None)):
            return datamodule
        connection = datamodule.connect(self.batch_format())
        self.chat_template, self.collator = connection.chat_template, connection.collator
        return datamodule

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        if callable(getattr(datamodule, "connect", None)) and getattr(datamodule, "batch_format", None) != \
                self.batch_format():
            raise ConfigError(f"{type(datamodule).__name__} is not connected to this {type(self).__name__}: call "
                              f"trainer.{getattr(stage, 'value', stage)}(module, datamodule=module.connect(data)) (the "
                              "CLI connects them)")

    def batch_format(self) -> BatchFormat:
        """What this objective needs from its data (see :meth:`PreferenceDataModule.connect`); whether batches
        can be packed is asked at collate time (:meth:`packed_rows`), once the models are placed."""
        return BatchFormat(self.tokenizer, unpaired=self.unpaired, packing=self.packed_rows,
                           predicts_either=self.predicts_either, objective=type(self).__name__)

    def data_collator(self) -> PreferenceCollator:
        """The connected data's collator, for batches the objective builds itself (sampled pairs, groups of
        completions), laid out as the data's; without a connection, padded or packed as the models allow."""
        if self.collator is not None:
            return self.collator()
        return PreferenceCollator(self.tokenizer.pad_token_id, padding_free=self.packed_attention)

    def packed_rows(self) -> PackedAttention:
        """Whether every model this module runs attends to packed rows per sequence, with no quadratic mask, and
        why not (before :meth:`configure_model`: not yet)."""
        if self.packed_attention:
            return PackedAttention(True)
        return self.packing if not self.packing else PackedAttention(False, "a reference model takes no sequence "
                                                                            "bounds")

    @property
    def packed_attention(self) -> bool:
        """Whether every model this module runs attends to packed rows per sequence, with no quadratic mask."""
        models = [self.policy, *self.reference_models()]
        return self.policy is not None and all(takes_sequence_bounds(model) for model in models)

    def reference_parameters(self) -> int:
        """Parameters of the reference forward that runs beside the policy's in training (0: none)."""
        return 0

    @property
    def chunked_logps(self) -> bool:
        """Whether log-probs come from the decoder's hidden states through the LM head in chunks."""
        return self.head_transform is not None

    # ----- forward ----------------------------------------------------------------------------
    def forward(self, model: nn.Module, sequences: Sequences, sum_sq_probs: bool = False, router_loss: bool = False,
                token_entropy: bool = False) -> tuple[SequenceStats, Tensor | None]:
        """One forward of ``model`` over ``sequences`` (:func:`~prefmodule.models.scoring.forward_stats`): its
        statistics, before :meth:`reweighted`, and with ``router_loss`` the load-balancing loss."""
        return forward_stats(model, sequences, self.head_transform, self.model_settings.logps_chunk_size,
                             sum_sq_probs, router_loss, token_entropy)

    def model_stats(self, model: nn.Module, sequences: Sequences, sum_sq_probs: bool = False) -> SequenceStats:
        """``model``'s statistics of ``sequences`` as the objective scores them (:meth:`reweighted`), never asking
        a mixture-of-experts model for its router logits (a reference, a scoring pass)."""
        return self.reweighted(self.forward(model, sequences, sum_sq_probs)[0])

    def policy_forward(self, sequences: Sequences) -> tuple[SequenceStats, Tensor | None]:
        """The policy's statistics of ``sequences`` and, beside them, its mixture-of-experts load-balancing loss
        (``None`` for a dense policy, or when its weight is 0)."""
        stats, aux_loss = self.forward(self.policy, sequences, self.sum_sq_probs,
                                       router_loss=self.router_loss_weight(self.policy) > 0,
                                       token_entropy=self.token_entropy)
        return self.reweighted(stats), aux_loss

    @property
    def sum_sq_probs(self) -> bool:
        """Whether the policy's forward also sums ``log sum_v p_v^2`` per response (WPO's weights)."""
        return False

    @property
    def token_entropy(self) -> bool:
        """Whether the policy's forward also keeps each response token's entropy (GRPO's ``entropy`` metric)."""
        return False

    def reweighted(self, stats: SequenceStats) -> SequenceStats:
        """The statistics the objective scores, from those of a forward (policy and reference alike): as they are,
        unless an objective reweighs the tokens (LD-DPO)."""
        return stats

    def router_loss_weight(self, model: nn.Module) -> float:
        """The weight of ``model``'s MoE load-balancing loss in the objective (0: none, or a dense model)."""
        coef = router_aux_loss_coef(model)
        if coef is None:
            return 0.0
        own = self.model_settings.router_aux_loss_coef
        return coef if own is None else own

    def reference_logps(self, batch: PairBatch | RowBatch) -> Tensor | None:
        """``[rows, sequences per row]`` reference log-probs of ``batch``; ``None`` for a reference-free objective."""
        return None

    def batch_outputs(self, batch: PairBatch | RowBatch) -> tuple[PairOutputs | RowOutputs, Tensor | None]:
        """The objective on ``batch``, and beside it the policy's router loss (``None`` for a dense policy)."""
        reference = self.reference_logps(batch)  # first: its activations are freed before the policy's exist
        policy, aux_loss = self.policy_forward(batch.sequences)
        return self.objective_outputs(batch, policy, reference), aux_loss

    def objective_outputs(self, batch: PairBatch | RowBatch, policy: SequenceStats,
                          reference: Tensor | None) -> PairOutputs | RowOutputs:
        """The objective on ``batch`` from the policy's statistics of its sequences and, for objectives with a
        reference, the reference's ``[rows, sequences per row]`` log-probs."""
        raise NotImplementedError

    # ----- steps and metrics ------------------------------------------------------------------------------
    def extra_metrics(self, stage: str) -> tuple[str, ...]:
        """The names of the metrics this objective logs besides the common ones, in ``stage``."""
        return ()

    def stage_metrics(self) -> nn.ModuleDict:
        """A :class:`MetricCollection` per stage (keyed ``<stage>_metrics``: a bare ``train`` would shadow
        ``nn.Module.train``), its names prefixed ``train/``, ``val/``, ``test/``; ``aux_loss`` too when the
        policy's router loss counts."""
        aux = ("aux_loss",) if self.router_loss_weight(self.policy) > 0 else ()
        return nn.ModuleDict({f"{stage}_metrics": self.metric_collection((*self.extra_metrics(stage), *aux))
                              .clone(prefix=f"{stage}/") for stage in STAGES})

    def metric_collection(self, extra: tuple[str, ...]) -> MetricCollection:
        """The metrics of one stage, besides the ``extra`` names: TRL's preference metrics."""
        return preference_metrics(extra, not self.unpaired)

    def training_step(self, batch: PairBatch | RowBatch, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: PairBatch | RowBatch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: PairBatch | RowBatch, batch_idx: int) -> None:
        self._step(batch, "test")

    def _step(self, batch: PairBatch | RowBatch, stage: str) -> Tensor:
        outputs, aux_loss = self.batch_outputs(batch)
        if aux_loss is not None:  # as transformers' MoE models add it to their language-modelling loss
            outputs.loss = outputs.loss + self.router_loss_weight(self.policy) * aux_loss
            outputs.extra["aux_loss"] = aux_loss.detach()
        values, weights = outputs.metric_values(self.length_normalized)
        metrics: MetricCollection = self.metrics[f"{stage}_metrics"]
        if stage == "train":  # each step's own values
            logged, on_step = metrics(values, weights), True
        else:  # the epoch's, over all its items and ranks
            metrics.update(values, weights)
            logged, on_step = dict(metrics.items(keep_base=False)), False
        for prog_bar in (True, False):
            self.log_dict({name: value for name, value in logged.items()
                           if (name.split("/", 1)[1] in PROGRESS_BAR_METRICS) is prog_bar},
                          prog_bar=prog_bar, on_step=on_step, on_epoch=not on_step, batch_size=outputs.items)
        return outputs.loss

    def on_train_epoch_end(self) -> None:
        self.metrics["train_metrics"].reset()

    def predict_step(self, batch: PairBatch | RowBatch, batch_idx: int) -> list[dict]:
        return self.predictions(batch, self.batch_outputs(batch)[0])

    def cited(self) -> tuple[str, str, str] | None:
        """The paper of what this module trains: its ``loss_type``'s own where it has one, else the objective's."""
        loss_type = self.hparams.get("loss_type")
        return self.loss_citations.get(loss_type, self.citation) if isinstance(loss_type, str) else self.citation

    def completion_rewards(self, items: list[dict], completions: list[list[int]]) -> list[float | None] | None:
        """The objective's own reward of one completion (token ids) of each data item, for the samples; ``None``
        where it has none of its own (the samples then show the implicit reward of a preference objective)."""
        return None

    def predictions(self, batch: PairBatch, outputs: PairOutputs) -> list[dict]:
        """One row per pair of ``batch``: its log-probs and rewards, and which response the model prefers."""
        rows = zip(batch.index.tolist(), logged_logps(outputs.chosen, self.length_normalized).tolist(),
                   logged_logps(outputs.rejected, self.length_normalized).tolist(), outputs.chosen_rewards.tolist(),
                   outputs.rejected_rewards.tolist())
        return [
            {"index": index, "chosen_logps": chosen_logps, "rejected_logps": rejected_logps,
             "chosen_reward": chosen_reward, "rejected_reward": rejected_reward,
             "preferred": "chosen" if chosen_reward > rejected_reward else "rejected"}
            for index, chosen_logps, rejected_logps, chosen_reward, rejected_reward in rows
        ]

    # ----- optimisation, callbacks, export ------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        return configure_optimizer(params, self.optimizer_settings, int(self.trainer.estimated_stepping_batches),
                                   self.optimizer_factory)

    def lr_scheduler_step(self, scheduler, metric) -> None:
        if not step_skipped(self.trainer):  # the non-finite guard dropped this step's update: the schedule waits too
            super().lr_scheduler_step(scheduler, metric)

    def configure_callbacks(self):
        return module_callbacks(attached_trainer(self))

    def export_hf(self, path: str, merge_adapters: bool = True) -> None:
        """Save the policy and tokenizer with ``save_pretrained`` as the base model had them (config with its
        ``use_cache``, generation config, tied weights), with the chat template the data was rendered with
        (``data.chat_template``, from :meth:`connect`) saved in the tokenizer.

        LoRA adapters are merged into a CPU copy of the weights (``merge_adapters``), or saved alone. Global rank
        0 writes. Sharded (FSDP) weights are gathered to it first: then every rank must call this.
        """
        export_policy(self, path, merge_adapters, self.chat_template)
