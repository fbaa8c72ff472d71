"""Attention over packed (padding-free) rows without a quadratic mask.

A packed row holds many sequences back to back. Hugging Face's ``sdpa`` path keeps them apart
with a ``[tokens, tokens]`` block-diagonal mask, which costs more than the padding it saves (and
gigabytes at 16 x 2048 tokens). :data:`VARLEN_SDPA` is ``sdpa`` that, given the sequence bounds
``cu_seq_lens_q`` of a packed row, runs causal attention on each sequence alone. Without them it *is*
``sdpa``, so padded batches, generation and saved models are unchanged. Flash-attention models
take the same bounds natively.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from prefmodule.models.loading import backbone, unwrapped
from prefmodule.private.transformers import attn_implementation

VARLEN_SDPA = "prefmodule_varlen_sdpa"


def varlen_sdpa_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                        attention_mask: Tensor | None, cu_seq_lens_q: Tensor | None = None,
                        cu_seq_lens_k: Tensor | None = None, max_length_q: int | None = None,
                        max_length_k: int | None = None, **kwargs) -> tuple[Tensor, None]:
    """``sdpa_attention_forward``, one sequence at a time when ``cu_seq_lens_q`` bounds a packed row
    (self-attention: the key bounds and the flash-attention lengths add nothing)."""
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"a packed batch is one row, got {query.shape[0]} rows")
    window = kwargs.pop("sliding_window", None)
    lengths = cu_seq_lens_q.diff().tolist()
    outputs = []
    # split, not slicing: its backward is one concatenation, where each slice's would zero-fill a whole copy
    for q, k, v in zip(query.split(lengths, dim=2), key.split(lengths, dim=2), value.split(lengths, dim=2)):
        length = q.shape[2]
        mask = _sliding_causal_mask(length, window, query.device) if window and length > window else None
        output, _ = sdpa_attention_forward(module, q, k, v, mask, is_causal=mask is None, **kwargs)
        outputs.append(output)
    return torch.cat(outputs, dim=1), None  # [1, tokens, heads, head_dim], as sdpa returns it


def _sliding_causal_mask(length: int, window: int, device: torch.device) -> Tensor:
    """Query ``i`` sees keys ``j`` with ``i - window < j <= i`` (Hugging Face's sliding-window rule)."""
    distance = torch.arange(length, device=device)[:, None] - torch.arange(length, device=device)[None, :]
    return ((distance >= 0) & (distance < window))[None, None]


AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_forward)
AttentionMaskInterface.register(VARLEN_SDPA, sdpa_mask)  # padded batches get sdpa's own masks


def _implementation(model: nn.Module) -> str:
    return str(attn_implementation(model.config))


def takes_sequence_bounds(model: nn.Module) -> bool:
    """Whether ``model``'s attention runs the sequences of a packed row apart, given their bounds."""
    implementation = _implementation(model)
    return implementation == VARLEN_SDPA or implementation.startswith("flash_attention")


def packed_inputs(model: nn.Module, position_ids: Tensor, sequence_ids: Tensor) -> dict:
    """Keyword arguments for ``model`` on a packed row: its sequence bounds, and the attention mask
    that lets the attention use them (all ones for :data:`VARLEN_SDPA`, ``None`` otherwise, so a
    model that cannot take bounds falls back to Hugging Face's block-diagonal mask: right, slower)."""
    if not takes_sequence_bounds(model):
        return dict(position_ids=position_ids, attention_mask=None)
    lengths = torch.bincount(sequence_ids[0])
    bounds = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    longest = int(lengths.max())
    mask = torch.ones_like(position_ids) if _implementation(model) == VARLEN_SDPA else None
    return dict(position_ids=position_ids, attention_mask=mask, cu_seq_lens_q=bounds, cu_seq_lens_k=bounds,
                max_length_q=longest, max_length_k=longest)


@dataclass(frozen=True)
class PackedAttention:
    """Whether packed rows reach a model's attention as separate sequences (truthy when they do), and why not."""

    enabled: bool
    reason: str | None = None  # why not, in a few words

    def __bool__(self) -> bool:
        return self.enabled


def enable_packed_attention(model: nn.Module, probe: nn.Module | None = None) -> PackedAttention:
    """Whether packed rows reach ``model``'s attention as separate sequences, with no quadratic mask, and why not.

    Flash-attention models take sequence bounds natively. A ``sdpa`` model is switched to
    :data:`VARLEN_SDPA` if a packed probe gives what separate rows give: checked on the model (or on
    ``probe``, a stand-in of the same architecture) rather than trusted, since a model that does not
    pass the bounds through would attend across sequences.
    """
    if takes_sequence_bounds(model):
        return PackedAttention(True)
    implementation = _implementation(model)
    if implementation != "sdpa":
        return PackedAttention(False, f"its attention ({implementation}) takes no sequence bounds; sdpa and "
                                      "flash_attention_2 do (model.attn_implementation)")
    probe = model if probe is None else probe
    probe.set_attn_implementation(VARLEN_SDPA)
    problem = packed_probe_problem(probe)
    if problem is None:
        model.set_attn_implementation(VARLEN_SDPA)
        return PackedAttention(True)
    probe.set_attn_implementation("sdpa")
    return PackedAttention(False, f"{type(unwrapped(model)).__name__}: {problem}")


def packed_probe_problem(model: nn.Module) -> str | None:
    """How a packed row of two short sequences differs from the same sequences run apart (``None``: it does not),
    compared on what an objective reads: a causal LM's next-token log-probs, a reward model's per-token scores,
    within a tolerance relative to their scale (1e-4 in float32, 3e-2 in half precision; attending across the
    two sequences moves them by far more)."""
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().weight.shape[0]
    rows = [torch.arange(3, 3 + n, device=device).remainder(vocab) for n in (5, 8)]
    packed = torch.cat(rows)[None]
    position_ids = torch.cat([torch.arange(len(row), device=device) for row in rows])[None]
    sequence_ids = torch.cat([torch.full_like(row, k) for k, row in enumerate(rows)])[None]
    training = model.training
    model.eval()  # no dropout
    try:
        with torch.no_grad():
            together = _probe_outputs(model, packed, **packed_inputs(model, position_ids, sequence_ids))[0]
            apart = torch.cat([_probe_outputs(model, row[None])[0] for row in rows])
    except (TypeError, ValueError, RuntimeError) as error:
        return f"a packed probe failed ({type(error).__name__}: {str(error).splitlines()[0][:120]})"
    finally:
        model.train(training)
    tolerance = 1e-4 if together.dtype == torch.float32 else 3e-2
    difference = float((together.float() - apart.float()).abs().max())
    scale = max(1.0, float(apart.float().abs().max()))
    if difference <= tolerance * scale:
        return None
    return (f"a packed probe's outputs differ from separate rows' by {difference:.3g} (tolerance {tolerance * scale:.3g}"
            f"): its attention does not keep packed sequences apart")


def _probe_outputs(model: nn.Module, input_ids: Tensor, **inputs) -> Tensor:
    """What an objective reads of ``model`` on ``input_ids``: a reward model's score per token, else the
    log-softmax of the logits (``[1, tokens, labels or vocab]``, float32)."""
    base = unwrapped(model)
    if hasattr(base, "score"):  # a sequence-classification (reward) model: its head on every token
        return base.score(backbone(model)(input_ids=input_ids, use_cache=False, **inputs).last_hidden_state).float()
    return model(input_ids=input_ids, use_cache=False, **inputs).logits.float().log_softmax(-1)
