"""The token layout a model's forward reads: sequences padded into rows or packed back to back in one row."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class Sequences:
    """``count`` prompt + response sequences, padded (``[count, T]``) or packed back to back in one row
    (``[1, N]``, with ``position_ids`` restarting at 0 per sequence and ``sequence_ids`` naming each token's
    sequence). ``labels`` hold the response ids and ``-100`` on prompts and padding; a packed row's
    ``attention_mask`` is all ones."""

    input_ids: Tensor
    labels: Tensor
    attention_mask: Tensor
    count: int
    position_ids: Tensor | None = None
    sequence_ids: Tensor | None = None

    @property
    def packed(self) -> bool:
        return self.sequence_ids is not None

    def tokens(self) -> int:
        """The tokens that are not padding."""
        return int(self.attention_mask.sum())
