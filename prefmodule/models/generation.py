"""Completions from a causal LM: batched, KV-cached ``generate`` on token ids, each completion cut after its first
end token. Every generation in prefmodule goes through :func:`generate`."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from prefmodule.models.moe import router_logits_kwargs


def end_tokens(model: nn.Module, tokenizer) -> set[int]:
    """The ids that end a completion: the tokenizer's EOS and the model's generation config's."""
    return {tokenizer.eos_token_id, *np.atleast_1d(model.generation_config.eos_token_id or []).tolist()}


def generate(model: nn.Module, tokenizer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, synced: bool = False) -> list[list[int]]:
    """One completion per prompt (token ids), up to and including its first end token (:func:`end_tokens`).

    ``temperature`` 0 decodes greedily; above 0 samples at that temperature, from the nucleus ``top_p``, with
    torch's global random state (seed it, or fork it, around the call). ``synced``: every rank runs the same
    number of forwards (sharded weights are gathered in each; transformers' ``synced_gpus``). A
    mixture-of-experts model is never asked for its router logits: its load-balancing loss means nothing over
    a KV-cached step (and transformers' fails on it).
    """
    inputs = tokenizer.pad({"input_ids": prompts}, padding_side="left", return_tensors="pt")
    inputs = inputs.to(next(model.parameters()).device)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, use_cache=True, synced_gpus=synced,
                                pad_token_id=tokenizer.pad_token_id, **sampling, **router_logits_kwargs(model, False))
    stops = end_tokens(model, tokenizer)
    completions = []
    for ids in output[:, inputs["input_ids"].shape[1]:].tolist():
        end = next((i + 1 for i, token in enumerate(ids) if token in stops), len(ids))
        completions.append(ids[:end])
    return completions
