"""One forward of a causal LM over a batch of prompt + response sequences, padded or packed: the per-sequence
statistics of the responses (:class:`~prefmodule.models.logps.SequenceStats`) and, when asked, a mixture-of-experts
model's load-balancing loss over the same forward."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from prefmodule.models.attention import packed_inputs
from prefmodule.models.logps import LogitsTransform, SequenceStats, chunked_sequence_stats, sequence_stats
from prefmodule.models.moe import load_balancing_loss, router_logits_kwargs
from prefmodule.models.sharding import finish_forward


def batch_stats(model: nn.Module, batch: dict[str, Tensor], num_sequences: int, head: LogitsTransform | None = None,
                chunk_size: int = 0, sum_sq_probs: bool = False,
                router_loss: bool = False) -> tuple[SequenceStats, Tensor | None]:
    """``model``'s statistics of the ``num_sequences`` sequences of ``batch`` (a padded batch, or one packed row
    with ``sequence_ids``), and its load-balancing loss when ``router_loss`` (else ``None``; a mixture-of-experts
    model is never asked for router logits it does not need).

    With ``head`` (how the model's logits follow from its LM head, :func:`~prefmodule.models.logps.head_logits_transform`)
    and a ``chunk_size``, the decoder and the head run separately, ``chunk_size`` response tokens at a time
    (:func:`~prefmodule.models.logps.chunked_sequence_stats`); otherwise from the full logits. ``sum_sq_probs``
    also sums ``log sum_v p_v^2`` over each response (WPO's weights).
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
                                       chunk_size, **sequences, transform=head, sum_sq_probs=sum_sq_probs)
        aux_loss = load_balancing_loss(model, outputs.router_logits, inputs["attention_mask"]) if router_loss else None
    else:
        outputs = model(**inputs)
        stats = sequence_stats(outputs.logits, batch["labels"], sum_sq_probs=sum_sq_probs, **sequences)
        aux_loss = outputs.aux_loss if router_loss else None
    if not torch.is_grad_enabled():
        finish_forward(model)  # no backward will close a sharded tied head's forward
    return stats, aux_loss
