"""Images, audio, video and generic arrays: cut into patches on a regular grid (``pretrain.patches``), each patch's
values concatenated with the Fourier features of its grid position and projected to ``d_model``. Decoder queries are
the projected Fourier features of the positions to predict; the head reconstructs the patch values.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn

from ...config import PatchGrid
from ...patches import patchify
from ..position import grid_fourier_features
from .base import check_tensor, element_mask

# The raw input's shape, None for the batch dimension.
_INPUT_SHAPES: Dict[str, Callable[..., tuple]] = {
    "image": lambda cfg: (None, cfg.channels, *cfg.size),
    "audio": lambda cfg: (None, cfg.num_samples),
    "video": lambda cfg: (None, cfg.frames, cfg.channels, *cfg.size),
    "array": lambda cfg: (None, cfg.length, cfg.channels),
}


class PatchAdapter(nn.Module):
    """The adapter of patch modality ``name`` (image, audio, video, array) with its config ``cfg``."""

    def __init__(self, name: str, cfg: PatchGrid, d_model: int):
        super().__init__()
        self.name, self.cfg = name, cfg
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
        check_tensor(x, self.name, _INPUT_SHAPES[self.name](self.cfg), floating=True)
        return patchify(self.name, self.cfg, x)

    def embed(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        patches = self.patchify(x)
        fourier = self.fourier.to(patches.dtype).expand(patches.shape[0], -1, -1)
        features = self.input_projection(torch.cat([patches, fourier], dim=-1))
        return features, element_mask(mask, self.name, patches.shape[0], patches.shape[1])

    def queries(self, positions: torch.Tensor) -> torch.Tensor:
        return self.query_projection(self.fourier[positions].to(self.query_projection.weight.dtype))

    def head(self, decoded: torch.Tensor) -> torch.Tensor:
        return self.output_projection(decoded)
