"""How a step ends, agreed by every rank: with an evaluation or not, with a save or not, and whether the run stops
after it (a preemption signal, the last step, a divergence, a full disk). The loop runs the evaluation, logs the line
and hands it here, where a divergence in it stops the run before the save."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional

import torch

from ..checkpoint import NoRoomError, read_latest
from ..config import Config
from ..preemption import EXIT_PREEMPTED, Preemption
from .distributed import DeferredAgreement, all_gather

log = logging.getLogger("pretrain")
AFTER_EXIT = "a requeued job resumes from the latest checkpoint; a cancelled one ends here"
EXIT_DIVERGED = 3  # the loss or the gradient norm is no longer finite: stopped without saving, do not requeue
EXIT_NO_ROOM = 4  # a rank lacks the disk space for the next checkpoint: stopped before writing it, do not requeue


def divergence(metrics: Dict[str, float]) -> Optional[str]:
    """What in a log line shows that training diverged, if anything: a non-finite mean loss over the steps since the
    last line (NaN and infinity survive the mean), or a non-finite gradient norm (DeepSpeed reports one as -1)."""
    loss, grad_norm = metrics.get("loss"), metrics.get("grad_norm")
    if loss is not None and not math.isfinite(loss):
        return f"loss {loss}"
    if grad_norm is not None and not (math.isfinite(grad_norm) and grad_norm >= 0):
        return f"gradient norm {grad_norm} (DeepSpeed's -1: infinite or NaN)"
    return None


@dataclass(frozen=True)
class StepEnd:
    save: bool
    stop: bool  # for a preemption signal
    last: bool
    evaluate: bool  # every train.eval_every_steps and at the last step, when there is a validation stream


class Stopping:
    """The evaluation, stop and save decisions. A signal and the checkpoint minutes are flags of one rank, ORed over
    all ranks one step late (``DeferredAgreement``: no wait for the GPU); a save follows ``checkpoint.every_steps``, the
    minutes, a signal and the last step. ``save(step)`` checkpoints (``Checkpointer.save``, raising ``NoRoomError``);
    ``checkpoint_dir`` is where the checkpoints go; ``validates``: the run has a validation stream. Every rank makes
    the same calls (collectives)."""

    def __init__(self, cfg: Config, device: torch.device, preemption: Preemption, save: Callable[[int], None],
                 checkpoint_dir: Path, validates: bool):
        self.cfg, self.preemption, self.save, self.checkpoint_dir = cfg, preemption, save, checkpoint_dir
        self.validates = validates
        self.agreement = DeferredAgreement(2, device)  # [stop for a signal, checkpoint minutes due]
        self.last_save = time.monotonic()

    def signalled_at_start(self) -> bool:
        """A signal that came while the ranks started: nothing was trained, nothing is saved."""
        if not any(all_gather(self.preemption.requested)):
            return False
        log.info("signal %s during the start: exiting with %d, nothing trained, nothing to save (%s)",
                 self.preemption.signal, EXIT_PREEMPTED, AFTER_EXIT)
        return True

    def decide(self, step: int) -> StepEnd:
        stop, minutes_due = self.agreement.result()
        every = self.cfg.checkpoint.every_steps
        last = step == self.cfg.train.max_steps
        evaluate = self.validates and (step % self.cfg.train.eval_every_steps == 0 or last)
        return StepEnd(save=bool(every and step % every == 0) or minutes_due or stop or last, stop=stop, last=last,
                       evaluate=evaluate)

    def end_step(self, step: int, end: StepEnd, metrics: Dict[str, float]) -> Optional[int]:
        """The exit code if the run stops after ``step`` (``metrics``: its log line, the same on every rank), else
        None. A divergence stops without saving, so every checkpoint holds finite weights; a full disk is found
        before writing."""
        diverged = divergence(metrics)
        if diverged:
            self._diverged(step, diverged)
            return EXIT_DIVERGED
        if end.save:
            try:
                self.save(step)
            except NoRoomError as exc:
                log.error("step %d: %s", step, exc)
                return EXIT_NO_ROOM
            self.last_save = time.monotonic()
        if end.stop:
            log.info("signal %s: checkpointed step %d, exiting with %d (%s)", self.preemption.signal, step,
                     EXIT_PREEMPTED, AFTER_EXIT)
            return EXIT_PREEMPTED
        if not end.last:  # posted after the save, so a save made for the minutes is not asked for again
            minutes_due = 0 < self.cfg.checkpoint.every_minutes * 60 <= time.monotonic() - self.last_save
            self.agreement.post([self.preemption.requested, minutes_due])
        return None

    def _diverged(self, step: int, diverged: str) -> None:
        latest = read_latest(self.checkpoint_dir)
        where = (f"the last checkpoint, {latest}, was saved while the loss was finite. Resume from it "
                 f"(--resume auto) or from an earlier one (--resume PATH)" if latest else
                 "no checkpoint was saved. Start again")
        log.error("training diverged by step %d: %s. Stopped without saving: %s, with changed optim settings "
                  "(a lower lr, a longer warmup_steps, a lower grad_clip): a resumed run takes them from its "
                  "config", step, diverged, where)
