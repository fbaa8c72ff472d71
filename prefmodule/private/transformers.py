"""transformers' private names that prefmodule uses (transformers 5 has no public way to any of them)."""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY


def attn_implementation(config: PreTrainedConfig) -> str | None:
    """The attention implementation a config selects (its private ``_attn_implementation``): no public getter."""
    return getattr(config, "_attn_implementation", None)


def no_split_modules(model: nn.Module | type) -> tuple[str, ...]:
    """The decoder-layer class names a model (class) keeps unsplit, its private ``_no_split_modules``: no getter."""
    return tuple(getattr(model, "_no_split_modules", None) or ())


def from_config(model_class: type[PreTrainedModel], config: PreTrainedConfig) -> PreTrainedModel:
    """A new model of ``model_class`` as ``AutoModel*.from_config`` builds it (its private ``_from_config``)."""
    return model_class._from_config(config)


def init_module_weights(model: PreTrainedModel, module: nn.Module) -> None:
    """Initialise one submodule by the model's own private ``_init_weights``: the public init is whole-model."""
    model._init_weights(module)


def register_recordable_outputs(module: PreTrainedModel) -> None:
    """List what a module may record (router logits) under its FSDP2 class name in a private registry: no public way."""
    _CAN_RECORD_REGISTRY[module] = type(module)._can_record_outputs
