"""Decode checks and encoders for every sample field.

Media are trusted only after a full decode: a file that merely has the right name would crash or stall training later.
Every decoder failure becomes :class:`~data_prep.schema.Rejected`, so bad data is skipped and reported, never fatal.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Iterator

import numpy as np
import soundfile as sf
from PIL import Image

from data_prep.schema import Rejected
from pretrain.shard_format import FIELD_MODALITY

IMAGE_FORMATS = {"PNG": "png", "JPEG": "jpg"}  # stored as they are; anything else PIL reads becomes PNG
PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I;16"}  # other modes are converted to RGB first
AUDIO_FORMATS = {"flac": "FLAC", "wav": "WAV"}
VIDEO_CHANNELS = (1, 3)


def decode_image(data: bytes, field: str = "image") -> Image.Image:
    """The fully decoded image (``load()`` reads every pixel, so truncated files fail here, not in training)."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as e:  # PIL raises many types for bad bytes (OSError, SyntaxError, ValueError, bomb errors)
        raise Rejected(field, f"cannot decode image ({type(e).__name__}: {e})") from None
    return image


def image_field(data: bytes, field: str = "image") -> tuple[str, bytes]:
    """``(extension, bytes)`` to store: PNG and JPEG bytes unchanged after a decode check, other formats as PNG."""
    image = decode_image(data, field)
    if image.format in IMAGE_FORMATS:
        return IMAGE_FORMATS[image.format], data
    try:
        return "png", encode_png(image if image.mode in PNG_MODES else image.convert("RGB"))
    except (OSError, ValueError) as e:
        raise Rejected(field, f"cannot store a {image.format} image of mode {image.mode} as PNG ({e})") from None


def encode_png(image: Image.Image | np.ndarray) -> bytes:
    """PNG bytes of a PIL image or a uint8 array (H, W) or (H, W, C); PNG is lossless and byte-for-byte reproducible."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decode_audio(data: bytes, field: str = "audio") -> tuple[np.ndarray, int]:
    """``(samples [frames, channels] float32, rate)`` of any format libsndfile reads; an empty clip is rejected."""
    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile errors, and struct/format errors from odd headers
        raise Rejected(field, f"cannot decode audio ({type(e).__name__}: {e})") from None
    if samples.shape[0] == 0:
        raise Rejected(field, "audio has no frames")
    return samples, rate


def resample(samples: np.ndarray, rate: int, new_rate: int) -> np.ndarray:
    """Band-limited resampling along axis 0 by truncating or zero-padding the spectrum (no scipy needed).

    The input is zero-padded to ``rate / gcd * 2**k`` frames, so both FFT lengths have small factors (a length with a
    large prime factor is many times slower) and the output length is exact; the padding is cut off again.
    """
    if rate == new_rate:
        return samples
    frames = samples.shape[0]
    step_in, step_out = rate // math.gcd(rate, new_rate), new_rate // math.gcd(rate, new_rate)
    blocks = 1 << max(0, math.ceil(math.log2(frames / step_in)))
    spectrum = np.fft.rfft(samples, n=step_in * blocks, axis=0)
    kept = np.zeros((step_out * blocks // 2 + 1,) + samples.shape[1:], dtype=spectrum.dtype)
    n = min(kept.shape[0], spectrum.shape[0])
    kept[:n] = spectrum[:n]
    resampled = np.fft.irfft(kept, n=step_out * blocks, axis=0) * (step_out / step_in)
    return resampled[:max(1, round(frames * new_rate / rate))].astype(np.float32)


def encode_flac(samples: np.ndarray, rate: int) -> bytes:
    """16-bit FLAC of float samples in [-1, 1] (clipped first: libsndfile would wrap overshoots around)."""
    buffer = io.BytesIO()
    sf.write(buffer, np.clip(samples, -1.0, 1.0), rate, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def audio_field(data: bytes, rate: int, field: str = "audio") -> bytes:
    """FLAC bytes at ``rate`` from audio in any format libsndfile reads, so every shard has one audio format."""
    samples, source_rate = decode_audio(data, field)
    return encode_flac(resample(samples, source_rate, rate), rate)


def check_video_array(array: np.ndarray, field: str = "video") -> np.ndarray:
    """``array`` if it is a (T, H, W, C) uint8 video with C in (1, 3) and no empty axis."""
    if array.dtype != np.uint8 or array.ndim != 4 or array.shape[3] not in VIDEO_CHANNELS or 0 in array.shape:
        raise Rejected(field, f"video must be a (T, H, W, C) uint8 array with C in {VIDEO_CHANNELS}, "
                              f"got {array.dtype} {array.shape}")
    return array


def decode_npy(data: bytes, field: str = "video") -> np.ndarray:
    """The (T, H, W, C) uint8 video in ``.npy`` bytes; pickled objects are refused (they could run code)."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # numpy raises ValueError/EOFError/OSError for bad or truncated files
        raise Rejected(field, f"cannot read .npy ({type(e).__name__}: {e})") from None
    return check_video_array(array, field)


def encode_npy(array: np.ndarray) -> bytes:
    """``.npy`` bytes of a checked video array (C order, so the bytes depend only on the values)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(check_video_array(array)), allow_pickle=False)
    return buffer.getvalue()


def mp4_frames(data: bytes, side: int | None = None, field: str = "video") -> Iterator[np.ndarray]:
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


def _centre_crop(frame: np.ndarray, side: int | None) -> np.ndarray:
    if side is None:
        return frame
    top, left = (frame.shape[0] - side) // 2, (frame.shape[1] - side) // 2
    return frame[top:top + side, left:left + side]


def encode_label(label: int) -> bytes:
    """A ``cls`` field: the integer in ASCII, as webdataset's decoders expect."""
    return str(label).encode("ascii")


def encode_json(meta: dict) -> bytes:
    """A ``json`` field with sorted keys, so equal metadata gives equal bytes."""
    return json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")


def _check_text(data: bytes) -> None:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Rejected("txt", f"text is not UTF-8 ({e})") from None


def _check_image(data: bytes, ext: str) -> None:
    found = decode_image(data, ext).format
    if IMAGE_FORMATS.get(found) != ("jpg" if ext == "jpeg" else ext):  # .jpeg: written by other tools, read too
        raise Rejected(ext, f"a .{ext} member holds {found} data")


def _check_audio(data: bytes, ext: str) -> None:
    decode_audio(data, ext)
    found = sf.info(io.BytesIO(data)).format
    if found != AUDIO_FORMATS[ext]:
        raise Rejected(ext, f"a .{ext} member holds {found} data")


def _check_mp4(data: bytes) -> None:
    for _ in mp4_frames(data, field="mp4"):
        pass


def _check_npy(data: bytes) -> None:
    decode_npy(data, "npy")


def _check_label(data: bytes) -> None:
    try:
        int(data.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise Rejected("cls", f"label must be an integer in ASCII, got {data[:20]!r}") from None


def _check_json(data: bytes) -> None:
    try:
        json.loads(data)
    except ValueError as e:
        raise Rejected("json", f"metadata is not valid JSON ({e})") from None


_CHECKS: dict[str, Callable[[bytes], None]] = {
    "txt": _check_text,
    "png": lambda data: _check_image(data, "png"),
    "jpg": lambda data: _check_image(data, "jpg"),
    "jpeg": lambda data: _check_image(data, "jpeg"),
    "flac": lambda data: _check_audio(data, "flac"),
    "wav": lambda data: _check_audio(data, "wav"),
    "npy": _check_npy,
    "mp4": _check_mp4,
    "cls": _check_label,
    "json": _check_json,
}


def check_field(ext: str, data: bytes) -> None:
    """Decode one stored field by its extension; raises :class:`Rejected` naming the field and what is wrong."""
    check = _CHECKS.get(ext)
    if check is None:
        raise Rejected(ext, f"unknown field '.{ext}'; the schema has {', '.join(FIELD_MODALITY)}")
    check(data)
