"""Audio (``flac``/``wav``): mono, resampled to ``data.audio_sample_rate``, cropped or zero-padded to
``model.audio.num_samples`` (patches wholly in the padding masked out), cut into patches with 1-D Fourier
positions."""

from __future__ import annotations

import io
from typing import Tuple

import numpy as np
import soundfile
import torch

from ..config import AudioConfig
from .base import Rngs, Rows, sequences
from .patched import PatchModality
from .transforms import crop_or_pad, resample


class Audio(PatchModality):
    name = "audio"
    shape_keys = ("d_model", "audio.patch_size", "audio.fourier_bands")

    def decode(self, field: str, data: bytes) -> Tuple[np.ndarray, int]:
        """FLAC/WAV -> (mono float32 waveform, sample rate)."""
        wave, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
        if wave.shape[0] == 0:
            raise ValueError("no audio frames")
        return wave.mean(axis=1) if wave.shape[1] > 1 else wave[:, 0], rate

    def prepare(self, decoded: tuple, builder, rng: np.random.Generator) -> tuple:
        rate = builder.data.audio_sample_rate
        builder.note("audio", f"{decoded[1]} Hz", f"{rate} Hz", "data.audio_sample_rate")
        return crop_or_pad(resample(decoded[0], decoded[1], rate), builder.model.audio.num_samples,
                           builder.random_crop, rng)

    def stack(self, rows: Rows, rngs: Rngs, batch: dict, builder) -> None:
        cfg = builder.model.audio
        wave, lengths = sequences(rows, self.name, (cfg.num_samples,), np.float32)
        batch["inputs"]["audio"] = torch.from_numpy(wave)
        valid = np.arange(cfg.num_patches) * cfg.patch_size < lengths[:, None]
        self.mask_patches(batch, valid, rngs, builder)

    def raw_shape(self, cfg: AudioConfig) -> tuple:
        return (None, cfg.num_samples)

    @staticmethod
    def channels_first(x: torch.Tensor) -> torch.Tensor:
        return x[:, None]  # [B, samples]


AUDIO = Audio()
