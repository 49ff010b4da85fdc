"""How image, audio, video and array inputs are cut into patches: one definition that the model's adapters (the
encoder's input) and the data stream (the reconstruction targets) share. Grids and patch sizes come from the
modality configs (``pretrain.config.PatchGrid``)."""

from __future__ import annotations

import math
from typing import Callable, Dict, Sequence

import torch

from .config import PatchGrid

# The raw batch as [B, C, *patch_sizes].
_CHANNELS_FIRST: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "image": lambda x: x,  # [B, C, H, W]
    "audio": lambda x: x[:, None],  # [B, samples]
    "video": lambda x: x.transpose(1, 2),  # [B, T, C, H, W]
    "array": lambda x: x.transpose(1, 2),  # [B, length, channels]
}


def blocks_to_patches(x: torch.Tensor, block: Sequence[int]) -> torch.Tensor:
    """[B, C, *grid*block] -> [B, prod(grid), prod(block) * C]: patches in row-major grid order, values in
    (block..., C) order."""
    batch, channels, *sizes = x.shape
    grid = [n // b for n, b in zip(sizes, block)]
    split = x.reshape(batch, channels, *[d for g, b in zip(grid, block) for d in (g, b)])
    nd = len(block)
    order = [0] + [2 + 2 * i for i in range(nd)] + [3 + 2 * i for i in range(nd)] + [1]
    return split.permute(order).reshape(batch, math.prod(grid), math.prod(block) * channels)


def patchify(name: str, cfg: PatchGrid, x: torch.Tensor) -> torch.Tensor:
    """A raw batch of modality ``name`` -> [B, patches, values]."""
    return blocks_to_patches(_CHANNELS_FIRST[name](x), cfg.patch_block)


def patches_at(name: str, cfg: PatchGrid, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The patches of ``x`` at ``positions`` [B, P] -> [B, P, values]: the reconstruction targets."""
    patches = patchify(name, cfg, x)
    return torch.gather(patches, 1, positions[..., None].expand(-1, -1, patches.shape[-1]))
