"""What the collator hands an objective: one dataclass per kind of batch (Lightning moves their tensors to the
device as it moves a dict's). Pairs and unpaired rows hold their tokens as
:class:`~prefmodule.models.sequences.Sequences`, what a model's forward reads."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from prefmodule.models.sequences import Sequences


@dataclass
class PairBatch:
    """``n`` preference pairs: sequences ``0..n-1`` are prompt + chosen, ``n..2n-1`` prompt + rejected.
    ``score_chosen``/``score_rejected`` (float ``[n]``) when the data rates its pairs, ``margin`` (float ``[n]``,
    NaN for a pair without one) when it has that column."""

    index: Tensor  # [n]: each pair's row number in its split
    sequences: Sequences
    score_chosen: Tensor | None = None
    score_rejected: Tensor | None = None
    margin: Tensor | None = None

    def tokens(self) -> int:
        return self.sequences.tokens()


@dataclass
class SampledPairs(PairBatch):
    """Pairs of completions sampled while training (Online DPO), scored (``score_chosen``, ``score_rejected``),
    with ``ended`` (float ``[2n]``): whether each completion ended with an end token."""

    ended: Tensor | None = None


@dataclass
class RowBatch:
    """``n`` unpaired rows (KTO, a reward model's ``predict``): sequences ``0..n-1`` are prompt + completion and,
    with ``kl_completions``, ``n..2n-1`` prompt + KL completion; ``label`` (bool ``[n]``, True = desirable)."""

    index: Tensor  # [n]
    label: Tensor
    sequences: Sequences
    kl_completions: bool = False

    def tokens(self) -> int:
        return self.sequences.tokens()


@dataclass
class PromptBatch:
    """Prompts to complete (on-policy objectives), as they are (generation pads them itself): their token ids,
    the prompt as the data holds it (text or messages), its tools, and each row's other columns (a dict)."""

    index: Tensor  # [n]
    prompt_ids: list[list[int]]
    prompt: list
    tools: list
    columns: list[dict | None]

    def tokens(self) -> int:
        return sum(len(ids) for ids in self.prompt_ids)


Batch = PairBatch | RowBatch | PromptBatch
__all__ = ["Batch", "PairBatch", "PromptBatch", "RowBatch", "SampledPairs", "Sequences"]
