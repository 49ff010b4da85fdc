"""Shard specs -> the list of shards of one dataset, with sample counts where an ``index.json`` gives them.

A spec is a path, URL or brace pattern of shards (``/d/shard-{000000..000099}.tar``,
``s3://bucket/c4/shard-{000000..000099}.tar.gz``; ``.tar``, ``.tar.gz``, ``.tgz``), a directory (local, or an
``http(s)://``, ``s3://`` or ``gs://`` prefix) holding ``index.json`` or shards (a local one also: subdirectories that
hold ``index.json``), a ``pipe:`` command (brace-expanded too), or several of these joined by ``::``. Counts size an
epoch and balance shards across ranks; they come from the ``index.json`` that ``data_prep shard`` writes next to its
shards and ``data_prep index`` writes for shards of any writer (``pretrain.shard_format``), whose names may be URLs or
absolute paths of shards elsewhere.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import braceexpand

from ..shard_format import (
    INDEX_FILE, WRITING_FILE, IndexFileError, check_index, is_shard_name, layout_fields, load_index, who_writes,
    why_stopped,
)
from .opener import PIPE_PREFIX
from .remote import RemoteError, is_remote, join, list_objects, read_small

# How long a remote index or listing may take at start-up; data.pipe_stall_timeout_s bounds the reads of shards.
REMOTE_TIMEOUT_S = 120.0


class DataError(ValueError):
    """The data cannot be streamed as configured; the message names the spec or shard and the fix."""


@dataclass(frozen=True)
class Shard:
    """One shard: what the opener opens, its sample count and samples per layout (from the index that lists it,
    ``index_dir``; None and () when no index lists it)."""

    url: str
    samples: Optional[int] = None
    index_dir: Optional[str] = None
    layouts: Tuple[Tuple[str, int], ...] = ()


def read_index(directory: str, key: str = "", unreachable_is_absent: bool = False) -> Optional[dict]:
    """``directory/index.json`` (local or remote) parsed and checked, or None where there is none (or, with
    ``unreachable_is_absent``, where it cannot be fetched: a bucket may answer 'access denied' for a missing object);
    raises :class:`DataError`, its message starting with ``key``."""
    prefix = f"{key}: " if key else ""
    try:
        if not is_remote(directory):
            return load_index(directory)
        url = join(directory, INDEX_FILE)
        data = read_small(url, REMOTE_TIMEOUT_S)
        return None if data is None else check_index(json.loads(data), url)
    except RemoteError as exc:
        if unreachable_is_absent:
            return None
        raise DataError(f"{prefix}cannot read {INDEX_FILE}: {exc}") from None
    except IndexFileError as exc:
        raise DataError(f"{prefix}{exc}") from None
    except ValueError as exc:
        raise DataError(f"{prefix}{join(directory, INDEX_FILE)}: not JSON ({exc})") from None


def _indexed(directory: str, index: dict) -> List[Shard]:
    return [Shard(join(directory, entry["name"]), entry["samples"], directory,
                  tuple(sorted((entry.get("layouts") or {}).items())))
            for entry in index["shards"]]


def listed_classes(shards: List[Shard]) -> List[str]:
    """The longest list of class names in the shards' ``index.json`` files (``data_prep shard --label-from-folder``
    writes one; labels are their positions), or [] when none lists classes."""
    directories = sorted({s.index_dir for s in shards if s.index_dir is not None})
    infos = [(read_index(d) or {}).get("info") for d in directories]
    return max((info.get("classes") or [] for info in infos if isinstance(info, dict)), key=len, default=[])


def unread_layouts(shards: List[Shard], readable: Sequence[str]) -> Dict[str, int]:
    """Samples per layout (``"json.npy"``: the fields a sample holds) that hold none of the ``readable`` keys, from
    the indexes that list the shards (``data_prep`` writes the layouts); empty without them."""
    found: Dict[str, int] = {}
    for shard in shards:
        for layout, count in shard.layouts:
            if not set(layout_fields(layout)) & set(readable):
                found[layout] = found.get(layout, 0) + int(count)
    return found


def _unfinished(directory: str, key: str) -> DataError:
    """A ``data_prep shard`` output without its index: a run cut off there (or still writing it), whose shards are a
    part of the data (the last one perhaps cut), which training would take for the whole; or one that data_prep
    stopped (too many rejections), whose shards are not the data asked for."""
    stopped = why_stopped(directory)
    if stopped:
        return DataError(f"{key}: {directory!r} is a data_prep shard output without its {INDEX_FILE}: {stopped}")
    writer = who_writes(directory)
    started = f"; {writer}" if writer else ""
    return DataError(f"{key}: {directory!r} is a data_prep shard output without its {INDEX_FILE}: the run that "
                     f"writes it was cut off or is still going{started}. Finish it (the same command with "
                     f"--resume), or remove the directory")


def _directory_shards(directory: str, key: str) -> List[Shard]:
    """The shards of a directory: those its index lists, else its shard files, else those of its subdirectories
    that have an index (one ``data_prep shard`` output per corpus file: ``c4/00000/``, ``c4/00001/``, ...)."""
    index = read_index(directory, key)
    if index is not None:
        return _indexed(directory, index)
    if os.path.exists(os.path.join(directory, WRITING_FILE)):
        raise _unfinished(directory, key)
    names = sorted(name for name in os.listdir(directory) if is_shard_name(name))
    if names:
        return [Shard(os.path.join(directory, name)) for name in names]
    subdirectories = sorted(entry.path for entry in os.scandir(directory) if entry.is_dir())
    indexed = [sub for sub in subdirectories if os.path.isfile(os.path.join(sub, INDEX_FILE))]
    unfinished = [sub for sub in subdirectories if sub not in indexed and any(
        is_shard_name(name) or name == WRITING_FILE for name in os.listdir(sub))]
    if not indexed and not unfinished:
        raise DataError(f"{key}: directory {directory!r} has neither {INDEX_FILE} nor shards (*.tar, *.tar.gz, "
                        f"*.tgz), nor subdirectories with an {INDEX_FILE}")
    stopped = [sub for sub in unfinished if why_stopped(sub)]
    if stopped:
        raise _unfinished(stopped[0], key)
    if unfinished:  # data_prep writes index.json last: a run was cut off, and this dataset would lack it silently
        raise DataError(f"{key}: {len(unfinished)} of the shard directories in {directory!r} hold shards but no "
                        f"{INDEX_FILE} (first: {os.path.basename(unfinished[0])}): a data_prep shard run cut off "
                        "there; finish it (the same command with --resume) or remove them")
    return [shard for sub in indexed for shard in _directory_shards(sub, key)]


def _remote_directory_shards(directory: str, key: str) -> List[Shard]:
    """The shards of a remote prefix: those its ``index.json`` lists, else (s3://, gs://) the shard objects in it."""
    index = read_index(directory, key)
    if index is not None:
        return _indexed(directory, index)
    try:
        names = sorted(url for url in list_objects(directory, REMOTE_TIMEOUT_S) if is_shard_name(url))
    except RemoteError as exc:
        raise DataError(f"{key}: {exc}; a web server's directory needs its {INDEX_FILE} (python -m data_prep index "
                        f"URLS --out DIR writes one), or name the shards with a brace pattern") from None
    if not names:
        raise DataError(f"{key}: {directory!r} holds neither {INDEX_FILE} nor shards (*.tar, *.tar.gz, *.tgz)")
    return [Shard(url) for url in names]


def _file_shard(path: str, key: str, indexes: Dict[str, Dict[str, Shard]]) -> Shard:
    """A shard named by its path or URL, with its count where its directory's index lists it."""
    if "://" in path and not is_remote(path):
        raise DataError(f"{key}: {path!r}: unknown scheme; shards are paths, http(s)://, s3:// or gs:// URLs, "
                        f"or pipe:COMMAND")
    if not is_remote(path) and not os.path.isfile(path):
        raise DataError(f"{key}: shard {path!r} does not exist; fix the path or brace pattern")
    directory = path.rsplit("/", 1)[0] if is_remote(path) else os.path.dirname(os.path.abspath(path))
    if directory not in indexes:  # the counts, where an index lists them; the shards' own errors come when read
        index = read_index(directory, key, unreachable_is_absent=True)
        indexes[directory] = {} if index is None else {os.path.basename(s.url): s for s in _indexed(directory, index)}
    listed = indexes[directory].get(os.path.basename(path))
    return Shard(path) if listed is None else Shard(path, listed.samples, listed.index_dir, listed.layouts)


def expand_spec(spec: str, key: str) -> List[Shard]:
    """Every shard named by ``spec`` in order; ``key`` (e.g. ``data.train_shards[0]``) names it in errors.

    Shards listed with 0 samples are dropped: they would only take a reader's turn.
    """
    shards: List[Shard] = []
    indexes: Dict[str, Dict[str, Shard]] = {}
    for part in spec.split("::"):
        part = part.strip()
        if not part:
            raise DataError(f"{key}: empty shard spec in {spec!r}")
        if part.startswith(PIPE_PREFIX):
            shards.extend(Shard(url) for url in braceexpand.braceexpand(part))
        elif is_remote(part) and not is_shard_name(part) and "{" not in part:
            shards.extend(_remote_directory_shards(part, key))
        elif os.path.isdir(part):
            shards.extend(_directory_shards(part, key))
        else:
            shards.extend(_file_shard(path, key, indexes) for path in braceexpand.braceexpand(part))
    shards = [shard for shard in shards if shard.samples != 0]
    if not shards:
        raise DataError(f"{key}: {spec!r} names no shard with samples")
    return shards


def total_samples(shards: List[Shard]) -> Optional[int]:
    """The dataset's sample count, or None when any shard's count is unknown."""
    if any(shard.samples is None for shard in shards):
        return None
    return sum(shard.samples for shard in shards)
