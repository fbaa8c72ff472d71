"""Completions from a causal LM: batched, KV-cached ``generate`` on token ids, each completion cut after its first
end token. Every generation in prefmodule goes through :func:`generate`."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from prefmodule.errors import finite, require
from prefmodule.models.moe import router_logits_kwargs


@dataclass(frozen=True)
class GenerationSettings:
    """How completions are drawn: ``max_new_tokens`` at most, at ``temperature`` (0: greedy) from the nucleus
    ``top_p``, ``num_completions`` per prompt, seeded by ``seed`` (the module's ``generation_seed``)."""

    num_completions: int = 4
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        require(isinstance(self.num_completions, int) and self.num_completions >= 2, "model.num_completions",
                self.num_completions, "must be a whole number >= 2 (a pair needs two completions to compare)")
        require(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "model.max_new_tokens",
                self.max_new_tokens, "must be a whole number >= 1")
        require(finite(self.temperature) and self.temperature >= 0, "model.temperature", self.temperature,
                "must be >= 0 (0 decodes greedily: every completion of a prompt the same)")
        require(finite(self.top_p) and 0 < self.top_p <= 1, "model.top_p", self.top_p, "must be in (0, 1]")
        require(self.temperature > 0 or self.num_completions == 1, "model.temperature", self.temperature,
                f"decodes greedily, and the {self.num_completions} completions of a prompt would all be the same "
                "(nothing to compare); sample at a temperature > 0 (e.g. 1.0)")


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


@contextmanager
def aside_from_training(module, seed: int):
    """Generation that leaves ``module``'s training as it was: no gradients, every submodule in eval mode (each
    mode restored after), torch's random state forked and seeded with ``seed``, under the trainer's precision."""
    devices = [module.device] if module.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad(), eval_mode(module), \
            module.trainer.precision_plugin.forward_context():
        torch.manual_seed(seed)
        yield


@contextmanager
def eval_mode(module: nn.Module):
    """``module`` and all its submodules in eval mode, each put back in its own mode afterwards (Lightning's own
    helper for this is private)."""
    modes = [(child, child.training) for child in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for child, training in modes:
            child.training = training
