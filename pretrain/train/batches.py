"""Batches for the training step: the stream without end, tensors onto the device in the engine's dtype."""

from __future__ import annotations

from typing import Iterator

import torch

from ..data import DataStream


def forever(stream: DataStream) -> Iterator[dict]:
    while True:
        yield from stream


def to_device(tree, device: torch.device, dtype: torch.dtype):
    """Tensors of a (nested) batch onto ``device``; floating ones in the engine's dtype."""
    if isinstance(tree, dict):
        return {key: to_device(value, device, dtype) for key, value in tree.items()}
    if isinstance(tree, torch.Tensor):
        tree = tree.to(device, non_blocking=True)
        return tree.to(dtype) if tree.is_floating_point() else tree
    return tree
