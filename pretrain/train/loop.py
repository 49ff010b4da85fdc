"""The training loop (nanoGPT spirit: it reads top to bottom) and the evaluation pass."""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections import defaultdict
from typing import Dict, Iterator, Optional

import torch
from tqdm import tqdm

from ..checkpoint import NoRoomError, read_latest
from ..config import gradient_accumulation_steps
from ..data import DataStream
from ..model.attention import tunes
from ..preemption import EXIT_PREEMPTED, Preemption
from ..tracking import format_metrics
from .distributed import DeferredAgreement, all_gather, mean_over_ranks, sum_over_ranks
from .metrics import SkipSummary, Window, compute_metrics, count_flops, input_tokens, skipped_totals
from .objective import accuracy_metrics, label_counts, modality_losses, over_present, predict, present, weighted_total
from .profiling import StepProfiler
from .run import Run
from .schedule import lr_factor

log = logging.getLogger("pretrain")
AFTER_EXIT = "a requeued job resumes from the latest checkpoint; a cancelled one ends here"
EXIT_DIVERGED = 3  # the loss or the gradient norm is no longer finite: stopped without saving, do not requeue
EXIT_NO_ROOM = 4  # a rank lacks the disk space for the next checkpoint: stopped before writing it, do not requeue


def forever(stream: DataStream) -> Iterator[dict]:
    while True:
        yield from stream


def to_device(tree, device: torch.device, dtype: torch.dtype):
    """Tensors of a (nested) batch onto ``device``; floating ones in the engine's dtype."""
    if isinstance(tree, dict):
        return {key: to_device(value, device, dtype) for key, value in tree.items()}
    if isinstance(tree, torch.Tensor):
        tree = tree.to(device, non_blocking=True)
        return tree.to(dtype) if tree.is_floating_point() else tree
    return tree


def reseed(seed: int, rank: int, step: int, micro: int) -> None:
    """Dropout masks as a pure function of (seed, rank, step, micro-step): a resumed run draws the same ones, whatever
    else (DataLoader iterators, evaluation) consumed the global generator in between."""
    torch.manual_seed(hash((seed, rank, step, micro)) % 2**63)


@torch.no_grad()
def evaluate(run: Run) -> Dict[str, float]:
    """Per-modality and total loss over the first ``train.eval_batches`` validation batches (all when 0), the same
    batches every time, averaged over ranks; with a label target, top-1 accuracy over all those samples and per
    class."""
    run.engine.eval()
    run.val.load_state_dict({"epoch": 0, "batches": 0})
    sums: Dict[str, float] = defaultdict(float)
    counts: Optional[torch.Tensor] = None
    batches = run.cfg.train.eval_batches or len(run.val)
    for batch in itertools.islice(run.val, batches):
        batch = to_device(batch, run.device, run.dtype)
        losses, out = predict(run.engine, run.engine.module, batch)
        losses["total"] = weighted_total(losses, run.cfg.train.loss_weights)
        for name, loss in losses.items():
            sums[name] += float(loss) / batches
        for name, share in present(batch).items():
            sums[f"present/{name}"] += float(share) / batches
        if "label" in out:
            found = label_counts(out["label"], batch["targets"]["label"])
            counts = found if counts is None else counts + found
    run.engine.train()
    metrics = {("val/loss" if k == "total" else f"val/loss/{k}"): v
               for k, v in over_present(mean_over_ranks(sums, run.device), "").items()}
    if counts is not None:  # every rank has a label target or none
        metrics.update({f"val/{k}": v for k, v in accuracy_metrics(sum_over_ranks(counts), run.class_names).items()})
    return metrics


def divergence(metrics: Dict[str, float]) -> Optional[str]:
    """What in a log line shows that training diverged, if anything: a non-finite mean loss over the steps since the
    last line (NaN and infinity survive the mean), or a non-finite gradient norm (DeepSpeed reports one as -1)."""
    loss, grad_norm = metrics.get("loss"), metrics.get("grad_norm")
    if loss is not None and not math.isfinite(loss):
        return f"loss {loss}"
    if grad_norm is not None and not (math.isfinite(grad_norm) and grad_norm >= 0):
        return f"gradient norm {grad_norm} (DeepSpeed's -1: infinite or NaN)"
    return None


def train_loop(run: Run, preemption: Preemption) -> int:
    """Steps until ``train.max_steps`` (0 returned), a preemption signal (checkpoint, ``EXIT_PREEMPTED``; a signal
    that came while the ranks started: ``EXIT_PREEMPTED`` at once, as nothing was trained since the start) or a
    divergence (``EXIT_DIVERGED``, nothing saved: every checkpoint holds finite weights, as every save follows a
    check of all steps since the previous one) or a full disk (``EXIT_NO_ROOM``, found before writing)."""
    cfg, engine, progress, world = run.cfg, run.engine, run.progress, run.env.world_size
    if any(all_gather(preemption.requested)):
        log.info("signal %s during the start: exiting with %d, nothing trained, nothing to save (%s)",
                 preemption.signal, EXIT_PREEMPTED, AFTER_EXIT)
        return EXIT_PREEMPTED
    gas = gradient_accumulation_steps(cfg, world)
    step_samples = cfg.data.batch_size * gas * world
    batches, window, skip_summary = forever(run.stream), Window(), SkipSummary()
    agreement = DeferredAgreement(2, run.device)  # [stop for a signal, checkpoint minutes due], one step late
    last_save, flops, checkpoint_time = time.monotonic(), None, None
    bar = tqdm(total=cfg.train.max_steps, initial=progress.step, disable=run.env.rank != 0 or not cfg.run.progress_bar)
    profiler = StepProfiler(cfg.run.profile_steps, cfg.run.profile_after_steps, run.run_dir / "profile", run.env.rank,
                            run.device)
    try:
        while progress.step < cfg.train.max_steps:
            profiler.step_begins(progress.step)
            for micro in range(gas):
                waited = time.perf_counter()
                batch = next(batches)
                window.add(data_wait=time.perf_counter() - waited, tokens=input_tokens(batch["inputs"]) * world)
                batch = to_device(batch, run.device, run.dtype)
                if flops is None:
                    if cfg.train.compile != "none" and tunes(cfg.model.attention_backend, run.device):
                        # One eager forward (past the compile wrapper) tunes attention for this shape: compiled code
                        # cannot time kernels, so without it the compiled graph would keep the static order.
                        engine.module._call_impl(batch["inputs"], batch["decode"])
                    flops = gas * world * count_flops(engine.module, (batch["inputs"], batch["decode"]))
                reseed(cfg.train.seed, run.env.rank, progress.step, micro)
                losses = modality_losses(engine, engine.module, batch)
                loss = weighted_total(losses, cfg.train.loss_weights)
                engine.backward(loss)
                engine.step()
                window.add(loss=loss.detach() / gas, **{f"loss/{k}": v.detach() / gas for k, v in losses.items()},
                           **{f"present/{k}": v / gas for k, v in present(batch).items()})
            progress.step += 1
            progress.samples += step_samples
            window.add(steps=1, samples=step_samples)
            bar.update(1)
            step, last = progress.step, progress.step == cfg.train.max_steps
            stop, minutes_due = agreement.result()
            save = bool(cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0) or minutes_due or \
                stop or last
            metrics: Dict[str, float] = {}
            if step % cfg.run.log_every_steps == 0 or save:  # a save is checked for divergence first
                metrics = over_present(mean_over_ranks(window.flush(), run.device), "loss/")
                skips = skipped_totals(run.stream.skipped())
                summary = skip_summary.line(skips, step)
                if summary and run.env.rank == 0:
                    log.warning("%s", summary)
                metrics.update(samples=progress.samples,
                               lr=cfg.optim.lr * lr_factor(step - 1, cfg.optim, cfg.train.max_steps), **skips,
                               **compute_metrics(run.device, flops, metrics["step_time_s"]))
                grad_norm = engine.get_global_grad_norm()
                if grad_norm is not None:
                    metrics["grad_norm"] = float(grad_norm)
            if run.val is not None and (step % cfg.train.eval_every_steps == 0 or last):
                metrics.update(evaluate(run))
            if metrics:  # logged before the checkpoint, so a kill during the save cannot lose this step's line
                if checkpoint_time is not None:
                    metrics["checkpoint_time_s"], checkpoint_time = checkpoint_time, None
                run.tracker.log(metrics, step)
                if run.env.rank == 0:
                    log.info("%s", format_metrics(metrics, step, cfg.train.max_steps))
            diverged = divergence(metrics)  # the same on every rank: means over ranks, the one global norm
            if diverged:
                latest = read_latest(run.checkpointer.directory)
                where = (f"the last checkpoint, {latest}, was saved while the loss was finite. Resume from it "
                         f"(--resume auto) or from an earlier one (--resume PATH)" if latest else
                         "no checkpoint was saved. Start again")
                log.error("training diverged by step %d: %s. Stopped without saving: %s, with changed optim settings "
                          "(a lower lr, a longer warmup_steps, a lower grad_clip): a resumed run takes them from its "
                          "config", step, diverged, where)
                return EXIT_DIVERGED
            if save:
                try:
                    checkpoint_time = run.checkpointer.save(step)
                except NoRoomError as exc:
                    log.error("step %d: %s", step, exc)
                    return EXIT_NO_ROOM
                last_save = time.monotonic()
            if stop:
                log.info("signal %s: checkpointed step %d, exiting with %d (%s)", preemption.signal, step,
                         EXIT_PREEMPTED, AFTER_EXIT)
                return EXIT_PREEMPTED
            if not last:  # posted after the save, so a save made for the minutes is not asked for again
                agreement.post([preemption.requested,
                                0 < cfg.checkpoint.every_minutes * 60 <= time.monotonic() - last_save])
            profiler.step_ends()
        return 0
    finally:
        profiler.close()
        bar.close()
