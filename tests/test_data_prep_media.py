"""Decode checks and encoders of data_prep.media, on real media made here; the makers are shared by the other
test_data_prep_* files."""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from data_prep.media import check_field
from pretrain.modalities.audio import audio_field, band_limited_resample
from pretrain.modalities.image import image_field
from pretrain.modalities.video import encode_npy, mp4_frames, read_npy_video
from pretrain.shard_format import FIELD_MODALITY, Rejected

HAS_AV = importlib.util.find_spec("av") is not None


def image_bytes(seed: int = 0, fmt: str = "PNG", size: int = 8) -> bytes:
    """A random RGB image in ``fmt``."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def audio_bytes(rate: int = 8000, seconds: float = 0.05, fmt: str = "FLAC", channels: int = 1,
                hz: float = 440.0) -> bytes:
    """A sine tone in ``fmt`` (FLAC or WAV)."""
    t = np.arange(int(rate * seconds)) / rate
    tone = 0.5 * np.sin(2 * np.pi * hz * t)
    buffer = io.BytesIO()
    sf.write(buffer, np.stack([tone] * channels, axis=1), rate, format=fmt, subtype="PCM_16")
    return buffer.getvalue()


def video_array(seed: int = 0, frames: int = 4, size: int = 8) -> np.ndarray:
    """A random (T, H, W, 3) uint8 video."""
    return np.random.default_rng(seed).integers(0, 256, (frames, size, size, 3), dtype=np.uint8)


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def mp4_bytes(frames: int = 6, width: int = 32, height: int = 24) -> bytes:
    """A real mp4 (MPEG-4 part 2) of moving gradients, made with PyAV."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            pixels = np.full((height, width, 3), 20 * i, dtype=np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    return buffer.getvalue()


def garbage(length: int = 200, seed: int = 1) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, length, dtype=np.uint8).tobytes()


def write_manifest(path: Path, rows: list) -> Path:
    """A JSONL manifest, gzipped when its name ends in ``.gz``; a ``str`` row is written as it is (for broken lines)."""
    data = "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows).encode("utf-8")
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def good_media(directory: Path) -> list[dict]:
    """Files of every modality in ``directory`` and manifest rows that use them (8 samples, all valid)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "a.png").write_bytes(image_bytes(1))
    (directory / "b.jpg").write_bytes(image_bytes(2, "JPEG"))
    (directory / "c.bmp").write_bytes(image_bytes(3, "BMP"))
    (directory / "d.wav").write_bytes(audio_bytes(fmt="WAV", rate=11025))
    (directory / "e.flac").write_bytes(audio_bytes(hz=220.0))
    np.save(directory / "f.npy", video_array(4))
    return [
        {"key": "png_cap", "image": "media/a.png", "text": "a photo of noise", "label": 3},
        {"image": "media/b.jpg", "meta": {"source": "test", "n": 2}},
        {"image": "media/c.bmp", "label": 0},
        {"audio": "media/d.wav", "text": "a tone"},
        {"audio": "media/e.flac"},
        {"video": "media/f.npy", "text": "moving noise"},
        {"text": "just text, ünïcode"},
        {"label": 7, "meta": {"only": "label"}},
    ]


def test_resample_keeps_the_pitch_and_the_duration():
    tone = np.sin(2 * np.pi * 440 * np.arange(44100) / 44100).astype(np.float32)[:, None]
    out = band_limited_resample(tone, 44100, 16000)
    assert out.shape == (16000, 1)
    spectrum = np.abs(np.fft.rfft(out[:, 0]))
    assert np.argmax(spectrum) * 16000 / len(out) == pytest.approx(440, abs=1)
    assert band_limited_resample(tone[:1001], 44100, 16000).shape == (363, 1)  # round(1001 * 16000 / 44100)


def test_audio_becomes_flac_at_the_requested_rate_with_its_channels():
    data, rate = sf.read(io.BytesIO(audio_field(audio_bytes(rate=22050, fmt="WAV", channels=2), 16000)),
                         always_2d=True)
    assert (rate, data.shape) == (16000, (800, 2))
    assert sf.info(io.BytesIO(audio_field(audio_bytes(), 16000))).format == "FLAC"


def test_png_and_jpeg_are_kept_other_formats_become_png():
    png, jpg = image_bytes(1), image_bytes(2, "JPEG")
    assert image_field(png) == ("png", png)
    assert image_field(jpg) == ("jpg", jpg)
    ext, data = image_field(image_bytes(3, "BMP"))
    assert ext == "png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))),
                          np.asarray(Image.open(io.BytesIO(image_bytes(3, "BMP")))))


def test_truncated_media_is_rejected_with_the_field_name():
    with pytest.raises(Rejected, match="cannot decode image") as e:
        image_field(image_bytes(size=64)[:-200])
    assert e.value.field == "image"
    with pytest.raises(Rejected, match="cannot decode audio"):
        audio_field(garbage(), 16000, field="audio")


def test_video_arrays_must_be_thwc_uint8():
    video = video_array()
    assert np.array_equal(read_npy_video(encode_npy(video)), video)
    for bad in (video.astype(np.float32), video[0], video[..., :2]):
        with pytest.raises(Rejected, match=r"\(T, H, W, C\) uint8"):
            read_npy_video(npy_bytes(bad))


def test_every_schema_field_has_a_decode_check():
    for ext in FIELD_MODALITY:
        with pytest.raises(Rejected) as e:
            check_field(ext, b"\xff\xfe" + garbage(50))
        assert e.value.field == ext and "unknown field" not in e.value.reason
    with pytest.raises(Rejected, match="unknown field"):
        check_field("bmp", image_bytes(fmt="BMP"))
    with pytest.raises(Rejected, match="holds JPEG"):
        check_field("png", image_bytes(fmt="JPEG"))
    for ext, data in (("png", image_bytes()), ("jpeg", image_bytes(fmt="JPEG")), ("flac", audio_bytes()),
                      ("wav", audio_bytes(fmt="WAV")),
                      ("npy", npy_bytes(video_array())), ("cls", b"12"), ("json", b'{"a": 1}'), ("txt", b"ok")):
        check_field(ext, data)


@pytest.mark.skipif(not HAS_AV, reason="PyAV not installed (scripts/install_demo_sources.sh installs it)")
def test_mp4_frames_decode_resize_and_crop():
    frames = np.stack(list(mp4_frames(mp4_bytes(), side=16)))
    assert frames.shape == (6, 16, 16, 3) and frames.dtype == np.uint8
    assert frames[5].mean() > frames[0].mean() + 50  # the frames brighten as they were written
    with pytest.raises(Rejected, match="cannot decode mp4"):
        list(mp4_frames(mp4_bytes()[:300]))
