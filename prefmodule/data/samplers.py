"""Batches of pairs for one rank: every pair exactly once per epoch across ranks, optionally grouped by length.

Lightning replaces the sampler inside a batch sampler made in a ``*_dataloader`` hook (with its own
``DistributedSampler`` under DDP, with the DataLoader's sampler when predicting) and calls ``set_epoch``
on whatever sampler is there. :class:`PairBatchSampler` therefore shards the pairs itself, from its own
``num_replicas`` and ``rank`` (without the repeated pairs a ``DistributedSampler`` pads with, yet with
the same number of batches on every rank), and reads only the epoch from its sampler.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, Sampler, SequentialSampler

from prefmodule.data.mixture import Mixture
from prefmodule.errors import ConfigError

MEGABATCHES = 64  # length grouping sorts within windows of this many batches, so shuffling still mixes lengths


def chunk_sizes(count: int, size: int) -> list[int]:
    """``count`` items cut into consecutive chunks of ``size`` (the last one shorter)."""
    return [min(size, count - start) for start in range(0, count, size)]


def kl_chunks(group_sizes: list[int], batch_size: int, seed: int,
              lengths: Sequence[int] | None = None) -> tuple[np.ndarray, list[int], list[int]]:
    """The training KL chunks: ``(order, chunk sizes, chunks per group)``, each group (consecutive items) in a
    seeded permutation cut into chunks of ``batch_size``; with ``lengths``, items of similar length are sorted
    together within windows of ``MEGABATCHES`` chunks, so chunks need less padding."""
    rng = np.random.default_rng(seed)
    order, sizes, per_group = [], [], []
    for start, size in zip(np.cumsum([0] + group_sizes[:-1]), group_sizes):
        permutation = start + rng.permutation(size)
        if lengths is not None:
            lengths = np.asarray(lengths)
            window = batch_size * MEGABATCHES
            permutation = np.concatenate([part[np.argsort(-lengths[part], kind="stable")]
                                          for part in np.split(permutation, range(window, size, window))])
        order.append(permutation)
        per_group.append(len(chunk_sizes(size, batch_size)))
        sizes += chunk_sizes(size, batch_size)
    return np.concatenate(order), sizes, per_group


class EpochSampler(SequentialSampler):
    """The pairs in order, carrying the epoch Lightning sets: the way ``set_epoch`` reaches a batch sampler."""

    epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class PairBatchSampler(BatchSampler):
    """Index batches of one rank.

    Each step takes ``batch_size * num_replicas`` pairs (a global batch) and deals them out: rank
    ``r`` gets every ``num_replicas``-th pair from position ``r``. A trailing global batch with fewer
    pairs than ranks joins the one before it, so all ranks have the same number of batches.

    Args:
        sampler: an :class:`EpochSampler` over the dataset (or the sampler Lightning puts in its place).
        batch_size: pairs per batch and rank.
        drop_last: drop a trailing global batch that is not full.
        lengths: tokens per pair; when given, batches hold pairs of similar length (less padding).
        shuffle: a new order every epoch, seeded by ``seed + epoch``; without it, the order is fixed
            (longest first when grouping by length).
        seed: seed of the shuffle, the same on every rank.
        num_replicas, rank: the data-parallel ranks and this one.
        mixture: the dataset's source groups (one after another) and their weights: each training epoch
            draws its pairs by weight (:class:`~prefmodule.data.mixture.Mixture`).
        repeats, window: each run of ``window`` consecutive batches (an optimizer step's micro-batches) comes
            ``repeats`` times in a row (GRPO's ``num_iterations``: a generation batch trained on ``repeats``
            times, as TRL's ``RepeatSampler``); the epoch holds ``repeats`` times as many batches.
    """

    def __init__(self, sampler: Sampler, batch_size: int, drop_last: bool = False,
                 lengths: Sequence[int] | None = None, shuffle: bool = False, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0, mixture: Mixture | None = None, repeats: int = 1,
                 window: int = 1):
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.sampler = sampler
        self.pairs = len(sampler.dataset) if isinstance(sampler, DistributedSampler) else len(sampler)
        if self.pairs < num_replicas:
            raise ConfigError(f"{self.pairs} rows cannot be shared among {num_replicas} ranks: "
                              "every rank needs at least one")
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.lengths = None if lengths is None else torch.as_tensor(lengths)
        self.shuffle = shuffle
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.mixture = mixture
        self.repeats, self.window = repeats, window
        self.skip = 0  # batches of this epoch already trained before a resume: the next pass starts after them

    @property
    def epoch(self) -> int:
        return getattr(self.sampler, "epoch", 0)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return self.repeats * self.distinct_batches()

    def distinct_batches(self) -> int:
        """Batches per epoch before repeats."""
        full, rest = divmod(self.pairs, self.batch_size * self.num_replicas)
        return max(1, full + (rest >= self.num_replicas and not self.drop_last))

    def _global_batches(self) -> list[torch.Tensor]:
        """This epoch's global batches, identical on every rank."""
        pairs, ranks = self.pairs, self.num_replicas
        step = self.batch_size * ranks
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if self.shuffle and self.mixture is not None:
            order = torch.from_numpy(self.mixture.draw(self.seed, self.epoch))
        else:
            order = torch.randperm(pairs, generator=generator) if self.shuffle else torch.arange(pairs)
        if self.lengths is not None:
            window = step * MEGABATCHES if self.shuffle else pairs
            order = torch.cat([part[self.lengths[part].argsort(descending=True, stable=True)]
                               for part in order.split(window)])
        batches = list(order.split(step))
        if len(batches) > 1 and (len(batches[-1]) < ranks or (self.drop_last and len(batches[-1]) < step)):
            last = batches.pop()
            if not self.drop_last:
                batches[-1] = torch.cat([batches[-1], last])
        if self.shuffle and self.lengths is not None:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator)]
        return batches

    def _rank_batches(self) -> list[list[int]]:
        return [batch[self.rank::self.num_replicas].tolist() for batch in self._global_batches()]

    def __iter__(self) -> Iterator[list[int]]:
        batches, self.skip = repeated(self._rank_batches(), self.repeats, self.window)[self.skip:], 0
        yield from batches


def repeated(batches: list, repeats: int, window: int) -> list:
    """Each run of ``window`` consecutive ``batches`` ``repeats`` times in a row: ``a b a b c d c d`` for
    ``window=2, repeats=2``."""
    if repeats == 1:
        return batches
    return [batch for start in range(0, len(batches), window) for _ in range(repeats)
            for batch in batches[start:start + window]]


class ChunkBatchSampler(PairBatchSampler):
    """Batches that are fixed chunks of consecutive items (an unpaired dataset's KL chunks, see
    :meth:`~prefmodule.data.dataset.UnpairedDataset.with_kl_chunks`), so a batch's KL completions are its
    own completions.

    Each epoch the chunks come in a new seeded order when ``shuffle`` (drawn by weight with a ``mixture``
    over the groups' chunks), in order otherwise. Under DDP rank ``r`` takes chunks ``r``, ``r + ranks``, ...;
    the chunks left over (fewer than the ranks) join the last batch of ranks ``0, 1, ...``, so every item is
    seen once per epoch and every rank runs the same number of batches.
    """

    def __init__(self, sampler: Sampler, chunk_sizes: Sequence[int], shuffle: bool = False, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0, mixture: Mixture | None = None):
        super().__init__(sampler, max(chunk_sizes), shuffle=shuffle, seed=seed, num_replicas=num_replicas,
                         rank=rank, mixture=mixture)
        if len(chunk_sizes) < num_replicas:
            raise ConfigError(f"{len(chunk_sizes)} batches of rows cannot be shared among {num_replicas} ranks: "
                              "every rank needs at least one (use a smaller batch_size)")
        self.chunk_sizes = list(chunk_sizes)
        self.bounds = np.cumsum([0] + self.chunk_sizes)

    def distinct_batches(self) -> int:
        return len(self.chunk_sizes) // self.num_replicas

    def _rank_batches(self) -> list[list[int]]:
        chunks, ranks = len(self.chunk_sizes), self.num_replicas
        if not self.shuffle:
            order = np.arange(chunks)
        elif self.mixture is not None:
            order = self.mixture.draw(self.seed, self.epoch)
        else:
            order = torch.randperm(chunks, generator=torch.Generator().manual_seed(self.seed + self.epoch)).numpy()
        shared = len(order) // ranks * ranks
        items = lambda chunk: list(range(self.bounds[chunk], self.bounds[chunk + 1]))  # noqa: E731
        batches = [items(chunk) for chunk in order[self.rank:shared:ranks]]
        left = order[shared:]
        if self.rank < len(left):
            batches[-1] = batches[-1] + items(left[self.rank])
        return batches


class ResumableLoader(DataLoader):
    """A DataLoader Lightning can resume mid-epoch (it saves ``state_dict`` in every checkpoint).

    Its state is the epoch and how many of its batches were trained (``trained``, counted by whoever
    consumes them: :class:`prefmodule.training.resume.DataPosition`, not here, since Lightning fetches a
    batch ahead). Resumed in the same epoch, the rest of that epoch's batches come in their original
    order, as if training had never stopped.
    """

    # Class defaults, not ``__init__``: Lightning rebuilds DataLoaders from their constructor arguments.
    trained = 0
    _resume: dict[str, int] | None = None

    def __iter__(self):
        sampler = self.batch_sampler
        resume, self._resume = self._resume, None
        if isinstance(sampler, PairBatchSampler):
            sampler.skip = resume["batches"] if resume is not None and resume["epoch"] == sampler.epoch else 0
            self.trained = sampler.skip
        return super().__iter__()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": getattr(self.batch_sampler, "epoch", 0), "batches": self.trained}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = state
