"""The stream: shards -> (rank, worker) split -> tar reading -> mixing -> shuffle buffer -> batches, with exact resume.

Each DataLoader worker builds whole batches itself (``DataLoader(batch_size=None)``); batch ``i`` of an epoch comes
from worker ``i % W``, and worker ``w``'s ``j``-th batch is made of raw samples ``j*B .. (j+1)*B-1`` of its own
sample stream, which depends only on (seed, split, epoch, rank, w). The stream's position is therefore just
(epoch, batches yielded): a restored worker replays its raw stream up to its next batch without decoding anything
(tar reading only, cheap) and goes on exactly where the uninterrupted run was. Because the DataLoader always starts at
its worker 0, physical worker ``p`` plays logical worker ``(p + start) % W``.

Every rank yields ``epoch_samples // (world_size * batch_size)`` batches per epoch: readers never run dry (each cycles
over its shards), so shard sizes and skipped samples cannot make ranks disagree on the step count.

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
import hashlib
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
from .plan import (
    MIX, SAMPLE, SHUFFLE, SOURCE, SPLITS, Dataset, batches_before, check_readers, epoch_batches, first_batch,
    load_datasets, python_rng, sample_rng, worker_shards,
)
from ..shards import DataError, Shard, SkipCounter
from ..shards.specs import unread_layouts
from .reader import MEDIA_KEYS, Sample, sample_selector, shard_samples

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamPlan:
    """Everything a worker needs to make its batches (plain data: it travels to worker processes)."""

    model: ModelConfig
    data: DataConfig
    split: str
    datasets: List[Dataset]
    rank: int
    world_size: int
    workers: int
    batches_per_epoch: Optional[int]  # None: one pass, every sample once (validation)

    @property
    def train(self) -> bool:
        return self.split == "train"

    def rng_epoch(self, epoch: int) -> int:
        """Validation sees the same shards, order and masks every pass, so its losses are comparable."""
        return epoch if self.train else 0

    def ids(self, epoch: int, worker: int) -> Tuple[int, ...]:
        """What every random choice of ``worker`` in ``epoch`` is seeded with (with its purpose after it)."""
        return self.data.seed, SPLITS[self.split], self.rng_epoch(epoch), self.rank, worker

    def shards(self, epoch: int, worker: int, dataset_index: int) -> List[Shard]:
        return worker_shards(
            self.datasets[dataset_index], dataset_index, self.data.seed, SPLITS[self.split], self.rng_epoch(epoch),
            self.train, self.rank, self.world_size, worker, self.workers, self.data.resample and self.train,
        )


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


def raw_samples(plan: StreamPlan, epoch: int, worker: int, counter: SkipCounter) -> Iterator[Sample]:
    """One worker's endless, undecoded sample stream for this epoch: a pure function of its arguments."""
    ids = plan.ids(epoch, worker)
    usable, label = read_keys(plan.data, plan.model)
    select = sample_selector(plan.data.require, usable, label)
    sources = [
        shard_samples(
            plan.shards(epoch, worker, i), python_rng(*ids, SOURCE, i), plan.data.resample, select, counter,
            where=f"{dataset.key} (rank {plan.rank}, worker {worker}, epoch {epoch})",
            stall_timeout_s=plan.data.pipe_stall_timeout_s, retries=plan.data.shard_retries, endless=plan.train,
        )
        for i, dataset in enumerate(plan.datasets)
    ]
    if not plan.train:  # every sample once, dataset after dataset
        return itertools.chain.from_iterable(sources)
    samples = mix(sources, [d.weight for d in plan.datasets], python_rng(*ids, MIX))
    if plan.data.shuffle_buffer > 1:
        buffer = plan.data.shuffle_buffer
        samples = shuffle(buffer, buffer, rng=python_rng(*ids, SHUFFLE))(samples)
    return samples


def worker_batches(plan: StreamPlan, epoch: int, worker: int, start: int) -> Iterator[Dict[str, object]]:
    """Logical ``worker``'s batches of ``epoch`` from batch index ``start`` on; each carries its index and the skips
    counted while making it (for the main process, which strips them). In a validation pass, the worker's batches
    until its shards end, the last one padded."""
    counter = SkipCounter()
    samples = raw_samples(plan, epoch, worker, counter)
    batch_size = plan.data.batch_size
    deque(itertools.islice(samples, batches_before(start, worker, plan.workers) * batch_size), maxlen=0)
    counter.drain()  # skips met while replaying were counted before the checkpoint
    builder = BatchBuilder(plan.model, plan.data, random_crop=plan.train and plan.data.random_crop)
    ids = plan.ids(epoch, worker)
    indexes = (itertools.count(worker, plan.workers) if plan.batches_per_epoch is None
               else range(first_batch(start, worker, plan.workers), plan.batches_per_epoch, plan.workers))
    for index in indexes:
        rows: List[Optional[Sample]] = list(itertools.islice(samples, batch_size))
        if not rows:  # a validation reader's shards are all read
            return
        rows += [None] * (batch_size - len(rows))  # the end of a validation pass: rows that hold nothing
        first = batches_before(index, worker, plan.workers) * batch_size  # the rows' places in the worker's stream
        batch = builder(rows, [sample_rng(*ids, SAMPLE, first + row) for row in range(batch_size)], counter)
        batch["_index"] = index
        batch["_skipped"] = counter.drain()
        batch["_notes"] = builder.drain_notes()
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


class _EpochBatches(IterableDataset):
    """What the DataLoader iterates: one epoch from ``start``, each worker playing its logical part."""

    def __init__(self, plan: StreamPlan, epoch: int, start: int):
        super().__init__()
        self.plan, self.epoch, self.start = plan, epoch, start

    def __iter__(self) -> Iterator[Dict[str, object]]:
        info = get_worker_info()
        physical = 0 if info is None else info.id
        return worker_batches(self.plan, self.epoch, (physical + self.start) % self.plan.workers, self.start)


class _Stream:
    """What training and validation streams share: the plan, the DataLoader over it, and the skips and notes that
    come with the batches. ``rank``/``world_size`` are passed in (not read from torch.distributed) so the data layout
    is explicit and several ranks can be simulated in one process."""

    def __init__(self, data: DataConfig, model: ModelConfig, rank: int, world_size: int, split: str):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        validate_data_config(data, model)
        datasets = load_datasets(data, split)
        workers = max(1, data.num_workers)
        batches = None
        if split == "train":
            check_readers(datasets, world_size, workers, data.resample)
            batches = epoch_batches(datasets, data, world_size)
        if rank == 0:
            announce_unread(datasets, data, model, split)
        self.plan = StreamPlan(model, data, split, datasets, rank, world_size, workers, batches)
        self._skipped: Counter = Counter()
        self._noted: set = set()

    def _batches(self, epoch: int, start: int) -> Iterator[Dict[str, object]]:
        """The loader's batches with their index (which the caller checks), skips and notes taken off."""
        for batch in self._loader(epoch, start):
            self._skipped.update(batch.pop("_skipped"))
            for note in batch.pop("_notes"):
                if note not in self._noted and self.plan.rank == 0:
                    log.info("data (%s): %s", self.plan.split, note)
                self._noted.add(note)
            yield batch

    def _loader(self, epoch: int, start: int) -> DataLoader:
        data = self.plan.data
        workers = data.num_workers
        if workers:
            _start_worker_server()
        return DataLoader(
            _EpochBatches(self.plan, epoch, start),
            batch_size=None,
            num_workers=workers,
            prefetch_factor=data.prefetch_factor if workers else None,
            multiprocessing_context=WORKER_START if workers else None,
            worker_init_fn=functools.partial(_worker_init, os.getpid()) if workers else None,
            pin_memory=data.pin_memory and torch.cuda.is_available(),
        )

    def skipped(self) -> Dict[str, int]:
        """Skipped data by reason (see ``pretrain.shards.read`` and ``pretrain.data.reader``) since the run began,
        this rank only."""
        return dict(self._skipped)

    def shards(self, epoch: int, worker: int) -> List[str]:
        """The shard URLs this rank's ``worker`` reads in ``epoch``, over all datasets (for logs and tests)."""
        return [s.url for i in range(len(self.plan.datasets)) for s in self.plan.shards(epoch, worker, i)]


class DataStream(_Stream):
    """The trainer's data: ``for batch in stream`` yields the rest of the current epoch (``len(stream)`` batches per
    epoch, the same on every rank), then the next iteration starts the next epoch.

    ``skipped()`` gives the skip counts of this rank by reason; ``state_dict()``/``load_state_dict()`` save and
    restore the position exactly. The position (epoch, batches) is the same on every rank at a given step, so any
    rank's state resumes any rank; only the skip counts are per rank. Iterate one epoch at a time: two live
    iterators would both advance the position.
    """

    def __init__(self, data: DataConfig, model: ModelConfig, rank: int = 0, world_size: int = 1):
        super().__init__(data, model, rank, world_size, "train")
        self.epoch = 0
        self.batches = 0

    def __len__(self) -> int:
        return self.plan.batches_per_epoch

    def __iter__(self) -> Iterator[Dict[str, object]]:
        if self.batches >= len(self):
            self.epoch, self.batches = self.epoch + 1, 0
        for batch in self._batches(self.epoch, self.batches):
            index = batch.pop("_index")
            if index != self.batches:
                raise RuntimeError(f"data stream out of order: got batch {index}, expected {self.batches}")
            self.batches += 1
            yield batch
        if self.batches != len(self):
            raise RuntimeError(f"data stream ended after {self.batches} of {len(self)} batches of epoch {self.epoch}")

    def _layout(self) -> Dict[str, object]:
        """What the order depends on besides (epoch, batches); a resume with other values cannot be exact."""
        names = "\n".join(f"{os.path.basename(s.url)}:{s.samples}" for d in self.plan.datasets for s in d.shards)
        data = self.plan.data
        return {
            "split": self.plan.split, "seed": data.seed, "world_size": self.plan.world_size,
            "num_workers": self.plan.workers, "batch_size": data.batch_size, "resample": data.resample,
            "shuffle_buffer": data.shuffle_buffer, "weights": [d.weight for d in self.plan.datasets],
            "shards": hashlib.sha1(names.encode()).hexdigest(),
        }

    def state_dict(self) -> Dict[str, object]:
        return {"epoch": self.epoch, "batches": self.batches, "skipped": self.skipped(), "layout": self._layout()}

    def load_state_dict(self, state: Dict[str, object], strict: bool = True) -> None:
        """Continue from ``state``. ``strict`` refuses a state saved under another data layout (world size, workers,
        batch size, seed, shards, ...), where the same position would not give the same samples. Without it, a state
        of one rank of another world size or batch size continues at the same number of samples into the epoch (all
        ranks together), so the epoch still ends after the samples it has left."""
        saved: Optional[dict] = state.get("layout")
        changed = {k: (saved.get(k), v) for k, v in self._layout().items() if saved and saved.get(k) != v}
        if strict and changed:
            details = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise DataError(f"data stream state was saved under another layout ({details}); resume with the saved "
                            f"values for an exact resume, or load with strict=False to continue from the same "
                            f"position in a different order")
        self.epoch, self.batches = int(state["epoch"]), int(state["batches"])
        if changed and {"world_size", "batch_size"} <= saved.keys():
            seen = self.batches * saved["world_size"] * saved["batch_size"]
            self.batches = min(len(self), seen // (self.plan.world_size * self.plan.data.batch_size))
        self._skipped = Counter(state.get("skipped", {}))


class ValidationPass(_Stream):
    """The validation data: each ``for batch in stream`` is one pass over every sample of ``data.val_shards`` once,
    the same batches in the same order every time (shards in order, no shuffle, fixed masks). A rank's pass ends
    when its shards do, so ranks may yield different numbers of batches: :meth:`padding` is the batch a rank
    evaluates while another still has data (``pretrain.train.evaluation``). Rows that hold nothing (padding, media
    that did not decode) have ``valid`` False and no targets."""

    def __init__(self, data: DataConfig, model: ModelConfig, rank: int = 0, world_size: int = 1):
        super().__init__(data, model, rank, world_size, "val")

    def __iter__(self) -> Iterator[Dict[str, object]]:
        for batch in self._batches(0, 0):
            batch.pop("_index")
            yield batch

    def padding(self) -> Dict[str, object]:
        """A batch of ``data.batch_size`` rows that hold nothing."""
        rows: List[Optional[Sample]] = [None] * self.plan.data.batch_size
        return BatchBuilder(self.plan.model, self.plan.data, random_crop=False)(rows, rows, SkipCounter())
