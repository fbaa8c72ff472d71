"""Per-sequence log-probabilities of the response tokens, in float32.

A batch row holds ``prompt + response + padding``; ``labels`` holds the token ids of the
response and ``-100`` everywhere else, so only response tokens count (SPEC.md §2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass
class SequenceStats:
    """Sums over the response tokens of each row, shape ``[rows]``."""

    logps: torch.Tensor  # sum_t log pi(y_t | x, y_<t)
    lengths: torch.Tensor  # number of response tokens
    logits: torch.Tensor  # sum over response tokens of the vocabulary-mean logit (detached)

    @property
    def avg_logps(self) -> torch.Tensor:
        """Length-normalised log-probability: log of the geometric-mean token probability."""
        return self.logps / self.lengths.clamp(min=1)

    def split(self) -> tuple[SequenceStats, SequenceStats]:
        """Split the concatenated batch into its chosen (first half) and rejected rows."""
        half = self.logps.shape[0] // 2
        first = SequenceStats(self.logps[:half], self.lengths[:half], self.logits[:half])
        second = SequenceStats(self.logps[half:], self.lengths[half:], self.logits[half:])
        return first, second


def sequence_stats(logits: torch.Tensor, labels: torch.Tensor) -> SequenceStats:
    """Reduce ``logits [rows, T, vocab]`` for ``labels [rows, T]`` to per-row response sums.

    Position ``t`` of ``logits`` predicts token ``t + 1``, so labels are shifted left by one.
    The per-token log-prob is ``-cross_entropy`` computed in float32, which never materialises
    a second ``[rows, T, vocab]`` tensor of log-probabilities.
    """
    logits = logits[:, :-1]
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    token_logps = -F.cross_entropy(
        logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view_as(targets)
    with torch.no_grad():
        mean_logits = (logits.mean(-1, dtype=torch.float32) * mask).sum(-1)
    return SequenceStats(
        logps=(token_logps * mask).sum(-1),
        lengths=mask.sum(-1),
        logits=mean_logits,
    )
