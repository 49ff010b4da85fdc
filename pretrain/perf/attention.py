"""The attention kernels ``optimize`` installs: one ``attend`` that runs the fastest backend the machine offers and
computes what ``pretrain.model.attention.attend`` computes.

Backends, in the order ``backend="auto"`` prefers them:

* ``flash_attn``: the flash-attn package on CUDA with bf16/fp16 inputs; padded keys are removed and the batch runs as
  variable-length sequences (``cu_seqlens``).
* ``sdpa``: torch's ``scaled_dot_product_attention`` with a boolean key mask.
* ``varlen``: ``torch.nn.attention.varlen.varlen_attn`` on CUDA (half precision, no dropout), the same unpadding as
  flash_attn; ranked after SDPA, faster on the shapes in ``bench/README.md``.
* ``sdpa_unpadded``: SDPA on unequal q/k and v head dims as they are. A candidate for tuning, never a static choice.
* ``math``: scores, softmax and dropout written out; the CPU default when training with attention dropout, where it
  runs as one autograd function (``_CpuDropoutAttention``) with in-place softmax and gradient passes.

``backend="auto"`` on CUDA times every candidate on the first call of each shape and keeps the fastest
(``pretrain.perf.autotune``; logged); on CPU it takes the first of the order above. ``"autotune"`` tunes on any device.

Unequal query/key and value head dims are zero-padded to the larger one while the softmax scale stays
``1/sqrt(qk_head_dim)``: the scores are unchanged and the fused kernels, which need equal dims, become eligible.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import math
from typing import Optional

import torch
import torch.nn.functional as F

from ..config import ATTENTION_BACKENDS as BACKENDS
from ..model.attention import scaled_dot_product, zero_without_keys
from .autotune import KernelTuner, shape_bucket

_HALF = (torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=None)
def flash_attn_available() -> bool:
    """True when the optional flash-attn package is importable (the ``flash`` extra on a CUDA machine)."""
    return importlib.util.find_spec("flash_attn") is not None


@functools.lru_cache(maxsize=None)
def torch_varlen_available() -> bool:
    """True when this torch ships ``torch.nn.attention.varlen`` (2.10 and later). Cached: it is asked on every call."""
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def available_backends(device: torch.device, dtype: torch.dtype, dropout_p: float = 0.0) -> list[str]:
    """The concrete backends that can run on this device and dtype, in the static order of preference."""
    if device.type != "cuda":
        return ["math", "sdpa", "sdpa_unpadded"] if dropout_p > 0.0 else ["sdpa", "math", "sdpa_unpadded"]
    half = dtype in _HALF
    names = ["flash_attn"] if half and flash_attn_available() else []
    names += ["sdpa", "sdpa_unpadded"]
    if half and torch_varlen_available() and dropout_p == 0.0:
        names.append("varlen")
    return names + ["math"]


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: Optional[torch.Tensor]) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"attend: q, k, v must be 4-D [batch, length, heads, head_dim], got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"attend: k {tuple(k.shape)} and v {tuple(v.shape)} must agree on [batch, length, heads]")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"attend: q {tuple(q.shape)} must match k {tuple(k.shape)} in batch, heads and head_dim"
        )
    if key_mask is not None and (key_mask.dtype != torch.bool or key_mask.shape != k.shape[:2]):
        raise ValueError(
            f"attend: key_mask must be a bool tensor of shape [batch, keys] = {tuple(k.shape[:2])}, "
            f"got {key_mask.dtype} {tuple(key_mask.shape)}"
        )


def _pad_head_dims(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    dqk, dv = q.shape[-1], v.shape[-1]
    if dqk < dv:
        q, k = F.pad(q, (0, dv - dqk)), F.pad(k, (0, dv - dqk))
    elif dv < dqk:
        v = F.pad(v, (0, dqk - dv))
    return q, k, v


def _sdpa(q, k, v, key_mask, scale, dropout_p):
    if q.stride(0) == 0 and q.shape[0] > 1:  # queries shared by the batch: cuDNN rejects the output layout they give
        q = q.contiguous()
    return scaled_dot_product(q, k, v, key_mask, scale, dropout_p)


def _drop_mask(shape: torch.Size, dropout_p: float, device: torch.device) -> torch.Tensor:
    """Bernoulli(p) mask (True = dropped) from the four 16-bit quarters of random int64s: with each quarter's top bit
    cleared, all are uniform over [0, 2^15) and one vectorised comparison with a scalar decides four elements, faster
    than ``bernoulli_`` (``bench/README.md``); the drop probability is exact to 1/32768."""
    count = math.prod(shape)
    randoms = torch.empty((count + 3) // 4, dtype=torch.int64, device=device).random_()
    drop = randoms.bitwise_and_(0x7FFF7FFF7FFF7FFF).view(torch.int16) < round(dropout_p * 2**15)
    return drop[:count].view(shape)


class _CpuDropoutAttention(torch.autograd.Function):
    """softmax(q k^T * scale) with dropout, times v, for [B, L, H, D] inputs. Saves what autograd would (inputs,
    probabilities before and after dropout, the mask) but runs the softmax, the masking of the incoming gradient and
    the softmax gradient in place (three score-sized allocations fewer per call), copies q, k, v once into [B, H, L, D]
    so that no matmul copies a transposed operand, and applies the scale and the 1/(1-p) rescale to the small
    results only."""

    @staticmethod
    def forward(ctx, q, k, v, key_mask, scale, dropout_p):
        q = torch.mul(q.transpose(1, 2), scale, out=q.new_empty(q.transpose(1, 2).shape))
        k, v = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
        scores = q @ k.transpose(-1, -2)
        if key_mask is not None:
            scores.masked_fill_(~key_mask[:, None, None, :], torch.finfo(scores.dtype).min)
        probs = torch.ops.aten._softmax.out(scores, -1, False, out=scores)  # row by row: safe in place
        drop = _drop_mask(probs.shape, dropout_p, probs.device)
        dropped = torch.where(drop, 0.0, probs)
        ctx.save_for_backward(q, k, v, probs, dropped, drop)
        ctx.scale, ctx.keep_scale = scale, 1.0 / (1.0 - dropout_p)
        return (dropped @ v).mul_(ctx.keep_scale).transpose(1, 2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, probs, dropped, drop = ctx.saved_tensors
        grad_out = grad_out.transpose(1, 2).contiguous()
        grad_v = (dropped.transpose(-1, -2) @ grad_out).mul_(ctx.keep_scale)
        grad_probs = (grad_out @ v.transpose(-1, -2)).masked_fill_(drop, 0.0)
        grad_scores = torch.ops.aten._softmax_backward_data.out(
            grad_probs, probs, -1, probs.dtype, grad_input=grad_probs
        )
        grad_q = (grad_scores @ k).mul_(ctx.scale * ctx.keep_scale)
        grad_k = (grad_scores.transpose(-1, -2) @ q).mul_(ctx.keep_scale)  # q holds the scale already
        return grad_q.transpose(1, 2), grad_k.transpose(1, 2), grad_v.transpose(1, 2), None, None, None


def _math(q, k, v, key_mask, scale, dropout_p):
    if dropout_p > 0.0 and q.device.type == "cpu" and not torch.compiler.is_compiling():  # random_ breaks graphs
        return _CpuDropoutAttention.apply(q, k, v, key_mask, scale, dropout_p)
    q, k, v = q.transpose(1, 2) * scale, k.transpose(1, 2), v.transpose(1, 2)
    scores = q @ k.transpose(-1, -2)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], torch.finfo(scores.dtype).min)
    # In the scores' dtype: CUDA autocast would run softmax in fp32 and cast a copy back. The kernel accumulates in
    # fp32 either way.
    probs = torch.softmax(scores, dim=-1, dtype=scores.dtype)
    if dropout_p > 0.0:  # fused by torch.compile
        probs = F.dropout(probs, dropout_p)
    return (probs @ v).transpose(1, 2)


def _unpad(q, k, v, key_mask):
    """Flatten to the varlen layout: queries [B*Q, H, D], kept keys [total, H, D], and their offsets."""
    batch, num_q = q.shape[:2]
    if key_mask is None:
        key_lengths = torch.full((batch,), k.shape[1], device=k.device, dtype=torch.int32)
        k_flat, v_flat = k.flatten(0, 1), v.flatten(0, 1)
    else:
        key_lengths = key_mask.sum(dim=1, dtype=torch.int32)
        k_flat, v_flat = k[key_mask], v[key_mask]
    cu_k = F.pad(key_lengths.cumsum(0, dtype=torch.int32), (1, 0))
    cu_q = torch.arange(0, (batch + 1) * num_q, num_q, device=q.device, dtype=torch.int32)
    return q.flatten(0, 1), k_flat, v_flat, cu_q, cu_k, num_q, k.shape[1]


def _flash_attn(q, k, v, key_mask, scale, dropout_p):
    from flash_attn import flash_attn_varlen_func

    q_flat, k_flat, v_flat, cu_q, cu_k, max_q, max_k = _unpad(q, k, v, key_mask)
    out = flash_attn_varlen_func(
        q_flat, k_flat, v_flat, cu_q, cu_k, max_q, max_k, dropout_p=dropout_p, softmax_scale=scale
    )
    return out.view(q.shape[0], q.shape[1], *out.shape[1:])


@functools.lru_cache(maxsize=1)
def _varlen_takes_scale() -> bool:
    from torch.nn.attention.varlen import varlen_attn

    return "scale" in inspect.signature(varlen_attn).parameters


def _torch_varlen(q, k, v, key_mask, scale, dropout_p):
    from torch.nn.attention.varlen import varlen_attn

    if not _varlen_takes_scale():  # torch 2.10/2.11: fold the scale into q, the kernel applies 1/sqrt(D)
        q = q * (scale * math.sqrt(q.shape[-1]))
    q_flat, k_flat, v_flat, cu_q, cu_k, max_q, max_k = _unpad(q, k, v, key_mask)
    kwargs = {"scale": scale} if _varlen_takes_scale() else {}
    out = varlen_attn(q_flat, k_flat, v_flat, cu_q, cu_k, max_q, max_k, **kwargs)
    return out.view(q.shape[0], q.shape[1], *out.shape[1:])


_KERNELS = {"flash_attn": _flash_attn, "varlen": _torch_varlen, "sdpa": _sdpa, "sdpa_unpadded": _sdpa, "math": _math}
_EQUAL_HEAD_DIMS = ("flash_attn", "varlen", "sdpa")  # the fused kernels these reach need equal head dims
TUNER = KernelTuner()


def _run(backend: str, q, k, v, key_mask, scale, dropout_p):
    dv = v.shape[-1]
    if backend in _EQUAL_HEAD_DIMS:
        q, k, v = _pad_head_dims(q, k, v)
    return zero_without_keys(_KERNELS[backend](q, k, v, key_mask, scale, dropout_p)[..., :dv], key_mask)


def _tuned(names: list[str], q, k, v, key_mask, scale, dropout_p) -> str:
    """The fastest of ``names`` for this call's kind, measured on its inputs the first time (see ``autotune``)."""
    (batch, nq, heads, dqk), nk, dv = q.shape, k.shape[1], v.shape[-1]
    candidates = [n for n in names if n != "sdpa_unpadded" or dqk != dv]  # the same as sdpa on equal dims
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    key = (q.device, q.dtype, shape_bucket(batch), shape_bucket(nq), shape_bucket(nk), heads, dqk, dv,
           key_mask is not None, dropout_p, grad)
    return TUNER.choose(
        key,
        candidates,
        lambda name, q, k, v: _run(name, q, k, v, key_mask, scale, dropout_p),
        (q, k, v),
        lambda: (f"attention B={batch} Q={nq} K={nk} H={heads} qk={dqk} v={dv} {str(q.dtype)[6:]}"
                 f"{' masked' if key_mask is not None else ''}{f' dropout {dropout_p}' if dropout_p else ''}"
                 f"{' fwd+bwd' if grad else ' fwd'}"),
    )


def tunes(backend: str, device: torch.device) -> bool:
    """Whether ``backend`` picks its kernel by timing on ``device`` (``autotune`` anywhere, ``auto`` on CUDA)."""
    return backend == "autotune" or (backend == "auto" and device.type == "cuda")


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: Optional[torch.Tensor] = None,
    *,
    scale: Optional[float] = None,
    dropout_p: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """softmax(q k^T * scale) v over the keys where ``key_mask`` is True, by ``backend``.

    q: [B, Q, H, Dqk], k: [B, K, H, Dqk], v: [B, K, H, Dv], key_mask: [B, K] bool or None (all keys valid).
    Returns [B, Q, H, Dv]. ``scale`` defaults to 1/sqrt(Dqk).
    """
    _check_inputs(q, k, v, key_mask)
    if backend not in BACKENDS:
        raise ValueError(f"attend: backend must be one of {BACKENDS}, got {backend!r}")
    names = available_backends(q.device, q.dtype, dropout_p)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if tunes(backend, q.device):
        backend = _tuned(names, q, k, v, key_mask, scale, dropout_p)
    elif backend == "auto":
        backend = names[0]
    elif backend not in names:
        raise ValueError(
            f"attend: backend {backend!r} cannot run on {q.device.type} with {q.dtype} and dropout {dropout_p}; "
            f"available here: {names}"
        )
    return _run(backend, q, k, v, key_mask, scale, dropout_p)
