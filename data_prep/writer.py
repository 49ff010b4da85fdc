"""Encode jobs in parallel and write them with webdataset's ``ShardWriter``, plus ``index.json`` and ``rejected.jsonl``.

Both ``shard`` and ``build-demo`` go through here, so the two produce the same format and the same checks.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from collections.abc import Iterable
from concurrent.futures import Executor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from data_prep.index import ShardIndex, ShardRecord, write_index
from data_prep.parallel import ordered_map
from data_prep.schema import Sample
from data_prep.shuffle import SPILL_PREFIX
from pretrain.atomic import temporary_path
from pretrain.shard_format import (
    INDEX_FILE,
    REJECTED_FILE,
    SHARD_GLOB,
    SHARD_PATTERN,
    WRITING_FILE,
    Rejected,
    writing_marker,
)


class Encodable(Protocol):
    """What a job carries: ``fields()`` reads, checks and encodes it, in a worker process when ``slow`` (reading or
    decoding media); quick work (text, metadata) is done in the writing process, where it costs less than the trip."""

    @property
    def slow(self) -> bool: ...

    def fields(self) -> dict[str, bytes]: ...


@dataclass(frozen=True)
class Job:
    """One sample to write; ``origin`` ("manifest.jsonl:12") tells a person where a rejected sample came from."""

    key: str
    origin: str
    payload: Encodable


@dataclass(frozen=True)
class Rejection:
    """A skipped sample and why, one line of ``rejected.jsonl``."""

    origin: str
    key: str | None
    field: str
    reason: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False, sort_keys=True)


class RejectionLog:
    """``rejected.jsonl``, written as rejections come (a corpus may be all rejects), and a count per field with the
    first reason of each, so that the summary can say at once what went wrong."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("w", encoding="utf-8")
        self.count = 0
        self._fields: dict[str, dict[str, Any]] = {}

    def add(self, rejection: Rejection) -> None:
        self._file.write(rejection.to_json() + "\n")
        self.count += 1
        self._fields.setdefault(rejection.field, {"count": 0, "example": rejection.reason})["count"] += 1

    def by_field(self) -> list[dict[str, Any]]:
        """``[{"field": f, "count": n, "example": reason}, ...]``, the most frequent first."""
        found = [{"field": field, **seen} for field, seen in self._fields.items()]
        return sorted(found, key=lambda seen: -seen["count"])

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "RejectionLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class ShardLimits:
    """A shard is closed once it holds ``max_samples`` samples or ``max_bytes`` bytes of sample data; an output of at
    least ``min_shards`` samples is spread over at least that many shards, so that the readers of a training run
    (processes x data-loader workers) each have shards of their own even on a small dataset."""

    max_samples: int = 10_000
    max_bytes: int = 1_000_000_000
    min_shards: int = 1

    def samples_per_shard(self, total: int | None) -> int:
        """``max_samples``, or fewer where ``total`` samples would otherwise make under ``min_shards`` shards."""
        return self.max_samples if total is None else max(1, min(self.max_samples, total // self.min_shards))


class OutputError(Exception):
    """The output directory cannot be used as it is; the message says what to do."""


def prepare_output(directory: Path, overwrite: bool) -> None:
    """Refuse to mix new shards with old ones; with ``overwrite``, delete only the files this tool writes."""
    if directory.exists() and not directory.is_dir():
        raise OutputError(f"{directory} exists and is not a directory; pick another --out")
    entries = sorted(directory.iterdir()) if directory.exists() else []
    if entries and not overwrite:
        raise OutputError(f"{directory} is not empty ({len(entries)} entries, e.g. {entries[0].name}); "
                          "pass --overwrite to replace its shards, or pick another --out")
    for path in [*directory.glob(SHARD_GLOB), directory / INDEX_FILE, temporary_path(directory / INDEX_FILE),
                 directory / REJECTED_FILE, directory / WRITING_FILE]:
        path.unlink(missing_ok=True)
    for stale in directory.glob(SPILL_PREFIX + "*"):  # a killed run's sort runs
        shutil.rmtree(stale, ignore_errors=True)


def _quick(item: Job | Rejection) -> bool:
    return isinstance(item, Rejection) or not item.payload.slow


def _encode(item: Job | Rejection) -> Sample | Rejection:
    if isinstance(item, Rejection):
        return item
    try:
        return {"__key__": item.key, **item.payload.fields()}
    except Rejected as e:
        return Rejection(item.origin, item.key, e.field, e.reason)


class _IndexedShardWriter:
    """A thin wrapper over ``wds.ShardWriter`` that keeps a :class:`ShardRecord` per finished shard."""

    def __init__(self, directory: Path, limits: ShardLimits, total: int | None) -> None:
        self.records: list[ShardRecord] = []
        self._current = ShardRecord(name="")
        self._writer: Any = None  # a webdataset.ShardWriter once the first sample arrives
        self._directory = directory
        self._limits = limits
        self._per_shard = limits.samples_per_shard(total)

    def write(self, sample: Sample) -> None:
        if self._writer is None:  # opened on the first sample: ShardWriter would otherwise leave an empty shard
            # Imported here, not at the top: webdataset imports torch (seconds), and every spawned worker imports this
            # module to run _encode.
            import webdataset as wds

            self._writer = wds.ShardWriter(
                str(self._directory / SHARD_PATTERN), maxcount=self._per_shard,
                maxsize=self._limits.max_bytes, post=self._finished, verbose=0,
                # A fixed mtime gives byte-identical tars; an int, as a float adds a 1 KiB pax header to every member.
                encoder=False, mtime=0,
            )
        self._writer.write(sample)  # may close the previous shard first, calling _finished
        self._current.add(sample)

    def _finished(self, filename: str) -> None:
        path = Path(filename)
        self._current.name = path.name
        self._current.bytes = path.stat().st_size
        self.records.append(self._current)
        self._current = ShardRecord(name="")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def _stop_reason(directory: Path, index: ShardIndex, max_reject_fraction: float) -> str | None:
    """Why ``directory`` must not pass for finished data (no sample, or more than ``max_reject_fraction`` of its
    inputs rejected), with the fix; None when it is done."""
    inputs = index.info["inputs"]
    listed = f"fix the inputs listed in {directory / REJECTED_FILE}"
    if index.samples == 0:
        return f"no sample was written: all {inputs} inputs were rejected; {listed}" if inputs else \
            "no sample was written: no input came to it; give it inputs"
    fraction = index.rejected / inputs
    if fraction > max_reject_fraction:
        return (f"rejected {fraction:.1%} of {inputs} inputs, more than --max-reject-fraction {max_reject_fraction}; "
                f"{listed} or raise the limit")
    return None


def write_shards(directory: Path, items: Iterable[Job | Rejection], *, total: int | None = None,
                 limits: ShardLimits = ShardLimits(), pool: Executor | None = None, info: dict[str, Any] | None = None,
                 desc: str = "shard", rejections: RejectionLog | None = None, progress: bool = True,
                 max_reject_fraction: float = 1.0) -> ShardIndex:
    """Encode the jobs of ``items`` in order (in ``pool``, from :func:`~data_prep.parallel.worker_pool`) into
    ``directory`` and add its rejections to ``rejections`` (by default a new ``rejected.jsonl``), earlier ones
    counted too; ``total`` items, for the progress bar (``progress``: drawn where stderr is a terminal). The index
    records ``info``, the rejections by field and the number of ``inputs``: the items and earlier rejections, unless
    ``info`` counts them (texts split into pieces).

    The directory must have been through :func:`prepare_output`. Returns the index, written unless no sample was or
    more than ``max_reject_fraction`` of the inputs was rejected: the directory is then left unfinished, its
    ``.writing`` saying why (``index.stopped``), so that nothing takes it for the data asked for; its shards and
    ``rejected.jsonl`` stay for a look.
    """
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / WRITING_FILE
    command = " ".join(sys.argv)
    marker.write_text(writing_marker(command))
    writer = _IndexedShardWriter(directory, limits, total)
    with contextlib.ExitStack() as stack:
        log = rejections or stack.enter_context(RejectionLog(directory / REJECTED_FILE))
        inputs = log.count
        try:
            with tqdm(total=total, desc=desc, unit=" samples", disable=None if progress else True) as bar:
                for result in ordered_map(_encode, items, pool, here=_quick):
                    inputs += 1
                    if isinstance(result, Rejection):
                        log.add(result)
                    else:
                        writer.write(result)
                    bar.update()
        finally:
            writer.close()
        info = {"inputs": inputs, **(info or {}), "rejections": log.by_field()}
        index = ShardIndex(writer.records, rejected=log.count, info=info)
    index.stopped = _stop_reason(directory, index, max_reject_fraction)
    if index.stopped:
        marker.write_text(writing_marker(command, stopped=index.stopped))
        return index
    write_index(directory, index)
    marker.unlink()
    return index
