"""Opening a shard: a local file, a ``pipe:`` command, or a remote URL (``remote.py`` turns it into a command), as
the stream of its tar bytes, gunzipped when the data is gzip (told by its first bytes, whatever the name).

Commands run under a stall guard: one that hangs (a download over a dead connection) would otherwise block its
data-loader worker, and with it the whole job, forever. The command runs in its own session, so that the guard can
kill it with everything it started (``pipe:aws s3 cp ...`` runs under a shell); the read then ends, and the reader
skips the shard as ``stalled_shard``. Only time spent inside a read counts: a worker that reads slowly because
training is slow is not stalled. Files cannot be guarded this way (a read from a hung filesystem cannot be
interrupted); ``train.collective_timeout_minutes`` ends such a run. A command's error output is kept, and its last
line is the error of a failed read, so a skipped shard is reported with the cause (``curl: (22) ... 404``).
"""

from __future__ import annotations

import contextlib
import gzip
import os
import signal
import subprocess
import tempfile
import threading
import time
from typing import BinaryIO, Optional

from webdataset import utils as webdataset_utils
from webdataset.gopen import gopen

from .remote import is_remote, stream_command

PIPE_PREFIX = "pipe:"
SIGPIPE_STATUSES = (141, -signal.SIGPIPE)  # the command was writing when the reader closed its end early: no error
GZIP_MAGIC = b"\x1f\x8b"
_ERROR_TAIL = 2048  # bytes of a failed command's error output searched for its last line


class CommandError(OSError):
    """A shard's command ended with a failure status; the message is its last line of error output (else the
    status)."""


class GuardedPipe:
    """A command's output; the command is killed when one read has waited ``stall_timeout_s`` (0: never)."""

    def __init__(self, command: str, stall_timeout_s: float) -> None:
        self._errors = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=self._errors, bufsize=8192,
                                      start_new_session=True)
        self._timeout = stall_timeout_s or None
        self.stalled = False
        self._reading_since: Optional[float] = None
        self._closed = threading.Event()
        if stall_timeout_s:
            threading.Thread(target=self._watch, args=(stall_timeout_s,), daemon=True,
                             name=f"stall guard {self._proc.pid}").start()

    def read(self, size: int = -1) -> bytes:
        self._reading_since = time.monotonic()
        try:
            return self._proc.stdout.read(size)
        finally:
            self._reading_since = None

    def close(self) -> None:
        """Wait for the command (one that does not end within the stall timeout is killed) and raise
        :class:`CommandError` if it failed."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._proc.stdout.close()
        try:
            status = self._proc.wait(self._timeout)
        except subprocess.TimeoutExpired:  # it did not end within the stall timeout after its output was closed
            self._kill()
            status = self._proc.wait()
        try:
            if status and status not in SIGPIPE_STATUSES:
                raise CommandError(self._last_error_line() or f"exit {status}")
        finally:
            self._errors.close()

    def _last_error_line(self) -> str:
        self._errors.seek(max(0, self._errors.seek(0, os.SEEK_END) - _ERROR_TAIL))
        lines = self._errors.read().decode("utf-8", "replace").strip().splitlines()
        return lines[-1].strip() if lines else ""

    def _watch(self, stall_timeout_s: float) -> None:
        while not self._closed.wait(min(1.0, stall_timeout_s / 4)):
            since = self._reading_since
            if since is not None and time.monotonic() - since > stall_timeout_s:
                self.stalled = True
                self._kill()
                return

    def _kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGKILL)


class _Counted:
    """Reads from ``raw``, counting the bytes as stored."""

    def __init__(self, raw: BinaryIO, head: bytes) -> None:
        self.raw, self.head, self.count = raw, head, len(head)

    def read(self, size: int = -1) -> bytes:
        head, self.head = self.head, b""
        if size >= 0 and len(head) >= size:
            head, self.head = head[:size], head[size:]
            return head
        data = self.raw.read(size - len(head) if size >= 0 else -1)
        self.count += len(data)
        return head + data


class ShardStream:
    """A shard's tar bytes. ``stored_bytes`` counts what was read as stored (compressed, for a gzipped shard);
    ``stalled`` says whether the stall guard killed the command. Nothing is read before the first ``read``, so a
    shard can be opened ahead of its turn (its command starts meanwhile)."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._stored: Optional[_Counted] = None
        self._tar: Optional[BinaryIO] = None

    def _start(self) -> BinaryIO:
        """The tar bytes: the stored ones, or gunzipped where they begin as gzip does."""
        self._stored = _Counted(self._raw, self._raw.read(len(GZIP_MAGIC)))
        gzipped = self._stored.head == GZIP_MAGIC
        self._tar = gzip.GzipFile(fileobj=self._stored) if gzipped else self._stored
        return self._tar

    @property
    def stored_bytes(self) -> int:
        return 0 if self._stored is None else self._stored.count

    @property
    def stalled(self) -> bool:
        return getattr(self._raw, "stalled", False)

    def read(self, size: int = -1) -> bytes:
        return (self._tar or self._start()).read(size)

    def drain(self) -> None:
        """Read to the end: a writer's padding after the end-of-archive block, and a gzip stream's checksum. A
        command stopped before it has sent everything (curl's 'write error') would fail the shard."""
        while self.read(1 << 16):
            pass

    def close(self) -> None:
        """Raises :class:`CommandError` where the shard's command failed."""
        self._raw.close()


def by_command(url: str) -> bool:
    """Whether the shard is read through a command (``pipe:``, a remote URL): one that can stall, fail for a while
    (a network) and take a moment to start."""
    return url.startswith(PIPE_PREFIX) or is_remote(url)


def open_shard(url: str, stall_timeout_s: float) -> ShardStream:
    """The shard's tar bytes: commands (``pipe:``, remote URLs) under the stall guard, files through webdataset's
    gopen."""
    if by_command(url):
        if webdataset_utils.enforce_security:
            raise ValueError(f"{url}: pipe: and remote shards are off (webdataset's enforce_security is set)")
        command = url[len(PIPE_PREFIX):] if url.startswith(PIPE_PREFIX) else stream_command(url)
        raw: BinaryIO = GuardedPipe(command, stall_timeout_s)
    else:
        raw = gopen(url, "rb")
    return ShardStream(raw)
