"""Checkpoints: collect the state of every component, save it through DeepSpeed (sharded per rank), move ``latest``.

Layout: ``<dir>/<tag>/`` as DeepSpeed writes it (``mp_rank_00_model_states.pt`` holds our client state, or
``zero_pp_rank_0_mp_rank_00_model_states.pt`` under ZeRO-3, which writes one per rank; one ``*_optim_states.pt`` per
rank) and ``<dir>/latest`` holding the newest complete tag. ``latest`` moves only after every
rank has finished writing (a barrier, then rank 0 replaces it atomically), so it never names a partial checkpoint; a
directory newer than ``latest`` is a write that was cut off and is replaced when that step is saved again.

Client state: ``shared`` components (step/samples, tracker, ...) from rank 0, ``per_rank`` components (data stream,
RNG) of every rank (gathered), the config and the world size. Resuming under another world size converts the tag to
a DeepSpeed universal checkpoint once (rank 0, ``ds_to_universal``) and loads that; per-rank components then get
rank 0's state (the data stream's position means the same on any shape: the same global batches follow).
"""

from __future__ import annotations

import logging
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Protocol

import numpy as np
import torch
import torch.distributed as dist

from .atomic import replaced_atomically, write_text_atomically

log = logging.getLogger(__name__)

LATEST = "latest"
CHECKPOINTS = "checkpoints"  # a run directory's checkpoint directory, unless checkpoint.dir names another
MODEL_STATES = "mp_rank_00_model_states.pt"
ZERO3_MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"  # ZeRO-3 writes one per rank; rank 0's has ours
TAG = re.compile(r"^step_(\d{8})$")
UNIVERSAL = "_universal"  # suffix of a tag's DeepSpeed universal conversion, made beside it at a resume
NOT_A_CHECKPOINT = (f"is not a checkpoint tag directory (with {MODEL_STATES}), nor a checkpoint directory or a run "
                    f"directory (with {CHECKPOINTS}/) whose '{LATEST}' file names one")


class Stateful(Protocol):
    def state_dict(self) -> Dict[str, Any]: ...

    def load_state_dict(self, state: Dict[str, Any]) -> None: ...


class CheckpointError(ValueError):
    """A checkpoint path cannot be resumed from; the message names it and the fix."""


class NoRoomError(CheckpointError):
    """A rank lacks the disk space for the next checkpoint; every rank raises it together, before any writes."""


_ESTIMATE_MARGIN = 1.1  # DeepSpeed's files hold a little more than the tensors (bench/README.md)


def estimated_bytes(model: torch.nn.Module) -> int:
    """About what a checkpoint takes on disk, all ranks together, before one exists to measure: the weights as
    trained plus AdamW's fp32 weights and two moments (DeepSpeed's optimizer state, which ZeRO spreads, not shrinks)."""
    # ZeRO-3 moves a parameter's data into partitions and keeps its size in ds_numel.
    count = sum(getattr(p, "ds_numel", p.numel()) * (p.element_size() + 12) for p in model.parameters())
    return int(_ESTIMATE_MARGIN * count)


def _free_bytes(directory: Path) -> int:
    while not directory.exists():  # not made yet: the space of the filesystem it will be on
        directory = directory.parent
    return shutil.disk_usage(directory).free


def _bytes_in(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def read_latest(directory: Path) -> Optional[Path]:
    """The tag directory ``directory/latest`` points to, or None when there is no complete checkpoint."""
    pointer = directory / LATEST
    return directory / pointer.read_text().strip() if pointer.is_file() else None


def write_latest(directory: Path, tag: str) -> None:
    """Atomically: a reader sees the old tag or the new one, never a torn file."""
    write_text_atomically(directory / LATEST, tag)


def model_states(tag_dir: Path) -> Optional[Path]:
    """The file of a tag that holds our client state and the weights' names (rank 0's under ZeRO-3), if any."""
    return next((tag_dir / name for name in (MODEL_STATES, ZERO3_MODEL_STATES) if (tag_dir / name).is_file()), None)


def resolve_resume(resume: str, checkpoint_dir: Path) -> Optional[Path]:
    """``auto`` -> the run's latest tag directory or None; ``none`` -> None (refused when the run already has
    checkpoints, which a fresh start would silently overwrite and prune); a path -> the tag directory it names
    (``find_tag``)."""
    if resume == "auto":
        return read_latest(checkpoint_dir)
    if resume == "none":
        if read_latest(checkpoint_dir) is not None:
            raise CheckpointError(
                f"--resume none: {checkpoint_dir} already holds checkpoints (latest: {read_latest(checkpoint_dir).name}); "
                f"use --resume auto to continue them, or set run.dir to a new directory for a fresh run"
            )
        return None
    if not Path(resume).exists():
        raise CheckpointError(f"--resume: {resume} does not exist; give a run, checkpoints or tag directory, 'auto' or "
                              f"'none'")
    tag_dir = find_tag(Path(resume))
    if tag_dir is None:
        raise CheckpointError(f"--resume: {resume} {NOT_A_CHECKPOINT}; give an existing path, 'auto' or 'none'")
    return tag_dir


def find_tag(path: Path) -> Optional[Path]:
    """The checkpoint tag directory ``path`` names: itself, the ``latest`` of a checkpoint directory, or the
    ``latest`` of a run directory's checkpoints; None when it names none."""
    for directory in (path, path / CHECKPOINTS):
        if (directory / LATEST).is_file():
            path = read_latest(directory)
            break
    return path if model_states(path) is not None else None


def peek_client_state(tag_dir: Path) -> Dict[str, Any]:
    """Our client state without building an engine (memory-mapped: the weights next to it are not read); of the
    per-rank components, rank 0's."""
    state = torch.load(model_states(tag_dir), map_location="cpu", mmap=True, weights_only=False)
    peeked = {k: state[k] for k in ("world_size", "shared", "config") if k in state}
    return {**peeked, "per_rank": state.get("per_rank", [{}])[:1]}


def check_fits(tag_dir: Path, model: torch.nn.Module) -> None:
    """Refuse a checkpoint whose weights do not match ``model``'s names and shapes (another model config, or an older
    layout of the model), before any process starts: DeepSpeed would fail mid-start-up, on every rank, with torch's
    list of every key. The weights are memory-mapped: only their names and shapes are read."""
    from .model.pretrained import state_mismatch

    saved = torch.load(model_states(tag_dir), map_location="cpu", mmap=True, weights_only=False).get("module") or {}
    mismatch = state_mismatch({name: t.shape for name, t in saved.items()},
                              {name: t.shape for name, t in model.state_dict().items()})
    if mismatch:
        raise CheckpointError(
            f"--resume: {tag_dir} does not fit the model of this config: {mismatch}. It was saved with another model "
            f"config or an older layout of the model: resume from a checkpoint of this model, or start a new run in "
            f"another run.dir")


class RngState:
    """The python, numpy, torch and CUDA generators of this process."""

    def state_dict(self) -> Dict[str, Any]:
        state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


def to_universal(tag_dir: Path) -> Path:
    """``tag_dir`` as a DeepSpeed universal checkpoint next to it (converted once, by rank 0; the others wait)."""
    target = tag_dir.with_name(tag_dir.name + UNIVERSAL)
    if dist.get_rank() == 0 and not target.is_dir():
        with replaced_atomically(target) as tmp:
            command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
                       "--output_folder", str(tmp), "--inject_missing_state"]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                raise CheckpointError(f"ds_to_universal failed on {tag_dir} (exit {done.returncode}):\n"
                                      f"{done.stderr[-3000:]}")
    dist.barrier()
    return target


class Checkpointer:
    """Saves and restores the engine plus the registered components under ``directory``."""

    def __init__(self, directory: Path, engine, keep_last: int, shared: Dict[str, Stateful],
                 per_rank: Dict[str, Stateful], config: Dict[str, Any]):
        self.directory, self.engine, self.keep_last = directory, engine, keep_last
        self.shared, self.per_rank, self.config = shared, per_rank, config
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def save(self, step: int) -> float:
        """Every rank writes its shard of ``tag_for(step)``; ``latest`` moves after all have. Returns the seconds.
        Raises :class:`NoRoomError` on every rank, with nothing written, when a rank lacks the space for it."""
        start = time.perf_counter()
        tag = tag_for(step)
        self._check_room(tag)
        if self.rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.directory / tag, ignore_errors=True)  # a write cut off earlier
        per_rank: List[Dict[str, Any]] = [None] * self.world_size  # type: ignore[list-item]
        dist.all_gather_object(per_rank, {name: c.state_dict() for name, c in self.per_rank.items()})
        client = {"shared": {name: c.state_dict() for name, c in self.shared.items()}, "per_rank": per_rank,
                  "config": self.config, "world_size": self.world_size}
        try:
            self.engine.save_checkpoint(str(self.directory), tag=tag, client_state=client, save_latest=False)
        except OSError as exc:  # the peers fail in their next collective, or after the collective timeout
            log.error("rank %d could not write checkpoint %s (%s); %s", self.rank, tag, exc, self._intact())
            raise
        dist.barrier()
        if self.rank == 0:
            write_latest(self.directory, tag)
            self._prune()
        dist.barrier()
        seconds = time.perf_counter() - start
        if self.rank == 0:
            log.info("checkpoint %s saved in %.1f s", self.directory / tag, seconds)
        return seconds

    def _check_room(self, tag: str) -> None:
        """Every rank compares its free space with what the last checkpoint took there (on shared storage the whole
        of it, on node-local disks this node's part), or with an estimate before the first; any short, all raise."""
        latest = read_latest(self.directory)
        need = _bytes_in(latest) if latest is not None else estimated_bytes(self.engine.module)
        found: List[Any] = [None] * self.world_size
        dist.all_gather_object(found, (_free_bytes(self.directory), need))
        short = [f"rank {rank} has {free / 1e6:.1f} MB free, needs about {need / 1e6:.1f} MB"
                 for rank, (free, need) in enumerate(found) if free < need]
        if short:
            raise NoRoomError(f"no room for checkpoint {tag} in {self.directory}: {'; '.join(short)}. Nothing was "
                              f"written; {self._intact()}. Free space there (every checkpoint but the latest may go) and "
                              "resume (--resume auto)")

    def _intact(self) -> str:
        latest = read_latest(self.directory)
        return f"the latest checkpoint, {latest.name}, is intact" if latest else "no checkpoint was saved yet"

    def _prune(self) -> None:
        tags = sorted(p.name for p in self.directory.iterdir() if TAG.match(p.name))
        latest = read_latest(self.directory)
        for name in tags[: -self.keep_last]:
            if latest is None or name != latest.name:
                shutil.rmtree(self.directory / name, ignore_errors=True)
                shutil.rmtree(self.directory / (name + UNIVERSAL), ignore_errors=True)

    def load(self, tag_dir: Path, universal: bool) -> None:
        """Restore the engine and every component from ``tag_dir`` (``universal``: saved under another world size,
        loaded through its universal conversion)."""
        source = to_universal(tag_dir) if universal else tag_dir
        path, client = self.engine.load_checkpoint(str(source.parent), tag=source.name)
        if path is None:
            raise CheckpointError(f"--resume: DeepSpeed could not load {source}")
        for name, component in self.shared.items():  # one added since the checkpoint was written keeps its start
            if name in client["shared"]:
                component.load_state_dict(client["shared"][name])
        mine = client["per_rank"][0 if universal else self.rank]
        for name, component in self.per_rank.items():
            component.load_state_dict(mine[name])
