"""``index``: the ``index.json`` of existing shards of any writer (webdataset's ShardWriter, img2dataset, tarp; local
or remote), written by reading each shard once, in parallel, without rewriting any.

An index gives the trainer the epoch length and balanced shards per rank, ``stats`` its numbers at once, and
``validate`` what to compare the shards with. Its names are relative to its own folder for the shards in it, and
URLs or absolute paths for shards elsewhere (an index in a local folder for shards in a bucket), so the folder (or
prefix) that holds it is a training spec.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.index import ShardIndex, ShardRecord, write_index
from data_prep.scan import Problem, ScanTask, ShardGroup, scan, shard_groups
from pretrain.shard_format import INDEX_FILE
from pretrain.shards import DataError, is_remote
from pretrain.shards.remote import HTTP_PREFIXES, RemoteError, join, read_small, write_small
from pretrain.shards.specs import REMOTE_TIMEOUT_S


@dataclass
class Indexed:
    """One index written: where, what it lists, the problems met reading the shards, the shards left out."""

    location: str
    index: ShardIndex
    problems: list[Problem] = field(default_factory=list)
    unreadable: int = 0


def _target(groups: list[ShardGroup], out: str | None) -> list[tuple[str, list[ShardGroup]]]:
    """Where each index goes: all shards into ``out``, else each group's into its own folder or prefix."""
    if out is not None:
        return [(out, groups)]
    homeless = [g.name for g in groups if g.location is None]
    if homeless:
        raise DataError(f"{homeless[0]}: these shards are not one folder's; give --out DIR for their index")
    return [(g.location, [g]) for g in groups]


def _name(url: str, location: str) -> str:
    """The shard's name in an index at ``location``: relative when the shard lies in it, else its URL or path."""
    folder, _, base = url.rpartition("/")
    if is_remote(url) or is_remote(location):
        return base if folder == location.rstrip("/") else url
    return base if os.path.abspath(folder) == os.path.abspath(location) else os.path.abspath(url)


def _existing(location: str) -> bool:
    if not is_remote(location):
        return (Path(location) / INDEX_FILE).exists()
    try:
        return read_small(join(location, INDEX_FILE), REMOTE_TIMEOUT_S) is not None
    except RemoteError as e:
        raise DataError(str(e)) from None


def index_shards(spec: str, out: str | None, workers: int, overwrite: bool) -> list[Indexed]:
    """Read every shard ``spec`` names and write the index (or indexes: one per shard directory of a folder of them,
    without ``out``). Refuses, before reading anything, to replace an index unless ``overwrite``."""
    groups = shard_groups(spec, prefer_files=True)
    unfinished = next((group for group in groups if group.unfinished), None)
    if unfinished:  # an index would make the shards of a run cut off or stopped look like the whole data
        raise DataError(f"{unfinished.location}: no {INDEX_FILE} for a data_prep shard output left unfinished: "
                        f"{unfinished.unfinished}")
    targets = _target(groups, out)
    for location, _ in targets:
        if location.startswith(HTTP_PREFIXES):
            raise DataError(f"{location}: cannot write to a web server; give --out DIR (a local folder, or an "
                            f"s3:// or gs:// prefix)")
        if not overwrite and _existing(location):
            raise DataError(f"{join(location, INDEX_FILE)} exists; pass --overwrite to replace it")
    written = []
    for location, groups in targets:
        written.append(_index_one(location, groups, spec, workers))
    return written


def _index_one(location: str, groups: list[ShardGroup], spec: str, workers: int) -> Indexed:
    tasks = [ScanTask(url, where, check_media=False) for g in groups for url, where in zip(g.urls, g.wheres)]
    done = Indexed(location, ShardIndex([], info={"indexed_from": spec}))
    for task, found in zip(tasks, scan(tasks, workers, f"index {location}")):
        done.problems += found.problems
        if found.record.samples == 0:
            done.unreadable += 1
            continue
        done.index.shards.append(ShardRecord(**{**vars(found.record), "name": _name(task.url, location)}))
    if done.index.shards:
        _write(location, done.index)
    return done


def _write(location: str, index: ShardIndex) -> None:
    if not is_remote(location):
        Path(location).mkdir(parents=True, exist_ok=True)
        write_index(Path(location), index)
        return
    try:
        write_small(join(location, INDEX_FILE), index.text().encode(), REMOTE_TIMEOUT_S)
    except RemoteError as e:
        raise DataError(str(e)) from None
