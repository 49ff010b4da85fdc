"""The DeepSpeed training engine: ``train(cfg, env, start, preemption)`` runs one training process of a job."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tqdm.contrib.logging import logging_redirect_tqdm

from launch.env import DistEnv
from ..config import Config
from ..preemption import EXIT_PREEMPTED, Preemption
from .distributed import device_of, process_group
from .loop import train_loop
from .run import build_run, checkpoint_dir

if TYPE_CHECKING:  # pretrain.start imports this package
    from ..start import Start


def train(cfg: Config, env: DistEnv, start: Start, preemption: Preemption) -> int:
    """Train under a process group that is destroyed on every exit path; returns the process exit code (0 done,
    ``EXIT_PREEMPTED`` after a signal, which ``preemption`` has caught since the process started, and its
    checkpoint). ``start``: how the run starts (``pretrain.start.decide_start``)."""
    device = device_of(env, cfg.data.num_workers)
    with process_group(env, device, cfg.train.collective_timeout_minutes):
        run = build_run(cfg, env, device, start)
        exit_code = 1
        try:
            with logging_redirect_tqdm():  # log lines pass rank 0's progress bar
                exit_code = train_loop(run, preemption)
            return exit_code
        finally:
            run.tracker.finish(exit_code=exit_code)


__all__ = ["train", "checkpoint_dir", "EXIT_PREEMPTED"]
