"""One forward of a causal LM over a batch of prompt + response sequences, padded or packed: the per-sequence
statistics of the responses (:class:`~prefmodule.models.logps.SequenceStats`) and, when asked, a mixture-of-experts
model's load-balancing loss over the same forward."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from prefmodule.models.attention import packed_inputs
from prefmodule.models.loading import backbone, unwrapped
from prefmodule.models.logps import LogitsTransform, SequenceStats, chunked_sequence_stats, sequence_stats
from prefmodule.models.moe import load_balancing_loss, router_logits_kwargs
from prefmodule.models.sharding import finish_forward


def batch_stats(model: nn.Module, batch: dict[str, Tensor], num_sequences: int, head: LogitsTransform | None = None,
                chunk_size: int = 0, sum_sq_probs: bool = False, router_loss: bool = False,
                token_entropy: bool = False) -> tuple[SequenceStats, Tensor | None]:
    """``model``'s statistics of the ``num_sequences`` sequences of ``batch`` (a padded batch, or one packed row
    with ``sequence_ids``), and its load-balancing loss when ``router_loss`` (else ``None``; a mixture-of-experts
    model is never asked for router logits it does not need).

    With ``head`` (how the model's logits follow from its LM head, :func:`~prefmodule.models.logps.head_logits_transform`)
    and a ``chunk_size``, the decoder and the head run separately, ``chunk_size`` response tokens at a time
    (:func:`~prefmodule.models.logps.chunked_sequence_stats`); otherwise from the full logits. ``sum_sq_probs``
    also sums ``log sum_v p_v^2`` over each response (WPO's weights); ``token_entropy`` keeps each response
    token's entropy (GRPO's metric).
    """
    if "sequence_ids" in batch:  # packed
        inputs = packed_inputs(model, batch["position_ids"], batch["sequence_ids"])
        sequences = dict(sequence_ids=batch["sequence_ids"], num_sequences=num_sequences)
    else:
        inputs, sequences = dict(attention_mask=batch["attention_mask"]), {}
    inputs.update(input_ids=batch["input_ids"], use_cache=False, **router_logits_kwargs(model, router_loss))
    if head is not None and chunk_size > 0:
        outputs = model.get_decoder()(**inputs)
        stats = chunked_sequence_stats(outputs.last_hidden_state, model.get_output_embeddings(), batch["labels"],
                                       chunk_size, **sequences, transform=head, sum_sq_probs=sum_sq_probs,
                                       token_entropy=token_entropy)
        aux_loss = load_balancing_loss(model, outputs.router_logits, inputs["attention_mask"]) if router_loss else None
    else:
        outputs = model(**inputs)
        stats = sequence_stats(outputs.logits, batch["labels"], sum_sq_probs=sum_sq_probs, token_entropy=token_entropy,
                               **sequences)
        aux_loss = outputs.aux_loss if router_loss else None
    if not torch.is_grad_enabled():
        finish_forward(model)  # no backward will close a sharded tied head's forward
    return stats, aux_loss


def sequence_rewards(model: nn.Module, batch: dict[str, Tensor], num_sequences: int,
                     router_loss: bool = False) -> tuple[Tensor, Tensor | None]:
    """A reward model's ``[num_sequences]`` float32 rewards of the sequences of ``batch`` (padded, or one packed
    row), each its score head at the sequence's last token that is not padding (as
    ``AutoModelForSequenceClassification`` pools), and with ``router_loss`` a mixture of experts' load-balancing
    loss."""
    base = unwrapped(model)
    ids = batch["input_ids"]
    if "sequence_ids" in batch:  # packed
        inputs = packed_inputs(model, batch["position_ids"], batch["sequence_ids"])
        owners = batch["sequence_ids"].reshape(-1)
    else:
        inputs = dict(attention_mask=batch["attention_mask"])
        owners = torch.arange(ids.shape[0], device=ids.device).repeat_interleave(ids.shape[1])
    outputs = backbone(model)(input_ids=ids, use_cache=False, **inputs, **router_logits_kwargs(model, router_loss))
    scores = base.score(outputs.last_hidden_state).reshape(-1).float()  # one per token
    positions = torch.arange(ids.numel(), device=ids.device)
    pad = base.config.pad_token_id
    scored = ids.reshape(-1) != pad if pad is not None else torch.ones_like(positions, dtype=torch.bool)
    first = torch.full((num_sequences,), ids.numel(), device=ids.device).scatter_reduce(0, owners, positions, "amin")
    last = first.scatter_reduce(0, owners[scored], positions[scored], "amax")  # a sequence of padding: its first
    aux_loss = load_balancing_loss(model, outputs.router_logits, inputs["attention_mask"]) if router_loss else None
    if not torch.is_grad_enabled():
        finish_forward(model)
    return scores[last], aux_loss

