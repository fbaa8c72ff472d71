"""The trained policy as a Hugging Face folder (``save_pretrained``), as the base model came: its config
(``use_cache`` included), generation config and tied weights, the tokenizer with the chat template the data was
rendered with, LoRA adapters merged into a CPU copy of the weights or saved alone."""

from __future__ import annotations

import copy

import torch
from lightning.pytorch import LightningModule
from torch import nn

from prefmodule.errors import NonFiniteError, writing
from prefmodule.models.sharding import cpu_copy, gather_unsharded, is_sharded


def export_policy(module: LightningModule, path: str, merge: bool, chat_template: str | None) -> None:
    """Save ``module.policy`` and ``module.tokenizer`` (with ``chat_template`` when given) to ``path``.

    Global rank 0 writes. Sharded (FSDP) weights are gathered to it first: then every rank must call this. A policy
    holding a NaN or infinite weight is never written (:class:`~prefmodule.errors.NonFiniteError`).
    """
    policy = module.policy
    lora = hasattr(policy, "merge_and_unload")
    sharded = is_sharded(policy)
    check_finite_weights(policy, path, sharded)
    if sharded:
        model = gather_unsharded(module, "policy")
    else:
        model = cpu_copy(policy) if lora and merge else policy
    if module.global_rank != 0:
        return
    if lora and merge:
        model = model.merge_and_unload(safe_merge=True)  # new tensors for the merged layers: no in-place sum
    tokenizer = copy.copy(module.tokenizer)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    with writing(path, "the Hugging Face export"):
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)


def check_finite_weights(model: nn.Module, destination: str, sharded: bool = False) -> None:
    """Raise :class:`~prefmodule.errors.NonFiniteError` if ``model`` holds a NaN or infinite weight. Sharded
    weights: every rank checks its shards and all agree (then call it on every rank)."""
    bad = [name for name, p in model.named_parameters()
           if not torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all()]
    device = next(model.parameters()).device  # where the backend (gloo, nccl) takes its tensors
    count = torch.tensor(len(bad), device=device)
    if sharded:
        torch.distributed.all_reduce(count)
    if count.item():
        names = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
        raise NonFiniteError(f"the policy holds non-finite weights (NaN or infinite: {names or 'on another rank'}); "
                             f"nothing was written to {destination}. Training diverged: resume from an earlier "
                             "checkpoint with a lower learning rate or gradient clipping.")
