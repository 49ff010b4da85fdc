"""Text: byte or token ids with learned input positions, learned decoder queries, logits tied to the input embedding.

Parameter roles equal transformers' ``PerceiverForMaskedLM`` (text preprocessor, decoder position encodings, embedding
decoder bias), so a text-only model converts 1:1.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...config import TextConfig
from .base import check_tensor, element_mask


class TextAdapter(nn.Module):
    name = "text"

    def __init__(self, cfg: TextConfig, d_model: int):
        super().__init__()
        self.max_length = cfg.max_length
        self.embeddings = nn.Embedding(cfg.vocab_size, d_model)
        self.position_embeddings = nn.Embedding(cfg.max_length, d_model)
        self.query_positions = nn.Embedding(cfg.max_length, d_model)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def num_positions(self, ids: Optional[torch.Tensor]) -> int:
        """Every position of the given text, or of ``max_length`` when decoding without text input."""
        return self.max_length if ids is None else ids.shape[1]

    def embed(self, ids: torch.Tensor, mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        check_tensor(ids, "text", (None, None), floating=False)
        if ids.shape[1] > self.max_length:
            raise ValueError(f"text: length {ids.shape[1]} exceeds model.text.max_length={self.max_length}")
        positions = torch.arange(ids.shape[1], device=ids.device)
        features = self.embeddings(ids) + self.position_embeddings(positions)
        return features, element_mask(mask, "text", ids.shape[0], ids.shape[1])

    def queries(self, positions: torch.Tensor) -> torch.Tensor:
        return self.query_positions(positions)

    def head(self, decoded: torch.Tensor) -> torch.Tensor:
        """Logits over the vocabulary: the input embedding transposed plus a bias."""
        return F.linear(decoded, self.embeddings.weight, self.bias)
