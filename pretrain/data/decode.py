"""Bytes of one webdataset key -> a native array or image. Every failure is a :class:`DecodeError` naming the key, so
the batch builder can skip the sample and count it by reason instead of crashing the run."""

from __future__ import annotations

import io
from typing import Callable, Dict, Tuple

import numpy as np
import soundfile
from PIL import Image


class DecodeError(ValueError):
    """Undecodable media; ``key`` is the webdataset key (``png``, ``flac``, ...) that failed."""

    def __init__(self, key: str, reason: object):
        super().__init__(f".{key}: {reason}")
        self.key = key


def decode_text(data: bytes) -> np.ndarray:
    """UTF-8 text -> its bytes as uint8 (the stream's ids are bytes + ``vocab.NUM_SPECIAL``); invalid UTF-8 and
    empty text are errors, since they are broken samples rather than text."""
    data.decode("utf-8")
    if not data:
        raise ValueError("empty text")
    return np.frombuffer(data, dtype=np.uint8)


def decode_image(data: bytes) -> Image.Image:
    """PNG/JPEG -> a PIL image, fully loaded so truncated files fail here and not later."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def decode_audio(data: bytes) -> Tuple[np.ndarray, int]:
    """FLAC/WAV -> (mono float32 waveform, sample rate)."""
    wave, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    if wave.shape[0] == 0:
        raise ValueError("no audio frames")
    return wave.mean(axis=1) if wave.shape[1] > 1 else wave[:, 0], rate


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


def decode_label(data: bytes) -> int:
    return int(data.decode("ascii").strip())


DECODERS: Dict[str, Callable[[bytes], object]] = {
    "txt": decode_text,
    "png": decode_image,
    "jpg": decode_image,
    "jpeg": decode_image,
    "flac": decode_audio,
    "wav": decode_audio,
    "npy": decode_npy_video,
    "mp4": decode_mp4_video,
    "cls": decode_label,
}


def decode(key: str, data: bytes) -> object:
    """Decode ``data`` stored under ``key``, turning any library's failure into a :class:`DecodeError`."""
    try:
        return DECODERS[key](data)
    except Exception as exc:  # PIL, soundfile, numpy and codecs raise many types; all mean "undecodable"
        raise DecodeError(key, exc) from exc
