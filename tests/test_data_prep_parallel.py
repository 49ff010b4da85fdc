"""The order-preserving map of ``data_prep``: quick items stay in this process, the others go to the pool, and the
results come back in input order across windows."""

from __future__ import annotations

import os

from data_prep.parallel import WINDOW, ordered_map, worker_pool


def where(item: int) -> tuple[int, int]:
    return item, os.getpid()


def test_quick_items_stay_here_and_the_order_is_kept():
    items = list(range(2 * WINDOW + 5))
    with worker_pool(2) as pool:
        results = list(ordered_map(where, items, pool, here=lambda item: item % 3 == 0))
    assert [item for item, _ in results] == items
    assert {pid for item, pid in results if item % 3 == 0} == {os.getpid()}
    assert os.getpid() not in {pid for item, pid in results if item % 3}


def test_one_worker_is_this_process():
    with worker_pool(1) as pool:
        assert pool is None
        assert {pid for _, pid in ordered_map(where, range(10), pool)} == {os.getpid()}
