"""The training loop: the step (fetching its micro-batches from ``StepBatches``, backward, optimizer), then the
evaluation and the save as ``Stopping`` decides them, with ``Logbook`` recording what the loop hands it."""

from __future__ import annotations

import sys
from typing import Dict, List

import torch
from tqdm import tqdm

from ..preemption import EXIT_PREEMPTED, Preemption
from .batches import StepBatches
from .distributed import sum_over_ranks
from .evaluation import evaluate
from .logbook import Logbook
from .objective import per_target, predict, target_counts, weighted_total
from .profiling import StepProfiler
from .run import Run
from .stopping import Stopping


def reseed(seed: int, rank: int, step: int, micro: int) -> None:
    """Dropout masks as a pure function of (seed, rank, step, micro-step): a resumed run draws the same ones, whatever
    else (DataLoader iterators, evaluation) consumed the global generator in between."""
    torch.manual_seed(hash((seed, rank, step, micro)) % 2**63)


def step_targets(batches: List[dict]) -> Dict[str, torch.Tensor]:
    """Each modality's targets in the whole step: the micro-batches of every rank (one all_reduce, on the device, so
    the host does not wait for it)."""
    counts = [target_counts(batch) for batch in batches]
    names = sorted(counts[0])
    if not names:
        return {}
    total = sum_over_ranks(torch.stack([sum(c[name] for c in counts) for name in names]).float())
    return dict(zip(names, total))


def train_step(run: Run, logbook: Logbook, step_batches: StepBatches) -> None:
    """One optimizer step on the step's micro-batches, each modality's loss divided by its targets in the whole step
    (every rank and micro-batch), so that the gradient and the logged losses are the same however the global batch
    is split over processes and accumulation steps (a mean of each micro-batch's own mean would weigh a target by
    the size of the micro-batch it falls in)."""
    cfg, engine = run.cfg, run.engine
    batches, data_wait, tokens = step_batches.next()
    logbook.fetched(data_wait, tokens, step_batches.flops)
    counts = step_targets(batches)
    logbook.step_targets(counts)
    scale = step_batches.gas * run.env.world_size  # DeepSpeed divides by both: the step's gradient is then the sum's
    for micro, batch in enumerate(batches):
        reseed(cfg.train.seed, run.env.rank, run.progress.step, micro)
        losses = per_target(predict(engine, batch)[0], counts)
        loss = weighted_total(losses, cfg.train.loss_weights)
        engine.backward(loss * scale)
        engine.step()
        logbook.micro_step(loss, losses)


def train_loop(run: Run, preemption: Preemption) -> int:
    """Steps until ``train.max_steps`` (0 returned) or until ``Stopping`` ends the run with its exit code. A step's
    evaluation runs after its training metrics are taken (its time is not training's) and goes in the same line, which
    ``Stopping`` checks for a divergence before saving."""
    cfg, progress = run.cfg, run.progress
    logbook, step_batches = Logbook(run), StepBatches(run)
    stopping = Stopping(cfg, run.device, preemption, checkpoint_dir=run.checkpointer.directory,
                        save=lambda step: logbook.note(checkpoint_time_s=run.checkpointer.save(step)),
                        validates=run.val is not None)
    if stopping.signalled_at_start():
        return EXIT_PREEMPTED
    bar = tqdm(total=cfg.train.max_steps, initial=progress.step,
               disable=run.env.rank != 0 or not cfg.run.progress_bar or not sys.stderr.isatty())
    profiler = StepProfiler(cfg.run.profile_steps, cfg.run.profile_after_steps, run.run_dir / "profile", run.env.rank,
                            run.device)
    try:
        while progress.step < cfg.train.max_steps:
            profiler.step_begins(progress.step)
            train_step(run, logbook, step_batches)
            progress.step += 1
            progress.samples += logbook.step_samples
            bar.update(1)
            end = stopping.decide(progress.step)
            metrics = logbook.end_step(progress.step, end.save)
            if end.evaluate:
                metrics.update(evaluate(run))
            exit_code = stopping.end_step(progress.step, end, logbook.write(progress.step, metrics))
            if exit_code is not None:
                return exit_code
            profiler.step_ends()
        return 0
    finally:
        profiler.close()
        bar.close()
