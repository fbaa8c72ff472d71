"""Progress of the long passes before training (tokenising, the reference pass): a bar with an ETA on
global rank 0, and one line saying how long the pass took."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from tqdm.auto import tqdm

T = TypeVar("T")


def progress(items: Iterable[T], description: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """Yield ``items`` behind a progress bar (rank 0 only), then log ``<description>: done in N s``."""
    start = time.perf_counter()
    bar = tqdm(items, desc=description, total=total, unit=unit, disable=rank_zero_only.rank != 0,
               dynamic_ncols=True, leave=False)
    yield from bar
    bar.close()
    rank_zero_info(f"prefmodule: {description}: done in {time.perf_counter() - start:.1f} s")
