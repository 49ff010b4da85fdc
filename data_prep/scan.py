"""Reading shards of any writer, local or remote, once each and in parallel: what ``index``, ``validate`` and ``stats``
learn of shards by reading them rather than trusting an index.

Shards are read by ``pretrain.shards``, as the trainer reads them: the same opener (files, ``pipe:``, http(s), s3,
gs; gzipped or not), the same tar reader, the same grouping into samples.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from data_prep.index import (
    IndexFileError,
    ShardIndex,
    ShardRecord,
    index_from_json,
    read_index,
    shard_dirs,
    why_unfinished,
)
from data_prep.media import check_field
from data_prep.parallel import ordered_map, worker_pool
from pretrain.shard_format import FIELD_MODALITY, INDEX_FILE, WRITING_FILE, Rejected, is_shard_name, layout
from pretrain.shards import DataError, ShardReader, SkipCounter, expand_spec, is_remote
from pretrain.shards.remote import RemoteError, join, list_objects
from pretrain.shards.specs import REMOTE_TIMEOUT_S
from pretrain.shards.specs import read_index as read_any_index

STALL_TIMEOUT_S = 300.0  # a remote shard sending nothing this long is given up (data.pipe_stall_timeout_s's default)
RETRIES = 3  # as data.shard_retries
_SKIP_WORDS = {
    "unreadable_shard": "cannot be read",
    "corrupt_tar": "truncated or corrupt tar",
    "stalled_shard": "stalled",
}


@dataclass(frozen=True)
class Problem:
    """One thing wrong: where (a shard or index file, relative to the root given), which sample, what."""

    where: str
    key: str | None
    what: str

    def __str__(self) -> str:
        return f"{self.where}: key {self.key}: {self.what}" if self.key else f"{self.where}: {self.what}"


@dataclass
class ShardGroup:
    """Shards one index describes, or would: a shard directory, a remote prefix, or the shards a spec names.
    ``location`` is the directory or prefix of its ``index.json`` (None for shards a pattern or list names);
    ``unfinished`` says why a ``shard`` output has none yet (a run cut off, or stopped), where it has none."""

    name: str
    location: str | None
    urls: list[str]
    wheres: list[str]
    index: ShardIndex | None = None
    problems: list[Problem] = field(default_factory=list)
    unfinished: str | None = None


@dataclass(frozen=True)
class ScanTask:
    url: str
    where: str
    check_media: bool


@dataclass
class ShardScan:
    """What one read of a shard found: its record (samples, stored bytes, layouts), sample keys per layout, problems,
    and the samples holding each field that no modality reads (``caption``: other tools write it, training skips
    it)."""

    record: ShardRecord
    keys: dict[str, list[str]]
    problems: list[Problem]
    unread_fields: Counter


class _Recorder(SkipCounter):
    """A skip counter that keeps every skip as a problem of the shard being read, and logs nothing."""

    def __init__(self, where: str) -> None:
        super().__init__(log_limit=0)
        self.where, self.problems = where, []

    def skip(self, reason: str, url: str, error: object = "", key: str | None = None) -> None:
        super().skip(reason, url, error, key)
        if reason == "duplicate_file":
            what = f"holds {error}; rewrite this shard"
        else:
            fix = "rewrite this shard" if reason == "corrupt_tar" else "check the address and credentials"
            what = f"{_SKIP_WORDS.get(reason, reason)} ({error}); {fix}"
        self.problems.append(Problem(self.where, key, what))


def scan_shard(task: ScanTask) -> ShardScan:
    """Read one shard to its end: count samples per layout and modality, and (``check_media``) decode every field."""
    recorder = _Recorder(task.where)
    reader = ShardReader(task.url, recorder, STALL_TIMEOUT_S, RETRIES)
    record = ShardRecord(os.path.basename(task.url))
    keys: dict[str, list[str]] = {}
    seen: set[str] = set()
    unread: Counter = Counter()
    media_problems: list[Problem] = []
    for sample in reader:
        key = str(sample["__key__"])
        fields = [name for name in sample if not name.startswith("__")]
        if key in seen:
            media_problems.append(Problem(task.where, key, "appears twice (its members are not adjacent); "
                                                           "webdataset would read two samples"))
        seen.add(key)
        record.add(sample)
        keys.setdefault(layout(fields), []).append(key)
        unread.update(name for name in fields if name not in FIELD_MODALITY)
        if task.check_media:
            for name in fields:
                if name in FIELD_MODALITY:
                    try:
                        check_field(name, sample[name])
                    except Rejected as e:
                        media_problems.append(Problem(task.where, key, f".{e.field}: {e.reason}"))
    record.bytes = reader.stored_bytes
    return ShardScan(record, keys, recorder.problems + media_problems, unread)


def scan(tasks: list[ScanTask], workers: int, desc: str) -> Iterator[ShardScan]:
    """:func:`scan_shard` of every task, in order, ``workers`` at once, with a progress bar."""
    with worker_pool(workers) as pool:
        yield from tqdm(ordered_map(scan_shard, tasks, pool, chunksize=1), total=len(tasks), desc=desc,
                        unit=" shards", disable=None)


def shard_groups(spec: str | Path, prefer_files: bool = False) -> list[ShardGroup]:
    """The shards ``spec`` names, grouped by the index that describes them: a local folder is itself a group, or each
    of its shard directories is (``build-demo``'s ``train/``, ``val/``); a remote prefix is one; a pattern or list
    of shards (``a/shard-{0..9}.tar``, ``s3://b/x.tar::s3://b/y.tar``) is one, without an index.
    ``prefer_files``: list a local folder's shard files even where its index lists others. Raises
    :class:`pretrain.shards.DataError` for a spec that names nothing."""
    spec, root = str(spec), Path(spec)
    if not is_remote(spec) and root.is_dir():
        return [_local_group(directory, root, prefer_files) for directory in shard_dirs(root)]
    if is_remote(spec) and not is_shard_name(spec) and "{" not in spec and "::" not in spec:
        found = read_any_index(spec, spec)
        index = None if found is None else index_from_json(found, spec)
        if prefer_files or index is None:
            try:
                urls = sorted(url for url in list_objects(spec, REMOTE_TIMEOUT_S) if is_shard_name(url))
            except RemoteError as e:
                raise DataError(f"{spec}: {e}") from None
        else:
            urls = [join(spec, shard.name) for shard in index.shards]
        return [ShardGroup(spec, spec, urls, list(urls), index)]
    urls = [s.url for s in expand_spec(spec, spec)]
    return [ShardGroup(spec, None, urls, list(urls))]


def _local_group(directory: Path, root: Path, prefer_files: bool) -> ShardGroup:
    name = str(directory.relative_to(root)) if directory != root else str(root)
    group = ShardGroup(name, str(directory), [], [])
    listed: list[str] = []
    if (directory / INDEX_FILE).exists() or (directory / WRITING_FILE).exists():  # the latter: a run cut off
        try:
            group.index = read_index(directory)
            listed = [s.name for s in group.index.shards]
        except IndexFileError as e:
            where = str(directory / INDEX_FILE)
            group.problems.append(Problem(where, None, str(e).removeprefix(f"{where}: ")))
            group.unfinished = why_unfinished(directory)
    on_disk = sorted(p.name for p in directory.iterdir() if p.is_file() and is_shard_name(p.name))
    names = on_disk if prefer_files else list(dict.fromkeys(listed + on_disk))
    for shard in names:
        url = join(str(directory), shard)
        inside = directory != root and url.startswith(f"{root}/")
        where = str(Path(url).relative_to(root)) if inside else shard
        if "://" in shard or shard.startswith("/") or shard in on_disk:
            group.urls.append(url)
            group.wheres.append(where)
        else:
            group.problems.append(Problem(where, None, f"listed in {INDEX_FILE} but missing; rewrite the directory"))
    return group

