"""Loading Hugging Face models and tokenizers from a local path, an ``asset://`` name or a hub id; models built
empty whose weights stream in from their safetensors files; small stand-ins of an architecture for probes."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from huggingface_hub import constants
from torch import nn
from transformers import (
    AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, GenerationConfig,
    PreTrainedModel, PreTrainedTokenizerBase,
)

from prefmodule.errors import ConfigError
from prefmodule.models.settings import ModelSettings
from prefmodule.paths import resolve
from prefmodule.private.torch import non_persistent_buffers
from prefmodule.private.transformers import attn_implementation, init_module_weights


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


def load_causal_lm(name_or_path: str, settings: ModelSettings) -> PreTrainedModel:
    """Load a causal LM in ``settings.dtype`` (float32 by default: Lightning's precision flag handles mixed
    precision), with its remote code and attention as ``settings`` say."""
    return _from_pretrained(AutoModelForCausalLM, name_or_path, **settings.load_kwargs())


def load_reward_model(settings: ModelSettings, pad_token_id: int) -> PreTrainedModel:
    """A reward model: ``AutoModelForSequenceClassification`` with one label, from a reward checkpoint (its score
    head kept) or a causal LM checkpoint (a new score head, initialised from torch's seeded random state). Its
    config learns the tokenizer's pad id: the score reads the last token that is not padding."""
    model = _from_pretrained(AutoModelForSequenceClassification, settings.model, num_labels=1,
                             **settings.load_kwargs())
    model.config.pad_token_id = pad_token_id
    return model


def empty_causal_lm(name_or_path: str, settings: ModelSettings) -> PreTrainedModel | None:
    """The model of ``name_or_path`` built on the meta device (no memory for its weights), to be sharded
    and then filled from its safetensors files (:func:`stream_weights`); ``None`` when its files cannot
    fill it as they are: no safetensors, or names that ``from_pretrained`` converts (MoE experts saved one
    by one, old layouts), so the model must be loaded whole.
    """
    location = _local_files(name_or_path)
    files = checkpoint_files(location) if location else {}
    if not files:
        return None
    config = AutoConfig.from_pretrained(location, trust_remote_code=settings.trust_remote_code)
    with torch.device("meta"):  # as from_pretrained builds it before loading
        model = AutoModelForCausalLM.from_config(config, **settings.load_kwargs())
    if not set(checkpoint_keys(model)) <= files.keys():
        return None
    model.name_or_path = location
    if (Path(location) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(location)
    return model


def _from_pretrained(auto_class, name_or_path: str, **kwargs):
    location = resolve(name_or_path)
    try:
        return auto_class.from_pretrained(location, **kwargs)
    except OSError as error:
        if os.path.isdir(location):
            raise
        hint = "HF_HUB_OFFLINE is set, so the Hub is not contacted" if constants.HF_HUB_OFFLINE \
            else "the Hub could not be reached"
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


def unwrapped(model: nn.Module) -> nn.Module:
    """``model`` without its peft wrapper: the transformers model under LoRA adapters (``model`` itself without)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def backbone(model: nn.Module) -> nn.Module:
    """The transformer under a model's head (``model.model`` of a Llama): the decoder of a causal LM, the encoder
    of a reward model's score; LoRA wrappers looked through."""
    return unwrapped(model).base_model


def stand_in(model: nn.Module) -> PreTrainedModel | None:
    """A small random model of ``model``'s architecture and config (two layers, a 256-token vocabulary) on the
    CPU, for the probes that check what the architecture's code does (packed attention, the head's logits)
    without gathering a sharded model's weights; ``None`` if the config cannot be cut down so."""
    base = unwrapped(model)
    config = base.config.__class__.from_dict(base.config.to_dict())
    layers = min(2, config.num_hidden_layers)
    config.num_hidden_layers, config.vocab_size = layers, 256
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:layers]
    try:
        with torch.device("cpu"), torch.random.fork_rng(devices=[]):  # leaves the seeded RNG as it was
            return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation(base.config),
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
            if name not in non_persistent_buffers(module):
                yield f"{module_name}.{name}".lstrip("."), buffer


def prepare_empty(model: nn.Module) -> None:
    """Give a meta-built ``model`` what its files do not hold, before it is sharded: its non-persistent
    buffers (rotary frequencies, embedding scales) computed as ``from_pretrained`` does, by the model's
    own ``_init_weights``, and LoRA adapters initialised by peft."""
    base = unwrapped(model)
    for module in base.modules():
        buffers = non_persistent_buffers(module) & {n for n, b in module.named_buffers(recurse=False) if b.is_meta}
        if buffers:
            for name in buffers:
                module.register_buffer(name, torch.empty_like(module.get_buffer(name), device="cpu"), persistent=False)
            init_module_weights(base, module)
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
