"""Classification: one learned decoder query per sample and a linear head (an output only, never an input)."""

from __future__ import annotations

import torch
import torch.nn as nn


class LabelAdapter(nn.Module):
    name = "label"

    def __init__(self, num_classes: int, d_model: int):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(1, d_model))
        self.classifier = nn.Linear(d_model, num_classes)

    def num_positions(self, _inputs: object = None) -> int:
        return 1

    def queries(self, positions: torch.Tensor) -> torch.Tensor:
        return self.query[positions]

    def head(self, decoded: torch.Tensor) -> torch.Tensor:
        """[B, 1, d_model] -> class logits [B, num_classes]."""
        return self.classifier(decoded[:, 0])
