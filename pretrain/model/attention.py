"""The attention every Perceiver layer calls: softmax(q k^T / sqrt(Dqk)) v over the keys a mask keeps.

Tensors are ``[batch, length, heads, head_dim]`` (what a linear projection gives after a ``view``). A query whose keys
are all masked returns exactly zero: it attends to nothing (transformers' Perceiver gives it a uniform average of the
padded keys, a meaningless output; ours is defined). ``pretrain.perf.optimize`` swaps in faster kernels that compute
the same function.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def scaled_dot_product(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: Optional[torch.Tensor],
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """torch's SDPA on ``[B, L, H, D]`` tensors with a ``[B, K]`` bool key mask (True: attend)."""
    mask = None if key_mask is None else key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, dropout_p=dropout_p, scale=scale
    )
    return out.transpose(1, 2)


def zero_without_keys(out: torch.Tensor, key_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """``out`` with the rows of samples that have no key to attend to set to zero."""
    return out if key_mask is None else torch.where(key_mask.any(dim=1)[:, None, None, None], out, 0.0)


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: Optional[torch.Tensor] = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """q [B, Q, H, Dqk], k [B, K, H, Dqk], v [B, K, H, Dv], key_mask [B, K] bool or None -> [B, Q, H, Dv]."""
    return zero_without_keys(scaled_dot_product(q, k, v, key_mask, dropout_p=dropout_p), key_mask)
