"""What every loss family shares."""

from __future__ import annotations

import torch
from torch import Tensor


def upcast(x: Tensor) -> Tensor:
    """At least float32: bf16/fp16 become float32, float64 is kept."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
