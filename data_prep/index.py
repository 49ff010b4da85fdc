"""``DIR/index.json``: what a shard directory holds, so readers can plan and validate can check without opening tars."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pretrain.atomic import write_text_atomically
from pretrain.shard_format import (
    FIELD_MODALITY,
    INDEX_FILE,
    INDEX_FORMAT,
    WRITING_FILE,
    IndexFileError,
    is_shard_name,
    layout,
    load_index,
    modalities,
    why_stopped,
)


@dataclass
class ShardRecord:
    """One shard: sample count, size as stored (None: unknown, in an index written by hand), samples per modality,
    payload bytes per modality, samples per layout."""

    name: str
    samples: int = 0
    bytes: int | None = None
    modalities: dict[str, int] = field(default_factory=dict)
    modality_bytes: dict[str, int] = field(default_factory=dict)
    layouts: dict[str, int] = field(default_factory=dict)

    def add(self, sample: dict[str, Any]) -> None:
        """Count one sample (``__key__`` plus encoded fields)."""
        fields = [k for k in sample if not k.startswith("__")]
        self.samples += 1
        _bump(self.layouts, {layout(fields): 1})
        _bump(self.modalities, {m: 1 for m in modalities(fields)})
        for name in fields:
            if name in FIELD_MODALITY:
                _bump(self.modality_bytes, {FIELD_MODALITY[name]: len(sample[name])})


def _bump(counts: dict[str, int], more: dict[str, int]) -> None:
    for name, n in more.items():
        counts[name] = counts.get(name, 0) + n


@dataclass
class ShardIndex:
    """All shards of one directory plus how they were made (``info``) and how many inputs were rejected; ``stopped``
    (never in ``index.json``) is why the writer left the directory unfinished instead of writing this index."""

    shards: list[ShardRecord]
    rejected: int = 0
    info: dict[str, Any] = field(default_factory=dict)
    stopped: str | None = None

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def bytes(self) -> int:
        """The shards' size as stored, those of unknown size not counted."""
        return sum(s.bytes or 0 for s in self.shards)

    def totals(self, attribute: str) -> dict[str, int]:
        """Sum of one per-shard count dict (``"modalities"``, ``"modality_bytes"``, ``"layouts"``)."""
        counts: dict[str, int] = {}
        for shard in self.shards:
            _bump(counts, getattr(shard, attribute))
        return dict(sorted(counts.items()))

    def text(self) -> str:
        """The ``index.json`` text (sorted keys, so equal inputs give equal bytes)."""
        return json.dumps(self.to_json(), indent=1, sort_keys=True) + "\n"

    def to_json(self) -> dict[str, Any]:
        return {
            "format": INDEX_FORMAT,
            "samples": self.samples,
            "bytes": self.bytes,
            "modalities": self.totals("modalities"),
            "rejected": self.rejected,
            "info": self.info,
            "shards": [asdict(s) for s in self.shards],
        }


def write_index(directory: Path, index: ShardIndex) -> Path:
    """Write ``directory/index.json`` in one step: it is written last, so its presence says the directory is
    complete, and a kill while writing must not leave half of it."""
    path = directory / INDEX_FILE
    write_text_atomically(path, index.text())
    return path


def read_index(directory: Path) -> ShardIndex:
    """The index of a shard directory; raises :class:`IndexFileError` naming the file and the bad field."""
    path = directory / INDEX_FILE
    data = load_index(directory)
    if data is None:
        unfinished = why_unfinished(directory)
        if unfinished:
            raise IndexFileError(f"{path}: not found: {unfinished}")
        raise IndexFileError(f"{path}: not found; `python -m data_prep shard` writes shard directories, "
                             f"`python -m data_prep index` the index of existing shards")
    return index_from_json(data, path)


def why_unfinished(directory: Path) -> str | None:
    """Why a ``shard`` output has no index yet, and the fix, where it holds ``.writing``: stopped by data_prep (too
    many rejections, no sample) or cut off (or still going); None where it holds none."""
    if not (directory / WRITING_FILE).exists():
        return None
    return why_stopped(directory) or ("the shard run that writes this directory was cut off or is still going; "
                                      "finish it (the same command with --resume)")


def index_from_json(data: dict[str, Any], where: Path | str) -> ShardIndex:
    """An index parsed by ``pretrain.shard_format`` as a :class:`ShardIndex`."""
    try:
        shards = [ShardRecord(**s) for s in data["shards"]]
    except TypeError as e:
        raise IndexFileError(f"{where}: bad 'shards' list ({e}); write it anew with data_prep index") from None
    return ShardIndex(shards, data.get("rejected", 0), data.get("info", {}))


def shard_dirs(root: Path) -> list[Path]:
    """``root`` if it holds an index, else its subdirectories that hold an index or shards (``build-demo`` writes
    ``train/``, ``val/``; shards without an index are a ``shard`` run cut off, which ``validate`` reports)."""
    if (root / INDEX_FILE).exists() or not root.is_dir():
        return [root]
    found = sorted(p for p in root.iterdir() if p.is_dir() and (
        (p / INDEX_FILE).exists() or (p / WRITING_FILE).exists() or any(is_shard_name(q.name) for q in p.iterdir())))
    return found or [root]
