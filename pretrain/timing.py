"""Seconds a piece of work takes on its device: CUDA events on a GPU (the host returns before the kernels end),
``perf_counter`` elsewhere. One clock for the attention autotuner and the benchmarks."""

from __future__ import annotations

import time
from typing import Callable

import torch


def elapsed_s(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds from ``fn``'s start to the end of the device work it queued."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin
