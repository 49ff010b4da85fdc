"""``stats``: what shards hold, per modality: from their index (no tar is opened, so it is instant), or, for shards
without one (other writers'), by reading them once."""

from __future__ import annotations

import shlex
from pathlib import Path

from data_prep.folder import describe_passed_over
from data_prep.index import ShardIndex
from data_prep.scan import ScanTask, ShardGroup, scan, shard_groups


def human_bytes(size: float) -> str:
    """``1536`` -> ``"1.5 KB"`` (powers of 1000, like the ``--max-shard-mb`` option)."""
    units = ("B", "KB", "MB", "GB", "TB")
    power = 0
    while size >= 1000 and power < len(units) - 1:
        size /= 1000
        power += 1
    return f"{size:.0f} B" if power == 0 else f"{size:.1f} {units[power]}"


_SHOWN_APART = ("classes", "rejections", "passed_over")  # index.json's info keys with lines of their own


def describe(name: str, index: ShardIndex) -> str:
    """A few lines for one shard directory: totals, how it was made (what ``shard --resume`` compares), shard sizes,
    then samples and bytes per modality."""
    sizes = [s.bytes or 0 for s in index.shards] or [0]
    made = {key: value for key, value in index.info.items() if key not in _SHOWN_APART and value not in ({}, [], "")}
    lines = [f"{name}: {len(index.shards)} shards, {index.samples} samples, {human_bytes(index.bytes)}, "
             f"{index.rejected} rejected",
             *([f"  made with: {', '.join(f'{key} {value}' for key, value in made.items())}"] if made else []),
             f"  shard size: min {human_bytes(min(sizes))}, mean {human_bytes(sum(sizes) / len(sizes))}, "
             f"max {human_bytes(max(sizes))}",
             f"  {'modality':<10}{'samples':>10}{'share':>9}{'bytes':>12}{'mean':>12}"]
    data = index.totals("modality_bytes")
    for modality, count in index.totals("modalities").items():
        share = count / index.samples if index.samples else 0.0
        lines.append(f"  {modality:<10}{count:>10}{share:>9.1%}{human_bytes(data.get(modality, 0)):>12}"
                     f"{human_bytes(data.get(modality, 0) / count):>12}")
    rejections = index.info.get("rejections")
    if rejections:
        counts = (f"{seen['count']} for {seen['field']}" for seen in rejections)
        lines.append(f"  rejected: {', '.join(counts)}")
    if "passed_over" in index.info:
        lines.append(f"  {describe_passed_over(index.info['passed_over'])}")
    classes = index.info.get("classes")
    if classes:
        lines.append(f"  classes: {', '.join(f'{i} {name}' for i, name in enumerate(classes))}")
    return "\n".join(lines)


def counted(group: ShardGroup, workers: int) -> ShardIndex:
    """The index of a group's shards, made by reading each of them once (``data_prep index`` writes it)."""
    tasks = [ScanTask(url, where, check_media=False) for url, where in zip(group.urls, group.wheres)]
    return ShardIndex([found.record for found in scan(tasks, workers, f"count {group.name}")])


def stats(spec: str | Path, workers: int = 1) -> str:
    """The description of what ``spec`` names: a shard directory, each shard directory below a folder (``train/``,
    ``val/``), a remote prefix, or a pattern or list of shards."""
    parts = []
    for group in shard_groups(spec):
        if group.index is not None:
            parts.append(describe(group.name, group.index))
        elif group.unfinished:
            parts.append(f"{describe(group.name, counted(group, workers))}\n  no index.json: {group.unfinished}")
        else:
            parts.append(f"{describe(group.name, counted(group, workers))}\n  no index.json: counted by reading "
                         f"every shard; `python -m data_prep index {shlex.quote(group.name)}` writes one (then this "
                         f"is instant, and training knows the epoch length)")
    return "\n".join(parts)
