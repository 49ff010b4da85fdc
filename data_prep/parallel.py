"""An order-preserving process-pool map, so parallel results are identical to serial ones for a fixed seed."""

from __future__ import annotations

import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import contextmanager
from itertools import islice
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

WINDOW = 1024  # items submitted at once: bounds memory for huge inputs while keeping the workers busy


@contextmanager
def worker_pool(workers: int) -> Iterator[Executor | None]:
    """``workers`` processes for every :func:`ordered_map` in the block (starting them is paid once for
    many manifests); ``None``, work in this process at no start-up cost, for ``workers <= 1``.

    Processes are spawned, not forked: a fork copies the parent's threads' locks (tqdm's monitor, BLAS pools) and can
    deadlock. A worker that dies raises ``BrokenProcessPool`` in the map instead of hanging the run.
    """
    if workers <= 1:
        yield None
        return
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield pool


def ordered_map(fn: Callable[[T], R], items: Iterable[T], pool: Executor | None, chunksize: int = 8,
                here: Callable[[T], bool] = lambda item: False) -> Iterator[R]:
    """``fn`` over ``items`` in input order, in ``pool`` (from :func:`worker_pool`; ``None``: in this process). Items
    for which ``here`` is true are done in this process, in their place: for quick work the trip to a worker and
    back (pickling, a pipe) costs more than the work."""
    if pool is None:
        yield from map(fn, items)
        return
    source = iter(items)
    pending: deque[tuple[list[T], Iterator[R]]] = deque()
    while window := list(islice(source, WINDOW)):
        pending.append((window, pool.map(fn, [item for item in window if not here(item)], chunksize=chunksize)))
        if len(pending) > 1:  # one window in flight while the previous one is consumed
            yield from _in_order(fn, here, *pending.popleft())
    while pending:
        yield from _in_order(fn, here, *pending.popleft())


def _in_order(fn: Callable[[T], R], here: Callable[[T], bool], window: list[T], done: Iterator[R]) -> Iterator[R]:
    for item in window:
        yield fn(item) if here(item) else next(done)
