"""Whole-or-nothing writes: a reader, or a kill during the write, sees the old content or the new one, never a part.

The new content (a file or a directory) is written under a hidden sibling name and renamed over the destination in
one ``os.replace``: the same file system, so the rename is atomic; a directory may replace only an empty one.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def replaced_atomically(path: Path) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content into; renamed over ``path`` when the block ends, removed
    when it raises. What a killed write left there before is removed first."""
    tmp = temporary_path(path)
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    os.replace(tmp, path)


def temporary_path(path: Path) -> Path:
    """Where ``path``'s new content is written before the rename (what a killed write leaves behind)."""
    return path.with_name(f".{path.name}.tmp")


def write_text_atomically(path: Path, text: str) -> None:
    with replaced_atomically(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
