"""The log lines of a run: what the steps since the last line measured, evaluation when due, to the tracker and the
console."""

from __future__ import annotations

import logging
import time
from typing import Dict, Mapping

import torch

from ..config import global_batch, gradient_accumulation_steps
from ..perf import first_step_flops
from ..tracking import format_metrics
from .batches import forever, to_device
from .distributed import mean_over_ranks
from .evaluation import evaluate
from .metrics import SkipSummary, Window, compute_metrics, input_tokens, skipped_totals
from .objective import over_present
from .run import Run
from .schedule import lr_factor

log = logging.getLogger("pretrain")


class Logbook:
    """Fetches the training batches (timing the wait for each) and sums what each micro-step measured; at the end of
    a step that logs (every ``run.log_every_steps``, and before every save, which is checked for divergence first) it
    turns the sums into one line, with an evaluation every ``train.eval_every_steps`` and at the last step."""

    def __init__(self, run: Run):
        self.run = run
        self.world = run.env.world_size
        self.gas = gradient_accumulation_steps(run.cfg, self.world)
        self.step_samples = global_batch(run.cfg, self.world)
        self.batches = forever(run.stream)
        self.window, self.skip_summary = Window(), SkipSummary()
        self.flops = None
        self.notes: Dict[str, float] = {}

    def next_batch(self) -> dict:
        """The next batch on the device; before the first is trained on, the FLOPs of a step are counted on it."""
        waited = time.perf_counter()
        batch = next(self.batches)
        self.window.add(data_wait=time.perf_counter() - waited, tokens=input_tokens(batch["inputs"]) * self.world)
        batch = to_device(batch, self.run.device, self.run.dtype)
        if self.flops is None:
            args, cfg = (batch["inputs"], batch["decode"]), self.run.cfg
            step_flops = first_step_flops(self.run.engine.module, args, cfg.model.attention_backend,
                                          cfg.train.compile, self.run.device)
            self.flops = self.gas * self.world * step_flops
        return batch

    def step_targets(self, counts: Mapping[str, torch.Tensor]) -> None:
        """The step's target counts over every rank: a modality is present in the step when it has any."""
        self.window.add(**{f"present/{name}": (count > 0).float() for name, count in counts.items()})

    def micro_step(self, loss: torch.Tensor, losses: Mapping[str, torch.Tensor]) -> None:
        """A micro-batch's part of the step's losses (its summed losses over the step's targets); times the world
        size, so that the mean over ranks the window takes is the step's loss."""
        world = self.world
        self.window.add(loss=loss.detach() * world, **{f"loss/{k}": v.detach() * world for k, v in losses.items()})

    def note(self, **values: float) -> None:
        """Values for the next line (a checkpoint's duration, known only after the line of its step)."""
        self.notes.update(values)

    def end_step(self, step: int, save: bool) -> Dict[str, float]:
        """The metrics logged for ``step``; empty when it logs nothing."""
        cfg = self.run.cfg
        self.window.add(steps=1, samples=self.step_samples)
        metrics = self._window(step) if step % cfg.run.log_every_steps == 0 or save else {}
        last = step == cfg.train.max_steps
        if self.run.val is not None and (step % cfg.train.eval_every_steps == 0 or last):
            metrics.update(evaluate(self.run))
        if metrics:
            metrics.update(self.notes)
            self.notes.clear()
            self.run.tracker.log(metrics, step)
            if self.run.env.rank == 0:
                log.info("%s", format_metrics(metrics, step, cfg.train.max_steps))
        return metrics

    def _window(self, step: int) -> Dict[str, float]:
        """The steps since the last line: losses and rates averaged over ranks, skipped samples, lr, FLOP/s, the
        gradient norm."""
        run, cfg = self.run, self.run.cfg
        metrics = over_present(mean_over_ranks(self.window.flush(), run.device), "loss/")
        skips = skipped_totals(run.stream.skipped())
        summary = self.skip_summary.line(skips, step)
        if summary and run.env.rank == 0:
            log.warning("%s", summary)
        lr = cfg.optim.lr * lr_factor(step - 1, cfg.optim, cfg.train.max_steps)
        metrics.update(samples=run.progress.samples, lr=lr, **skips,
                       **compute_metrics(run.device, self.flops, metrics["step_time_s"]))
        grad_norm = run.engine.get_global_grad_norm()
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        return metrics
