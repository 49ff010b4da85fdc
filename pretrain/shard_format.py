"""The shard format, defined once: what ``data_prep`` writes and ``pretrain.data`` reads. It imports nothing of the
project, so both sides can depend on it and on nothing else of each other.

A shard directory holds ``shard-NNNNNN.tar`` files of samples (webdataset: the members of one sample share a key,
their suffix names the field) and, once complete, ``index.json``: ``{"format": INDEX_FORMAT, "shards": [{"name":
"shard-000000.tar", "samples": N, "layouts": {"png.txt": N}, ...}, ...], "info": {...}}``. While ``data_prep shard``
writes a directory it holds ``.writing`` (what, where, since when) instead, so a reader can tell a run cut off from
a finished one; a run that ends with too many rejections (or no sample) leaves it, saying why, and no index. An index
without ``format`` (written by hand for one's own tars) is read too.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Set, Union

# Sample fields (webdataset suffixes) and the modality each carries; within a modality, the field read first.
FIELD_MODALITY = {
    "txt": "text",
    "png": "image",
    "jpg": "image",
    "jpeg": "image",
    "flac": "audio",
    "wav": "audio",
    "npy": "video",
    "mp4": "video",
    "series.npy": "series",
    "cls": "label",
    "json": "meta",
}
LABEL_FIELD = "cls"
META_FIELD = "json"
# The input modalities (text, image, audio, video), each with its fields in the order above.
MODALITY_FIELDS: Dict[str, tuple] = {
    modality: tuple(f for f, m in FIELD_MODALITY.items() if m == modality)
    for modality in dict.fromkeys(FIELD_MODALITY.values()) if modality not in ("label", "meta")
}

INDEX_FILE = "index.json"
REJECTED_FILE = "rejected.jsonl"
WRITING_FILE = ".writing"
SHARD_PATTERN = "shard-%06d.tar"
SHARD_GLOB = "shard-*.tar"
# What a shard of any writer is called: a tar, gzipped or not (read alike: the reader tells them by their bytes).
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
INDEX_FORMAT = "perceiver-shards/1"


class Rejected(Exception):
    """A sample or member that cannot be used (``data_prep`` writes it to ``rejected.jsonl``, each modality's unit
    raises it for a file it refuses): ``field`` names the bad part, ``reason`` says why and what fixes it."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(field, reason)  # both in args, so the exception survives pickling between processes
        self.field = field
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.field}: {self.reason}"


class IndexFileError(ValueError):
    """An ``index.json`` that cannot be read; the message names the file, what is wrong and what to do."""


def is_shard_name(name: str) -> bool:
    """Whether a file or object name is a shard's (``a.tar``, ``a.tar.gz``, ``a.tgz``; not a hidden file)."""
    base = name.rstrip("/").rsplit("/", 1)[-1]
    return base.endswith(SHARD_SUFFIXES) and not base.startswith(".")


def layout(fields: Iterable[str]) -> str:
    """A sample's field set as one sorted string (``"cls.json.png.txt"``): the index counts samples per layout."""
    return ".".join(sorted(fields))


def layout_fields(name: str) -> List[str]:
    """The fields of a :func:`layout`; a field with a dot (``series.npy``) is one field where the schema has it."""
    parts, fields = name.split("."), []
    while parts:
        pair = ".".join(parts[:2])
        fields.append(pair if pair in FIELD_MODALITY else parts[0])
        del parts[:2 if pair in FIELD_MODALITY else 1]
    return fields


def modalities(fields: Iterable[str]) -> Set[str]:
    """The modalities present in a sample with these fields (unknown fields carry none)."""
    return {FIELD_MODALITY[f] for f in fields if f in FIELD_MODALITY}


def load_index(directory: Union[str, Path]) -> Optional[Dict[str, Any]]:
    """``directory/index.json`` parsed and checked (:func:`check_index`), or None when there is none. Raises
    :class:`IndexFileError`."""
    path = Path(directory) / INDEX_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise _bad(path, str(exc)) from None
    return check_index(data, path)


def check_index(data: Any, where: Union[str, Path]) -> Dict[str, Any]:
    """A parsed index checked: a ``shards`` list of ``name`` and ``samples``, ``format`` ours when given. Raises
    :class:`IndexFileError` naming ``where``."""
    if not isinstance(data, dict):
        raise _bad(where, "not a JSON object")
    if data.get("format", INDEX_FORMAT) != INDEX_FORMAT:
        raise _bad(where, f"'format' is {data['format']!r}, not {INDEX_FORMAT!r}")
    shards = data.get("shards")
    if not isinstance(shards, list) or not all(
            isinstance(s, dict) and isinstance(s.get("name"), str) and type(s.get("samples")) is int
            and s["samples"] >= 0 for s in shards):
        raise _bad(where, "'shards' must be a list of {\"name\": ..., \"samples\": N}")
    return data


def writing_marker(command: str, stopped: Optional[str] = None) -> str:
    """The text of ``.writing``: the command that writes the directory, where and since when; with ``stopped``, why
    it ended without finishing it on purpose (the output must not pass for finished data) and when."""
    now = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    when = {"started": now} if stopped is None else {"stopped": stopped, "ended": now}
    return json.dumps({"command": command, "host": socket.gethostname(), "pid": os.getpid(), **when}) + "\n"


def _marker(directory: Union[str, Path]) -> Dict[str, Any]:
    """``directory/.writing`` parsed, or {} where it is absent or unreadable."""
    try:
        marker = json.loads((Path(directory) / WRITING_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return marker if isinstance(marker, dict) else {}


def who_writes(directory: Union[str, Path]) -> Optional[str]:
    """What ``directory/.writing`` says ("started ... on HOST (pid N): COMMAND"); None without a readable one or for
    a run that stopped (:func:`why_stopped`)."""
    marker = _marker(directory)
    try:
        return f"started {marker['started']} on {marker['host']} (pid {marker['pid']}): {marker['command']}"
    except KeyError:
        return None


def why_stopped(directory: Union[str, Path]) -> Optional[str]:
    """For an output ``data_prep`` left unfinished on purpose (too many rejections, no sample): why and the fix, in
    one line ("data_prep stopped it: ..."); None for one being written, cut off, or without a readable marker. Such an
    output is no run cut off, which the same command would finish: the inputs or the limit must change first."""
    stopped = _marker(directory).get("stopped")
    return f"data_prep stopped it: {stopped}, and run the same command with --overwrite" if stopped else None


def _bad(path: Union[str, Path], detail: str) -> IndexFileError:
    return IndexFileError(f"{path}: not a valid shard index ({detail}); expected {{\"shards\": [{{\"name\": ..., "
                          f"\"samples\": N}}, ...]}}: write it anew with `python -m data_prep index` (or `shard`), "
                          f"or delete the file")
