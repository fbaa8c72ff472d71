"""Sharding for Lightning's FSDP strategies, one unit per decoder layer, the layer class taken from
the model itself (the names in its ``_no_split_modules``).

- ``ModelParallelStrategy`` (PyTorch's FSDP2, ``fully_shard``; ``configs/strategies/fsdp2.yaml``):
  the module shards its models in ``configure_model`` with :func:`shard`. Runs on GPUs and on CPU.
- ``FSDPStrategy`` (FSDP1, ``--trainer.strategy=fsdp``; ``configs/strategies/fsdp.yaml``): Lightning
  wraps the module; :func:`decoder_layer_policy` is its auto-wrap and activation-checkpointing policy.
  Lightning runs it on CUDA only.
"""

from __future__ import annotations

import functools
import sys

import torch
from lightning.pytorch.strategies import ModelParallelStrategy, Strategy
from torch import nn

from prefmodule.models.loading import prepare_empty, stream_weights, unwrapped
from prefmodule.private.torch import awaits_forward
from prefmodule.private.transformers import from_config, no_split_modules, register_recordable_outputs


def decoder_layer_policy(module: nn.Module, recurse: bool, nonwrapped_numel: int) -> bool:
    """FSDP1 policy (``auto_wrap_policy``, ``activation_checkpointing_policy``): wrap every decoder layer."""
    return recurse or type(module).__name__ in _no_split_names(type(module).__module__)


@functools.cache
def _no_split_names(python_module: str) -> frozenset[str]:
    """The ``_no_split_modules`` named by the model classes defined next to a layer class."""
    namespace = vars(sys.modules[python_module]) if python_module in sys.modules else {}
    return frozenset(
        name for value in namespace.values() if isinstance(value, type)
        for name in no_split_modules(value)
    )


def decoder_layer_classes(model: nn.Module) -> tuple[type[nn.Module], ...]:
    """The classes of ``model``'s repeated blocks: those its ``_no_split_modules`` names."""
    names = {name for module in model.modules() for name in no_split_modules(module)}
    classes = tuple({type(module) for module in model.modules() if type(module).__name__ in names})
    if not classes:
        raise ValueError(f"{type(model).__name__} names no decoder-layer class of its own in `_no_split_modules`: "
                         "FSDP cannot shard it per layer.")
    return classes


def shard(model: nn.Module, strategy: Strategy | None) -> nn.Module:
    """Under ``ModelParallelStrategy``, shard a causal LM with FSDP2 in place (and return it); otherwise,
    or if it is sharded already, leave it as is. A model built on the meta device is then filled from its
    safetensors files, each rank its own shards (:func:`prefmodule.models.loading.stream_weights`).

    Units: each decoder layer, the rest of the decoder (final norm, and the embeddings unless tied) and the
    LM head; a head tied to the input embeddings shares one unit with them, so the tie holds. Each may be
    called on its own, as log-probs from hidden states through the head in chunks do. A frozen model (the
    reference) gathers its weights for a forward only.
    """
    if not isinstance(strategy, ModelParallelStrategy) or is_sharded(model):
        return model
    from torch.distributed.fsdp import FSDPModule, fully_shard

    mesh = strategy.device_mesh
    if mesh["tensor_parallel"].size() != 1:
        raise ValueError("prefmodule shards with FSDP2 over `data_parallel` only: set the ModelParallelStrategy's "
                         f"`tensor_parallel_size: 1` and `data_parallel_size` to the world size (got {mesh}).")
    mesh = mesh["data_parallel"]
    empty = any(p.is_meta for p in model.parameters())
    if empty:
        prepare_empty(model)
    frozen = not any(p.requires_grad for p in model.parameters())
    layers = decoder_layer_classes(model)
    for module in model.modules():
        if isinstance(module, layers):
            fully_shard(module, mesh=mesh)
    decoder, head, embeddings = model.get_decoder(), model.get_output_embeddings(), model.get_input_embeddings()
    tied = head is not None and head.weight is embeddings.weight
    # The head is gathered once per forward, not once per chunk, unless frozen.
    if tied:  # one unit for the shared weight (FSDP2 keeps both modules pointing at it)
        fully_shard([embeddings, head], mesh=mesh, reshard_after_forward=frozen)
    elif head is not None:
        fully_shard(head, mesh=mesh, reshard_after_forward=frozen)
    fully_shard(decoder, mesh=mesh, reshard_after_forward=frozen)  # a root: keeps its weights gathered until backward
    base = unwrapped(model)
    for head in [child for child in base.children() if child is not decoder and not isinstance(child, FSDPModule)
                 and any(p.numel() for p in child.parameters())]:  # a reward model's score head
        fully_shard(head, mesh=mesh, reshard_after_forward=frozen)
    # transformers looks up what a model may record (router logits, ...) by its class name, which FSDP2 changed.
    register_recordable_outputs(decoder)
    if empty:
        stream_weights(model, strategy.root_device)
    left = [name for name, p in model.named_parameters() if not isinstance(p, torch.distributed.tensor.DTensor)]
    if left:
        raise ValueError(f"{type(model).__name__}: weights outside its decoder and LM head ({left[:3]}...) are not "
                         "supported under FSDP2; use DDP or FSDP1.")
    return model


def finish_forward(model: nn.Module) -> None:
    """Close the forward of a sharded model's tied embeddings + head unit after the head ran on its own.

    FSDP2 ends a unit's forward once each of its modules ran. The head runs after the decoder (and per
    chunk), so the unit stays open, its weights gathered, until the next backward resets it; a pass
    without one (the reference, validation, the probes) leaves it open, and it could not be resharded or
    moved. An empty lookup in the embeddings, the module it still waits for, closes it.
    """
    from torch.distributed.fsdp import FSDPModule

    embeddings = model.get_input_embeddings()
    if isinstance(embeddings, FSDPModule) and awaits_forward(embeddings):
        embeddings(torch.zeros(0, dtype=torch.long, device=embeddings.weight.device))


def reshard(model: nn.Module) -> None:
    """Free the gathered weights FSDP2 keeps after forwards that no backward followed (a probe)."""
    from torch.distributed.fsdp import FSDPModule

    finish_forward(model)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP (1 or 2) holds any of ``model``'s weights."""
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return any(isinstance(module, (FSDPModule, FullyShardedDataParallel)) for module in model.modules())


def gather_unsharded(module: nn.Module, name: str) -> nn.Module | None:
    """A plain CPU copy of ``module``'s sharded model ``name`` (e.g. ``"policy"``) on global rank 0,
    ``None`` elsewhere.

    A collective: every rank must call it. The full weights are gathered once, from the trainer's root
    model (FSDP1 wraps the whole module there, FSDP2 shards it in place), onto rank 0's CPU, and
    assigned into a skeleton built on the meta device (no second copy of the weights).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(module.trainer.model, options=options)
    if torch.distributed.get_rank() != 0:
        return None
    prefix = f"{name}."
    state = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    return rebuilt(getattr(module, name), state)


def cpu_copy(model: nn.Module) -> nn.Module:
    """``model`` (unsharded) as a model whose weights are on the CPU: its own tensors when they already are
    (shared, not copied), else one CPU copy of each; the device holds nothing more."""
    state = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    return rebuilt(model, state)


def rebuilt(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A new model of ``model``'s class (a causal LM, a reward model), config, generation config and LoRA adapters,
    built on the meta device and given the tensors of ``state`` (``model``'s names); tied weights tied again."""
    peft_config = getattr(model, "peft_config", None)
    base = model.get_base_model() if peft_config else model
    with torch.device("meta"):
        copy = from_config(type(base), base.config)
        if peft_config:
            from peft import get_peft_model

            copy = get_peft_model(copy, peft_config[model.active_adapter])
    copy.load_state_dict(state, assign=True)
    copy_base = copy.get_base_model() if peft_config else copy
    copy_base.tie_weights()
    if getattr(base, "generation_config", None) is not None:  # a causal LM's (a reward model has none)
        copy_base.generation_config = base.generation_config
    return copy
