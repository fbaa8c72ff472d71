"""A policy (and a reference) made ready for the trainer's strategy, one step after the other: loaded (built empty
under FSDP2, its shards streamed in when sharded), given LoRA adapters and activation checkpointing, then sharded
and probed: whether packed rows reach its attention per sequence, and whether its logits are its LM head's."""

from __future__ import annotations

import functools

from lightning.pytorch.strategies import ModelParallelStrategy, Strategy
from torch import nn
from torch.utils.checkpoint import checkpoint

from prefmodule.errors import ConfigError

from prefmodule.models.attention import PackedAttention, enable_packed_attention
from prefmodule.models.loading import empty_causal_lm, load_causal_lm, stand_in, unwrapped
from prefmodule.models.logps import LogitsTransform, head_logits_transform
from prefmodule.models.settings import ModelSettings
from prefmodule.models.sharding import is_sharded, reshard, shard
from prefmodule.private.transformers import no_split_modules


def load_policy(settings: ModelSettings, strategy: Strategy | None) -> nn.Module:
    """The starting policy: built on the meta device under FSDP2 (filled from its files once sharded, see
    :func:`place`), unless its files cannot fill it as they are or a LoRA initialisation needs the whole base
    weights (DoRA, PiSSA, ...); loaded whole otherwise."""
    lora = settings.lora
    plain_lora = lora is None or (not lora.use_dora and lora.init_lora_weights in (True, False, "gaussian"))
    policy = None
    if isinstance(strategy, ModelParallelStrategy) and plain_lora:
        policy = empty_causal_lm(settings.model, settings)
    return policy if policy is not None else load_causal_lm(settings.model, settings)


def trainable(policy: nn.Module, settings: ModelSettings) -> nn.Module:
    """``policy`` as it trains: with LoRA adapters (peft) when ``settings.lora``, activation checkpointing when
    asked (of whole decoder blocks, or of their MLPs alone), in train mode (``from_pretrained`` returns eval mode;
    Lightning keeps modes as found)."""
    if settings.lora is not None:
        from peft import get_peft_model

        policy = get_peft_model(policy, settings.lora)
    if settings.gradient_checkpointing == "mlp":
        if not checkpoint_mlps(policy):
            raise ConfigError("model.gradient_checkpointing=mlp: the policy's repeated blocks (_no_split_modules) "
                              "have no `mlp` to checkpoint; use true (whole blocks)")
    elif settings.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return policy.train()


def checkpoint_mlps(model: nn.Module) -> int:
    """Recompute the MLP of each of ``model``'s repeated blocks in backward instead of keeping its activations
    (the ``[tokens, intermediate]`` gate and up projections, the largest a dense decoder keeps). Transformers'
    own checkpointing takes whole blocks only. Returns how many MLPs were wrapped."""
    blocks = set(no_split_modules(unwrapped(model)))
    mlps = [module.mlp for module in model.modules() if type(module).__name__ in blocks
            and isinstance(getattr(module, "mlp", None), nn.Module)]
    for mlp in mlps:
        mlp.forward = functools.partial(checkpoint, mlp.forward, use_reentrant=False)
    return len(mlps)


def compile_layers(model: nn.Module) -> int:
    """``torch.compile`` each of ``model``'s repeated blocks (its ``_no_split_modules`` classes: the decoder
    layers), regionally: one compiled code serves every layer of the same shape, dynamic over the packed lengths.
    On the 2-core CPU it left the SmolLM2 step time as it was and took a quarter off its peak memory (inductor
    fuses RMSNorm, rotary and SiLU-up, keeping fewer activations), for ~40 s of compilation once (BENCHMARKS.md).
    Returns how many blocks were compiled."""
    blocks = set(no_split_modules(unwrapped(model)))
    layers = [module for module in model.modules() if type(module).__name__ in blocks]
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def place(model: nn.Module, strategy: Strategy | None,
          probe_head: bool = False) -> tuple[LogitsTransform | None, PackedAttention]:
    """Shard ``model`` for ``strategy`` (FSDP2; nothing otherwise), switch its attention to per-sequence SDPA
    when a probe shows packed rows stay apart, and return, with ``probe_head``, how its logits follow from its LM
    head (``None``: from the full logits only), and whether packed rows reach its attention apart (and why not).
    A sharded model is probed through a small stand-in of its architecture, so no weights are gathered."""
    shard(model, strategy)
    probe = (stand_in(model) or model) if is_sharded(model) else model
    packing = enable_packed_attention(model, probe)
    head = head_logits_transform(probe) if probe_head else None
    reshard(model)  # if the probes ran on the sharded model itself
    return head, packing
