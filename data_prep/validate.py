"""``validate``: read every sample of every shard; report, with shard and key, what a training run would trip over.

Shards of any writer, local or remote, with our ``index.json`` or without: with one, its counts, sizes and layouts
are checked against the shards; without, the shards are counted and the report says that an index would make the
epoch length known.
"""

from __future__ import annotations

import shlex
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.index import ShardRecord
from data_prep.scan import Problem, ScanTask, ShardGroup, scan, shard_groups
from pretrain.shard_format import INDEX_FILE


@dataclass
class Report:
    """What ``validate`` found: problems (empty when all is well), how much it read, and notes (no problems)."""

    problems: list[Problem] = field(default_factory=list)
    shards: int = 0
    samples: int = 0
    notes: list[str] = field(default_factory=list)


def _nearest(found: str, declared: dict[str, int]) -> str:
    """How a sample's fields differ from the closest layout the index declares ("lacks .png")."""
    have = set(found.split("."))
    best = min(declared, key=lambda lay: len(have ^ set(lay.split("."))))
    missing, extra = sorted(set(best.split(".")) - have), sorted(have - set(best.split(".")))
    parts = []
    if missing:
        parts.append(f"lacks .{', .'.join(missing)}")
    if extra:
        parts.append(f"has extra .{', .'.join(extra)}")
    return f"{' and '.join(parts)} (index.json declares samples with fields {best!r})"


def _compare(where: str, declared: ShardRecord, found: ShardRecord, keys: dict[str, list[str]]) -> list[Problem]:
    problems = []
    if declared.samples != found.samples:
        problems.append(Problem(where, None, f"index.json declares {declared.samples} samples, the tar has "
                                             f"{found.samples}"))
    if declared.bytes is not None and found.bytes is not None and declared.bytes != found.bytes:
        problems.append(Problem(where, None, f"index.json declares {declared.bytes} bytes, the file has "
                                             f"{found.bytes}"))
    for lay, names in sorted(keys.items()):
        if lay not in declared.layouts and declared.layouts:
            problems += [Problem(where, name, _nearest(lay, declared.layouts)) for name in names]
    for lay, count in sorted(declared.layouts.items()):
        if len(keys.get(lay, [])) != count:
            problems.append(Problem(where, None, f"index.json declares {count} samples with fields {lay!r}, "
                                                 f"the tar has {len(keys.get(lay, []))}"))
    return problems


def _check_group(group: ShardGroup, workers: int, report: Report) -> None:
    declared = {} if group.index is None else {s.name: s for s in group.index.shards}
    names = {url: url.rsplit("/", 1)[-1] for url in group.urls}
    unread: Counter = Counter()
    tasks = [ScanTask(url, where, check_media=True) for url, where in zip(group.urls, group.wheres)]
    for task, found in zip(tasks, scan(tasks, workers, f"validate {group.name}")):
        report.shards += 1
        report.samples += found.record.samples
        report.problems += found.problems
        unread.update(found.unread_fields)
        record = declared.get(names[task.url]) or declared.get(task.url)
        if group.index is not None and record is None:
            report.problems.append(Problem(task.where, None, f"not listed in {INDEX_FILE}; write it anew with "
                                                             "python -m data_prep index"))
        elif record is not None:
            report.problems += _compare(task.where, record, found.record, found.keys)
    if group.index is None and group.unfinished is None:  # an unfinished output's problem says what to do instead
        report.notes.append(f"{group.name}: no {INDEX_FILE}: counted by reading; `python -m data_prep index "
                            f"{shlex.quote(group.name)}` writes one, which makes the epoch length known to training")
    if unread:
        fields = ", ".join(f".{name} ({count} samples)" for name, count in unread.most_common())
        report.notes.append(f"{group.name}: fields no modality reads, passed over by training: {fields}")


def validate(spec: str | Path, workers: int = 1) -> Report:
    """Check every shard ``spec`` names (a shard directory, a folder of them like ``build-demo``'s output, a remote
    prefix, or a pattern or list of shards)."""
    report = Report()
    for group in shard_groups(spec):
        report.problems += group.problems
        _check_group(group, workers, report)
    return report
