"""Opening a shard, with a stall guard on ``pipe:`` shards: a command that hangs (a download over a dead connection)
would otherwise block its data-loader worker, and with it the whole job, forever.

The command runs in its own session, so that the guard can kill it with everything it started (``pipe:aws s3 cp ...``
runs under a shell); the read then ends, and the reader skips the shard as ``stalled_shard``. Only time spent inside
a read counts: a worker that reads slowly because training is slow is not stalled. Files cannot be guarded this way (a
read from a hung filesystem cannot be interrupted); ``train.collective_timeout_minutes`` ends such a run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from typing import BinaryIO, Optional

from webdataset import utils as webdataset_utils
from webdataset.gopen import Pipe, gopen

from .specs import PIPE_PREFIX

SIGPIPE_STATUS = 141  # the command was writing when the reader closed its end early: no error (as webdataset's gopen)


class GuardedPipe:
    """A ``pipe:`` shard's output; the command is killed when one read has waited ``stall_timeout_s`` (0: never)."""

    def __init__(self, command: str, stall_timeout_s: float) -> None:
        self._pipe = Pipe(command, mode="rb", shell=True, bufsize=8192, ignore_status=[SIGPIPE_STATUS],
                          start_new_session=True, timeout=stall_timeout_s or None)
        self.stalled = False
        self._reading_since: Optional[float] = None
        self._closed = threading.Event()
        if stall_timeout_s:
            threading.Thread(target=self._watch, args=(stall_timeout_s,), daemon=True,
                             name=f"stall guard {self._pipe.proc.pid}").start()

    def read(self, size: int = -1) -> bytes:
        self._reading_since = time.monotonic()
        try:
            return self._pipe.read(size)
        finally:
            self._reading_since = None

    def close(self) -> None:
        """Wait for the command (a stalled or stuck one is killed) and raise if it failed."""
        self._closed.set()
        try:
            self._pipe.close()
        except subprocess.TimeoutExpired:  # it did not end within the stall timeout after its output was closed
            self._kill()
            self._pipe.wait_for_child()

    def _watch(self, stall_timeout_s: float) -> None:
        while not self._closed.wait(min(1.0, stall_timeout_s / 4)):
            since = self._reading_since
            if since is not None and time.monotonic() - since > stall_timeout_s:
                self.stalled = True
                self._kill()
                return

    def _kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._pipe.proc.pid, signal.SIGKILL)


def open_shard(url: str, stall_timeout_s: float) -> BinaryIO:
    """The shard's byte stream: ``pipe:`` commands under the stall guard, anything else through webdataset's gopen."""
    if url.startswith(PIPE_PREFIX):
        if webdataset_utils.enforce_security:
            raise ValueError(f"{url}: pipe: shards are off (webdataset's enforce_security is set)")
        return GuardedPipe(url[len(PIPE_PREFIX):], stall_timeout_s)
    return gopen(url, "rb")
