"""The stream: shards -> logical streams (tar reading, mixing, shuffle buffer) -> global order -> micro-batches, with
exact resume on any shape.

Training samples come from ``S`` logical streams (``pretrain.data.plan``), each a pure function of (seed, epoch,
stream); step ``t`` trains on global samples ``t*G .. (t+1)*G - 1``, sample ``g`` being sample ``g // S`` of stream
``g % S``, and every random choice of a sample (crop, masks) comes from its place (stream, place in it). Reader
(rank ``r``, worker ``w``) of ``R`` reads streams ``r + world_size*w``, ``+ R``, ...: for each step it decodes its
streams' samples of that step (``DataLoader(batch_size=None)``: one part per worker and step, taken in turn); the
rank cuts its workers' parts into the step's micro-batches (``pretrain.data.parts``). The global
batches, their samples' masks and so the losses are the same on any number of processes, workers and micro-batches.
The position is (epoch, steps done): a restored worker replays its streams up to the step without decoding anything
(tar reading only) and goes on exactly where the uninterrupted run was. Readers never run dry (each stream cycles over
its shards), so shard sizes and skipped samples cannot make ranks disagree on the step count.

Validation (:class:`ValidationPass`) reads every sample once instead: each reader's shards in order, its last batch
padded with rows that hold nothing; ranks whose pass ends first are given empty batches by the evaluation, which
goes on while any rank has data.

Workers start from a fork server (``WORKER_START``), never by forking the trainer: a rank has threads (gloo's, the
queue feeders of its other loaders, tqdm's monitor), and a fork can copy a lock one of them holds, leaving the new
worker hung inside ``os.fork``. Seen once in about ten CI runs: an evaluation loader's worker, at the last step of a
resumed run; the rank then waited for its batch forever.
"""

from __future__ import annotations

import bisect
import faulthandler
import functools
import itertools
import logging
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.resource_tracker
import os
import select
import signal
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.filters import shuffle

from ..config import DataConfig, ModelConfig, data_roles, validate_data_config
from ..shard_format import LABEL_FIELD, MODALITY_FIELDS, layout_fields, modalities
from .collate import BatchBuilder
from .parts import micro_batches, packed, unpacked
from .plan import (
    MIX, SAMPLE, SHUFFLE, SOURCE, SPLITS, Dataset, check_order, check_streams, data_order, epoch_steps,
    first_of_stream, load_datasets, python_rng, reader_shards, sample_rng, seed_of, stream_shards,
)
from ..shards import Shard, SkipCounter
from ..shards.specs import unread_layouts
from .reader import MEDIA_KEYS, Sample, sample_selector, shard_samples

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamPlan:
    """Everything a worker needs to make its part (plain data: it travels to worker processes). ``streams``,
    ``global_batch`` and ``steps_per_epoch`` are the training order's; 0 for validation."""

    model: ModelConfig
    data: DataConfig
    split: str
    datasets: List[Dataset]
    rank: int
    world_size: int
    workers: int
    streams: int = 0
    global_batch: int = 0
    steps_per_epoch: int = 0

    @property
    def train(self) -> bool:
        return self.split == "train"

    def streams_of(self, worker: int) -> range:
        """The training streams reader (rank, worker) reads: those whose number is its own modulo the readers."""
        return range(self.rank + self.world_size * worker, self.streams, self.world_size * self.workers)

    def stream_shards(self, epoch: int, stream: int) -> List[List[Shard]]:
        """The shards a training stream reads in ``epoch``, per dataset."""
        return [stream_shards(d, i, self.data.seed, epoch, stream, self.streams, self.data.resample)
                for i, d in enumerate(self.datasets)]

    def stream_ids(self, epoch: int, stream: int) -> Tuple[int, ...]:
        """What every random choice of a training stream in ``epoch`` is seeded with (its purpose after it)."""
        return self.data.seed, SPLITS["train"], epoch, stream


def mix(sources: Sequence[Iterator[Sample]], weights: Sequence[float], rng) -> Iterator[Sample]:
    """Each sample drawn from a source chosen with probability proportional to its weight."""
    if len(sources) == 1:
        yield from sources[0]
        return
    cumulative = list(itertools.accumulate(weights))
    while True:
        yield next(sources[bisect.bisect_right(cumulative, rng.random() * cumulative[-1])])


def read_keys(data: DataConfig, model: ModelConfig) -> Tuple[List[str], List[str]]:
    """The sample keys a run reads: those of its input modalities, and the label's when it is a target."""
    roles = data_roles(data, model)
    inputs = [key for name in roles if name in MODALITY_FIELDS for key in MODALITY_FIELDS[name]]
    return inputs, [LABEL_FIELD] * ("label" in roles)


def announce_unread(datasets: List[Dataset], data: DataConfig, model: ModelConfig, split: str) -> None:
    """Say once what the data holds that this run does not read by design (video-only samples for a model without
    video): the stream passes such samples over quietly and counts them as ``unused``, not as skips."""
    inputs, _ = read_keys(data, model)
    found = {layout: (n, sorted(modalities(MEDIA_KEYS.intersection(layout_fields(layout)))))
             for layout, n in unread_layouts([s for d in datasets for s in d.shards], inputs).items()}
    # a sample of no medium at all is a skip, reported as such
    unread = {layout: (n, media) for layout, (n, media) in found.items() if media}
    if unread:
        kinds = [f"{n} with {'+'.join(media)} only ({layout})"
                 for layout, (n, media) in sorted(unread.items(), key=lambda item: -item[1][0])]
        log.info("data (%s): %d samples hold nothing this run reads (it reads %s): %s; passed over and counted as "
                 "unused_samples, not as skipped", split, sum(n for n, _ in unread.values()),
                 list(data_roles(data, model)), "; ".join(kinds))


def _dataset_samples(plan: StreamPlan, shards: List[List[Shard]], ids: Tuple[int, ...], counter: SkipCounter,
                     where: str, endless: bool) -> List[Iterator[Sample]]:
    """Each dataset's kept samples from its ``shards`` (see ``pretrain.data.reader.shard_samples``)."""
    usable, label = read_keys(plan.data, plan.model)
    select = sample_selector(plan.data.require, usable, label)
    return [
        shard_samples(
            shards[i], python_rng(*ids, SOURCE, i), plan.data.resample and endless, select, counter,
            where=f"{dataset.key} ({where})", stall_timeout_s=plan.data.pipe_stall_timeout_s,
            retries=plan.data.shard_retries, endless=endless,
        )
        for i, dataset in enumerate(plan.datasets)
    ]


def stream_samples(plan: StreamPlan, epoch: int, stream: int, counter: SkipCounter) -> Iterator[Sample]:
    """A training stream's endless, undecoded samples in ``epoch``: its share of each dataset's shards, mixed by the
    datasets' weights, through its share of ``data.shuffle_buffer``; a pure function of its arguments."""
    ids = plan.stream_ids(epoch, stream)
    sources = _dataset_samples(plan, plan.stream_shards(epoch, stream), ids, counter, f"stream {stream}, epoch {epoch}",
                               endless=True)
    samples = mix(sources, [d.weight for d in plan.datasets], python_rng(*ids, MIX))
    buffer = plan.data.shuffle_buffer // plan.streams
    if buffer > 1:
        samples = shuffle(buffer, buffer, rng=python_rng(*ids, SHUFFLE))(samples)
    return samples


def worker_steps(plan: StreamPlan, epoch: int, worker: int, start: int) -> Iterator[Dict[str, object]]:
    """Reader ``worker``'s part of each step of ``epoch`` from step ``start`` on: the samples of its streams that
    fall in the step's global batch, decoded, with the step and the skips counted while making it (for the main
    process, which strips them)."""
    counter = SkipCounter()
    streams, count, size = list(plan.streams_of(worker)), plan.streams, plan.global_batch
    sources = [stream_samples(plan, epoch, stream, counter) for stream in streams]
    for stream, samples in zip(streams, sources):
        deque(itertools.islice(samples, first_of_stream(start * size, stream, count)), maxlen=0)
    counter.drain()  # skips met while replaying were counted before the checkpoint
    builder = BatchBuilder(plan.model, plan.data, training=True)
    keys = [seed_of(*plan.stream_ids(epoch, stream), SAMPLE) for stream in streams]
    for step in range(start, plan.steps_per_epoch):
        rows, rngs = [], []
        for stream, samples, key in zip(streams, sources, keys):
            for place in range(first_of_stream(step * size, stream, count),
                               first_of_stream((step + 1) * size, stream, count)):
                rows.append(next(samples))
                rngs.append(sample_rng(key, place))
        batch = builder(rows, rngs, counter)
        batch.update(_step=step, _skipped=counter.drain(), _notes=builder.drain_notes())
        yield batch


def pass_batches(plan: StreamPlan, worker: int) -> Iterator[Dict[str, object]]:
    """Validation reader ``worker``'s batches: its shards read once, in order, the last batch padded with rows that
    hold nothing; each sample's random choices from its place in its shard, so a sample is masked alike whichever
    reader reads it."""
    counter = SkipCounter()
    ids = plan.data.seed, SPLITS["val"]
    keys = {shard.url: seed_of(*ids, i, j, SAMPLE)
            for i, dataset in enumerate(plan.datasets) for j, shard in enumerate(dataset.shards)}
    places: Counter = Counter()
    shards = [reader_shards(d, plan.rank, plan.world_size, worker, plan.workers) for d in plan.datasets]
    where = f"rank {plan.rank}, worker {worker}"
    samples = itertools.chain.from_iterable(_dataset_samples(plan, shards, ids, counter, where, endless=False))
    builder = BatchBuilder(plan.model, plan.data, training=False)
    size = plan.data.batch_size
    while rows := list(itertools.islice(samples, size)):
        rngs = []
        for row in rows:
            rngs.append(sample_rng(keys[row["__url__"]], places[row["__url__"]]))
            places[row["__url__"]] += 1
        padding = size - len(rows)
        batch = builder(rows + [None] * padding, rngs + [None] * padding, counter)
        batch.update(_skipped=counter.drain(), _notes=builder.drain_notes())
        yield batch


WORKER_START = multiprocessing.get_context("forkserver")
WORKER_START.set_forkserver_preload([__name__])  # a worker then imports nothing but what this module did


# A Slurm requeue, preemption or time-limit warning signals every process of the job step. The trainer alone acts on
# them (it checkpoints, then stops its workers); a worker or fork server killed by one would fail the trainer's next
# batch or its next epoch's workers.
JOB_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# Where a worker can take SIGTERM in a thread of its own (not macOS, where no Slurm runs), it is blocked from the
# worker's first instruction: torch's worker loop installs an exiting SIGTERM handler before our init runs, and each
# epoch's new workers start while the job may be signalled.
_TERM_WAITABLE = hasattr(signal, "sigwaitinfo")


def _start_worker_server() -> None:
    """Start the fork server (once) with the signals above ignored and, where waitable, blocked: it and the workers
    it forks inherit both (ignored dispositions and the mask survive exec and fork). The resource tracker starts
    first, ignoring them too: starting it unblocks SIGTERM. The trainer's own handlers are back afterwards, and a
    signal that reached it meanwhile is delivered to them then."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in JOB_SIGNALS}
    mask = None
    try:
        multiprocessing.resource_tracker.ensure_running()
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, JOB_SIGNALS if _TERM_WAITABLE else ())
        multiprocessing.forkserver.ensure_running()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if mask is not None:  # after the handlers: a signal pending while ignored is not lost
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def _exit_with(trainer: int) -> None:
    """End this worker when the trainer process ends, however it ends (SIGKILL included). torch's watchdog watches
    the worker's parent, here the fork server, which outlives the trainer while its workers live."""
    try:
        select.select([os.pidfd_open(trainer)], [], [])  # readable once the trainer has exited
    except ProcessLookupError:  # already gone
        pass
    except (AttributeError, OSError):  # no pidfd (not Linux, or a kernel before 5.3): poll
        while _alive(trainer):
            time.sleep(1.0)
    os._exit(0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _exit_on_terms_from(trainer: int) -> None:
    """End this worker on a SIGTERM from the trainer (how torch's DataLoader and multiprocessing's exit stop a worker
    that lingers; one left running would hang the trainer's exit), and take any other (Slurm's) without effect."""
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != trainer:
        pass
    os._exit(0)


def _worker_init(trainer: int, _worker_id: int) -> None:
    """SIGUSR1 ignored; SIGTERM, blocked since the fork (``_start_worker_server``) in this thread and so in every
    thread started after it, left to ``_exit_on_terms_from`` (a SIGTERM that came before is still pending for it); and
    the worker tied to the trainer's life. ``kill -USR2 <worker pid>`` prints the worker's Python stacks, as it does
    for the trainer."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    watches = [_exit_with]
    if _TERM_WAITABLE:  # else torch's SIGTERM handler stays
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not ignored: a blocked signal stays pending for sigwaitinfo
        watches.append(_exit_on_terms_from)
    for watch in watches:
        threading.Thread(target=watch, args=(trainer,), name=watch.__name__, daemon=True).start()
    faulthandler.register(signal.SIGUSR2, all_threads=True)


class _Part(IterableDataset):
    """What the DataLoader iterates: in training, each worker's part of the steps of ``epoch`` from ``start``; in
    validation, each worker's pass."""

    def __init__(self, plan: StreamPlan, epoch: int, start: int):
        super().__init__()
        self.plan, self.epoch, self.start = plan, epoch, start

    def __iter__(self) -> Iterator[Dict[str, object]]:
        info = get_worker_info()
        if info is None:
            return self._items(0)
        return map(packed, self._items(info.id))

    def _items(self, worker: int) -> Iterator[Dict[str, object]]:
        if self.plan.train:
            return worker_steps(self.plan, self.epoch, worker, self.start)
        return pass_batches(self.plan, worker)


class _Stream:
    """What training and validation streams share: the datasets, the DataLoader over a plan, and the skips and notes
    that come with the batches. ``rank``/``world_size`` are passed in (not read from torch.distributed) so the data
    layout is explicit and several ranks can be simulated in one process."""

    plan: StreamPlan

    def __init__(self, data: DataConfig, model: ModelConfig, rank: int, world_size: int, split: str):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        validate_data_config(data, model)
        self.datasets = load_datasets(data, split)
        self.workers = max(1, data.num_workers)
        if rank == 0:
            announce_unread(self.datasets, data, model, split)
        self._skipped: Counter = Counter()
        self._noted: set = set()

    def _parts(self, epoch: int, start: int) -> Iterator[Dict[str, object]]:
        """The loader's items, skips and notes taken off."""
        for part in self._loader(epoch, start):
            if self.plan.data.num_workers:
                part = unpacked(part)
            self._skipped.update(part.pop("_skipped"))
            for note in part.pop("_notes"):
                if note not in self._noted and self.plan.rank == 0:
                    log.info("data (%s): %s", self.plan.split, note)
                self._noted.add(note)
            yield part

    def _loader(self, epoch: int, start: int) -> DataLoader:
        data = self.plan.data
        workers = data.num_workers
        if workers:
            _start_worker_server()
        return DataLoader(
            _Part(self.plan, epoch, start),
            batch_size=None,
            num_workers=workers,
            prefetch_factor=data.prefetch_factor if workers else None,
            multiprocessing_context=WORKER_START if workers else None,
            worker_init_fn=functools.partial(_worker_init, os.getpid()) if workers else None,
            pin_memory=self._pinned() and not self.plan.train,  # training pins the micro-batches it joins
        )

    def _pinned(self) -> bool:
        return self.plan.data.pin_memory and torch.cuda.is_available()

    def skipped(self) -> Dict[str, int]:
        """Skipped data by reason (see ``pretrain.shards.read`` and ``pretrain.data.reader``) since the run began,
        this rank only."""
        return dict(self._skipped)


class DataStream(_Stream):
    """The trainer's data: ``for batch in stream`` yields the micro-batches of the rest of the current epoch
    (``len(stream)`` per epoch, the same on every rank: ``global_batch // (batch_size * world_size)`` per step, 0
    meaning one), then the next iteration starts the next epoch.

    ``saved_streams``: the stream count of the state to be loaded (``plan.saved_streams``), kept where
    ``data.streams`` is 0. ``skipped()`` gives the skip counts of this rank by reason;
    ``state_dict()``/``load_state_dict()`` save and restore the position, (epoch, steps), which is the same on every
    rank and means the same on any shape: a state resumes any rank of any number of processes, workers and
    micro-batches with the same global batch. Iterate one epoch at a time: two live iterators would both advance the
    position.
    """

    def __init__(self, data: DataConfig, model: ModelConfig, rank: int = 0, world_size: int = 1,
                 global_batch: int = 0, saved_streams: int = 0):
        super().__init__(data, model, rank, world_size, "train")
        micro = data.batch_size * world_size
        global_batch = global_batch or micro
        if global_batch % micro:
            raise ValueError(f"global batch {global_batch} is no multiple of data.batch_size x world size {micro}")
        streams = check_streams(self.datasets, data, world_size, self.workers, global_batch, saved_streams)
        self.accumulation = global_batch // micro
        self.plan = StreamPlan(model, data, "train", self.datasets, rank, world_size, self.workers, streams,
                               global_batch, epoch_steps(self.datasets, data, global_batch))
        self.epoch = 0
        self.steps = 0

    def __len__(self) -> int:
        return self.plan.steps_per_epoch * self.accumulation

    def __iter__(self) -> Iterator[Dict[str, object]]:
        if self.steps >= self.plan.steps_per_epoch:
            self.epoch, self.steps = self.epoch + 1, 0
        loader, size = self._parts(self.epoch, self.steps), self.plan.data.batch_size
        for step in range(self.steps, self.plan.steps_per_epoch):
            parts = [next(loader) for _ in range(self.workers)]
            if any(part.pop("_step") != step for part in parts):
                raise RuntimeError(f"data stream out of order at step {step} of epoch {self.epoch}")
            micro = micro_batches(parts, size, self.accumulation, self._pinned())
            self.steps += 1  # before the step's micro-batches: a checkpoint after them is at the next step
            yield from micro

    def shards(self, epoch: int, worker: int) -> List[str]:
        """The shard URLs this rank's ``worker`` reads in ``epoch``, over its streams and all datasets (for logs and
        tests)."""
        return [s.url for stream in self.plan.streams_of(worker) for shards in self.plan.stream_shards(epoch, stream)
                for s in shards]

    def _order(self) -> Dict[str, object]:
        return data_order(self.plan.datasets, self.plan.data, self.plan.streams, self.plan.global_batch)

    def _shape(self) -> Dict[str, int]:
        return {"processes": self.plan.world_size, "workers": self.workers, "batch_size": self.plan.data.batch_size}

    def state_dict(self) -> Dict[str, object]:
        return {"epoch": self.epoch, "steps": self.steps, "skipped": self.skipped(), "order": self._order(),
                "shape": self._shape()}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        """Continue from ``state``, on any number of processes, workers and micro-batches: the batches stay the same.
        A state saved under another order (seed, streams, global batch, shards, ...) raises :class:`DataError`
        naming what changed, unless ``data.new_order``: then the epoch goes on from the same number of samples, in
        the new order."""
        saved: Dict[str, object] = state.get("order") or {}
        changes = check_order(saved, self._order(), self.plan.data.new_order)
        self.epoch, self.steps = int(state["epoch"]), int(state["steps"])
        if changes:
            seen = self.steps * int(saved.get("global_batch") or self.plan.global_batch)
            self.steps = min(self.plan.steps_per_epoch, seen // self.plan.global_batch)
            if self.plan.rank == 0:
                log.warning("data.new_order: the training data's order changed (%s): going on from step %d of epoch "
                            "%d in the new order; the samples of the steps to come are not those the saved run would "
                            "have had", changes, self.steps, self.epoch)
        self._skipped = Counter(state.get("skipped", {}))
        shape, now = state.get("shape") or {}, self._shape()
        if shape and shape != now and self.plan.rank == 0:
            log.info("data: resuming on %d processes x %d workers, micro-batches of %d (saved: %d x %d, %d): the "
                     "global batches and their samples stay the same", now["processes"], now["workers"],
                     now["batch_size"], shape["processes"], shape["workers"], shape["batch_size"])


class ValidationPass(_Stream):
    """The validation data: each ``for batch in stream`` is one pass over every sample of ``data.val_shards`` once,
    the same batches in the same order every time (shards in order, no shuffle, fixed masks). A rank's pass ends
    when its shards do, so ranks may yield different numbers of batches: :meth:`padding` is the batch a rank
    evaluates while another still has data (``pretrain.train.evaluation``). Rows that hold nothing (padding, media
    that did not decode) have ``valid`` False and no targets."""

    def __init__(self, data: DataConfig, model: ModelConfig, rank: int = 0, world_size: int = 1):
        super().__init__(data, model, rank, world_size, "val")
        self.plan = StreamPlan(model, data, "val", self.datasets, rank, world_size, self.workers)

    def __iter__(self) -> Iterator[Dict[str, object]]:
        return self._parts(0, 0)

    def padding(self) -> Dict[str, object]:
        """A batch of ``data.batch_size`` rows that hold nothing."""
        rows: List[Optional[Sample]] = [None] * self.plan.data.batch_size
        return BatchBuilder(self.plan.model, self.plan.data, training=False)(rows, rows, SkipCounter())
