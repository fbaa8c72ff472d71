"""One forward of a causal LM over prompt + response :class:`~prefmodule.data.batches.Sequences`, padded or
packed: the per-sequence statistics of the responses (:class:`~prefmodule.models.logps.SequenceStats`) or a reward
model's rewards and, when asked, a mixture-of-experts model's load-balancing loss over the same forward."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from prefmodule.models.attention import packed_inputs
from prefmodule.models.loading import backbone, unwrapped
from prefmodule.models.sequences import Sequences
from prefmodule.models.logps import LogitsTransform, SequenceStats, stats_from_hidden, stats_from_logits
from prefmodule.models.moe import load_balancing_loss, router_logits_kwargs
from prefmodule.models.sharding import finish_forward


def forward_stats(model: nn.Module, sequences: Sequences, head: LogitsTransform | None = None, chunk_size: int = 0,
                  sum_sq_probs: bool = False, router_loss: bool = False,
                  token_entropy: bool = False) -> tuple[SequenceStats, Tensor | None]:
    """``model``'s statistics of ``sequences`` (padded, or packed in one row), and its load-balancing loss when
    ``router_loss`` (else ``None``; a mixture-of-experts model is never asked for router logits it does not need).

    With ``head`` (how the model's logits follow from its LM head, :func:`~prefmodule.models.logps.head_logits_transform`)
    and a ``chunk_size``, the decoder and the head run separately, ``chunk_size`` response tokens at a time
    (:func:`~prefmodule.models.logps.stats_from_hidden`); otherwise from the full logits. ``sum_sq_probs``
    also sums ``log sum_v p_v^2`` over each response (WPO's weights); ``token_entropy`` keeps each response
    token's entropy (GRPO's metric).
    """
    inputs = model_inputs(model, sequences, router_loss)
    owners = dict(sequence_ids=sequences.sequence_ids, num_sequences=sequences.count) if sequences.packed else {}
    if head is not None and chunk_size > 0:
        outputs = model.get_decoder()(**inputs)
        stats = stats_from_hidden(outputs.last_hidden_state, model.get_output_embeddings(), sequences.labels,
                                  chunk_size, **owners, transform=head, sum_sq_probs=sum_sq_probs,
                                  token_entropy=token_entropy)
        aux_loss = load_balancing_loss(model, outputs.router_logits, inputs["attention_mask"]) if router_loss else None
    else:
        outputs = model(**inputs)
        stats = stats_from_logits(outputs.logits, sequences.labels, sum_sq_probs=sum_sq_probs,
                                  token_entropy=token_entropy, **owners)
        aux_loss = outputs.aux_loss if router_loss else None
    if not torch.is_grad_enabled():
        finish_forward(model)  # no backward will close a sharded tied head's forward
    return stats, aux_loss


def sequence_rewards(model: nn.Module, sequences: Sequences, router_loss: bool = False) -> tuple[Tensor, Tensor | None]:
    """A reward model's ``[sequences.count]`` float32 rewards of ``sequences`` (padded, or one packed row), each its
    score head at the sequence's last token that is not padding (as ``AutoModelForSequenceClassification``
    pools), and with ``router_loss`` a mixture of experts' load-balancing loss."""
    base = unwrapped(model)
    ids = sequences.input_ids
    inputs = model_inputs(model, sequences, router_loss)
    if sequences.packed:
        owners = sequences.sequence_ids.reshape(-1)
    else:
        owners = torch.arange(ids.shape[0], device=ids.device).repeat_interleave(ids.shape[1])
    outputs = backbone(model)(**inputs)
    scores = base.score(outputs.last_hidden_state).reshape(-1).float()  # one per token
    positions = torch.arange(ids.numel(), device=ids.device)
    pad = base.config.pad_token_id
    scored = ids.reshape(-1) != pad if pad is not None else torch.ones_like(positions, dtype=torch.bool)
    first = torch.full((sequences.count,), ids.numel(), device=ids.device).scatter_reduce(0, owners, positions, "amin")
    last = first.scatter_reduce(0, owners[scored], positions[scored], "amax")  # a sequence of padding: its first
    aux_loss = load_balancing_loss(model, outputs.router_logits, inputs["attention_mask"]) if router_loss else None
    if not torch.is_grad_enabled():
        finish_forward(model)
    return scores[last], aux_loss


def model_inputs(model: nn.Module, sequences: Sequences, router_loss: bool) -> dict:
    """``model``'s keyword arguments for ``sequences``: padded ones' attention mask, or a packed row's bounds."""
    if sequences.packed:
        inputs = packed_inputs(model, sequences.position_ids, sequences.sequence_ids)
    else:
        inputs = dict(attention_mask=sequences.attention_mask)
    return dict(input_ids=sequences.input_ids, use_cache=False, **inputs, **router_logits_kwargs(model, router_loss))
