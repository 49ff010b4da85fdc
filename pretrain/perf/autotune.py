"""Pick the fastest of several interchangeable kernels by timing them once on the real inputs, then remember the pick.

Used by ``attend``: which attention kernel wins depends on the card, the torch build and the shape (the encoder's
cross-attention and the latent self-attention pick different kernels on an H100, ``bench/README.md``), so a fixed
preference order leaves time on the table somewhere.
Timing happens on the first call for each key (shapes rounded up to powers of two), costs a few forward and
backward passes per candidate, and is logged. Each process decides for itself: ranks may pick differently, which
changes rounding, not results; so may two runs, so pin a backend where runs must repeat exactly.

Nothing is timed where timing would be wrong or impossible, and the default is used instead, without remembering:
inside ``torch.compile`` tracing, under a dispatch mode (FLOP counting, fake tensors), during CUDA graph capture, on
the meta device, and under ``torch.use_deterministic_algorithms(True)`` (two runs must run the same kernels). The
caller's random number generator state is left as it was, so a tuned run draws the same dropout masks as a run that
names the chosen kernel, and activation checkpointing (whose saved-tensor hooks would otherwise apply to the trial
passes) is shielded off.
"""

from __future__ import annotations

import logging
from typing import Callable, Hashable, Sequence

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ..timing import elapsed_s

log = logging.getLogger(__name__)

# Each candidate's time is its fastest of these runs: a run only ever gets slower by chance (the host stalls before
# a launch, another process takes the GPU), so the minimum is the stable estimate (the median was not).
TIMED_RUNS = 5


def shape_bucket(size: int) -> int:
    """The power of two at or above ``size``: nearby lengths share one decision."""
    return 1 << max(size - 1, 0).bit_length()


def can_time(device: torch.device) -> bool:
    """False where a trial run would be traced, counted, captured or has no data, and where the pick must not
    depend on timing (``torch.use_deterministic_algorithms``: two runs must run the same kernels)."""
    if device.type == "meta" or torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return False
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    return not torch.are_deterministic_algorithms_enabled()


def _trial(run: Callable[..., torch.Tensor], name: str, inputs: Sequence[torch.Tensor]) -> Callable[[], None]:
    """One forward (and backward, when an input needs gradients and grad mode is on) of candidate ``name``."""
    leaves = [t.detach().requires_grad_(t.requires_grad) for t in inputs]
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in leaves)
    targets = [t for t in leaves if t.requires_grad]

    def once() -> None:
        out = run(name, *leaves)
        if wants_grad:
            torch.autograd.grad(out, targets, torch.ones_like(out))

    return once


class KernelTuner:
    """Per-key cache of the fastest candidate, filled by timing the candidates on the caller's inputs."""

    def __init__(self) -> None:
        self.choices: dict[Hashable, str] = {}
        self.timings: dict[Hashable, dict[str, float]] = {}

    def choose(
        self,
        key: Hashable,
        candidates: Sequence[str],
        run: Callable[..., torch.Tensor],
        inputs: Sequence[torch.Tensor],
        describe: Callable[[], str],
    ) -> str:
        """The remembered or newly measured fastest of ``candidates`` (``run(name, *inputs)`` runs one); the first
        candidate where nothing can be timed or every candidate failed."""
        if key in self.choices:
            return self.choices[key]
        device = inputs[0].device
        if len(candidates) == 1 or not can_time(device):
            return candidates[0]
        seconds, errors = {}, {}
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            for name in candidates:
                try:
                    once = _trial(run, name, inputs)
                    once()  # warm-up: kernel selection, lazy initialisation, allocator growth
                    seconds[name] = min(elapsed_s(once, device) for _ in range(TIMED_RUNS))
                except (RuntimeError, ValueError) as exc:  # a kernel that refuses this shape or runs out of memory
                    errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
        if not seconds:
            log.warning("autotune %s: every candidate failed (%s); using %s", describe(), errors, candidates[0])
            return candidates[0]
        best = min(seconds, key=seconds.get)
        self.choices[key], self.timings[key] = best, seconds
        timings = ", ".join(f"{name} {s * 1e3:.3f} ms" for name, s in sorted(seconds.items(), key=lambda x: x[1]))
        failed = f"; failed: {errors}" if errors else ""
        log.info("autotune %s: %s -> %s%s", describe(), timings, best, failed)
        return best
