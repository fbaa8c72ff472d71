"""A split's data as source groups, and weighted mixtures of them.

``train: data.jsonl`` or ``train: [a.jsonl, b.parquet]`` is one group (its rows one after another, one
format). A list holding mappings makes each entry its own group, read with its own settings::

    train:
      - {path: a.jsonl, weight: 0.7}
      - {path: owner/name?split=train_prefs, weight: 0.3, format: sharegpt, columns: {conv: conversations}}

Keys: ``path`` (a file, glob, Hub name, or a list of them), ``weight``, and per group ``format``,
``columns``, ``tags``, ``pairs_from_ratings`` (the datamodule's settings otherwise).

Weights: an epoch of training draws as many items as the groups hold together, ``weight / sum(weights)`` of
them from each group: whole passes over a group in a fresh order, then a random part of it, so a small group
with a large weight repeats and a large one with a small weight is subsampled, differently every epoch and
the same in every run (seeded by ``seed`` and the epoch). Without weights, groups are simply read in turn.
Evaluation splits use every item of every group once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prefmodule.errors import ConfigError

GROUP_KEYS = ("path", "weight", "format", "columns", "tags", "pairs_from_ratings")


@dataclass(frozen=True)
class SourceGroup:
    names: tuple[str, ...]
    weight: float | None = None
    options: tuple = ()  # (key, value) pairs of the group's own settings

    def settings(self, defaults: dict) -> dict:
        return {**defaults, **dict(self.options)}

    @property
    def label(self) -> str:
        return self.names[0] if len(self.names) == 1 else str(list(self.names))


def parse_split(spec, option: str) -> list[SourceGroup]:
    """The source groups of a split's setting (a name, a list of names, a mapping, or a list of mappings)."""
    if isinstance(spec, str):
        return [SourceGroup((spec,))]
    if isinstance(spec, dict):
        spec = [spec]
    if not isinstance(spec, (list, tuple)) or not spec:
        raise ConfigError(f"{option}: expected a file, a glob, a dataset name, or a list of them (optionally "
                          f"{{path, weight, ...}} mappings), got {spec!r}")
    if all(isinstance(name, str) for name in spec):
        return [SourceGroup(tuple(spec))]
    groups = [_group(entry, f"{option}[{i}]") for i, entry in enumerate(spec)]
    weighted = [g.weight is not None for g in groups]
    if any(weighted) and not all(weighted):
        raise ConfigError(f"{option}: give every source a weight, or none (got weights for "
                          f"{sum(weighted)} of {len(groups)})")
    return groups


def _group(entry, option: str) -> SourceGroup:
    if isinstance(entry, str):
        return SourceGroup((entry,))
    if not isinstance(entry, dict):
        raise ConfigError(f"{option}: expected a file name or a mapping with {list(GROUP_KEYS)}, got {entry!r}")
    unknown = sorted(set(entry) - set(GROUP_KEYS))
    if unknown or "path" not in entry:
        raise ConfigError(f"{option}: a source takes the keys {list(GROUP_KEYS)} and needs `path`; got "
                          f"{sorted(entry)}")
    path, weight = entry["path"], entry.get("weight")
    names = (path,) if isinstance(path, str) else tuple(path) if isinstance(path, list) else ()
    if not names or not all(isinstance(name, str) for name in names):
        raise ConfigError(f"{option}.path: expected a file, a glob or a dataset name (or a list), got {path!r}")
    if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float))
                               or not 0 < weight < float("inf")):
        raise ConfigError(f"{option}.weight: expected a number > 0, got {weight!r}")
    options = tuple((key, value) for key, value in entry.items() if key not in ("path", "weight"))
    return SourceGroup(names, None if weight is None else float(weight), options)


class Mixture:
    """Per epoch, which units (items, or chunks of items) of each group to draw, by weight."""

    def __init__(self, sizes: list[int], weights: list[float]):
        self.sizes, self.weights = sizes, weights
        self.starts = np.cumsum([0] + sizes[:-1])

    def quotas(self) -> list[int]:
        """Units drawn from each group per epoch: their shares of the total, rounded by largest remainder."""
        total, weights = sum(self.sizes), np.array(self.weights) / sum(self.weights)
        exact = weights * total
        quotas = np.floor(exact).astype(int)
        quotas[np.argsort(quotas - exact, kind="stable")[: total - quotas.sum()]] += 1
        return quotas.tolist()

    def draw(self, seed: int, epoch: int) -> np.ndarray:
        """The epoch's units (indices into all groups' units one after another), shuffled together."""
        rng = np.random.default_rng([seed, epoch])
        picks = []
        for start, size, quota in zip(self.starts, self.sizes, self.quotas()):
            passes, rest = divmod(quota, size) if size else (0, 0)
            picks += [start + rng.permutation(size) for _ in range(passes)] + [start + rng.permutation(size)[:rest]]
        return rng.permutation(np.concatenate(picks)) if picks else np.zeros(0, dtype=np.int64)

    def shares(self) -> list[float]:
        total = sum(self.sizes)
        return [quota / total if total else 0.0 for quota in self.quotas()]
