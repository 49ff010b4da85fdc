"""Who reads what, and how much: shard assignment to (rank, worker), epoch length, and the seeds of every random
choice. Everything here is a pure function of (seed, split, epoch, rank, worker), which is what makes the stream's
order reproducible and a resumed run exact.
"""

from __future__ import annotations

import heapq
import random
import shlex
from dataclasses import dataclass
from typing import List, Sequence

import numpy as np

from ..config import DataConfig
from ..shards import DataError, Shard, expand_spec, total_samples
from ..shards.opener import by_command
from ..shards.read import first_sample_error

SPLITS = {"train": 0, "val": 1}
# Purposes of the per-worker random streams, so no two choices share one.
SOURCE, MIX, SHUFFLE, SAMPLE = range(4)


@dataclass(frozen=True)
class Dataset:
    """One entry of ``data.train_shards``/``val_shards``: its shards and mixing weight."""

    key: str
    spec: str
    shards: List[Shard]
    weight: float


def seed_of(*parts: int) -> int:
    """A 64-bit seed mixing all ``parts`` (numpy's SeedSequence: nearby tuples give unrelated streams)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0])


def python_rng(*parts: int) -> random.Random:
    return random.Random(seed_of(*parts))


def sample_rng(*parts: int) -> np.random.Generator:
    """The generator of one sample's random choices (crop, masks), from its place in its reader's stream."""
    return np.random.default_rng(seed_of(*parts))


def load_datasets(cfg: DataConfig, split: str) -> List[Dataset]:
    """Expand every spec of the split; weights default to the datasets' sample counts (equal when unknown)."""
    name = f"{split}_shards"
    specs = getattr(cfg, name)
    if not specs:
        raise DataError(f"data.{name} is empty: list shard specs (a directory with index.json, a brace pattern "
                        f"/d/shard-{{000000..000009}}.tar, or pipe:COMMAND)")
    shards = [expand_spec(spec, f"data.{name}[{i}]") for i, spec in enumerate(specs)]
    counts = [total_samples(s) for s in shards]
    if split == "train" and cfg.weights:
        weights = list(cfg.weights)
    elif all(c is not None for c in counts):
        weights = [float(c) for c in counts]
    else:
        weights = [1.0] * len(specs)
    return [Dataset(f"data.{name}[{i}]", spec, s, w)
            for i, (spec, s, w) in enumerate(zip(specs, shards, weights)) if w > 0]


def epoch_batches(datasets: List[Dataset], cfg: DataConfig, world_size: int) -> int:
    """Training batches every rank yields per epoch: the epoch's samples (``data.epoch_samples``, else the index
    counts) split evenly. (Validation has no such count: it reads every sample once, :class:`ValidationPass`.)"""
    samples, batch_size = cfg.epoch_samples, cfg.batch_size
    if samples == 0:
        counts = [total_samples(d.shards) for d in datasets]
        unknown = [d for d, c in zip(datasets, counts) if c is None]
        if unknown:
            first = unknown[0]
            raise DataError(
                f"{', '.join(d.key for d in unknown)}: the samples per epoch are unknown, no index.json lists "
                f"these shards' counts; `python -m data_prep index {shlex.quote(first.spec)}` writes one (reading "
                f"every shard once, in parallel; into the shards' folder, or --out DIR for remote shards: then "
                f"train on DIR), or set data.epoch_samples to the samples per epoch")
        samples = sum(counts)
    batches = samples // (world_size * batch_size)
    if batches == 0:
        raise DataError(f"data.train_shards: an epoch of {samples} samples is less than one batch per rank (world "
                        f"size {world_size} x data.batch_size {batch_size}); lower data.batch_size or raise "
                        f"data.epoch_samples")
    return batches


def check_before_start(cfg: DataConfig, splits: Sequence[str], world_size: int) -> None:
    """What would stop the stream once the job runs, found before it starts (each raises :class:`DataError` naming
    the key): specs that name no shards, training epochs of unknown length or under one batch per rank, too few
    training shards for the readers, and remote datasets whose first shard cannot be read (address, bucket,
    credentials). Validation reads each shard once, on whichever reader it falls to: any count of shards and
    samples will do."""
    for split in splits:
        datasets = load_datasets(cfg, split)
        if split == "train":
            check_readers(datasets, world_size, max(1, cfg.num_workers), cfg.resample)
            epoch_batches(datasets, cfg, world_size)
        for dataset in datasets:
            first = dataset.shards[0].url
            if by_command(first):
                error = first_sample_error(first, cfg.pipe_stall_timeout_s)
                if error is not None:
                    raise DataError(f"{dataset.key}: its first shard cannot be read: {error}")


def check_readers(datasets: List[Dataset], world_size: int, workers: int, resample: bool) -> None:
    """Without resampling every (rank, worker) needs a shard of every dataset of its own: fail before starting."""
    if resample:
        return
    for dataset in datasets:
        if len(dataset.shards) < world_size * workers:
            raise DataError(
                f"{dataset.key}: {len(dataset.shards)} shards for {world_size} ranks x {workers} data-loader workers "
                f"= {world_size * workers} readers; write more, smaller shards (data_prep shard "
                f"--max-samples-per-shard), lower data.num_workers, or set data.resample=true"
            )


def balanced_split(shards: List[Shard], parts: int) -> List[List[Shard]]:
    """Shards dealt to ``parts`` readers, largest first to the least-loaded one (ties keep the given order), so
    readers hold nearly equal sample counts whatever the shard sizes; with unknown counts, a round-robin deal.
    Each reader keeps its shards in the given order."""
    loads = [(0, part) for part in range(parts)]
    owner = {}
    for position in sorted(range(len(shards)), key=lambda i: -(shards[i].samples or 1)):
        load, part = heapq.heappop(loads)
        owner[position] = part
        heapq.heappush(loads, (load + (shards[position].samples or 1), part))
    return [[shard for i, shard in enumerate(shards) if owner[i] == part] for part in range(parts)]


def worker_shards(
    dataset: Dataset, dataset_index: int, seed: int, split: int, epoch: int, shuffle: bool,
    rank: int, world_size: int, worker: int, workers: int, resample: bool,
) -> List[Shard]:
    """The shards one (rank, worker) reads this epoch: shuffled with a seed shared by all ranks, split by rank, then by
    worker (all of them when resampling, which draws from the whole dataset)."""
    if resample:
        return list(dataset.shards)
    shards = list(dataset.shards)
    if shuffle:
        python_rng(seed, split, epoch, dataset_index).shuffle(shards)
    return balanced_split(balanced_split(shards, world_size)[rank], workers)[worker]


def batches_before(start: int, worker: int, workers: int) -> int:
    """How many of the batches 0..start-1 come from ``worker`` (batch i comes from worker i % workers)."""
    return len(range(worker, start, workers))


def first_batch(start: int, worker: int, workers: int) -> int:
    """The first batch index >= ``start`` that ``worker`` makes."""
    return start + (worker - start) % workers
