"""Per-modality adapters: input embedding, decoder queries and output head of each modality."""

from __future__ import annotations

import torch.nn as nn

from ...config import ModelConfig
from .label import LabelAdapter
from .patches import PatchAdapter
from .text import TextAdapter


def build_adapters(cfg: ModelConfig) -> nn.ModuleDict:
    """One adapter per enabled modality, plus the label adapter when ``num_classes > 0``."""
    adapters = nn.ModuleDict()
    for name in cfg.input_modalities:
        modality = getattr(cfg, name)
        if name == "text":
            adapters[name] = TextAdapter(modality, cfg.d_model)
        else:
            adapters[name] = PatchAdapter(name, modality, cfg.d_model)
    if cfg.num_classes > 0:
        adapters["label"] = LabelAdapter(cfg.num_classes, cfg.d_model)
    return adapters


__all__ = ["build_adapters", "TextAdapter", "PatchAdapter", "LabelAdapter"]
