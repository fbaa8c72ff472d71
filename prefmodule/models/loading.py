"""Loading Hugging Face models and tokenizers from a local path, an ``asset://`` name or a hub id; LoRA
settings; the MoE router loss; models built empty whose weights stream in from their safetensors files."""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase,
)

from prefmodule.errors import ConfigError
from prefmodule.paths import resolve

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Names the LoRA settings had before they became peft.LoraConfig's own.
OLD_LORA_NAMES = {"alpha": "lora_alpha", "dropout": "lora_dropout"}


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer for right-padded training; a missing pad token falls back to EOS."""
    tokenizer = _from_pretrained(AutoTokenizer, name_or_path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token is None:
        raise ConfigError(f"the tokenizer of {name_or_path!r} has no EOS token: preference training ends every "
                          "response with it. Use a tokenizer that has one (model.tokenizer), or set its eos_token "
                          "and save it with save_pretrained.")
    tokenizer.padding_side = "right"
    return tokenizer


def load_causal_lm(name_or_path: str, dtype: str = "float32", trust_remote_code: bool = False,
                   attn_implementation: str | None = None) -> PreTrainedModel:
    """Load a causal LM with float32 weights by default (Lightning's precision flag handles mixed precision)."""
    return _from_pretrained(AutoModelForCausalLM, name_or_path, **_model_kwargs(dtype, trust_remote_code,
                                                                                attn_implementation))


def empty_causal_lm(name_or_path: str, dtype: str = "float32", trust_remote_code: bool = False,
                    attn_implementation: str | None = None) -> PreTrainedModel | None:
    """The model of ``name_or_path`` built on the meta device (no memory for its weights), to be sharded
    and then filled from its safetensors files (:func:`stream_weights`); ``None`` when its files cannot
    fill it as they are: no safetensors, or names that ``from_pretrained`` converts (MoE experts saved one
    by one, old layouts), so the model must be loaded whole.
    """
    location = _local_files(name_or_path)
    files = checkpoint_files(location) if location else {}
    if not files:
        return None
    kwargs = _model_kwargs(dtype, trust_remote_code, attn_implementation)
    config = AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
    with torch.device("meta"):  # as from_pretrained builds it before loading
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    if not set(checkpoint_keys(model)) <= files.keys():
        return None
    model.name_or_path = location
    if (Path(location) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(location)
    return model


def _model_kwargs(dtype: str, trust_remote_code: bool, attn_implementation: str | None) -> dict:
    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    attention = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return dict(dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, **attention)


def _from_pretrained(auto_class, name_or_path: str, **kwargs):
    location = resolve(name_or_path)
    try:
        return auto_class.from_pretrained(location, **kwargs)
    except OSError as error:
        if os.path.isdir(location):
            raise
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        hint = "HF_HUB_OFFLINE is set, so the Hub is not contacted" if offline else "the Hub could not be reached"
        raise OSError(
            f"Could not load {name_or_path!r}: it is not a local directory and {hint}. "
            "Pass a local path (a folder written by save_pretrained) or run where the Hub is reachable."
        ) from error


def _local_files(name_or_path: str) -> str | None:
    """The folder holding ``name_or_path``'s config and safetensors files (downloaded for a hub id)."""
    location = resolve(name_or_path)
    if os.path.isdir(location):
        return location
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(location, allow_patterns=["*.json", "*.safetensors"])
    except Exception:  # offline or unknown: the full load that follows reports it
        return None


def stand_in(model: nn.Module) -> PreTrainedModel | None:
    """A small random model of ``model``'s architecture and config (two layers, a 256-token vocabulary) on the
    CPU, for the probes that check what the architecture's code does (packed attention, the head's logits)
    without gathering a sharded model's weights; ``None`` if the config cannot be cut down so."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config.__class__.from_dict(base.config.to_dict())
    layers = min(2, config.num_hidden_layers)
    config.num_hidden_layers, config.vocab_size = layers, 256
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:layers]
    try:
        with torch.device("cpu"), torch.random.fork_rng(devices=[]):  # leaves the seeded RNG as it was
            return AutoModelForCausalLM.from_config(config, attn_implementation=base.config._attn_implementation,
                                                    dtype=base.dtype).eval()
    except (ValueError, TypeError, IndexError, AttributeError):
        return None


# ----- streaming weights into a sharded model ---------------------------------------------------
def checkpoint_files(location: str) -> dict[str, str]:
    """Tensor name -> the safetensors file of ``location`` that holds it ({} without safetensors)."""
    folder = Path(location)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {key: str(folder / file) for key, file in json.loads(index.read_text())["weight_map"].items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        return {}
    from safetensors import safe_open

    with safe_open(single, "pt") as handle:
        return dict.fromkeys(handle.keys(), str(single))


def checkpoint_key(name: str) -> str:
    """The checkpoint name of parameter ``name`` of a model, or of its base when LoRA wraps it."""
    name = name.removeprefix("base_model.model.")
    for wrapper in (".base_layer", ".original_module"):
        name = name.replace(wrapper, "")
    head, saved, tail = name.partition(".modules_to_save.")
    return f"{head}.{tail.partition('.')[2]}" if saved else name


def checkpoint_keys(model: nn.Module) -> list[str]:
    """The checkpoint names of ``model``'s weights (one per tied weight; LoRA adapters left out)."""
    return [checkpoint_key(name) for name, _ in model.named_parameters() if not _is_adapter(name)] + [
        checkpoint_key(name) for name, _ in _persistent_buffers(model)]


def _is_adapter(name: str) -> bool:
    return any(part.startswith("lora_") for part in name.split("."))


def _persistent_buffers(model: nn.Module):
    for module_name, module in model.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                yield f"{module_name}.{name}".lstrip("."), buffer


def prepare_empty(model: nn.Module) -> None:
    """Give a meta-built ``model`` what its files do not hold, before it is sharded: its non-persistent
    buffers (rotary frequencies, embedding scales) computed as ``from_pretrained`` does, by the model's
    own ``_init_weights``, and LoRA adapters initialised by peft."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for module in base.modules():
        buffers = module._non_persistent_buffers_set & {n for n, b in module.named_buffers(recurse=False) if b.is_meta}
        if buffers:
            for name in buffers:
                module._buffers[name] = torch.empty_like(module._buffers[name], device="cpu")
            base._init_weights(module)
    init_adapters(model)


def init_adapters(model: nn.Module) -> None:
    """Materialise on the CPU and initialise, with peft's own ``reset_lora_parameters``, the LoRA
    adapters of a model whose base is on the meta device (peft put them there with it)."""
    from peft.tuners.lora import LoraLayer

    for layer in model.modules():
        if not isinstance(layer, LoraLayer):
            continue
        for name, param in list(layer.named_parameters()):
            if _is_adapter(name) and param.is_meta:  # lora_A/B (Linear), lora_embedding_A/B (Embedding)
                owner, _, attribute = name.rpartition(".")
                setattr(layer.get_submodule(owner), attribute,
                        nn.Parameter(torch.empty_like(param, device="cpu"), requires_grad=param.requires_grad))
        for adapter in layer.r:
            layer.reset_lora_parameters(adapter, model.peft_config[adapter].init_lora_weights)


def stream_weights(model: nn.Module, device: torch.device) -> None:
    """Fill a sharded ``model`` built on the meta device from its safetensors files: each rank reads only
    the rows of its own shards (FSDP2 shards dim 0 as ``torch.chunk``). Parameters and buffers already
    real (adapters, rotary frequencies) keep their values.

    Each tensor is read with its file opened and closed around it, not with torch's
    ``HuggingFaceStorageReader``: that keeps a file mapped for the whole load, so the pages read would
    stay in the rank's memory on top of its shards.
    """
    from safetensors import safe_open

    from_files = {name for name, p in model.named_parameters() if p.is_meta}
    from_files |= {name for name, b in _persistent_buffers(model) if b.is_meta}
    kept = {name: _local(p).clone() for name, p in model.named_parameters() if name not in from_files}
    kept |= {name: b.clone() for name, b in model.named_buffers() if name not in from_files}
    model.to_empty(device=device)
    files = checkpoint_files(model.name_or_path)
    with torch.no_grad():
        for name, value in [*model.named_parameters(), *model.named_buffers()]:
            local = _local(value)
            if name in kept:
                local.copy_(kept[name])
                continue
            key = checkpoint_key(name)
            start = _shard_offset(value)
            with safe_open(files[key], "pt") as handle:
                rows = handle.get_slice(key)
                local.copy_(rows[start: start + local.shape[0]] if local.dim() else rows[:])


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, torch.distributed.tensor.DTensor) else tensor


def _shard_offset(tensor: torch.Tensor) -> int:
    """The first dim-0 row this rank holds of ``tensor`` (0 unless it is a dim-0 sharded DTensor)."""
    if not isinstance(tensor, torch.distributed.tensor.DTensor) or tensor.dim() == 0:
        return 0
    mesh, (placement,) = tensor.device_mesh, tensor.placements
    if not placement.is_shard(0):
        return 0
    rows_per_rank = math.ceil(tensor.shape[0] / mesh.size())
    return min(mesh.get_local_rank() * rows_per_rank, tensor.shape[0])


# ----- LoRA ---------------------------------------------------------------------------------------
def lora_config(settings) -> "peft.LoraConfig | None":  # noqa: F821
    """``peft.LoraConfig`` from a module's ``lora`` setting: ``None``, a ``LoraConfig``, or its keyword
    arguments (``r``, ``lora_alpha``, ``lora_dropout``, ``target_modules``, ``use_dora``, ``use_rslora``,
    ``modules_to_save``, ...). ``task_type`` defaults to ``CAUSAL_LM``. The older ``alpha`` and ``dropout``
    still mean ``lora_alpha`` and ``lora_dropout``."""
    from peft import LoraConfig

    if settings is None or isinstance(settings, LoraConfig):
        return settings
    if not isinstance(settings, dict):
        raise ConfigError(f"model.lora={settings!r}: expected a mapping of peft.LoraConfig arguments")
    settings = {OLD_LORA_NAMES.get(name, name): value for name, value in settings.items()}
    allowed = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
    unknown = sorted(settings.keys() - allowed)
    if unknown:
        raise ConfigError(f"model.lora: {unknown} are not peft.LoraConfig arguments; allowed: {sorted(allowed)}")
    config = LoraConfig(**{"task_type": "CAUSAL_LM", "target_modules": "all-linear", **settings})
    if not (isinstance(config.r, int) and config.r >= 1):
        raise ConfigError(f"model.lora.r={config.r!r}: must be a whole number >= 1 (the adapters' rank).")
    if not 0 <= config.lora_dropout < 1:
        raise ConfigError(f"model.lora.lora_dropout={config.lora_dropout!r}: must be in [0, 1).")
    if not config.target_modules:
        raise ConfigError("model.lora.target_modules is empty: name the layers to adapt, e.g. all-linear or "
                          "[q_proj, v_proj].")
    return config


def lora_arguments(config: "peft.LoraConfig") -> dict:  # noqa: F821
    """The arguments of ``config`` that differ from ``peft.LoraConfig``'s defaults, as plain data."""
    from peft import LoraConfig

    default = LoraConfig()
    plain = {field.name: getattr(config, field.name) for field in dataclasses.fields(LoraConfig)
             if field.init and getattr(config, field.name) != getattr(default, field.name)}
    return json.loads(json.dumps(plain, default=lambda value: sorted(value) if isinstance(value, set) else str(value)))


# ----- mixture of experts -------------------------------------------------------------------------
def router_aux_loss_coef(model: nn.Module) -> float | None:
    """The weight of the load-balancing loss the model's config sets; ``None`` for a model without routers."""
    config = model.config
    if not hasattr(config, "output_router_logits"):
        return None
    return float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)


def router_logits_kwargs(model: nn.Module, wanted: bool) -> dict:
    """The forward (or ``generate``) keyword that asks a mixture-of-experts ``model`` for its router logits or not,
    whatever its config's ``output_router_logits`` says; nothing for a dense model."""
    return {"output_router_logits": wanted} if hasattr(model.config, "output_router_logits") else {}


def load_balancing_loss(model: nn.Module, router_logits: tuple[torch.Tensor, ...],
                        attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The model's own load-balancing loss (``load_balancing_loss_func`` of its modeling file, Switch
    Transformer eqs. 4-6) over ``router_logits`` of one decoder forward, as its ``forward`` computes ``aux_loss``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    loss_func = inspect.getmodule(type(base)).load_balancing_loss_func
    return loss_func(router_logits, base.num_experts, base.num_experts_per_tok, attention_mask)
