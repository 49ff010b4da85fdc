"""Per-modality adapters: input embedding, decoder queries and output head of each modality."""

from __future__ import annotations

import torch.nn as nn

from ...config import ModelConfig
from .label import LabelAdapter
from .patches import ArrayAdapter, AudioAdapter, ImageAdapter, VideoAdapter, blocks_to_patches
from .text import TextAdapter

_INPUT_ADAPTERS = {
    "text": TextAdapter,
    "image": ImageAdapter,
    "audio": AudioAdapter,
    "video": VideoAdapter,
    "array": ArrayAdapter,
}


def build_adapters(cfg: ModelConfig) -> nn.ModuleDict:
    """One adapter per enabled modality, plus the label adapter when ``num_classes > 0``."""
    adapters = nn.ModuleDict(
        {name: _INPUT_ADAPTERS[name](getattr(cfg, name), cfg.d_model) for name in cfg.input_modalities}
    )
    if cfg.num_classes > 0:
        adapters["label"] = LabelAdapter(cfg.num_classes, cfg.d_model)
    return adapters


__all__ = ["build_adapters", "blocks_to_patches", "TextAdapter", "ImageAdapter", "AudioAdapter", "VideoAdapter",
           "ArrayAdapter", "LabelAdapter"]
