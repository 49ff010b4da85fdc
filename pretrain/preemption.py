"""SIGUSR1/SIGTERM -> a flag; the loop checkpoints on every rank at the step boundary after the next (the ranks agree
on the flag one step late, so the host never waits for the GPU to agree), then exits with
``EXIT_PREEMPTED`` so a batch script can requeue the job (Slurm sends SIGUSR1 ahead of time with
``--signal=USR1@60`` or at a preemption with a grace time, and SIGTERM on ``scontrol requeue`` or preemption).

``python -m pretrain train`` installs the handlers before it imports torch: the signal may come while the process
starts (imports, engine, checkpoint load: minutes for a large model), where the default action would end it with
nothing saved and, for SIGUSR1, no requeue. This module imports nothing heavy for that reason."""

from __future__ import annotations

import signal
from types import FrameType
from typing import Optional

EXIT_PREEMPTED = 143  # 128 + SIGTERM: "checkpointed after a signal, requeue me"
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preemption:
    """Installs the handlers on creation; ``restore()`` puts the previous ones back."""

    def __init__(self) -> None:
        self.signal: Optional[int] = None
        self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}

    def _handle(self, signum: int, _frame: Optional[FrameType]) -> None:
        self.signal = signum  # only a flag: no I/O or collectives inside a handler

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
