"""What the loop measures besides the losses: throughput, data-wait fraction, skipped samples, GPU memory and MFU."""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..shards.read import UNUSED
from .distributed import all_gather

# Dense bf16 peak FLOP/s per GPU, by a substring of the device name; MFU is left out for others.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


class Window:
    """Sums over the steps since the last log line; ``flush`` turns them into rates and means and starts anew."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.sums: Dict[str, float] = defaultdict(float)
        self.steps = 0

    def add(self, **values) -> None:
        """Numbers or 0-d tensors (kept on their device: converting them here would sync the GPU every step)."""
        for key, value in values.items():
            self.sums[key] = self.sums[key] + value

    def flush(self) -> Dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        steps = max(self.sums["steps"], 1)
        out = {key: float(value) / steps for key, value in self.sums.items() if key.startswith(("loss", "present/"))}
        out.update({
            "samples_per_s": float(self.sums["samples"]) / elapsed,
            "tokens_per_s": float(self.sums["tokens"]) / elapsed,
            "step_time_s": elapsed / steps,
            "data_wait_frac": float(self.sums["data_wait"]) / elapsed,
        })
        self.__init__()
        return out


def input_tokens(inputs: Mapping[str, torch.Tensor]) -> int:
    """Elements the encoder attends to: the True entries of every ``<name>_mask`` of the batch."""
    return int(sum(int(mask.sum()) for key, mask in inputs.items() if key.endswith("_mask")))


def skipped_totals(counts: Dict[str, int]) -> Dict[str, int]:
    """Skipped samples by reason (``skipped/<reason>``) and those passed over by design (``unused_samples``), summed
    over ranks (a collective: every rank calls it)."""
    total: Counter = Counter()
    for rank_counts in all_gather(counts):
        total.update(rank_counts)
    return {"unused_samples" if reason == UNUSED else f"skipped/{reason}": n for reason, n in sorted(total.items())}


class SkipSummary:
    """One line per log window for the samples skipped in it (the first of each reason are logged as they come, a
    few per worker; this line says how many followed)."""

    def __init__(self) -> None:
        self.seen: Dict[str, int] = {}

    def line(self, totals: Mapping[str, int], step: int) -> Optional[str]:
        """``totals``: :func:`skipped_totals`; None when nothing was skipped since the last call."""
        new = {k[len("skipped/"):]: n - self.seen.get(k, 0) for k, n in totals.items()
               if k.startswith("skipped/") and n > self.seen.get(k, 0)}
        self.seen = dict(totals)
        if not new:
            return None
        everything = sum(n for k, n in totals.items() if k.startswith("skipped/"))
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(new.items()))
        return (f"data: {sum(new.values())} samples skipped by step {step} since the last line ({reasons}); "
                f"{everything} in all")


def compute_metrics(device: torch.device, flops_per_step: Optional[float], step_time_s: float) -> Dict[str, float]:
    """Achieved TFLOP/s (all ranks together) on every device; peak memory and model FLOP utilisation on GPU. Counting
    on every device keeps the counting path in the CPU tests."""
    achieved = flops_per_step / step_time_s if flops_per_step and step_time_s > 0 else None
    out = {"tflops": achieved / 1e12} if achieved else {}
    if device.type != "cuda":
        return out
    out["memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    name = torch.cuda.get_device_name(device)
    peak = next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)
    if peak and achieved:
        out["mfu"] = achieved / peak
    return out


# Operators that are neither views nor kernels: allocations without a fill, a view by another name, profiler marks.
_NO_KERNEL = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "_unsafe_view",
                        "_record_function_enter_new", "_record_function_exit"})


class OperatorCount(TorchDispatchMode):
    """While active, counts the operators dispatched, by name (``counts``), those of them that would launch a GPU kernel
    (``launches``: not views, allocations or profiler marks), and keeps the output shapes of the operators that write
    new memory (``written``: not views). On a GPU each operator is host work and most are a kernel launch, and
    ``_local_scalar_dense`` a host sync, whatever the device counted on: the benchmarks and tests count on the CPU
    what a GPU step would pay per launch, and which arrays it copies."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()
        self.launches = 0
        self.written: Dict[str, List[Tuple[int, ...]]] = defaultdict(list)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.counts[name] += 1
        self.launches += not func.is_view and name not in _NO_KERNEL
        out = func(*args, **(kwargs or {}))
        if not any(r.alias_info is not None for r in func._schema.returns):
            self.written[name] += [tuple(t.shape) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out
