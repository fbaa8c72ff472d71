"""A policy (and a reference) made ready for the trainer's strategy, one step after the other: loaded (built empty
under FSDP2, its shards streamed in when sharded), given LoRA adapters and activation checkpointing, then sharded
and probed: whether packed rows reach its attention per sequence, and whether its logits are its LM head's."""

from __future__ import annotations

from lightning.pytorch.strategies import ModelParallelStrategy, Strategy
from torch import nn

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
    asked, in train mode (``from_pretrained`` returns eval mode; Lightning keeps modes as found)."""
    if settings.lora is not None:
        from peft import get_peft_model

        policy = get_peft_model(policy, settings.lora)
    if settings.gradient_checkpointing:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return policy.train()


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
