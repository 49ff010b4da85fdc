"""``shard --val-fraction F``: a validation split beside the training one, each a complete ``shard`` output.

A sample is in ``val`` when a hash of (seed, "val", its key) / 2**64 is below F: a pure function of the seed and the
key, so the split is the same every run, disjoint by key, and a sample keeps its split when others are added. The key
is the one its input gives (a manifest's ``key`` or line number, a folder sample's path), taken before a long text is
cut into pieces, so the pieces of a document stay together; a rejection without a key goes by its origin.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from data_prep.writer import Job, Rejection

SPLITS = ("train", "val")


@dataclass(frozen=True)
class ValSplit:
    """One side of the split: ``name`` (one of :data:`SPLITS`) and the fraction of the samples that goes to val."""

    name: str
    fraction: float

    def holds(self, seed: int, key: str) -> bool:
        """Whether the sample of ``key`` falls on this side: of the seed and the key alone, whatever else is read."""
        digest = hashlib.blake2b(f"{seed}\0val\0{key}".encode(), digest_size=8).digest()
        return (int.from_bytes(digest, "big") / 2**64 < self.fraction) == (self.name == "val")

    def items(self, items: Iterable[Job | Rejection], seed: int) -> Iterator[Job | Rejection]:
        """The jobs and rejections of ``items`` that fall on this side."""
        return (item for item in items if self.holds(seed, item.origin if item.key is None else item.key))
