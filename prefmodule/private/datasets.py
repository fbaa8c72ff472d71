"""datasets' private names that prefmodule uses (datasets has no public way to any of them)."""

from __future__ import annotations


def dataset_fingerprint(dataset) -> str:
    """The fingerprint a ``datasets`` dataset keeps of its data and transforms (its private ``_fingerprint``)."""
    return dataset._fingerprint
