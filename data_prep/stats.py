"""``stats``: what a shard directory holds, per modality, from its index (no tar is opened, so it is instant)."""

from __future__ import annotations

from pathlib import Path

from data_prep.index import ShardIndex, read_index, shard_dirs


def human_bytes(size: float) -> str:
    """``1536`` -> ``"1.5 KB"`` (powers of 1000, like the ``--max-shard-mb`` option)."""
    units = ("B", "KB", "MB", "GB", "TB")
    power = 0
    while size >= 1000 and power < len(units) - 1:
        size /= 1000
        power += 1
    return f"{size:.0f} B" if power == 0 else f"{size:.1f} {units[power]}"


_SHOWN_APART = ("classes", "rejections")  # index.json's info keys with lines of their own


def describe(name: str, index: ShardIndex) -> str:
    """A few lines for one shard directory: totals, how it was made (what ``shard --resume`` compares), shard sizes,
    then samples and bytes per modality."""
    sizes = [s.bytes for s in index.shards] or [0]
    made = {key: value for key, value in index.info.items() if key not in _SHOWN_APART and value not in ({}, [], "")}
    lines = [f"{name}: {len(index.shards)} shards, {index.samples} samples, {human_bytes(index.bytes)}, "
             f"{index.rejected} rejected",
             f"  made with: {', '.join(f'{key} {value}' for key, value in made.items())}",
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
    classes = index.info.get("classes")
    if classes:
        lines.append(f"  classes: {', '.join(f'{i} {name}' for i, name in enumerate(classes))}")
    return "\n".join(lines)


def stats(root: Path) -> str:
    """The description of ``root``, or of each shard directory below it (``train/``, ``val/``)."""
    return "\n".join(describe(str(d.relative_to(root)) if d != root else str(root), read_index(d))
                     for d in shard_dirs(root))
