"""Video (``npy`` (T, H, W, C) uint8 or ``mp4``): ``model.video.frames`` frames evenly picked, each resized like an
image, cut into space-time tubelets with 3-D Fourier positions."""

from __future__ import annotations

import io

import numpy as np
import torch

from ..config import VideoConfig
from .base import Rngs, Rows
from .patched import PixelModality
from .transforms import video_frames


def decode_npy_video(data: bytes) -> np.ndarray:
    """A (T, H, W, C) or (T, H, W) uint8 array -> (T, H, W, C) uint8."""
    video = np.load(io.BytesIO(data), allow_pickle=False)
    if video.ndim == 3:
        video = video[..., None]
    if video.ndim != 4 or video.dtype != np.uint8 or 0 in video.shape:
        raise ValueError(f"expected a non-empty (T, H, W, C) uint8 array, got {video.dtype} {list(video.shape)}")
    return video


def decode_mp4_video(data: bytes) -> np.ndarray:
    """An mp4 clip -> (T, H, W, 3) uint8 frames, with PyAV (optional: ``pip install av``)."""
    try:
        import av
    except ImportError as exc:
        raise ValueError("mp4 video needs PyAV: pip install av (or store clips as npy)") from exc
    with av.open(io.BytesIO(data)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    if not frames:
        raise ValueError("no video frames")
    return np.stack(frames)


class Video(PixelModality):
    name = "video"
    shape_keys = ("d_model", "video.channels", "video.tubelet", "video.fourier_bands")

    def decode(self, field: str, data: bytes) -> np.ndarray:
        return decode_mp4_video(data) if field == "mp4" else decode_npy_video(data)

    def prepare(self, video: np.ndarray, builder, rng: np.random.Generator) -> np.ndarray:
        cfg = builder.model.video
        frames, height, width, channels = video.shape
        builder.note("video", f"{frames} frames, {channels}-channel {height}x{width}",
                     f"{cfg.frames} frames, {cfg.channels}-channel {cfg.size[0]}x{cfg.size[1]}", "model.video")
        return video_frames(video, cfg.frames, cfg.size, cfg.channels)

    def stack(self, rows: Rows, rngs: Rngs, batch: dict, builder) -> None:
        cfg = builder.model.video
        pixels = self.pixels(rows, (cfg.frames, *cfg.size, cfg.channels), builder)
        batch["inputs"]["video"] = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 1, 4, 2, 3)))
        self.mask_patches(batch, self.whole(rows, builder.model), rngs, builder)

    def raw_shape(self, cfg: VideoConfig) -> tuple:
        return (None, cfg.frames, cfg.channels, *cfg.size)

    @staticmethod
    def channels_first(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)  # [B, T, C, H, W]


VIDEO = Video()
