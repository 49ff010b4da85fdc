"""Tar shards -> raw samples (``{"__key__", "__url__", ext: bytes}``), skipping and counting what cannot be read.

Shards are opened with webdataset's ``gopen`` (files, http, ...; ``pipe:`` commands under a stall guard, ``pipes.py``)
and grouped into samples by webdataset's key rule (``base_plus_ext``: the key is the name up to the first dot of the
file name).

Reading is cheap (no decoding), so a resumed worker can replay it to fast-forward. Skips are counted by reason in a
:class:`SkipCounter`; what each reason counts:

* ``unreadable_shard``: a shard that could not be opened or yielded nothing before failing (missing file, failed
  ``pipe:`` command) -- one per shard read.
* ``corrupt_tar``: a shard that broke off mid-way (truncated, garbage header) -- one per shard read; the samples
  before the damage are kept, the one being read is dropped (its files may be incomplete).
* ``stalled_shard``: a ``pipe:`` shard whose command sent nothing for ``data.pipe_stall_timeout_s``: killed, and the
  shard left from there on (samples before the stall are kept) -- one per shard read.
* ``duplicate_file``: a sample holding the same extension twice.
* ``missing_key:<ext>``: a sample without a key listed in ``data.require``.
* ``no_usable_modality``: a sample with none of the keys the model reads, nor any other medium or label.
* ``unused`` (counted, never logged: not a fault of the data): a sample whose media or label are all of modalities
  the run does not read (video-only samples for a model without ``model.video``), passed over by design.
* ``undecodable:<ext>`` (counted by the batch builder): media that failed to decode.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from typing import Callable, Dict, Iterator, List, Optional, Sequence

from webdataset.tariterators import base_plus_ext

from ..shard_format import FIELD_MODALITY, META_FIELD
from .pipes import open_shard
from .specs import DataError, Shard
from .tar import tar_members

log = logging.getLogger(__name__)
Sample = Dict[str, object]
UNUSED = "unused"
MEDIA_KEYS = frozenset(FIELD_MODALITY) - {META_FIELD}


class SkipCounter:
    """Counts skipped data by reason; logs the first few of each reason with the shard and key, so a bad shard is
    easy to find without flooding the log."""

    def __init__(self, log_limit: int = 3):
        self.log_limit = log_limit
        self.total: Counter = Counter()
        self._pending: Counter = Counter()

    def skip(self, reason: str, where: str, error: object = "") -> None:
        self.total[reason] += 1
        self._pending[reason] += 1
        if self.total[reason] <= self.log_limit and reason != UNUSED:
            log.warning("data: skipped %s at %s%s", reason, where, f": {error}" if error else "")

    def drain(self) -> Dict[str, int]:
        """Counts since the last drain; the stream ships them to the main process with each batch."""
        pending, self._pending = dict(self._pending), Counter()
        return pending


def read_shard(url: str, counter: SkipCounter, stall_timeout_s: float) -> Iterator[Sample]:
    """The samples of one tar (files grouped by key, extensions lower-cased), never raising on bad data (nor
    hanging on a ``pipe:`` command that stops sending for ``stall_timeout_s``)."""
    members = 0
    current: Optional[Sample] = None
    try:
        stream = open_shard(url, stall_timeout_s)
    except Exception as exc:  # any failure to open is a bad shard, whatever the scheme raises
        counter.skip("unreadable_shard", url, exc)
        return
    try:
        for name, data in tar_members(stream, url):
            members += 1
            key, ext = base_plus_ext(name)
            if key is None:
                continue
            ext = ext.lower()
            if current is not None and key != current["__key__"]:
                yield from _valid(current, counter)
                current = None
            if current is None:
                current = {"__key__": key, "__url__": url}
            if ext in current:
                current["__duplicate__"] = ext
            current[ext] = data
        stream.close()  # a pipe: reports its command's exit status here
    except Exception as exc:  # tar damage, I/O and pipe errors: all mean this shard is unusable from here on
        if getattr(stream, "stalled", False):
            counter.skip("stalled_shard", url, f"its command sent nothing for {stall_timeout_s:g} s and was killed")
        else:
            counter.skip("corrupt_tar" if members else "unreadable_shard", url, exc)
        if current is not None and base_plus_ext(getattr(exc, "member", ""))[0] not in (None, current["__key__"]):
            yield from _valid(current, counter)  # the damage is in the next sample: this one is complete
        return
    finally:
        _close_quietly(stream)
    if current is not None:
        yield from _valid(current, counter)


def _close_quietly(stream: object) -> None:
    """Close a shard left early (the consumer stopped): a pipe's exit status no longer matters then."""
    try:
        stream.close()
    except Exception:  # noqa: BLE001 -- a pipe killed by closing it reports an error we do not care about
        pass


def _valid(sample: Sample, counter: SkipCounter) -> Iterator[Sample]:
    if "__duplicate__" in sample:
        counter.skip("duplicate_file", f"{sample['__url__']}:{sample['__key__']}", f".{sample['__duplicate__']} twice")
    else:
        yield sample


def sample_selector(
    required: Sequence[str], usable: Sequence[str], extra: Sequence[str] = ()
) -> Callable[[Sample, SkipCounter], Optional[Sample]]:
    """A check that keeps samples holding every ``required`` key and at least one ``usable`` one, slimmed to those
    and the ``extra`` keys (a shuffle buffer of raw samples should not hold metadata nobody decodes)."""
    wanted = set(required) | set(usable) | set(extra) | {"__key__", "__url__"}

    def select(sample: Sample, counter: SkipCounter) -> Optional[Sample]:
        for key in required:
            if key not in sample:
                counter.skip(f"missing_key:{key}", f"{sample['__url__']}:{sample['__key__']}")
                return None
        if not any(key in sample for key in usable):
            reason = UNUSED if MEDIA_KEYS & set(sample) else "no_usable_modality"
            counter.skip(reason, f"{sample['__url__']}:{sample['__key__']}", f"keys {sorted(sample)}")
            return None
        return {key: value for key, value in sample.items() if key in wanted}

    return select


def shard_samples(
    shards: List[Shard],
    rng: random.Random,
    resample: bool,
    select: Callable[[Sample, SkipCounter], Optional[Sample]],
    counter: SkipCounter,
    where: str,
    stall_timeout_s: float,
) -> Iterator[Sample]:
    """An endless stream of kept samples from ``shards``: in order, then reshuffled passes (or shards drawn with
    replacement, weighted by sample count, when ``resample``). Endless, so no reader ever runs dry before its
    rank's batch quota; raises once every shard has been read without yielding a sample, instead of spinning."""
    urls = [shard.url for shard in shards]
    weights = [shard.samples for shard in shards] if all(s.samples for s in shards) else None
    empty: set = set()
    productive = False
    order = list(urls)
    while True:
        for url in rng.choices(urls, weights) if resample else order:
            kept = 0
            for sample in read_shard(url, counter, stall_timeout_s):
                selected = select(sample, counter)
                if selected is not None:
                    kept += 1
                    yield selected
            if kept:
                productive = True
            elif not productive:
                empty.add(url)
                if len(empty) == len(set(urls)):
                    raise DataError(
                        f"{where}: no usable sample in any of its {len(empty)} shards (e.g. {urls[0]}); skipped so "
                        f"far: {dict(counter.total)}. Check them with `python -m data_prep validate DIR` and "
                        f"data.require against the keys the shards hold"
                    )
        rng.shuffle(order)
