"""A small numeric-series corpus, generated (nothing to download): three-axis accelerometer recordings of four
activities, the demo source of the series modality (``configs/series.yaml``)::

    python -m data_prep.series_demo --out data/series_raw
    python -m data_prep shard --input-dir data/series_raw --label-from-folder --val-fraction 0.1 --out data/series

A folder per activity (the label, sorted: falling 0, resting 1, running 2, walking 3), a sample per file stem: a
recording of 96-256 steps at 50 Hz with 3 channels (x, y, z) in g, as ``.series.npy`` (every fourth as ``.csv`` with
an ``x,y,z`` header, to show both), a caption (``.txt``: where the sensor was worn and for how long, not the activity)
and a 16x16 picture of the recording's spectrogram (``.png``): series, text and image in one sample. The activities:
resting (noise around gravity), walking (a 1.5-2.5 Hz gait), running (2.5-3.5 Hz and stronger), falling (a jolt, then
lying still on the side). The same seed gives the same files.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from pretrain.modalities.image import encode_png

RATE_HZ = 50
STEPS = (96, 256)
SPECTROGRAM_SIDE = 16
PLACES = ("wrist", "hip", "ankle", "pocket")


def _gravity(rng: np.random.Generator) -> np.ndarray:
    """Gravity seen by a sensor tilted at random by up to ~20 degrees."""
    tilt = rng.normal(0.0, 0.2, 3) + np.array([0.0, 0.0, 1.0])
    return tilt / np.linalg.norm(tilt)


def _gait(t: np.ndarray, rng: np.random.Generator, hz: tuple, amplitude: tuple) -> np.ndarray:
    """A periodic gait: a step frequency, its second harmonic, a phase per axis."""
    f, a = rng.uniform(*hz), rng.uniform(*amplitude)
    phase = rng.uniform(0, 2 * np.pi, 3)
    axes = np.array([0.6, 0.4, 1.0]) * a
    wave = np.sin(2 * np.pi * f * t[:, None] + phase) + 0.3 * np.sin(4 * np.pi * f * t[:, None] + 2 * phase)
    return wave * axes


def recording(activity: str, rng: np.random.Generator) -> np.ndarray:
    """One [T, 3] float32 recording of ``activity``."""
    steps = int(rng.integers(STEPS[0], STEPS[1] + 1))
    t = np.arange(steps) / RATE_HZ
    base = np.tile(_gravity(rng), (steps, 1))
    if activity == "walking":
        base += _gait(t, rng, (1.5, 2.5), (0.2, 0.4))
    elif activity == "running":
        base += _gait(t, rng, (2.5, 3.5), (0.6, 1.0))
    elif activity == "falling":
        at = int(rng.integers(steps // 4, steps // 2))
        jolt = rng.uniform(2.0, 3.0) * rng.normal(0, 1, 3)
        base[at:at + 5] += jolt
        base[at + 5:] = _gravity(rng)[[2, 0, 1]]  # lying on the side: gravity along another axis
    return (base + rng.normal(0, rng.uniform(0.02, 0.05), (steps, 3))).astype(np.float32)


def spectrogram_image(values: np.ndarray) -> np.ndarray:
    """A 16x16 uint8 picture of the magnitude's spectrogram: 16 evenly spaced windows of 32 steps, 16 bins each."""
    magnitude = np.linalg.norm(values, axis=1)
    magnitude = magnitude - magnitude.mean()
    starts = np.linspace(0, len(magnitude) - 32, SPECTROGRAM_SIDE).round().astype(int)
    frames = np.stack([np.abs(np.fft.rfft(magnitude[s:s + 32] * np.hanning(32)))[1:SPECTROGRAM_SIDE + 1]
                       for s in starts])
    power = np.log1p(frames.T[::-1])  # low frequencies at the bottom, time to the right
    return (255 * power / max(power.max(), 1e-6)).astype(np.uint8)


def write_corpus(out: Path, per_activity: int, seed: int) -> int:
    """``per_activity`` samples of each activity under ``out/<activity>/``; returns the number written."""
    rng = np.random.default_rng(seed)
    for activity in ("falling", "resting", "running", "walking"):
        folder = out / activity
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_activity):
            values = recording(activity, rng)
            stem = folder / f"{i:05d}"
            if i % 4 == 3:
                lines = ["x,y,z", *(",".join(f"{v:.5f}" for v in row) for row in values)]
                (folder / f"{i:05d}.csv").write_text("\n".join(lines) + "\n")
            else:
                np.save(stem.with_suffix(".series.npy"), values, allow_pickle=False)
            place = PLACES[int(rng.integers(len(PLACES)))]
            stem.with_suffix(".txt").write_text(f"a three-axis accelerometer worn at the {place}, "
                                                f"{len(values) / RATE_HZ:.1f} seconds at {RATE_HZ} Hz")
            stem.with_suffix(".png").write_bytes(encode_png(spectrogram_image(values)))
    return 4 * per_activity


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.series_demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the folder to write (a folder per activity)")
    parser.add_argument("--per-activity", type=int, default=200, help="samples of each of the 4 activities")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    written = write_corpus(args.out, args.per_activity, args.seed)
    print(f"{written} recordings in {args.out}; next: python -m data_prep shard --input-dir {args.out} "
          f"--label-from-folder --val-fraction 0.1 --out data/series")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
