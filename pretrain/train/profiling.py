"""Where a step's time goes: ``torch.profiler`` over a few steps, summarised one way for the training loop
(``run.profile_steps``) and ``bench/model_bench.py``. On a GPU the summary sets the kernels' busy time against the
step's wall time: far below it, the step waits on the host (Python, launches, syncs), not on the GPU."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

log = logging.getLogger("pretrain")


def start_profiler(device: torch.device) -> profile:
    """A started profiler of the host's operators and, on CUDA, the kernels."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=activities)
    prof.start()
    return prof


def stop_and_summarize(prof: profile, started: float, steps: int, device: torch.device) -> Tuple[str, Optional[float]]:
    """Wait for ``device``'s queued work, stop ``prof`` (started at ``started``, a ``time.perf_counter``) and
    :func:`summarize` its ``steps`` steps (at least one) over the wall time since ``started``."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    wall_s = time.perf_counter() - started
    prof.stop()
    return summarize(prof, steps, wall_s, cuda)


def summarize(prof: profile, steps: int, wall_s: float, cuda: bool, rows: int = 15) -> Tuple[str, Optional[float]]:
    """A line (wall ms per step; on GPU kernels per step and the GPU's busy ms per step) and the tables of the top
    kernels (GPU) and of the operators that take the host's time; also the busy ms per step (None on CPU)."""
    wall_ms = wall_s * 1e3 / steps
    line, busy_ms = f"wall {wall_ms:.1f} ms/step (profiled)", None
    if cuda:
        kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        busy_ms = sum(e.device_time_total for e in kernels) / 1e3 / steps
        line += f", {len(kernels) / steps:.0f} kernels/step, GPU busy {busy_ms:.1f} ms/step ({busy_ms / wall_ms:.0%})"
    averages = prof.key_averages()
    tables = [averages.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60)]
    if cuda:
        tables.insert(0, averages.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=60))
    return "\n".join([line, *tables]), busy_ms


class StepProfiler:
    """Profiles this process's training steps ``after + 1`` to ``after + steps`` (after the first steps' attention
    tuning, compilation and data warm-up), then writes ``<directory>/rank<r>.txt`` (the summary and its tables) and
    ``rank<r>.trace.json.gz`` (a Chrome / Perfetto trace); rank 0 logs the summary line. ``steps`` 0: off."""

    def __init__(self, steps: int, after: int, directory: Path, rank: int, device: torch.device) -> None:
        self.steps, self.first, self.directory, self.rank, self.device = steps, after, directory, rank, device
        self.taken, self.prof, self.started, self.done_before = 0, None, 0.0, 0

    def step_begins(self, done_before: int) -> None:
        """``done_before``: the run's steps before this one (a resumed run's include the earlier processes')."""
        if self.steps and self.taken == self.first:
            self.prof, self.started, self.done_before = start_profiler(self.device), time.perf_counter(), done_before

    def step_ends(self) -> None:
        self.taken += 1
        if self.prof is not None and self.taken == self.first + self.steps:
            self.close()

    def close(self) -> None:
        """Stop and write what was profiled (also when the run ends inside the window); a no-op otherwise."""
        if self.prof is None:
            return
        prof, self.prof = self.prof, None
        profiled = self.taken - self.first
        if profiled == 0:  # the run stopped inside the first profiled step
            prof.stop()
            return
        text, _ = stop_and_summarize(prof, self.started, profiled, self.device)
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / f"rank{self.rank}.txt").write_text(text + "\n")
        prof.export_chrome_trace(str(self.directory / f"rank{self.rank}.trace.json.gz"))
        if self.rank == 0:
            log.info("profile of steps %d-%d (rank 0): %s; tables and traces in %s", self.done_before + 1,
                     self.done_before + profiled, text.split("\n", 1)[0], self.directory)
