"""Mixture-of-experts policies: their routers' load-balancing loss, and when a forward asks for router logits."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from prefmodule.models.loading import unwrapped


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
    base = unwrapped(model)
    loss_func = inspect.getmodule(type(base)).load_balancing_loss_func
    config = base.config  # the causal LM's own attributes, or its config's (a reward model of the architecture)
    experts = getattr(base, "num_experts", None) or getattr(config, "num_experts", None) or config.num_local_experts
    return loss_func(router_logits, experts, config.num_experts_per_tok, attention_mask)
