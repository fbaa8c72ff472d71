"""Per-sequence log-probabilities of the response tokens, in float32.

A batch row holds ``prompt + response + padding``; ``labels`` holds the token ids of the
response and ``-100`` everywhere else, so only response tokens count (SPEC.md §2).

A *packed* batch (``padding_free``) is one row holding every sequence back to back, with
``position_ids`` restarting at 0 for each and ``sequence_ids`` naming the sequence (0 .. rows-1)
each token belongs to. Its first token of every sequence is a prompt token, so no label crosses
a sequence boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass
class SequenceStats:
    """Sums over the response tokens of each sequence, shape ``[sequences]``."""

    logps: torch.Tensor  # sum_t log pi(y_t | x, y_<t)
    lengths: torch.Tensor  # number of response tokens
    logits: torch.Tensor  # sum over response tokens of the vocabulary-mean logit (detached)

    @property
    def avg_logps(self) -> torch.Tensor:
        """Length-normalised log-probability: log of the geometric-mean token probability."""
        return self.logps / self.lengths.clamp(min=1)

    def split(self) -> tuple[SequenceStats, SequenceStats]:
        """Split the concatenated batch into its chosen (first half) and rejected sequences."""
        half = self.logps.shape[0] // 2
        first = SequenceStats(self.logps[:half], self.lengths[:half], self.logits[:half])
        second = SequenceStats(self.logps[half:], self.lengths[half:], self.logits[half:])
        return first, second


def shifted_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets aligned with logits (position ``t`` predicts token ``t + 1``) and their mask."""
    targets = labels[:, 1:]
    return targets, targets != IGNORE_INDEX


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[target]`` per position in float32 (0 where the target is ignored).

    ``-cross_entropy`` never materialises a second ``[rows, T, vocab]`` tensor of log-probs.
    """
    return -F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view_as(targets)


def reduce_per_sequence(values: torch.Tensor, mask: torch.Tensor, sequence_ids: torch.Tensor | None,
                        num_sequences: int) -> torch.Tensor:
    """Sum ``values`` over the masked positions of each sequence: per row, or per packed sequence id."""
    values = values * mask
    if sequence_ids is None:
        return values.sum(-1)
    out = torch.zeros(num_sequences, dtype=values.dtype, device=values.device)
    ids = sequence_ids[:, 1:].clamp(min=0).flatten()  # aligned with the shifted targets
    return out.index_add(0, ids, values.flatten())


def sequence_stats(logits: torch.Tensor, labels: torch.Tensor, sequence_ids: torch.Tensor | None = None,
                   num_sequences: int | None = None) -> SequenceStats:
    """Reduce ``logits [rows, T, vocab]`` for ``labels [rows, T]`` to per-sequence response sums.

    Padded batches need only ``logits`` and ``labels``; packed batches also pass ``sequence_ids``
    and ``num_sequences``.
    """
    logits = logits[:, :-1]
    targets, mask = shifted_targets(labels)
    rows = num_sequences if sequence_ids is not None else labels.shape[0]
    logps = token_logps(logits, targets)
    with torch.no_grad():
        mean_logits = logits.mean(-1, dtype=torch.float32)
    return SequenceStats(
        logps=reduce_per_sequence(logps, mask, sequence_ids, rows),
        lengths=reduce_per_sequence(mask.long(), mask, sequence_ids, rows),
        logits=reduce_per_sequence(mean_logits, mask, sequence_ids, rows),
    )
