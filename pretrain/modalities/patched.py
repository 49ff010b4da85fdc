"""What the patch modalities (image, audio, video, arrays, series) share: cut into patches on a regular grid, each
patch's values concatenated with the Fourier features of its grid position and projected to ``d_model``; decoder
queries are the projected Fourier features of the positions to predict; the head reconstructs the patch values, and
the loss is their squared error. The cut is one definition that the adapter (the encoder's input) and the batch
builder (the reconstruction targets) share. Grids and patch sizes come from the modality configs
(``pretrain.config.PatchGrid``); each unit says how its raw batch lies (:meth:`PatchModality.channels_first`).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..config import ModelConfig, PatchGrid
from .base import Builder, Modality, Rngs, add_decode, check_tensor, element_mask, present
from .masking import hide, patch_positions
from .position import grid_fourier_features


def blocks_to_patches(x: torch.Tensor, block: Sequence[int]) -> torch.Tensor:
    """[B, C, *grid*block] -> [B, prod(grid), prod(block) * C]: patches in row-major grid order, values in
    (block..., C) order."""
    batch, channels, *sizes = x.shape
    grid = [n // b for n, b in zip(sizes, block)]
    split = x.reshape(batch, channels, *[d for g, b in zip(grid, block) for d in (g, b)])
    nd = len(block)
    order = [0] + [2 + 2 * i for i in range(nd)] + [3 + 2 * i for i in range(nd)] + [1]
    return split.permute(order).reshape(batch, math.prod(grid), math.prod(block) * channels)


class PatchAdapter(nn.Module):
    """The adapter of a patch modality: ``raw_shape`` is its input's shape (None for the batch dimension) and
    ``channels_first`` turns such a batch into [B, C, *patch_sizes]."""

    def __init__(self, name: str, cfg: PatchGrid, d_model: int, raw_shape: tuple,
                 channels_first: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.name, self.cfg, self.raw_shape, self.channels_first = name, cfg, raw_shape, channels_first
        patch_values = math.prod(cfg.patch_block) * cfg.patch_channels
        self.register_buffer("fourier", grid_fourier_features(cfg.grid, cfg.fourier_bands), persistent=False)
        fourier_dim = self.fourier.shape[1]
        self.input_projection = nn.Linear(patch_values + fourier_dim, d_model)
        self.query_projection = nn.Linear(fourier_dim, d_model)
        self.output_projection = nn.Linear(d_model, patch_values)

    def num_positions(self, _x: Optional[torch.Tensor] = None) -> int:
        return self.cfg.num_patches

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """Raw input -> [B, patches, values]: the encoder's input."""
        check_tensor(x, self.name, self.raw_shape, floating=True)
        return blocks_to_patches(self.channels_first(x), self.cfg.patch_block)

    def embed(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        patches = self.patchify(x)
        fourier = self.fourier.to(patches.dtype).expand(patches.shape[0], -1, -1)
        features = self.input_projection(torch.cat([patches, fourier], dim=-1))
        return features, element_mask(mask, self.name, patches.shape[0], patches.shape[1])

    def queries(self, positions: torch.Tensor) -> torch.Tensor:
        return self.query_projection(self.fourier[positions].to(self.query_projection.weight.dtype))

    def head(self, decoded: torch.Tensor) -> torch.Tensor:
        return self.output_projection(decoded)


class PatchModality(Modality):
    """A modality read as patches: subclasses give the raw shape and layout, :meth:`prepare` and :meth:`stack`."""

    def raw_shape(self, cfg: PatchGrid) -> tuple:
        """The raw batch's shape, None for the batch dimension."""
        raise NotImplementedError

    @staticmethod
    def channels_first(x: torch.Tensor) -> torch.Tensor:
        """The raw batch as [B, C, *patch_sizes]."""
        raise NotImplementedError

    def positions(self, model: ModelConfig) -> int:
        return getattr(model, self.name).num_patches

    def adapter(self, model: ModelConfig) -> nn.Module:
        cfg = getattr(model, self.name)
        return PatchAdapter(self.name, cfg, model.d_model, self.raw_shape(cfg), self.channels_first)

    def patches_at(self, cfg: PatchGrid, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The patches of the raw batch ``x`` at ``positions`` [B, P] -> [B, P, values]: the reconstruction targets."""
        patches = blocks_to_patches(self.channels_first(x), cfg.patch_block)
        return torch.gather(patches, 1, positions[..., None].expand(-1, -1, patches.shape[-1]))

    def loss(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        per_slot = (pred.float() - target.float()).pow(2).mean(-1)
        return (per_slot * mask.to(per_slot.dtype)).sum()

    def whole(self, rows: list, model: ModelConfig) -> np.ndarray:
        """Patch validity [B, patches] of a modality that is either wholly present in a row or absent."""
        return np.repeat(present(rows, self.name)[:, None], self.positions(model), axis=1)

    def mask_patches(self, batch: dict, valid: np.ndarray, rngs: Rngs, builder: Builder,
                     where_used: Optional[Tuple[np.ndarray, np.ndarray]] = None) -> None:
        """The key mask; with patches to predict, their positions (uniform among the valid ones, or ``where_used``
        when the unit chose them) and original values (each normalised with ``data.masking.normalized_patches``)."""
        slots = builder.slots[self.name]
        visible = valid
        if slots:
            masking = builder.data.masking
            where, used = where_used or patch_positions(valid, getattr(masking, self.name), slots, rngs)
            visible = hide(valid, where, used)
            add_decode(batch, self.name, where, used)
            targets = self.patches_at(getattr(builder.model, self.name), batch["inputs"][self.name],
                                      batch["decode"][self.name])
            if masking.normalized_patches:
                targets = (targets - targets.mean(-1, keepdim=True)) / (targets.var(-1, keepdim=True) + 1e-6).sqrt()
            batch["targets"][self.name] = targets
        batch["inputs"][f"{self.name}_mask"] = torch.from_numpy(visible)


class PixelModality(PatchModality):
    """Images and video: uint8 pixels, stacked and normalised a batch at a time (cheaper than per sample)."""

    def pixels(self, rows: list, shape: tuple, builder: Builder) -> np.ndarray:
        """Stacked uint8 pixels -> float32 ((x/255 - mean)/std), zeros where the row lacks them."""
        here = present(rows, self.name)
        raw = np.zeros((len(rows), *shape), dtype=np.uint8)
        for b in np.flatnonzero(here):
            raw[b] = rows[b][self.name]
        mean = np.asarray(builder.data.pixel_mean, dtype=np.float32)
        std = np.asarray(builder.data.pixel_std, dtype=np.float32)
        pixels = (raw.astype(np.float32) * np.float32(1 / 255) - mean) / std
        pixels[~here] = 0.0
        return pixels
