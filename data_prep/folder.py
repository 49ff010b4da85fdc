"""``shard --input-dir``: a folder of raw files -> the same checked shards a manifest gives, with no manifest to write.

Files whose paths are equal up to the last suffix are one sample (``cats/001.png`` and ``cats/001.txt``), the way
webdataset groups tar members; the suffix names the field. Hidden files and folders (``.DS_Store``, ``.git``) are
not data and are passed over; any other file that fits no field rejects its sample, so nothing is dropped unseen.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_prep.index import ShardIndex
from data_prep.manifest import CONTENT_FIELDS, ManifestRow, ShardOptions, shuffle_into_shards
from data_prep.schema import KEY_RE, Rejected, hashed_key
from data_prep.writer import Job, OutputError, Rejection

SUFFIX_FIELD = {
    **dict.fromkeys((".txt",), "text"),
    **dict.fromkeys((".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"), "image"),
    **dict.fromkeys((".flac", ".wav", ".ogg", ".mp3", ".aiff", ".aif"), "audio"),
    **dict.fromkeys((".npy", ".mp4"), "video"),
    **dict.fromkeys((".cls",), "label"),
    **dict.fromkeys((".json",), "meta"),
}
_NOT_IN_KEYS = re.compile(r"[^A-Za-z0-9_-]")


@dataclass(frozen=True)
class FolderSample(ManifestRow):
    """A sample's files (paths relative to the input folder); text, labels and metadata are read from files too."""

    base_name = "input folder"
    slow = True  # every field is a file to read

    def _text(self) -> bytes:
        data = self._read("text")
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise Rejected("text", f"{self.row['text']} is not UTF-8 text ({e})") from None
        return data

    def _label(self) -> int:
        label = self.row["label"]
        if isinstance(label, int):
            return label
        data = self._read("label")
        try:
            return int(data.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            raise Rejected("label", f"{label} must hold one integer, got {data[:20]!r}") from None

    def _meta(self) -> dict[str, Any]:
        try:
            meta = json.loads(self._read("meta"))
        except ValueError as e:
            raise Rejected("meta", f"{self.row['meta']} is not valid JSON ({e})") from None
        if not isinstance(meta, dict):
            raise Rejected("meta", f"{self.row['meta']} must hold a JSON object, got {type(meta).__name__}")
        return meta


def visible_files(root: Path) -> list[str]:
    """Every file below ``root`` as a sorted POSIX path relative to it, hidden files and folders left out."""
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        relative = Path(folder).relative_to(root)
        found += [(relative / name).as_posix() for name in files if not name.startswith(".")]
    return sorted(found)


def sample_keys(stems: list[str]) -> dict[str, str]:
    """A valid, unique key per stem: the stem with ``/``, ``.`` and the like as ``_``, or, where that would be too
    long or shared by two stems, its first characters and a hash of the stem."""
    plain = {stem: _NOT_IN_KEYS.sub("_", stem) for stem in stems}
    uses = Counter(plain.values())
    return {stem: key if uses[key] == 1 and KEY_RE.match(key) else hashed_key(key, stem)
            for stem, key in plain.items()}


def _row(stem: str, files: list[str], classes: list[str] | None) -> dict[str, Any]:
    """The sample's fields -> file paths (the label as an int when it comes from the folder)."""
    row: dict[str, Any] = {}
    for name in files:
        field = SUFFIX_FIELD.get(Path(name).suffix.lower())
        if field is None:
            raise Rejected("file", f"{name} is no supported file; the suffixes are {', '.join(SUFFIX_FIELD)}")
        if field in row:
            raise Rejected(field, f"two {field} files, {row[field]} and {name}; a sample has one of each")
        row[field] = name
    if classes is not None:
        if "/" not in stem:
            raise Rejected("label", f"{stem} is not in a class folder; with --label-from-folder every sample's "
                                    "files lie in a folder named after its class")
        if "label" in row:
            raise Rejected("label", f"{row['label']} and --label-from-folder both give the label; keep one")
        row["label"] = classes.index(stem.split("/", 1)[0])
    if not any(field in row for field in CONTENT_FIELDS):
        raise Rejected("file", f"only {', '.join(files)}: a sample needs one of {', '.join(CONTENT_FIELDS)}")
    return row


def read_folder(root: Path, audio_rate: int, label_from_folder: bool = False
                ) -> tuple[list[Job], list[Rejection], list[str] | None]:
    """Jobs for the samples, rejections for file groups that make none, and the class names (folder labels only)."""
    groups: dict[str, list[str]] = {}
    for name in visible_files(root):
        groups.setdefault(name.rsplit(".", 1)[0] if "." in Path(name).name else name, []).append(name)
    classes = sorted({stem.split("/", 1)[0] for stem in groups if "/" in stem}) if label_from_folder else None
    keys = sample_keys(list(groups))
    jobs: list[Job] = []
    rejected: list[Rejection] = []
    for stem, files in groups.items():
        try:
            jobs.append(Job(keys[stem], stem, FolderSample(_row(stem, files, classes), root, audio_rate)))
        except Rejected as e:
            rejected.append(Rejection(stem, keys[stem], e.field, e.reason))
    return jobs, rejected, classes


def shard_folder(root: Path, out: Path, options: ShardOptions = ShardOptions(), label_from_folder: bool = False,
                 pool: Executor | None = None) -> ShardIndex:
    """The folder's samples as shards; with ``label_from_folder`` the top folder names the class (sorted: 0, 1, ...).
    Encoding runs in ``pool`` (``None``: this process)."""
    if out.resolve().is_relative_to(root.resolve()):
        raise OutputError(f"--out {out} lies inside --input-dir {root}, whose files would become samples; "
                          "pick an --out outside it")
    jobs, rejected, classes = read_folder(root, options.audio_rate, label_from_folder)
    info: dict[str, Any] = {"input_dir": root.name}
    if classes is not None:
        info["classes"] = classes
    return shuffle_into_shards([*rejected, *jobs], out, options, info, pool)
