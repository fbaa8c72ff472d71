"""torch's private names that prefmodule uses (torch 2.13 has no public way to any of them)."""

from __future__ import annotations

from torch import nn


def non_persistent_buffers(module: nn.Module) -> set[str]:
    """The names of a module's own buffers left out of its state dict (private ``_non_persistent_buffers_set``)."""
    return set(module._non_persistent_buffers_set)


def has_forward_hooks(module: nn.Module) -> bool:
    """Whether a module has forward (pre-)hooks of its own: ``nn.Module`` offers no public way to list them."""
    return bool(module._forward_pre_hooks or module._forward_hooks)


def awaits_forward(module: nn.Module) -> bool:
    """Whether ``module``'s FSDP2 unit waits for its forward (private ``_modules_to_run_forward``): no public way."""
    from torch.distributed.fsdp import fully_shard

    return module in fully_shard.state(module)._modules_to_run_forward
