"""``shard --input-dir``: a folder of raw files -> the same checked shards a manifest gives, with no manifest to write.

Files whose paths are equal up to the last suffix are one sample (``cats/001.png`` and ``cats/001.txt``), the way
webdataset groups tar members; the suffix names the field. What is clearly no data is passed over, counted and named
in ``index.json`` (and the summary): hidden files and folders (``.DS_Store``, ``.git``), and file groups made only of
documentation or system files (``README.md``, ``LICENSE``, ``notes.pdf``, ``Thumbs.db``, ``setup.py``). Any other
file that fits no field, one of those beside a sample's files included, rejects its sample, so nothing that may be
data (an image in a format not read) is dropped unseen.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from data_prep.index import ShardIndex
from data_prep.manifest import CONTENT_FIELDS, ManifestRow, ShardOptions, shuffle_into_shards
from data_prep.schema import KEY_RE, hashed_key
from data_prep.writer import Job, Rejection
from pretrain.modalities import STORED
from pretrain.shard_format import Rejected

# A file's suffix -> the field it gives: each modality's (pretrain.modalities), and metadata. A suffix may have several
# parts (".series.npy"): the longest one that a name ends with counts.
SUFFIX_FIELD = {
    **{suffix: name for name, unit in STORED.items() for suffix in unit.source_suffixes},
    ".json": "meta",
}
_BY_LENGTH = sorted(SUFFIX_FIELD, key=len, reverse=True)
_NOT_IN_KEYS = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True)
class FolderSample(ManifestRow):
    """A sample's files (paths relative to the input folder); text, labels and metadata are read from files too."""

    base_name = "input folder"
    slow = True  # every field is a file to read

    def _content(self, name: str) -> bytes:
        """Its file's bytes; the label of ``--label-from-folder`` (an int) as text."""
        value = self.row[name]
        return str(value).encode("ascii") if isinstance(value, int) else self._read(name)

    def _meta(self) -> dict[str, Any]:
        try:
            meta = json.loads(self._read("meta"))
        except ValueError as e:
            raise Rejected("meta", f"{self.row['meta']} is not valid JSON ({e})") from None
        if not isinstance(meta, dict):
            raise Rejected("meta", f"{self.row['meta']} must hold a JSON object, got {type(meta).__name__}")
        return meta


_NOT_DATA_NAME = re.compile(r"(readme|licen[cs]e|copying|notice|changelog|authors)([.-].*)?|thumbs\.db|desktop\.ini",
                            re.IGNORECASE)
_NOT_DATA_SUFFIXES = frozenset(".md .rst .pdf .html .htm .doc .docx .ini .log .yaml .yml .toml .cfg .py .sh .ipynb"
                               .split())
PASSED_OVER_NAMED = 10  # names of passed-over files index.json records


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _no_data(name: str) -> bool:
    """A hidden file, or a documentation or system one by its name or suffix."""
    return _hidden(name) or bool(_NOT_DATA_NAME.fullmatch(name)) or Path(name).suffix.lower() in _NOT_DATA_SUFFIXES


def _listing(root: Path) -> Iterator[tuple[str, list[str]]]:
    """``(stem, files)`` per file group, paths relative to ``root``, and ``("folder/", [])`` per hidden folder (not
    entered). A sample's files share a folder, so folders are read one at a time (sorted): memory holds one folder's
    names, not the tree's."""
    for folder, subfolders, files in os.walk(root):
        relative = Path(folder).relative_to(root)
        subfolders.sort()
        yield from ((f"{(relative / name).as_posix()}/", []) for name in subfolders if _hidden(name))
        subfolders[:] = [name for name in subfolders if not _hidden(name)]
        groups: dict[str, list[str]] = {}
        for name in sorted(files):
            path = (relative / name).as_posix()
            groups.setdefault(_stem(path), []).append(path)
        yield from groups.items()


def _suffix(name: str) -> str:
    """The suffix that names a file's field, lower case: the longest known one it ends with, else from its last dot."""
    lower = name.lower()
    return next((suffix for suffix in _BY_LENGTH if lower.endswith(suffix)), lower[lower.rfind("."):] if "." in lower
                else "")


def _stem(path: str) -> str:
    """The path without the suffix of :func:`_suffix` (``a/1.series.npy`` -> ``a/1``): what groups a sample."""
    name = path.rsplit("/", 1)[-1]
    return path[:len(path) - len(_suffix(name))] if "." in name else path


def _is_data(files: list[str]) -> bool:
    return not all(_no_data(Path(path).name) for path in files)


def sample_groups(root: Path) -> Iterator[tuple[str, list[str]]]:
    """``(stem, files)`` per sample, paths relative to ``root``; what is no data (:func:`passed_over`) left out."""
    return ((stem, files) for stem, files in _listing(root) if _is_data(files))


def passed_over(root: Path) -> dict[str, Any]:
    """What :func:`sample_groups` leaves out, for ``index.json``: ``{"count": N, "examples": [the first names]}``
    (a hidden folder counts once, named with a trailing ``/``)."""
    names = [path for stem, files in _listing(root) if not _is_data(files) for path in files or [stem]]
    return {"count": len(names), "examples": names[:PASSED_OVER_NAMED]}


def describe_passed_over(record: dict[str, Any], named: int = 3) -> str:
    """``passed over 3 files that are not data (README.md, .DS_Store, notes/LICENSE)``, for a :func:`passed_over`
    record: a line, so that nothing is left out unseen."""
    count, names = record["count"], record["examples"][:named]
    more = ", ..." if count > len(names) else ""
    what = "1 file that is" if count == 1 else f"{count} files that are"
    return f"passed over {what} not data ({', '.join(names)}{more})"


def class_names(root: Path) -> list[str]:
    """``--label-from-folder``'s classes: the top folders that hold a sample, sorted (their label is their place)."""
    return [name for name in sorted(d.name for d in root.iterdir() if d.is_dir() and not _hidden(d.name))
            if next(sample_groups(root / name), None) is not None]


def sample_key(stem: str) -> str:
    """The stem with ``/``, ``.`` and the like as ``_``, or, where that is no valid key (too long), its first
    characters and a hash of the stem. Two stems may give one key (``a/b``, ``a_b``): :func:`hash_the_others`."""
    plain = _NOT_IN_KEYS.sub("_", stem)
    return plain if KEY_RE.match(plain) else hashed_key(plain, stem)


def hash_the_others(jobs: list[Job]) -> list[Job | Rejection]:
    """Samples whose stems give one key: a file named as the key keeps it (else the first), the others take the key
    with a hash of their stem (each job's origin), so every sample is written under a key of its own."""
    keeper = next((job for job in jobs if job.origin == job.key), jobs[0])
    return [job if job is keeper else Job(hashed_key(job.key, job.origin), job.origin, job.payload) for job in jobs]


def _row(stem: str, files: list[str], labels: dict[str, int] | None) -> dict[str, Any]:
    """The sample's fields -> file paths (the label as an int when it comes from the folder)."""
    row: dict[str, Any] = {}
    for name in files:
        field = SUFFIX_FIELD.get(_suffix(name))
        if field is None:
            raise Rejected("file", f"{name} is no supported file; the suffixes are {', '.join(SUFFIX_FIELD)}")
        if field in row:
            raise Rejected(field, f"two {field} files, {row[field]} and {name}; a sample has one of each")
        row[field] = name
    if labels is not None:
        if "/" not in stem:
            raise Rejected("label", f"{stem} is not in a class folder; with --label-from-folder every sample's "
                                    "files lie in a folder named after its class")
        if "label" in row:
            raise Rejected("label", f"{row['label']} and --label-from-folder both give the label; keep one")
        row["label"] = labels[stem.split("/", 1)[0]]
    if not any(field in row for field in CONTENT_FIELDS):
        raise Rejected("file", f"only {', '.join(files)}: a sample needs one of {', '.join(CONTENT_FIELDS)}")
    return row


def read_folder(root: Path, options: Mapping[str, Any],
                classes: list[str] | None = None) -> Iterator[Job | Rejection]:
    """A job per sample and a rejection per file group that makes none, folder by folder; ``classes`` (from
    :func:`class_names`) label each sample by its top folder."""
    labels = None if classes is None else {name: label for label, name in enumerate(classes)}
    for stem, files in sample_groups(root):
        key = sample_key(stem)
        try:
            yield Job(key, stem, FolderSample(_row(stem, files, labels), root, options))
        except Rejected as e:
            yield Rejection(stem, key, e.field, e.reason)


def shard_folder(root: Path, outputs: Sequence[tuple[Path, ShardOptions]], label_from_folder: bool = False,
                 pool: Executor | None = None) -> list[ShardIndex]:
    """The folder's samples as shards in each output directory (outside ``root``, else its shards would be samples
    of a next run), written with that output's options (its side of a ``--val-fraction`` split); with
    ``label_from_folder`` the top folder names the class (sorted: 0, 1, ...), the same classes in every output.
    The classes and what is passed over are found once. Encoding runs in ``pool`` (``None``: this process)."""
    classes = class_names(root) if label_from_folder else None
    info: dict[str, Any] = {"input_dir": root.name}
    if classes is not None:
        info["classes"] = classes
    skipped = passed_over(root)
    if skipped["count"]:
        info["passed_over"] = skipped
    return [shuffle_into_shards(read_folder(root, options.prep, classes), out, options, info, pool,
                                settle=hash_the_others) for out, options in outputs]
