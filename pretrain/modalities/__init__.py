"""The modality registry: one unit per modality (:class:`~pretrain.modalities.base.Modality`), listed once in
:data:`REGISTRY`. The data stream, the model, the objective, ``init_from`` and ``data_prep`` iterate it; a new
modality is a unit here, its config section (``pretrain.config``) and its shard fields (``pretrain.shard_format``).

This package imports ``pretrain.config``, ``pretrain.vocab`` and ``pretrain.shard_format``, never ``pretrain.model``
or ``pretrain.data``, so that both can import it."""

from __future__ import annotations

from typing import Dict

import torch.nn as nn

from ..config import ModelConfig
from .array import ARRAY
from .audio import AUDIO
from .base import IGNORE_INDEX, Modality
from .image import IMAGE
from .label import LABEL
from .series import SERIES
from .text import TEXT
from .video import VIDEO

# In the order the model builds its adapters and the batch builder reads a sample (and draws its random numbers).
REGISTRY: Dict[str, Modality] = {unit.name: unit for unit in (TEXT, IMAGE, AUDIO, VIDEO, ARRAY, SERIES, LABEL)}
# The modalities shards hold (the others are given to the model directly).
STORED: Dict[str, Modality] = {name: unit for name, unit in REGISTRY.items() if unit.fields}


def build_adapters(cfg: ModelConfig) -> nn.ModuleDict:
    """One adapter per enabled modality, the label's when ``num_classes > 0``."""
    return nn.ModuleDict({name: unit.adapter(cfg) for name, unit in REGISTRY.items() if unit.enabled(cfg)})


__all__ = ["REGISTRY", "STORED", "Modality", "IGNORE_INDEX", "build_adapters"]
