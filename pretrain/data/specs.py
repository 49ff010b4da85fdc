"""Shard specs -> the list of shards of one dataset, with sample counts where an ``index.json`` gives them.

A spec is a brace pattern or file path (``/d/shard-{000000..000099}.tar``), a directory holding ``index.json`` (or
tars, or subdirectories that hold ``index.json``), a ``pipe:`` command (brace-expanded too), or several of these
joined by ``::``. Counts are needed to size an epoch and to balance shards across ranks; they come from the
``index.json`` written by ``data_prep`` next to the shards (``pretrain.shard_format``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import braceexpand

from ..shard_format import INDEX_FILE, WRITING_FILE, IndexFileError, layout_fields, load_index, who_writes

PIPE_PREFIX = "pipe:"


class DataError(ValueError):
    """The data cannot be streamed as configured; the message names the spec or shard and the fix."""


@dataclass(frozen=True)
class Shard:
    """One tar shard: what ``webdataset.gopen`` opens, and its sample count (None when no index lists it)."""

    url: str
    samples: Optional[int] = None


def _index_json(directory: str) -> Optional[dict]:
    try:
        return load_index(directory)
    except IndexFileError as exc:
        raise DataError(str(exc)) from None


def read_index(directory: str) -> Dict[str, int]:
    """Shard file name -> sample count from ``directory/index.json``; empty when there is none."""
    index = _index_json(directory)
    return {} if index is None else {entry["name"]: entry["samples"] for entry in index["shards"]}


def listed_classes(shards: List[Shard]) -> List[str]:
    """The longest list of class names in the shards' ``index.json`` files (``data_prep shard --label-from-folder``
    writes one; labels are their positions), or [] when none lists classes."""
    directories = {os.path.dirname(s.url) for s in shards if not s.url.startswith(PIPE_PREFIX)}
    infos = [(_index_json(d) or {}).get("info") for d in sorted(directories)]
    return max((info.get("classes") or [] for info in infos if isinstance(info, dict)), key=len, default=[])


def unread_layouts(shards: List[Shard], readable: Sequence[str]) -> Dict[str, int]:
    """Samples per layout (``"json.npy"``: the fields a sample holds) that hold none of the ``readable`` keys, from
    the ``index.json`` of the shards' directories (which ``data_prep`` writes with the layouts); empty without one."""
    by_directory: Dict[str, set] = {}
    for s in shards:
        if not s.url.startswith(PIPE_PREFIX):
            by_directory.setdefault(os.path.dirname(s.url), set()).add(os.path.basename(s.url))
    found: Dict[str, int] = {}
    for directory, listed in sorted(by_directory.items()):
        for entry in (_index_json(directory) or {}).get("shards", []):
            if entry.get("name") not in listed:
                continue
            for layout, count in (entry.get("layouts") or {}).items():
                if not set(layout_fields(layout)) & set(readable):
                    found[layout] = found.get(layout, 0) + int(count)
    return found


def _unfinished(directory: str, key: str) -> DataError:
    """A ``data_prep shard`` output without its index: a run cut off there (or still writing it), whose shards are a
    part of the data (the last one perhaps cut), which training would take for the whole."""
    writer = who_writes(directory)
    started = f"; {writer}" if writer else ""
    return DataError(f"{key}: {directory!r} is a data_prep shard output without its {INDEX_FILE}: the run that "
                     f"writes it was cut off or is still going{started}. Finish it (the same command with "
                     f"--resume), or remove the directory")


def _directory_shards(directory: str, key: str) -> List[Shard]:
    """The shards of a directory: those its index lists, else its tars, else those of its subdirectories that have
    an index (one ``data_prep shard`` output per corpus file: ``c4/00000/``, ``c4/00001/``, ...)."""
    counts = read_index(directory)
    if counts:
        return [Shard(os.path.join(directory, name), n) for name, n in counts.items()]
    if os.path.exists(os.path.join(directory, WRITING_FILE)):
        raise _unfinished(directory, key)
    names = sorted(name for name in os.listdir(directory) if name.endswith(".tar"))
    if names:
        return [Shard(os.path.join(directory, name)) for name in names]
    subdirectories = sorted(entry.path for entry in os.scandir(directory) if entry.is_dir())
    indexed = [sub for sub in subdirectories if os.path.isfile(os.path.join(sub, INDEX_FILE))]
    unfinished = [sub for sub in subdirectories if sub not in indexed and any(
        name.endswith(".tar") or name == WRITING_FILE for name in os.listdir(sub))]
    if not indexed and not unfinished:
        raise DataError(f"{key}: directory {directory!r} has neither {INDEX_FILE} nor *.tar files, nor subdirectories "
                        f"with an {INDEX_FILE}")
    if unfinished:  # data_prep writes index.json last: a run was cut off, and this dataset would lack it silently
        raise DataError(f"{key}: {len(unfinished)} of the shard directories in {directory!r} hold shards but no "
                        f"{INDEX_FILE} (first: {os.path.basename(unfinished[0])}): a data_prep shard run cut off "
                        "there; finish it (the same command with --resume) or remove them")
    return [shard for sub in indexed for shard in _directory_shards(sub, key)]


def _file_shard(path: str, key: str, indexes: Dict[str, Dict[str, int]]) -> Shard:
    if "://" in path:
        raise DataError(f"{key}: {path!r}: a URL is read through a command, which the stall guard watches: "
                        f"pipe:curl -sfL {path} (or pipe:aws s3 cp ... -, pipe:gsutil cat ...)")
    if not os.path.isfile(path):
        raise DataError(f"{key}: shard {path!r} does not exist; fix the path or brace pattern")
    directory, name = os.path.split(os.path.abspath(path))
    if directory not in indexes:
        indexes[directory] = read_index(directory)
    return Shard(path, indexes[directory].get(name))


def expand_spec(spec: str, key: str) -> List[Shard]:
    """Every shard named by ``spec`` in order; ``key`` (e.g. ``data.train_shards[0]``) names it in errors.

    Shards listed with 0 samples are dropped: they would only take a reader's turn.
    """
    shards: List[Shard] = []
    indexes: Dict[str, Dict[str, int]] = {}
    for part in spec.split("::"):
        part = part.strip()
        if not part:
            raise DataError(f"{key}: empty shard spec in {spec!r}")
        if part.startswith(PIPE_PREFIX):
            shards.extend(Shard(url) for url in braceexpand.braceexpand(part))
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
