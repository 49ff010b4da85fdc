"""Images, audio, video and generic arrays: cut into patches on a regular grid, each patch's values concatenated with
the Fourier features of its grid position and projected to ``d_model``. Decoder queries are the projected Fourier
features of the positions to predict; the head reconstructs the patch values.

The four modalities differ only in how a raw tensor becomes ``[batch, patches, values]`` (``patchify``).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn

from ...config import ArrayConfig, AudioConfig, ImageConfig, VideoConfig
from ..position import grid_fourier_features
from .base import check_tensor, element_mask


def blocks_to_patches(x: torch.Tensor, block: Sequence[int]) -> torch.Tensor:
    """[B, C, *grid*block] -> [B, prod(grid), prod(block) * C], patches in row-major grid order, values (block..., C)."""
    batch, channels, *sizes = x.shape
    grid = [n // b for n, b in zip(sizes, block)]
    split = x.reshape(batch, channels, *[d for g, b in zip(grid, block) for d in (g, b)])
    nd = len(block)
    order = [0] + [2 + 2 * i for i in range(nd)] + [3 + 2 * i for i in range(nd)] + [1]
    return split.permute(order).reshape(batch, math.prod(grid), math.prod(block) * channels)


class PatchAdapter(nn.Module):
    """Shared machinery; subclasses give ``name``, the raw ``input_shape`` and ``to_blocks``."""

    name = ""

    def __init__(self, block: Sequence[int], sizes: Sequence[int], channels: int, fourier_bands: int, d_model: int):
        super().__init__()
        self.block = tuple(block)
        self.grid = [n // b for n, b in zip(sizes, block)]
        patch_values = math.prod(block) * channels
        self.register_buffer("fourier", grid_fourier_features(self.grid, fourier_bands), persistent=False)
        fourier_dim = self.fourier.shape[1]
        self.input_projection = nn.Linear(patch_values + fourier_dim, d_model)
        self.query_projection = nn.Linear(fourier_dim, d_model)
        self.output_projection = nn.Linear(d_model, patch_values)

    def input_shape(self) -> tuple:
        """The raw input's shape, None for the batch dimension."""
        raise NotImplementedError

    def to_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """The raw tensor as [B, C, *sizes] for :func:`blocks_to_patches`."""
        raise NotImplementedError

    def num_positions(self, _x: Optional[torch.Tensor] = None) -> int:
        return math.prod(self.grid)

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """Raw input -> [B, patches, values]: the encoder's input and the reconstruction target."""
        check_tensor(x, self.name, self.input_shape(), floating=True)
        return blocks_to_patches(self.to_blocks(x), self.block)

    def embed(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        patches = self.patchify(x)
        fourier = self.fourier.to(patches.dtype).expand(patches.shape[0], -1, -1)
        features = self.input_projection(torch.cat([patches, fourier], dim=-1))
        return features, element_mask(mask, self.name, patches.shape[0], patches.shape[1])

    def queries(self, positions: torch.Tensor) -> torch.Tensor:
        return self.query_projection(self.fourier[positions].to(self.query_projection.weight.dtype))

    def head(self, decoded: torch.Tensor) -> torch.Tensor:
        return self.output_projection(decoded)


class ImageAdapter(PatchAdapter):
    """Images [B, C, H, W] (float, normalised) -> square patches with 2-D Fourier features."""

    name = "image"

    def __init__(self, cfg: ImageConfig, d_model: int):
        super().__init__([cfg.patch_size] * 2, cfg.size, cfg.channels, cfg.fourier_bands, d_model)
        self.cfg = cfg

    def input_shape(self) -> tuple:
        return (None, self.cfg.channels, *self.cfg.size)

    def to_blocks(self, x: torch.Tensor) -> torch.Tensor:
        return x


class AudioAdapter(PatchAdapter):
    """Mono waveforms [B, samples] -> consecutive patches with 1-D Fourier features."""

    name = "audio"

    def __init__(self, cfg: AudioConfig, d_model: int):
        super().__init__([cfg.patch_size], [cfg.num_samples], 1, cfg.fourier_bands, d_model)
        self.cfg = cfg

    def input_shape(self) -> tuple:
        return (None, self.cfg.num_samples)

    def to_blocks(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, None]


class VideoAdapter(PatchAdapter):
    """Clips [B, T, C, H, W] -> space-time tubelets (t, h, w) with 3-D Fourier features."""

    name = "video"

    def __init__(self, cfg: VideoConfig, d_model: int):
        super().__init__(cfg.tubelet, [cfg.frames, *cfg.size], cfg.channels, cfg.fourier_bands, d_model)
        self.cfg = cfg

    def input_shape(self) -> tuple:
        return (None, self.cfg.frames, self.cfg.channels, *self.cfg.size)

    def to_blocks(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)


class ArrayAdapter(PatchAdapter):
    """Generic arrays [B, length, channels]: one element per position, 1-D Fourier features."""

    name = "array"

    def __init__(self, cfg: ArrayConfig, d_model: int):
        super().__init__([1], [cfg.length], cfg.channels, cfg.fourier_bands, d_model)
        self.cfg = cfg

    def input_shape(self) -> tuple:
        return (None, self.cfg.length, self.cfg.channels)

    def to_blocks(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)
