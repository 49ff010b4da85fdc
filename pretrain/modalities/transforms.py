"""Decoded media -> the fixed shapes of the model config (crop/pad, resize, resample, frame selection).

Pixels stay uint8 here; the batch builder normalises a whole batch at once, which is cheaper than per sample.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..config import PIXEL_CHANNELS

PIL_MODES = dict(zip(PIXEL_CHANNELS, ("L", "RGB", "RGBA")))


def crop_or_pad(
    values: np.ndarray, length: int, random_start: bool, rng: np.random.Generator
) -> Tuple[np.ndarray, int]:
    """A 1-D array cut to ``length`` (at a random offset or the start) or zero-padded; returns it and its valid
    length."""
    if len(values) > length:
        start = int(rng.integers(0, len(values) - length + 1)) if random_start else 0
        return values[start:start + length], length
    padded = np.zeros(length, dtype=values.dtype)
    padded[: len(values)] = values
    return padded, len(values)


def to_pixels(image: Image.Image, size: Sequence[int], channels: int) -> np.ndarray:
    """Any PIL image -> uint8 [H, W, C]: converted to the channel count, the shorter side resized to fit (bilinear,
    antialiased), then centre-cropped, so aspect ratios are kept."""
    height, width = size
    if image.format == "JPEG":
        image.draft(PIL_MODES[channels], (width, height))  # decode big JPEGs at a reduced scale: much faster
    if image.mode != PIL_MODES[channels]:
        image = image.convert(PIL_MODES[channels])
    if image.size != (width, height):
        scale = max(width / image.width, height / image.height)
        resized = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
        left, top = (resized[0] - width) // 2, (resized[1] - height) // 2
        image = image.resize(resized, Image.BILINEAR).crop((left, top, left + width, top + height))
    return np.asarray(image, dtype=np.uint8).reshape(height, width, channels)


def shift(pixels: np.ndarray, most: int, rng: np.random.Generator) -> np.ndarray:
    """[H, W, C] moved by up to ``most`` pixels down/up and right/left at random, its edge pixels filling in (the
    pad-and-crop of RandomCrop with edge padding); unchanged, and no random number drawn, when ``most`` is 0."""
    if most == 0:
        return pixels
    height, width = pixels.shape[:2]
    top, left = rng.integers(0, 2 * most + 1, size=2)
    padded = np.pad(pixels, ((most, most), (most, most), (0, 0)), mode="edge")
    return padded[top:top + height, left:left + width]


def resample(wave: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    """Linear resampling with an antialiasing filter when downsampling (torch's antialiased interpolation)."""
    if rate == target_rate:
        return wave
    length = max(1, round(len(wave) * target_rate / rate))
    x = torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))[None, None, None]
    return F.interpolate(x, size=(1, length), mode="bilinear", antialias=True, align_corners=False)[0, 0, 0].numpy()


def video_frames(video: np.ndarray, frames: int, size: Sequence[int], channels: int) -> np.ndarray:
    """(T, H, W, C) uint8 -> (frames, H', W', channels): ``frames`` frames evenly spaced over the clip (repeated when
    the clip is shorter), each resized like an image."""
    picks = np.linspace(0, len(video) - 1, frames).round().astype(int)
    return np.stack([to_pixels(Image.fromarray(_pil_frame(video[i])), size, channels) for i in picks])


def _pil_frame(frame: np.ndarray) -> np.ndarray:
    return frame[..., 0] if frame.shape[-1] == 1 else frame
