"""How the policy is loaded and run: :class:`ModelSettings`, checked when built, before any weights load. Each
error names the option (as the CLI spells it), the value and what is allowed."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

import torch
from huggingface_hub import constants

from prefmodule.errors import ConfigError, MissingFileError, require
from prefmodule.paths import resolve

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelSettings:
    """The policy's source and how it runs (``model.*`` options of every objective).

    ``lora`` becomes a ``peft.LoraConfig`` (``task_type`` ``CAUSAL_LM``, ``target_modules`` ``all-linear`` unless
    given); :attr:`lora_arguments` is the same as plain data, for the checkpoint's hyperparameters.
    """

    model: str
    tokenizer: str | None = None
    dtype: str = "float32"
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    lora: Any = None  # peft.LoraConfig, or its keyword arguments
    gradient_checkpointing: bool | str = False  # or "mlp": the MLP of each decoder block alone
    logps_chunk_size: int = 512
    router_aux_loss_coef: float | None = None
    task: str = "causal_lm"  # or "reward": a sequence-classification model with one label (set by the objective)
    compile_layers: bool = False

    def __post_init__(self):
        require(isinstance(self.logps_chunk_size, int) and self.logps_chunk_size >= 0, "model.logps_chunk_size",
                self.logps_chunk_size, "must be a whole number >= 0 (response tokens per chunk through the LM head; "
                "0 = full logits)")
        require(self.dtype in DTYPES, "model.dtype", self.dtype, f"must be one of {list(DTYPES)}")
        require(self.gradient_checkpointing in (False, True, "mlp"), "model.gradient_checkpointing",
                self.gradient_checkpointing, "must be true (whole decoder blocks), mlp (their MLPs alone) or false")
        if self.attn_implementation is not None and "/" not in self.attn_implementation:  # "/": a Hub kernel
            from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

            allowed = ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]
            require(self.attn_implementation in allowed, "model.attn_implementation", self.attn_implementation,
                    f"must be one of {allowed}")
        require(self.router_aux_loss_coef is None or self.router_aux_loss_coef >= 0, "model.router_aux_loss_coef",
                self.router_aux_loss_coef, "must be >= 0 (0 turns the MoE load-balancing loss off; unset takes the "
                "model config's)")
        self.lora = lora_config(self.lora, "SEQ_CLS" if self.task == "reward" else "CAUSAL_LM")
        check_model("model.model", self.model, self.trust_remote_code, self.task)  # its config.json, before weights
        if self.tokenizer is not None:
            check_source("model.tokenizer", self.tokenizer)

    @property
    def lora_arguments(self) -> dict | None:
        """The LoRA arguments that differ from ``peft.LoraConfig``'s defaults, as plain data."""
        if self.lora is None:
            return None
        from peft import LoraConfig

        default = LoraConfig()
        plain = {field.name: getattr(self.lora, field.name) for field in dataclasses.fields(LoraConfig)
                 if field.init and getattr(self.lora, field.name) != getattr(default, field.name)}
        return json.loads(json.dumps(plain, default=lambda value: sorted(value) if isinstance(value, set) else str(value)))

    def load_kwargs(self) -> dict:
        """``from_pretrained`` / ``from_config`` keyword arguments: dtype, remote code, attention."""
        attention = {"attn_implementation": self.attn_implementation} if self.attn_implementation else {}
        return dict(dtype=DTYPES[self.dtype], trust_remote_code=self.trust_remote_code, **attention)


def lora_config(settings, task_type: str = "CAUSAL_LM") -> "peft.LoraConfig | None":  # noqa: F821
    """``peft.LoraConfig`` from a module's ``lora`` setting: ``None``, a ``LoraConfig``, or its keyword
    arguments (``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules``, ``use_dora``, ``use_rslora``,
    ``modules_to_save``, ...). ``task_type`` defaults to the objective's (``SEQ_CLS`` trains a reward model's new
    score head too)."""
    from peft import LoraConfig

    if settings is None or isinstance(settings, LoraConfig):
        return settings
    if not isinstance(settings, dict):
        raise ConfigError(f"model.lora={settings!r}: expected a mapping of peft.LoraConfig arguments")
    allowed = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
    unknown = sorted(settings.keys() - allowed)
    if unknown:
        raise ConfigError(f"model.lora: {unknown} are not peft.LoraConfig arguments; allowed: {sorted(allowed)}")
    config = LoraConfig(**{"task_type": task_type, "target_modules": "all-linear", **settings})
    require(isinstance(config.r, int) and config.r >= 1, "model.lora.r", config.r,
            "must be a whole number >= 1 (the adapters' rank)")
    require(0 <= config.lora_dropout < 1, "model.lora.lora_dropout", config.lora_dropout, "must be in [0, 1)")
    if not config.target_modules:
        raise ConfigError("model.lora.target_modules is empty: name the layers to adapt, e.g. all-linear or "
                          "[q_proj, v_proj].")
    return config


def check_source(option: str, name: Any) -> str:
    """``name`` as a loadable location: an existing folder, an ``asset://`` name or a Hub id (``owner/name``)."""
    require(isinstance(name, str) and name.strip() != "", option, name, "must be a model folder (written by "
            "save_pretrained), an asset:// name or a Hugging Face Hub id")
    try:
        location = resolve(name)
    except FileNotFoundError as error:
        raise MissingFileError(f"{option}={name!r}: {error}") from None
    hub_id = not os.path.exists(location) and location.count("/") == 1 and not location.startswith((".", "/", "~"))
    if not os.path.isdir(location) and not hub_id:
        found = "a file, not a folder" if os.path.exists(location) else "no such folder"
        raise MissingFileError(f"{option}={name!r}: {found} ({os.path.abspath(location)}). Pass a folder written "
                               "by save_pretrained, an asset:// name, or a Hugging Face Hub id (owner/name).")
    return location


def check_model(option: str, name: str, trust_remote_code: bool = False, task: str = "causal_lm") -> None:
    """``name`` is a causal (decoder) language model, or for ``task="reward"`` also a reward model (a decoder's
    sequence classification with one label): read from its ``config.json`` alone, before any weights."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    location = check_source(option, name)
    try:
        config = AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
    except OSError as error:
        where = "the Hub is not contacted (HF_HUB_OFFLINE is set) and it is not in the local cache" \
            if constants.HF_HUB_OFFLINE else "it could not be read"
        raise MissingFileError(f"{option}={name!r}: no model config found: {where} "
                               f"({str(error).splitlines()[0]}). Pass a folder written by save_pretrained.") from None
    except ValueError as error:
        raise ConfigError(f"{option}={name!r}: its config.json cannot be used: {error}") from None
    causal_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    declared = set(getattr(config, "architectures", None) or ())
    if task == "reward" and any(name.endswith("ForSequenceClassification") for name in declared):
        require(config.num_labels == 1, option, name, f"is a classifier with {config.num_labels} labels; a reward "
                "model has one (a causal LM checkpoint gets a new one-label head)")
        return
    remote = "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    decoder = config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and (
        config.model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES or config.is_decoder)
    if not (declared & causal_classes or remote or (decoder and not declared - causal_classes)):
        kind = ", ".join(sorted(declared)) or config.model_type
        raise ConfigError(f"{option}={name!r} is a {kind} model, not a causal language model: preference "
                          "training needs a decoder that predicts the next token (e.g. Llama, Qwen, Mistral, GPT-2).")
