"""A shard -> its raw samples (``{"__key__", "__url__", ext: bytes}``), skipping and counting what cannot be read.

Members are grouped into samples by webdataset's key rule (``base_plus_ext``: the key is the name up to the first
dot of the file name), extensions lower-cased. A shard is read to its very end, the writer's padding after the
end-of-archive block included: a command stopped early fails (curl's 'write error'), which cost the last sample of
about half the shards streamed through ``pipe:curl`` before. A shard read through a command (``pipe:`` or a remote
URL) that fails is read again ``retries`` times, after 1, 2, 4, ... s, going on after the samples it already gave,
before it is skipped: a network error costs no sample and does not change the order.

Skips are counted by reason in a :class:`SkipCounter`; what each reason counts:

* ``unreadable_shard``: a shard that could not be opened or yielded nothing before failing (missing file, failed
  command, HTTP 404, access denied) -- one per shard read.
* ``corrupt_tar``: a shard that broke off mid-way (truncated, garbage header, no end-of-archive block) -- one per
  shard read; the samples before the damage are kept, the one being read is dropped (its files may be incomplete).
* ``stalled_shard``: a shard whose command sent nothing for ``data.pipe_stall_timeout_s``: killed, and the shard
  left from there on (samples before the stall are kept) -- one per shard read.
* ``duplicate_file``: a sample holding the same extension twice.

The data stream counts more (``pretrain.data.reader``): ``missing_key:<ext>``, ``no_usable_modality``, ``unused``
(never logged: not a fault of the data) and ``undecodable:<ext>``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Dict, Iterable, Iterator, Optional, Tuple

from webdataset.tariterators import base_plus_ext

from .opener import CommandError, ShardStream, by_command, open_shard
from .tar import tar_members

log = logging.getLogger(__name__)
Sample = Dict[str, object]
UNUSED = "unused"
RETRY_WAIT_S = 1.0  # before a shard's first retry; doubled for each next one, up to RETRY_WAIT_MAX_S
RETRY_WAIT_MAX_S = 30.0


class SkipCounter:
    """Counts skipped data by reason; logs the first few of each reason with the shard and key, so a bad shard is
    easy to find without flooding the log. ``first`` keeps the first skip of each reason (where, and the error)."""

    def __init__(self, log_limit: int = 3):
        self.log_limit = log_limit
        self.total: Counter = Counter()
        self.first: Dict[str, str] = {}
        self._pending: Counter = Counter()
        self._retries = 0

    def skip(self, reason: str, url: str, error: object = "", key: Optional[str] = None) -> None:
        """One skip of ``reason`` in the shard ``url``, of the sample ``key`` when it is known."""
        where = url if key is None else f"{url}:{key}"
        self.total[reason] += 1
        self._pending[reason] += 1
        self.first.setdefault(reason, f"{where}: {error}" if error else where)
        if self.total[reason] <= self.log_limit and reason != UNUSED:
            log.warning("data: skipped %s at %s%s", reason, where, f": {error}" if error else "")

    def retry(self, where: str, error: object, attempt: int, attempts: int, wait_s: float) -> None:
        """A shard read again after a failure (not a skip: nothing is lost unless the last attempt fails too)."""
        self._retries += 1
        if self._retries <= self.log_limit:
            log.warning("data: reading %s failed (%s); reading it again in %g s (attempt %d of %d)", where, error,
                        wait_s, attempt, attempts)

    def drain(self) -> Dict[str, int]:
        """Counts since the last drain; the stream ships them to the main process with each batch."""
        pending, self._pending = dict(self._pending), Counter()
        return pending


class _Failed(Exception):
    """One read of a shard failed: the skip reason, the error, and the sample being read (``key``): whole in
    ``complete`` when it is complete."""

    def __init__(self, reason: str, error: object, complete: Optional[Sample] = None, key: Optional[str] = None):
        super().__init__(reason, error)
        self.reason, self.error, self.complete, self.key = reason, error, complete, key


class ShardReader:
    """The samples of one shard (iterate once), never raising on bad data nor hanging on a command that stops
    sending for ``stall_timeout_s``; once read to the end, ``stored_bytes`` is the shard's size as stored.
    ``opened``: the shard's stream, opened ahead (:func:`read_shards`), for its first read."""

    def __init__(self, url: str, counter: SkipCounter, stall_timeout_s: float, retries: int = 0,
                 opened: Optional[ShardStream] = None) -> None:
        self.url, self.counter, self.stall_timeout_s = url, counter, stall_timeout_s
        self.attempts = 1 + (retries if by_command(url) else 0)
        self.stored_bytes: Optional[int] = None
        self._opened = opened

    def __iter__(self) -> Iterator[Sample]:
        given = 0  # samples yielded so far: a retry goes on after them
        for attempt in range(1, self.attempts + 1):
            samples = self._read(skip=given)
            try:
                for sample in samples:
                    given += 1
                    yield from _valid(sample, self.counter)
                return
            except _Failed as failed:
                if attempt < self.attempts:
                    wait_s = min(RETRY_WAIT_S * 2 ** (attempt - 1), RETRY_WAIT_MAX_S)
                    self.counter.retry(self.url, failed.error, attempt + 1, self.attempts, wait_s)
                    time.sleep(wait_s)
                    continue
                self.counter.skip(failed.reason, self.url, failed.error, failed.key)
                if failed.complete is not None:
                    yield from _valid(failed.complete, self.counter)
            finally:
                samples.close()  # a consumer that stopped early closes the shard now, not when collected

    def _read(self, skip: int) -> Iterator[Sample]:
        """One read from the shard's start, the first ``skip`` samples passed over; raises :class:`_Failed`."""
        stream, self._opened = self._opened, None
        try:
            stream = stream or open_shard(self.url, self.stall_timeout_s)
        except Exception as exc:  # any failure to open is a bad shard, whatever the scheme raises
            raise _Failed("unreadable_shard", exc) from None
        members, seen, ended = 0, 0, False
        current: Optional[Sample] = None
        try:
            for name, data in tar_members(stream):
                members += 1
                key, ext = base_plus_ext(name)
                if key is None:
                    continue
                if current is not None and key != current["__key__"]:
                    seen += 1
                    if seen > skip:
                        yield current
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": self.url}
                ext = ext.lower()
                if ext in current:
                    current["__duplicate__"] = ext
                current[ext] = data
            ended = True
            stream.drain()
            stream.close()  # a command reports its exit status here
        except Exception as exc:  # tar damage, I/O and command errors: this shard is unusable from here on
            raise self._failure(stream, exc, members, ended, current, seen + 1 > skip) from None
        finally:
            _close_quietly(stream)
        self.stored_bytes = stream.stored_bytes
        if current is not None and seen + 1 > skip:
            yield current

    def _failure(self, stream: ShardStream, exc: Exception, members: int, ended: bool, current: Optional[Sample],
                 unseen: bool) -> _Failed:
        if stream.stalled:
            return _Failed("stalled_shard", f"its command sent nothing for {self.stall_timeout_s:g} s and was killed")
        # the sample being read is complete when the archive had ended, or when the damage is in the next sample
        damaged = base_plus_ext(getattr(exc, "member", ""))[0] or (None if current is None else current["__key__"])
        complete = current is not None and unseen and (ended or damaged not in (None, current["__key__"]))
        if isinstance(exc, EOFError) or getattr(exc, "at_end", False):
            try:  # the data stopped: a command that failed explains why better than the data it left
                stream.close()
            except CommandError as command_error:
                exc = command_error
            except Exception:  # noqa: BLE001 -- the first error stands
                pass
        return _Failed("corrupt_tar" if members else "unreadable_shard", exc, current if complete else None,
                       None if ended else damaged)


def read_shard(url: str, counter: SkipCounter, stall_timeout_s: float, retries: int = 0) -> Iterator[Sample]:
    """The samples of one shard (see :class:`ShardReader`)."""
    return iter(ShardReader(url, counter, stall_timeout_s, retries))


def read_shards(urls: Iterable[str], counter: SkipCounter, stall_timeout_s: float,
                retries: int = 0) -> Iterator[Tuple[str, Iterator[Sample]]]:
    """Each shard's URL and samples in turn (read each one's samples before asking for the next). A shard read
    through a command (remote, ``pipe:``) is opened when the one before it starts: its process, connection and first
    bytes come while that shard is read, not after (about half a second a shard for s3://, ``bench/README.md``)."""
    urls = iter(urls)
    url = next(urls, None)
    ahead = _open_ahead(url, stall_timeout_s)  # the next shard's stream, until its reader takes it
    try:
        while url is not None:
            current, ahead = ahead, None  # the reader below takes it
            following = next(urls, None)
            ahead = _open_ahead(following, stall_timeout_s)
            yield url, iter(ShardReader(url, counter, stall_timeout_s, retries, current))
            url = following
    finally:
        if ahead is not None:  # the reader stopped before the next shard: its command is not left running
            _close_quietly(ahead)


def _open_ahead(url: Optional[str], stall_timeout_s: float) -> Optional[ShardStream]:
    """A command's shard opened now (its command starts), None for a file (opened when read) or where the opening
    fails (the read that follows fails, and reports it)."""
    if url is None or not by_command(url):
        return None
    try:
        return open_shard(url, stall_timeout_s)
    except Exception:  # noqa: BLE001 -- reported by the read
        return None


def first_sample_error(url: str, stall_timeout_s: float) -> Optional[str]:
    """Why the first sample of a shard cannot be read (its URL and the cause), None when it can: a start-up check
    that a remote dataset's address, bucket and credentials work, before the job starts."""
    counter = SkipCounter(log_limit=0)
    samples = read_shard(url, counter, stall_timeout_s)
    try:
        if next(samples, None) is not None:
            return None
    finally:
        samples.close()
    return next(iter(counter.first.values()), f"{url}: no sample")


def _close_quietly(stream: ShardStream) -> None:
    """Close a shard left early (the consumer stopped): a command's exit status no longer matters then."""
    try:
        stream.close()
    except Exception:  # noqa: BLE001 -- a command killed by closing it reports an error we do not care about
        pass


def _valid(sample: Sample, counter: SkipCounter) -> Iterator[Sample]:
    if "__duplicate__" in sample:
        counter.skip("duplicate_file", str(sample["__url__"]), f".{sample['__duplicate__']} twice",
                     str(sample["__key__"]))
    else:
        yield sample
