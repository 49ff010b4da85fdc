"""The seeded sample order of ``shard``, for inputs of any size in bounded memory.

Samples are ordered by a hash of (seed, key): a pure function of the seed and the keys, whatever the input order or
the number of workers, and samples that share a key meet, so a duplicate is found without a set of every key.
Samples are held pickled (a manifest line takes about its own size); past ``buffer_bytes`` the held ones are written
to a temporary folder as one sorted run, and the runs are merged at the end (an external sort). Memory stays near
``buffer_bytes`` however large the manifest; the order does not depend on the buffer.
"""

from __future__ import annotations

import hashlib
import heapq
import pickle
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from itertools import groupby
from operator import itemgetter
from pathlib import Path
from typing import Generic, TypeVar

T = TypeVar("T")

SPILL_PREFIX = ".shuffle-"  # the temporary folder in the output directory; prepare_output removes a stale one
MAX_OPEN_RUNS = 128  # runs merged at once; more are merged in rounds, so files open stay far below ulimit -n
_RECORD_OVERHEAD = 200  # bytes a held record costs beyond its pickle and key: tuple, bytes and str headers

_Record = tuple[bytes, int, str, bytes]  # (hash tag, arrival number, key, pickled sample)


def _read_run(path: Path) -> Iterator[_Record]:
    with path.open("rb") as run:
        while True:
            try:
                yield pickle.load(run)
            except EOFError:
                return


class KeyedShuffle(Generic[T]):
    """:meth:`add` every sample, then iterate once: lists of the samples that share a key (one, unless a key
    repeats), each in arrival order, the lists in the seeded order. Use it as a context manager: its temporary folder
    under ``spill_dir`` is removed on exit."""

    def __init__(self, seed: int, spill_dir: Path, buffer_bytes: int, max_open_runs: int = MAX_OPEN_RUNS) -> None:
        self._salt = f"{seed}\0".encode()
        self._spill_dir = spill_dir
        self._buffer_bytes = buffer_bytes
        self._max_open_runs = max_open_runs
        self._held: list[_Record] = []
        self._held_bytes = 0
        self._runs: list[Path] = []
        self._folder: Path | None = None
        self._count = 0
        self._runs_written = 0

    def __len__(self) -> int:
        return self._count

    def add(self, key: str, sample: T) -> None:
        tag = hashlib.blake2b(self._salt + key.encode(), digest_size=8).digest()
        blob = pickle.dumps(sample, protocol=pickle.HIGHEST_PROTOCOL)
        self._held.append((tag, self._count, key, blob))
        self._count += 1
        self._held_bytes += len(blob) + len(key) + _RECORD_OVERHEAD
        if self._held_bytes >= self._buffer_bytes:
            self._spill()

    def __iter__(self) -> Iterator[list[T]]:
        for _, records in groupby(self._sorted(), key=itemgetter(0)):
            by_key: dict[str, list[T]] = {}  # one key, bar a 64-bit hash collision
            for _, _, key, blob in records:
                by_key.setdefault(key, []).append(pickle.loads(blob))
            yield from by_key.values()

    def _sorted(self) -> Iterable[_Record]:
        self._held.sort()  # (tag, arrival) is unique: keys and pickles are never compared
        if not self._runs:
            return self._held
        if self._held:
            self._spill()
        runs = self._runs
        while len(runs) > self._max_open_runs:
            group, runs = runs[:self._max_open_runs], runs[self._max_open_runs:]
            runs.append(self._write_run(heapq.merge(*map(_read_run, group))))
            for path in group:
                path.unlink()
        return heapq.merge(*map(_read_run, runs))

    def _spill(self) -> None:
        self._held.sort()
        self._runs.append(self._write_run(self._held))
        self._held, self._held_bytes = [], 0

    def _write_run(self, records: Iterable[_Record]) -> Path:
        if self._folder is None:
            self._spill_dir.mkdir(parents=True, exist_ok=True)
            self._folder = Path(tempfile.mkdtemp(prefix=SPILL_PREFIX, dir=self._spill_dir))
        path = self._folder / f"run-{self._runs_written:06d}"
        self._runs_written += 1
        with path.open("wb") as run:
            for record in records:
                pickle.dump(record, run, protocol=pickle.HIGHEST_PROTOCOL)
        return path

    def __enter__(self) -> "KeyedShuffle[T]":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
