"""The Perceiver's one layer type: pre-LayerNorm attention (cross or self) then a pre-LayerNorm MLP, both residual.

Numerics follow the paper's code and transformers' Perceiver: LayerNorm eps 1e-5, exact (erf) GELU, softmax scale from
the query/key head dim, dropout only on attention probabilities, and the query residual adds the raw query.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attend


class MLP(nn.Module):
    def __init__(self, channels: int, widening_factor: int):
        super().__init__()
        self.dense1 = nn.Linear(channels, widening_factor * channels)
        self.dense2 = nn.Linear(widening_factor * channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense2(F.gelu(self.dense1(x)))


class PerceiverLayer(nn.Module):
    """Cross-attention when ``kv_dim`` is given (queries attend to another array), else self-attention."""

    def __init__(
        self,
        q_dim: int,
        kv_dim: Optional[int],
        qk_channels: int,
        v_channels: int,
        num_heads: int,
        widening_factor: int,
        use_query_residual: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        for name, channels in (("qk_channels", qk_channels), ("v_channels", v_channels)):
            if channels % num_heads:
                raise ValueError(f"{name}={channels} is not divisible by num_heads={num_heads}")
        self.is_cross = kv_dim is not None
        self.num_heads = num_heads
        self.use_query_residual = use_query_residual
        self.dropout = dropout
        self.attend = attend  # what pretrain.perf.optimize replaces with its kernels
        self.q_norm = nn.LayerNorm(q_dim)
        # Projections that read the same input are one Linear (transformers' checkpoints convert by concatenation).
        if self.is_cross:
            self.kv_norm = nn.LayerNorm(kv_dim)
            self.query = nn.Linear(q_dim, qk_channels)
            self.widths = [qk_channels, v_channels]
            self.key_value = nn.Linear(kv_dim, sum(self.widths))
        else:
            self.widths = [qk_channels, qk_channels, v_channels]
            self.query_key_value = nn.Linear(q_dim, sum(self.widths))
        self.out = nn.Linear(v_channels, q_dim)
        self.mlp_norm = nn.LayerNorm(q_dim)
        self.mlp = MLP(q_dim, widening_factor)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, -1))

    def forward(
        self, x: torch.Tensor, kv: Optional[torch.Tensor] = None, key_mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        if self.is_cross != (kv is not None):
            raise ValueError("a cross-attention layer needs kv; a self-attention layer takes none")
        h = self.q_norm(x)
        if self.is_cross:
            # Queries of batch 1 against a batch of kv (the encoder's latents, the decoder's queries of every position)
            # are the same for every sample: normalised and projected once, broadcast in the residual.
            if x.shape[0] not in (1, kv.shape[0]):
                raise ValueError(
                    f"queries have batch {x.shape[0]} and kv batch {kv.shape[0]}: give both the same batch, or the "
                    f"queries batch 1 when every sample shares them"
                )
            query = self.query(h).expand(kv.shape[0], -1, -1)
            key, value = self.key_value(self.kv_norm(kv)).split(self.widths, dim=-1)
        else:
            query, key, value = self.query_key_value(h).split(self.widths, dim=-1)
        attended = self.attend(
            self._heads(query), self._heads(key), self._heads(value), key_mask,
            dropout_p=self.dropout if self.training else 0.0,
        )
        y = self.out(attended.flatten(-2))
        if self.use_query_residual:
            y = y + x
        return y + self.mlp(self.mlp_norm(y))
