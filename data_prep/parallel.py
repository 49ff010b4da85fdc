"""An order-preserving process-pool map, so parallel results are identical to serial ones for a fixed seed."""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from itertools import islice
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

WINDOW = 1024  # items submitted at once: bounds memory for huge inputs while keeping the workers busy


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, chunksize: int = 8) -> Iterator[R]:
    """``fn`` over ``items`` in input order, in ``workers`` processes (``<= 1``: in this one, no start-up cost).

    Processes are spawned, not forked: a fork copies the parent's threads' locks (tqdm's monitor, BLAS pools) and can
    deadlock. A worker that dies raises ``BrokenProcessPool`` here instead of hanging the run.
    """
    if workers <= 1:
        yield from map(fn, items)
        return
    source = iter(items)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending: deque[Iterator[R]] = deque()
        while window := list(islice(source, WINDOW)):
            pending.append(pool.map(fn, window, chunksize=chunksize))
            if len(pending) > 1:  # one window in flight while the previous one is consumed
                yield from pending.popleft()
        while pending:
            yield from pending.popleft()
