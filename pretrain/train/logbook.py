"""The log lines of a run: it records what the loop hands it (the wait for the batches, the losses, a checkpoint's
seconds), and at a step that logs turns the sums since the last line into one line, with the evaluation the loop ran
beside it, to the tracker and the console. Fetching the batches and deciding when to evaluate are the loop's."""

from __future__ import annotations

import logging
from typing import Dict, Mapping, Optional

import torch

from ..config import global_batch
from ..tracking import format_metrics
from .distributed import mean_over_ranks
from .metrics import SkipSummary, Window, compute_metrics, skipped_totals
from .objective import over_present
from .run import Run
from .schedule import lr_factor

log = logging.getLogger("pretrain")


class Logbook:
    """Sums what each step measured; a step that logs (every ``run.log_every_steps``, and before every save, which
    is checked for divergence first) turns the sums into the metrics of its line, which ``write`` logs."""

    def __init__(self, run: Run):
        self.run = run
        self.world = run.env.world_size
        self.step_samples = global_batch(run.cfg, self.world)
        self.window, self.skip_summary = Window(), SkipSummary()
        self.flops: Optional[float] = None
        self.notes: Dict[str, float] = {}

    def fetched(self, data_wait: float, tokens: int, flops: Optional[float]) -> None:
        """What fetching a step's batches measured (``StepBatches.next``), and the FLOPs of a step, all ranks."""
        self.window.add(data_wait=data_wait, tokens=tokens)
        self.flops = flops

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
        """The metrics of the steps since the last line when ``step`` logs, else empty; the loop adds the evaluation
        it runs after them (so that its time is not counted as training's) and hands the line to ``write``."""
        self.window.add(steps=1, samples=self.step_samples)
        return self._window(step) if step % self.run.cfg.run.log_every_steps == 0 or save else {}

    def write(self, step: int, metrics: Dict[str, float]) -> Dict[str, float]:
        """``step``'s line, with the notes since the last, to the tracker and (rank 0) the console; nothing when
        ``metrics`` is empty. Returns the line."""
        if metrics:
            metrics.update(self.notes)
            self.notes.clear()
            self.run.tracker.log(metrics, step)
            if self.run.env.rank == 0:
                log.info("%s", format_metrics(metrics, step, self.run.cfg.train.max_steps))
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
