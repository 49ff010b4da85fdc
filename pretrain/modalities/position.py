"""Position features: the paper's Fourier features for 1-, 2- and 3-D index grids (learned positions are plain
``nn.Embedding`` tables in the adapters).

The channel order equals transformers' ``generate_fourier_features``: raw positions first (when ``concat_pos``), then
all sines (band-major within each dimension), then all cosines.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch


def fourier_channels(num_dims: int, num_bands: int, concat_pos: bool = True, sine_only: bool = False) -> int:
    """Channel count of :func:`fourier_features` for ``num_dims``-D positions."""
    return num_dims * num_bands * (1 if sine_only else 2) + (num_dims if concat_pos else 0)


def linear_positions(index_dims: Sequence[int], device: Optional[torch.device] = None) -> torch.Tensor:
    """Grid coordinates in [-1, 1]: ``[*index_dims, len(index_dims)]``, first dimension slowest."""
    axes = [torch.linspace(-1.0, 1.0, n, device=device) for n in index_dims]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)


def fourier_features(
    pos: torch.Tensor,
    num_bands: int,
    max_resolution: Sequence[int],
    concat_pos: bool = True,
    sine_only: bool = False,
) -> torch.Tensor:
    """Features of positions ``pos`` ``[..., d]`` in [-1, 1]: frequencies linearly spaced from 1 to
    ``max_resolution[i] / 2`` (Nyquist) per dimension i, ``sin(pi f x)`` and ``cos(pi f x)``."""
    if pos.shape[-1] != len(max_resolution):
        raise ValueError(
            f"fourier_features: pos has {pos.shape[-1]} coordinates but max_resolution has {len(max_resolution)} dims"
        )
    freqs = torch.stack(
        [torch.linspace(1.0, res / 2, num_bands, device=pos.device, dtype=pos.dtype) for res in max_resolution]
    )
    scaled = (pos[..., :, None] * freqs).flatten(-2)
    parts = [torch.sin(math.pi * scaled)] if sine_only else [torch.sin(math.pi * scaled), torch.cos(math.pi * scaled)]
    return torch.cat(([pos] if concat_pos else []) + parts, dim=-1)


def grid_fourier_features(index_dims: Sequence[int], num_bands: int,
                          device: Optional[torch.device] = None) -> torch.Tensor:
    """Fourier features of every point of a grid, flattened: ``[prod(index_dims), channels]``."""
    pos = linear_positions(index_dims, device=device).reshape(-1, len(index_dims))
    return fourier_features(pos, num_bands, index_dims)
