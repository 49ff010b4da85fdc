"""Generic arrays [B, length, channels] given to the model directly (not streamed from shards): one patch per
element, 1-D Fourier positions."""

from __future__ import annotations

import torch

from ..config import ArrayConfig
from .patched import PatchModality


class Array(PatchModality):
    name = "array"
    shape_keys = ("d_model", "array.channels", "array.fourier_bands")

    def raw_shape(self, cfg: ArrayConfig) -> tuple:
        return (None, cfg.length, cfg.channels)

    @staticmethod
    def channels_first(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)  # [B, length, channels]


ARRAY = Array()
