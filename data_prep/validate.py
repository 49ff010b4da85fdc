"""``validate``: read every sample of every shard; report, with shard and key, what a training run would trip over."""

from __future__ import annotations

import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from data_prep.index import IndexFileError, ShardRecord, read_index, shard_dirs
from data_prep.media import check_field
from data_prep.parallel import ordered_map, worker_pool
from data_prep.schema import Rejected, split_member
from pretrain.shard_format import INDEX_FILE, layout

END_MARKER = bytes(1024)  # two zero blocks close every tar; without them the file was cut


@dataclass(frozen=True)
class Problem:
    """One thing wrong: where (a shard or index file, relative to the validated root), which sample, what."""

    where: str
    key: str | None
    what: str

    def __str__(self) -> str:
        return f"{self.where}: key {self.key}: {self.what}" if self.key else f"{self.where}: {self.what}"


@dataclass
class Report:
    """What ``validate`` found: problems (empty when all is well) and how much it read."""

    problems: list[Problem] = field(default_factory=list)
    shards: int = 0
    samples: int = 0


@dataclass(frozen=True)
class _Task:
    path: Path
    where: str
    declared: ShardRecord | None


def _read_tar(task: _Task) -> tuple[dict[str, list[str]], list[Problem]]:
    """Sample keys per layout, and the problems met while decoding every member."""
    keys: dict[str, list[str]] = {}
    problems: list[Problem] = []
    key, fields, seen = None, [], set()
    try:
        with tarfile.open(task.path, "r|") as tar:  # streaming, as a training reader sees the file
            for member in tar:
                if not member.isfile():
                    continue
                name, ext = split_member(member.name)
                if name != key:
                    if key is not None:
                        keys.setdefault(layout(fields), []).append(key)
                    if name in seen:
                        problems.append(Problem(task.where, name, "appears twice (its members are not adjacent); "
                                                                  "webdataset would read two samples"))
                    key, fields = name, []
                    seen.add(name)
                fields.append(ext)
                try:
                    check_field(ext, tar.extractfile(member).read())
                except Rejected as e:
                    problems.append(Problem(task.where, key, f".{e.field}: {e.reason}"))
            end = tar.offset
    except (tarfile.TarError, OSError, EOFError) as e:
        problems.append(Problem(task.where, key, f"truncated or corrupt tar ({e}); rewrite this shard"))
        key = None  # the sample being read was cut: not counted
    else:
        with task.path.open("rb") as f:
            f.seek(end)
            if f.read(len(END_MARKER)) != END_MARKER:
                problems.append(Problem(task.where, key, "truncated tar: the file ends without the end-of-archive "
                                                          "marker after this sample; rewrite this shard"))
    if key is not None:
        keys.setdefault(layout(fields), []).append(key)
    return keys, problems


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


def _compare(where: str, path: Path, declared: ShardRecord, keys: dict[str, list[str]]) -> list[Problem]:
    samples = sum(len(k) for k in keys.values())
    problems = []
    if declared.samples != samples:
        problems.append(Problem(where, None, f"index.json declares {declared.samples} samples, the tar has {samples}"))
    size = path.stat().st_size
    if declared.bytes != size:
        problems.append(Problem(where, None, f"index.json declares {declared.bytes} bytes, the file has {size}"))
    for found, names in sorted(keys.items()):
        if found not in declared.layouts and declared.layouts:
            problems += [Problem(where, name, _nearest(found, declared.layouts)) for name in names]
    for lay, count in sorted(declared.layouts.items()):
        if len(keys.get(lay, [])) != count:
            problems.append(Problem(where, None, f"index.json declares {count} samples with fields {lay!r}, "
                                                 f"the tar has {len(keys.get(lay, []))}"))
    return problems


def check_shard(task: _Task) -> tuple[int, list[Problem]]:
    """Sample count and problems of one shard: decoding, truncation, and agreement with its index record."""
    keys, problems = _read_tar(task)
    if task.declared is None:
        problems.insert(0, Problem(task.where, None, f"not listed in {INDEX_FILE}; rewrite the directory"))
    else:
        problems += _compare(task.where, task.path, task.declared, keys)
    return sum(len(k) for k in keys.values()), problems


def _tasks(root: Path, report: Report) -> list[_Task]:
    tasks = []
    for directory in shard_dirs(root):
        try:
            declared = {s.name: s for s in read_index(directory).shards}
        except IndexFileError as e:
            path = str(directory / INDEX_FILE)
            report.problems.append(Problem(path, None, str(e).removeprefix(f"{path}: ")))
            declared = {}
        on_disk = {p.name for p in directory.glob("*.tar")}
        for name in sorted(declared.keys() | on_disk):
            where = str((directory / name).relative_to(root)) if directory != root else name
            if name in on_disk:
                tasks.append(_Task(directory / name, where, declared.get(name)))
            else:
                report.problems.append(Problem(where, None, f"listed in {INDEX_FILE} but missing; "
                                                            "rewrite the directory"))
    return tasks


def validate(root: Path, workers: int = 1) -> Report:
    """Check every shard under ``root`` (a shard directory, or a folder of them like ``build-demo``'s output)."""
    report = Report()
    tasks = _tasks(root, report)
    with worker_pool(workers) as pool:
        for samples, problems in tqdm(ordered_map(check_shard, tasks, pool, chunksize=1), total=len(tasks),
                                      desc="validate", unit=" shards", disable=None):
            report.shards += 1
            report.samples += samples
            report.problems += problems
    return report
