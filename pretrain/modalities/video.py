"""Video (``npy`` (T, H, W, C) uint8 or ``mp4``, decoded with PyAV: ``pip install av``): ``model.video.frames``
frames evenly picked, each resized like an image, cut into space-time tubelets with 3-D Fourier positions."""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any, Mapping, Optional, Tuple

import numpy as np
import torch

from ..config import VideoConfig
from ..shard_format import Rejected
from .base import Builder, Rngs, Rows, load_npy, npy_bytes
from .patched import PixelModality
from .transforms import video_frames


def decode_npy_video(data: bytes) -> np.ndarray:
    """A (T, H, W, C) or (T, H, W) uint8 array -> (T, H, W, C) uint8."""
    video = load_npy(data, "npy")
    if video.ndim == 3:
        video = video[..., None]
    if video.ndim != 4 or video.dtype != np.uint8 or 0 in video.shape:
        raise ValueError(f"expected a non-empty (T, H, W, C) uint8 array, got {video.dtype} {list(video.shape)}")
    return video


VIDEO_CHANNELS = (1, 3)


def check_video_array(array: np.ndarray, field: str = "video") -> np.ndarray:
    """``array`` if it is a (T, H, W, C) uint8 video with C in (1, 3) and no empty axis."""
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[3] not in VIDEO_CHANNELS or 0 in array.shape:
        raise Rejected(field, f"video must be a (T, H, W, C) uint8 array with C in {VIDEO_CHANNELS}, "
                              f"got {array.dtype} {array.shape}")
    return array


def read_npy_video(data: bytes, field: str = "video") -> np.ndarray:
    """The (T, H, W, C) uint8 video in ``.npy`` bytes."""
    return check_video_array(load_npy(data, field), field)


def encode_npy(array: np.ndarray) -> bytes:
    """``.npy`` bytes of a checked video array."""
    return npy_bytes(check_video_array(array))


def mp4_frames(data: bytes, side: Optional[int] = None, field: str = "video") -> Iterator[np.ndarray]:
    """RGB frames of an mp4, one at a time (memory holds one frame); ``side``: resize the short side, centre-crop."""
    try:
        import av
    except ImportError:
        raise Rejected(field, "checking mp4 needs PyAV: pip install av") from None
    count = 0
    try:
        with av.open(io.BytesIO(data)) as container:
            container_format = container.format.name
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            size = {} if side is None else _scaled(stream.codec_context.width, stream.codec_context.height, side)
            for frame in container.decode(stream):
                count += 1
                yield _centre_crop(frame.to_ndarray(format="rgb24", **size), side)
    except Exception as e:  # PyAV/FFmpeg errors for damaged containers and streams, IndexError for no video stream
        raise Rejected(field, f"cannot decode mp4 ({type(e).__name__}: {e})") from None
    if "mp4" not in container_format.split(","):
        raise Rejected(field, f"not an mp4 file: it holds {container_format} data")
    if count == 0:
        raise Rejected(field, "mp4 has no video frames")


def _scaled(width: int, height: int, side: int) -> dict[str, int]:
    scale = side / min(width, height)
    return {"width": max(side, round(width * scale)), "height": max(side, round(height * scale))}


def _centre_crop(frame: np.ndarray, side: Optional[int]) -> np.ndarray:
    if side is None:
        return frame
    top, left = (frame.shape[0] - side) // 2, (frame.shape[1] - side) // 2
    return frame[top:top + side, left:left + side]


def check_video(data: bytes, field: str) -> None:
    """A stored ``mp4`` or ``npy`` field decoded in full."""
    if field == "mp4":
        for _ in mp4_frames(data, field=field):
            pass
    else:
        read_npy_video(data, field)


class Video(PixelModality):
    name = "video"
    shape_keys = ("d_model", "video.channels", "video.tubelet", "video.fourier_bands")
    source_suffixes = (".npy", ".mp4")

    def decode(self, field: str, data: bytes) -> np.ndarray:
        return np.stack(list(mp4_frames(data, field=field))) if field == "mp4" else decode_npy_video(data)

    def prepare(self, video: np.ndarray, builder: Builder, rng: np.random.Generator) -> np.ndarray:
        cfg = builder.model.video
        frames, height, width, channels = video.shape
        builder.note("video", f"{frames} frames, {channels}-channel {height}x{width}",
                     f"{cfg.frames} frames, {cfg.channels}-channel {cfg.size[0]}x{cfg.size[1]}", "model.video")
        return video_frames(video, cfg.frames, cfg.size, cfg.channels)

    def stack(self, rows: Rows, rngs: Rngs, batch: dict, builder: Builder) -> None:
        cfg = builder.model.video
        pixels = self.pixels(rows, (cfg.frames, *cfg.size, cfg.channels), builder)
        batch["inputs"]["video"] = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 1, 4, 2, 3)))
        self.mask_patches(batch, self.whole(rows, builder.model), rngs, builder)

    def store(self, data: bytes, source: str, options: Mapping[str, Any]) -> Tuple[str, bytes]:
        """``.npy`` (T, H, W, C uint8) and ``.mp4`` files as they are, after a full decode."""
        field = source.rsplit(".", 1)[-1].lower()
        if field not in self.fields:
            raise Rejected("video", f"unsupported video file {source!r}; use .npy (T, H, W, C uint8) or .mp4")
        try:
            check_video(data, field)
        except Rejected as e:
            raise Rejected("video", e.reason) from None
        return field, data

    def check(self, field: str, data: bytes) -> None:
        check_video(data, field)

    def raw_shape(self, cfg: VideoConfig) -> tuple:
        return (None, cfg.frames, cfg.channels, *cfg.size)

    @staticmethod
    def channels_first(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)  # [B, T, C, H, W]


VIDEO = Video()
