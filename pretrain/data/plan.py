"""Who reads what, and how much: the training data's logical streams and their shards, epoch length, shard
assignment of validation readers, and the seeds of every random choice.

Training samples come from ``data.streams`` logical streams, each a pure function of (seed, epoch, stream): its share
of every dataset's shards, its own mixing and shuffle buffer. The global order interleaves them (global sample ``g``
is sample ``g // S`` of stream ``g % S``) and step ``t`` trains on samples ``t*G .. (t+1)*G - 1`` (G the global batch),
whatever the number of processes and workers that read the streams: reader ``r`` of ``R`` (R dividing S) reads the
streams ``r, r + R, ...``. Validation is read per (rank, worker), every sample once.
"""

from __future__ import annotations

import hashlib
import heapq
import os
import random
import shlex
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

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


def sample_rng(key: int, place: int) -> np.random.Generator:
    """The generator of one sample's random choices (crop, masks): Philox keyed by its stream (``seed_of`` its ids),
    counting from its place in it (each place owns 2^64 blocks of the counter; a third of the cost of a seeded
    generator per sample)."""
    return np.random.Generator(np.random.Philox(counter=[0, place, 0, 0], key=key))


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


def epoch_steps(datasets: List[Dataset], cfg: DataConfig, global_batch: int) -> int:
    """Training steps per epoch: the epoch's samples (``data.epoch_samples``, else the index counts) in global
    batches. (Validation has no such count: it reads every sample once, :class:`ValidationPass`.)"""
    samples = cfg.epoch_samples
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
    steps = samples // global_batch
    if steps == 0:
        raise DataError(f"data.train_shards: an epoch of {samples} samples is less than one global batch of "
                        f"{global_batch} (data.batch_size {cfg.batch_size} x processes x accumulation steps); lower "
                        f"data.batch_size or train.global_batch_size, or raise data.epoch_samples")
    return steps


def data_order(datasets: List[Dataset], cfg: DataConfig, streams: int, global_batch: int) -> Dict[str, Any]:
    """What the order of the training samples depends on besides the position (epoch, steps): a resume with other
    values cannot give the same batches. The number of processes, workers and micro-batches is not among them."""
    names = "\n".join(f"{os.path.basename(s.url)}:{s.samples}" for d in datasets for s in d.shards)
    return {"seed": cfg.seed, "streams": streams, "global_batch": global_batch, "resample": cfg.resample,
            "shuffle_buffer": cfg.shuffle_buffer, "weights": [d.weight for d in datasets],
            "shards": hashlib.sha1(names.encode()).hexdigest()}


def order_changes(saved: Mapping[str, Any], now: Mapping[str, Any]) -> str:
    """``"seed: 0 -> 1, ..."`` for what differs ("" for nothing)."""
    return ", ".join(f"{key}: {saved.get(key)!r} -> {value!r}" for key, value in now.items() if saved.get(key) != value)


def check_order(saved: Mapping[str, Any], now: Mapping[str, Any], new_order: bool) -> str:
    """The changes from the checkpoint's order, allowed only with ``data.new_order`` (else a :class:`DataError`)."""
    changes = order_changes(saved, now)
    if changes and not new_order:
        raise DataError(f"data.new_order: the checkpoint's training data was ordered under other settings "
                        f"({changes}), so its next steps would not get the samples they would have had; resume with "
                        f"the saved values, or set data.new_order=true to go on from the same point of the epoch in "
                        f"the new order")
    return changes


def saved_streams(state: Optional[Mapping[str, Any]]) -> int:
    """The stream count a training stream's state (``DataStream.state_dict``) was saved with (0 for none)."""
    return int((state or {}).get("order", {}).get("streams", 0))


def check_before_start(cfg: DataConfig, splits: Sequence[str], world_size: int, global_batch: int,
                       saved: Optional[Mapping[str, Any]] = None) -> None:
    """What would stop the stream once the job runs, found before it starts (each raises :class:`DataError` naming
    the key): specs that name no shards, training epochs of unknown length or under one global batch, streams the
    readers cannot share or that lack shards, and remote datasets whose first shard cannot be read (address, bucket,
    credentials). Validation reads each shard once, on whichever reader it falls to: any count of shards and
    samples will do. ``saved``: the training stream's state in the checkpoint a run resumes, whose order it must
    keep (unless ``data.new_order``)."""
    for split in splits:
        datasets = load_datasets(cfg, split)
        if split == "train":
            streams = check_streams(datasets, cfg, world_size, max(1, cfg.num_workers), global_batch,
                                    saved_streams(saved))
            epoch_steps(datasets, cfg, global_batch)
            if saved:
                check_order(saved["order"], data_order(datasets, cfg, streams, global_batch), cfg.new_order)
        for dataset in datasets:
            first = dataset.shards[0].url
            if by_command(first):
                error = first_sample_error(first, cfg.pipe_stall_timeout_s)
                if error is not None:
                    raise DataError(f"{dataset.key}: its first shard cannot be read: {error}")


# Numbers with more divisors than any smaller one: as many (processes x workers) shapes as possible divide them.
HIGHLY_COMPOSITE = (1, 2, 4, 6, 12, 24, 36, 48, 60, 120, 180, 240, 360, 720, 840, 1260, 1680, 2520, 5040, 7560, 10080,
                    15120, 20160, 25200, 27720, 45360, 50400, 55440, 83160, 110880, 166320, 221760, 277200, 332640,
                    498960, 554400, 665280, 720720)


def stream_count(datasets: List[Dataset], cfg: DataConfig, readers: int, saved: int = 0) -> int:
    """``data.streams``; else (0) those of the checkpoint resumed (``saved``); else, at a first start, the largest
    highly composite number not above the fewest shards of a training dataset that the ``readers`` divide (16 shards:
    12 streams, for 1, 2, 3, 4, 6 or 12 readers), or the largest multiple of them not above it: no stream without
    shards, and many shapes to resume on."""
    if cfg.streams or saved:
        return cfg.streams or saved
    fewest = min(len(dataset.shards) for dataset in datasets)
    fitting = [n for n in HIGHLY_COMPOSITE if n <= fewest and n % readers == 0]
    return max(fitting) if fitting else max(readers, fewest - fewest % readers)


def check_streams(datasets: List[Dataset], cfg: DataConfig, world_size: int, workers: int, global_batch: int,
                  saved: int = 0) -> int:
    """The stream count (:func:`stream_count`), once it is known that the (rank, worker) readers share it evenly,
    that each has a sample in every global batch and, without resampling, that every dataset has a shard for each
    stream: else a :class:`DataError` with the numbers that would work."""
    readers = world_size * workers
    streams = stream_count(datasets, cfg, readers, saved)
    if global_batch < readers:
        raise DataError(f"data.num_workers: a global batch of {global_batch} samples leaves some of the {world_size} "
                        f"processes x {workers} data-loader workers = {readers} readers without a sample; lower "
                        f"data.num_workers or raise data.batch_size")
    if streams % readers:
        shapes = ", ".join(str(n) for n in range(1, streams + 1) if streams % n == 0)
        whose = "the checkpoint's" if saved and not cfg.streams else "data.streams"
        raise DataError(
            f"data.streams: {world_size} processes x {workers} data-loader workers = {readers} readers cannot share "
            f"{whose} {streams} training streams evenly; use processes x data.num_workers of {shapes}, or set "
            f"data.streams to a multiple of {readers} (each dataset needs that many shards; the samples of each "
            f"step then differ from those of {streams} streams)")
    if not cfg.resample:
        for dataset in datasets:
            if len(dataset.shards) < streams:
                raise DataError(
                    f"{dataset.key}: {len(dataset.shards)} shards for data.streams {streams} (each stream reads "
                    f"shards of its own); write more, smaller shards (data_prep shard --min-shards), lower "
                    f"data.streams, or set data.resample=true")
    return streams


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


def stream_shards(dataset: Dataset, dataset_index: int, seed: int, epoch: int, stream: int, streams: int,
                  resample: bool) -> List[Shard]:
    """The shards a training stream reads this epoch: its share of the dataset's shards, shuffled by epoch (all of
    them when resampling, which draws from the whole dataset)."""
    if resample:
        return list(dataset.shards)
    shards = list(dataset.shards)
    python_rng(seed, SPLITS["train"], epoch, dataset_index).shuffle(shards)
    return balanced_split(shards, streams)[stream]


def reader_shards(dataset: Dataset, rank: int, world_size: int, worker: int, workers: int) -> List[Shard]:
    """The shards a validation reader (rank, worker) reads, in order: split by rank, then by worker."""
    return balanced_split(balanced_split(list(dataset.shards), world_size)[rank], workers)[worker]


def first_of_stream(global_index: int, stream: int, streams: int) -> int:
    """The place in ``stream`` of its first sample at or after ``global_index`` of the global order (sample ``k`` of
    stream ``s`` is global sample ``k * streams + s``)."""
    return max(0, -(-(global_index - stream) // streams))
