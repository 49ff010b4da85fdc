"""The training loop: the step (micro-batches, backward, optimizer), with the log lines (``Logbook``) and the
save and stop decisions (``Stopping``) around it."""

from __future__ import annotations

import sys

import torch
from tqdm import tqdm

from ..preemption import EXIT_PREEMPTED, Preemption
from .logbook import Logbook
from .objective import modality_losses, weighted_total
from .profiling import StepProfiler
from .run import Run
from .stopping import Stopping


def reseed(seed: int, rank: int, step: int, micro: int) -> None:
    """Dropout masks as a pure function of (seed, rank, step, micro-step): a resumed run draws the same ones, whatever
    else (DataLoader iterators, evaluation) consumed the global generator in between."""
    torch.manual_seed(hash((seed, rank, step, micro)) % 2**63)


def train_loop(run: Run, preemption: Preemption) -> int:
    """Steps until ``train.max_steps`` (0 returned) or until ``Stopping`` ends the run with its exit code."""
    cfg, engine, progress = run.cfg, run.engine, run.progress
    logbook = Logbook(run)
    stopping = Stopping(cfg, run.device, preemption, checkpoint_dir=run.checkpointer.directory,
                        save=lambda step: logbook.note(checkpoint_time_s=run.checkpointer.save(step)))
    if stopping.signalled_at_start():
        return EXIT_PREEMPTED
    bar = tqdm(total=cfg.train.max_steps, initial=progress.step,
               disable=run.env.rank != 0 or not cfg.run.progress_bar or not sys.stderr.isatty())
    profiler = StepProfiler(cfg.run.profile_steps, cfg.run.profile_after_steps, run.run_dir / "profile", run.env.rank,
                            run.device)
    try:
        while progress.step < cfg.train.max_steps:
            profiler.step_begins(progress.step)
            for micro in range(logbook.gas):
                batch = logbook.next_batch()
                reseed(cfg.train.seed, run.env.rank, progress.step, micro)
                losses = modality_losses(engine, batch)
                loss = weighted_total(losses, cfg.train.loss_weights)
                engine.backward(loss)
                engine.step()
                logbook.micro_step(batch, loss, losses)
            progress.step += 1
            progress.samples += logbook.step_samples
            bar.update(1)
            end = stopping.decide(progress.step)
            exit_code = stopping.end_step(progress.step, end, logbook.end_step(progress.step, end.save))
            if exit_code is not None:
                return exit_code
            profiler.step_ends()
        return 0
    finally:
        profiler.close()
        bar.close()
