"""Samples/s of the full data stream (read, decode, transform, mask, collate) against plain webdataset iteration over
the same tars (read, group, batch; no decoding), with 1 and 2 DataLoader workers, on text-only and multimodal shards.

Not a test. Generates demo-like shards itself (text passages; 28x28 grey PNG + caption + label; 1-2 s 16 kHz FLAC
speech stand-ins + transcript; a few npy clips), or reads ``--text DIR`` / ``--multimodal DIR`` (data_prep output).
Targets on 2 cores: text-only >= 5,000 samples/s, multimodal >= 1,000 samples/s.

    python bench/data_bench.py [--samples 20000] [--workers 1 2] [--repeat 2] [--read] [--json out.json]

The loop's process takes the torch threads a trainer's would (``share_cores``). ``--read``: the loop copies every
tensor of each batch, as a trainer's copy to the device does; batches from DataLoader workers arrive in shared memory,
whose pages the first read maps, so a loop that reads nothing leaves that cost out (and a stream that copies its
batches in the process pays it inside ``stream/s``).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import soundfile
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.config import AudioConfig, DataConfig, ImageConfig, ModelConfig, TextConfig, VideoConfig  # noqa: E402
from pretrain.data import DataStream  # noqa: E402
from pretrain.train.distributed import share_cores  # noqa: E402

TARGETS = {"text-only": 5000, "multimodal": 1000}
WORDS = ("the of and to in a that is be it for not on with as by this we have are which our government people "
         "nation congress year states united must will all has more their world great new war peace law").split()


def _passage(rng: np.random.Generator, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS, int(rng.integers(low, high))))


def _png(rng: np.random.Generator) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _flac(rng: np.random.Generator) -> bytes:
    seconds = rng.uniform(1.0, 2.0)
    t = np.arange(int(16000 * seconds)) / 16000
    wave = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 400) * t) + 0.01 * rng.standard_normal(len(t))
    buffer = io.BytesIO()
    soundfile.write(buffer, wave.astype(np.float32), 16000, format="FLAC")
    return buffer.getvalue()


def _npy(rng: np.random.Generator) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8))
    return buffer.getvalue()


def text_sample(rng: np.random.Generator, key: str) -> dict:
    return {"__key__": key, "txt": _passage(rng, 80, 500)}


def multimodal_sample(rng: np.random.Generator, key: str) -> dict:
    """The demo corpus's mix: mostly captioned labelled images, some speech, some text, a few clips."""
    kind = rng.random()
    if kind < 0.65:
        return {"__key__": key, "png": _png(rng), "txt": "a photo of a shirt", "cls": str(int(rng.integers(10)))}
    if kind < 0.85:
        return {"__key__": key, "flac": _flac(rng), "txt": _passage(rng, 5, 20)}
    if kind < 0.97:
        return {"__key__": key, "txt": _passage(rng, 80, 400)}
    return {"__key__": key, "npy": _npy(rng), "txt": "a short clip"}


def write_shards(directory: Path, samples: int, make: Callable, shards: int = 8) -> None:
    """``shards`` tars and their index.json (data_prep's format)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    entries = []
    for shard in range(shards):
        name = f"shard-{shard:06d}.tar"
        count = samples // shards
        with wds.TarWriter(str(directory / name)) as writer:
            for i in range(count):
                writer.write(make(rng, f"{shard:06d}-{i:06d}"))
        entries.append({"name": name, "samples": count, "bytes": (directory / name).stat().st_size})
    (directory / "index.json").write_text(json.dumps({"shards": entries}))


def model_config(kind: str) -> ModelConfig:
    """Text: the 201M language Perceiver's 2048 bytes. Multimodal: a demo-sized model of every modality."""
    if kind == "text-only":
        return ModelConfig(text=TextConfig(max_length=2048))
    return ModelConfig(
        num_classes=10,
        text=TextConfig(max_length=512),
        image=ImageConfig(size=[28, 28], channels=1, patch_size=4),
        audio=AudioConfig(num_samples=16000, patch_size=160),
        video=VideoConfig(frames=8, size=[32, 32], channels=3, tubelet=[2, 8, 8]),
    )


def plain_rate(urls: List[str], workers: int, batch_size: int) -> float:
    """Samples/s of plain webdataset over the tars (paths, or URLs it reads with its own curl): read, group, batch
    as lists in the workers (so both sides pay inter-process transfer per batch), no decoding."""
    dataset = wds.WebDataset(urls, shardshuffle=False, empty_check=False).batched(batch_size, collation_fn=None)
    start, count = time.perf_counter(), 0
    for batch in DataLoader(dataset, batch_size=None, num_workers=workers):
        count += len(batch)
    return count / (time.perf_counter() - start)


def _copy(tree: object) -> None:
    if isinstance(tree, dict):
        for value in tree.values():
            _copy(value)
    elif isinstance(tree, torch.Tensor):
        tree.clone()


def stream_rate(spec: Path | str, kind: str, workers: int, batch_size: int, read: bool = False) -> float:
    """Samples/s of one epoch of the full stream over every sample once (its shuffle buffer included); ``spec``: a
    shard directory, or any other ``data.train_shards`` entry; ``read``: each batch's tensors copied."""
    cfg = DataConfig(train_shards=[str(spec)], batch_size=batch_size, num_workers=workers,
                     pixel_mean=[0.5], pixel_std=[0.5])
    share_cores(workers, 1)  # as a trainer's process on CPU
    stream = DataStream(cfg, model_config(kind))
    start, count = time.perf_counter(), 0
    for batch in stream:
        count += len(batch["keys"])
        if read:
            _copy(batch)
    return count / (time.perf_counter() - start)


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", type=Path, help="text-only shard directory (default: generate)")
    parser.add_argument("--multimodal", type=Path, help="multimodal shard directory (default: generate)")
    parser.add_argument("--samples", type=int, default=20000, help="samples per generated dataset")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=2, help="runs per cell; the best is reported")
    parser.add_argument("--read", action="store_true", help="copy every tensor of each batch, as a trainer does")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        dirs: Dict[str, Path] = {}
        for kind, given, make, samples in (("text-only", args.text, text_sample, args.samples),
                                           ("multimodal", args.multimodal, multimodal_sample, args.samples // 4)):
            dirs[kind] = given or Path(tmp) / kind
            if given is None:
                write_shards(dirs[kind], samples, make)
        rows = []
        print(f"{'shards':<11} {'workers':>7} {'plain/s':>9} {'stream/s':>9} {'ratio':>6} {'target':>7}")
        for kind, directory in dirs.items():
            for workers in args.workers:
                urls = sorted(str(p) for p in directory.glob("*.tar"))
                plain = max(plain_rate(urls, workers, args.batch_size) for _ in range(args.repeat))
                ours = max(stream_rate(directory, kind, workers, args.batch_size, args.read)
                           for _ in range(args.repeat))
                rows.append({"shards": kind, "workers": workers, "plain": plain, "stream": ours,
                             "ratio": ours / plain, "target": TARGETS[kind]})
                print(f"{kind:<11} {workers:>7} {plain:>9.0f} {ours:>9.0f} {ours / plain:>6.2f} {TARGETS[kind]:>7}",
                      flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
