"""Audio (``flac``/``wav``; ``data_prep`` stores any format libsndfile reads as FLAC at its ``--audio-rate``): mono,
resampled to ``data.audio_sample_rate``, cropped or zero-padded to ``model.audio.num_samples`` (patches wholly in the
padding masked out), cut into patches with 1-D Fourier positions."""

from __future__ import annotations

import io
import math
from typing import Any, Mapping, Tuple

import numpy as np
import soundfile
import torch

from ..config import AudioConfig
from ..shard_format import Rejected
from .base import Builder, Rngs, Rows, sequences
from .patched import PatchModality
from .transforms import crop_or_pad, resample

AUDIO_FORMATS = {"flac": "FLAC", "wav": "WAV"}


def read_audio(data: bytes, field: str = "audio") -> tuple[np.ndarray, int]:
    """``(samples [frames, channels] float32, rate)`` of any format libsndfile reads; an empty clip is rejected."""
    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile errors, and struct/format errors from odd headers
        raise Rejected(field, f"cannot decode audio ({type(e).__name__}: {e})") from None
    if samples.shape[0] == 0:
        raise Rejected(field, "audio has no frames")
    return samples, rate


def band_limited_resample(samples: np.ndarray, rate: int, new_rate: int) -> np.ndarray:
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
    soundfile.write(buffer, np.clip(samples, -1.0, 1.0), rate, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def audio_field(data: bytes, rate: int, field: str = "audio") -> bytes:
    """FLAC bytes at ``rate`` from audio in any format libsndfile reads, so every shard has one audio format."""
    samples, source_rate = read_audio(data, field)
    return encode_flac(band_limited_resample(samples, source_rate, rate), rate)


def check_audio(data: bytes, ext: str) -> None:
    read_audio(data, ext)
    found = soundfile.info(io.BytesIO(data)).format
    if found != AUDIO_FORMATS[ext]:
        raise Rejected(ext, f"a .{ext} member holds {found} data")


class Audio(PatchModality):
    name = "audio"
    shape_keys = ("d_model", "audio.patch_size", "audio.fourier_bands")
    source_suffixes = (".flac", ".wav", ".ogg", ".mp3", ".aiff", ".aif")

    def decode(self, field: str, data: bytes) -> Tuple[np.ndarray, int]:
        """FLAC/WAV -> (mono float32 waveform, sample rate)."""
        wave, rate = read_audio(data, field)
        return wave.mean(axis=1) if wave.shape[1] > 1 else wave[:, 0], rate

    def prepare(self, decoded: tuple, builder: Builder, rng: np.random.Generator) -> tuple:
        rate = builder.data.audio_sample_rate
        builder.note("audio", f"{decoded[1]} Hz", f"{rate} Hz", "data.audio_sample_rate")
        return crop_or_pad(resample(decoded[0], decoded[1], rate), builder.model.audio.num_samples,
                           builder.random_crop, rng)

    def stack(self, rows: Rows, rngs: Rngs, batch: dict, builder: Builder) -> None:
        cfg = builder.model.audio
        wave, lengths = sequences(rows, self.name, (cfg.num_samples,), np.float32)
        batch["inputs"]["audio"] = torch.from_numpy(wave)
        valid = np.arange(cfg.num_patches) * cfg.patch_size < lengths[:, None]
        self.mask_patches(batch, valid, rngs, builder)

    def store(self, data: bytes, source: str, options: Mapping[str, Any]) -> Tuple[str, bytes]:
        """FLAC at ``data_prep shard --audio-rate``, whatever the source's format and rate."""
        return "flac", audio_field(data, options["audio_rate"])

    def check(self, field: str, data: bytes) -> None:
        check_audio(data, field)

    def raw_shape(self, cfg: AudioConfig) -> tuple:
        return (None, cfg.num_samples)

    @staticmethod
    def channels_first(x: torch.Tensor) -> torch.Tensor:
        return x[:, None]  # [B, samples]


AUDIO = Audio()
