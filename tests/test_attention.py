"""``attend``: every backend on this machine against a float64 reference; masks, head dims, errors, dropout."""

from __future__ import annotations

import math

import pytest
import torch

from pretrain.perf.attention import attend, available_backends

CPU = torch.device("cpu")
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def reference(q, k, v, key_mask=None, scale=None):
    """softmax(q k^T * scale) v in float64; a query with no valid key gives zeros."""
    q, k, v = q.double(), k.double(), v.double()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v)


def qkv(batch=3, nq=5, nk=9, heads=2, dqk=32, dv=32, dtype=torch.float32, requires_grad=False):
    g = torch.Generator().manual_seed(1)
    tensors = [torch.randn(batch, n, heads, d, generator=g).to(dtype) for n, d in ((nq, dqk), (nk, dqk), (nk, dv))]
    return [t.requires_grad_(requires_grad) for t in tensors]


def padding_mask(batch=3, nk=9):
    """Row 0 full, the others padded at the end by different amounts."""
    lengths = torch.tensor([nk, nk - 3, 1])[:batch]
    return torch.arange(nk)[None, :] < lengths[:, None]


def rel_err(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


CASES = [
    (dtype, backend)
    for dtype in (torch.float32, torch.bfloat16)
    for backend in ["auto", "autotune", *available_backends(CPU, dtype)]
]


@pytest.mark.parametrize("dtype,backend", CASES, ids=[f"{d}-{b}".replace("torch.", "") for d, b in CASES])
@pytest.mark.parametrize("dqk,dv", [(32, 32), (32, 160), (64, 16)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_matches_float64_reference(dtype, backend, dqk, dv, masked, scale):
    q, k, v = qkv(dqk=dqk, dv=dv, dtype=dtype)
    key_mask = padding_mask() if masked else None
    out = attend(q, k, v, key_mask, scale=scale, backend=backend)
    assert out.shape == (3, 5, 2, dv) and out.dtype == dtype
    assert rel_err(out, reference(q, k, v, key_mask, scale)) < TOLERANCE[dtype]


def test_mask_changes_result():
    """The reference comparison above is only meaningful if masking actually matters."""
    q, k, v = qkv()
    assert not torch.allclose(attend(q, k, v, padding_mask()), attend(q, k, v))


def test_cpu_backends_and_auto_choice():
    """SDPA (its CPU flash kernel) without dropout; the written-out math path, whose dropout is cheaper, with it."""
    assert available_backends(CPU, torch.float32) == ["sdpa", "math", "sdpa_unpadded"]
    assert available_backends(CPU, torch.float32, dropout_p=0.1) == ["math", "sdpa", "sdpa_unpadded"]
    assert "varlen" not in available_backends(CPU, torch.bfloat16)


@pytest.mark.parametrize("dtype,backend", CASES, ids=[f"{d}-{b}".replace("torch.", "") for d, b in CASES])
@pytest.mark.parametrize("dqk,dv", [(32, 32), (32, 160)])
@pytest.mark.parametrize("dropout_p", [0.0, 0.5])
def test_fully_masked_query_is_zero_with_finite_gradients(dtype, backend, dqk, dv, dropout_p):
    q, k, v = qkv(dqk=dqk, dv=dv, dtype=dtype, requires_grad=True)
    key_mask = padding_mask()
    key_mask[1] = False
    out = attend(q, k, v, key_mask, backend=backend, dropout_p=dropout_p)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isfinite(out).all()
    if dropout_p == 0.0:
        ref = reference(q.detach(), k.detach(), v.detach(), key_mask)
        assert rel_err(out.detach(), ref) < TOLERANCE[dtype]
    (out * torch.randn_like(out)).sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[1], torch.zeros_like(q.grad[1]))
    assert q.grad[0].abs().sum() > 0


def test_default_scale_is_inverse_sqrt_qk_head_dim():
    q, k, v = qkv(dqk=16, dv=64)
    assert torch.allclose(attend(q, k, v), attend(q, k, v, scale=0.25), atol=1e-6)
    assert not torch.allclose(attend(q, k, v), attend(q, k, v, scale=0.125), atol=1e-4)


def test_dropout_changes_output_but_stays_finite():
    q, k, v = qkv()
    plain = attend(q, k, v, padding_mask())
    dropped = attend(q, k, v, padding_mask(), dropout_p=0.5)
    assert torch.isfinite(dropped).all()
    assert not torch.allclose(plain, dropped)


def _bad(**changes):
    q, k, v = qkv()
    args = dict(q=q, k=k, v=v, key_mask=padding_mask())
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "args,match",
    [
        (dict(q=torch.zeros(3, 5, 64)), r"4-D \[batch, length, heads, head_dim\]"),
        (dict(v=torch.zeros(3, 9, 2)), r"4-D"),
        (dict(q=torch.zeros(3, 5, 4, 32)), r"q .* must match k .* in batch, heads and head_dim"),
        (dict(v=torch.zeros(3, 9, 4, 32)), r"k .* and v .* must agree"),
        (dict(q=torch.zeros(3, 5, 2, 16)), r"head_dim"),
        (dict(key_mask=torch.ones(3, 9)), r"key_mask must be a bool tensor of shape \[batch, keys\] = \(3, 9\)"),
        (dict(key_mask=torch.ones(3, 8, dtype=torch.bool)), r"key_mask .*\(3, 9\).*\(3, 8\)"),
        (dict(key_mask=torch.ones(9, dtype=torch.bool)), r"key_mask"),
    ],
    ids=["q-rank", "v-rank", "heads", "kv-heads", "head-dim", "mask-dtype", "mask-shape", "mask-rank"],
)
def test_bad_inputs_raise(args, match):
    with pytest.raises(ValueError, match=match):
        attend(**_bad(**args))


@pytest.mark.parametrize(
    "backend,match",
    [
        ("fast", r"backend must be one of"),
        ("varlen", r"backend 'varlen' cannot run on cpu.*available here: \['sdpa', 'math', 'sdpa_unpadded'\]"),
        ("flash_attn", r"backend 'flash_attn' cannot run on cpu"),
    ],
)
def test_bad_backend_raises(backend, match):
    with pytest.raises(ValueError, match=match):
        attend(*qkv(), backend=backend)


@pytest.mark.parametrize("dropout_p", [0.1, 0.5])
def test_math_dropout_keeps_one_minus_p_and_is_unbiased(dropout_p):
    """The mask drops a p fraction, and the 1/(1-p) rescale keeps the expected output unchanged."""
    from pretrain.perf.attention import _drop_mask

    drop = _drop_mask(torch.Size([1001, 999]), dropout_p, CPU)
    assert abs(drop.float().mean().item() - dropout_p) < 3e-3
    quarters = drop.flatten()[: drop.numel() // 4 * 4].view(-1, 4).float().mean(0)  # one per 16-bit quarter
    assert (quarters - dropout_p).abs().max().item() < 6e-3
    q, k, v = qkv()
    mean = torch.stack([attend(q, k, v, dropout_p=dropout_p, backend="math") for _ in range(400)]).mean(0)
    plain = attend(q, k, v)
    assert ((mean - plain).norm() / plain.norm()).item() < dropout_p / 2  # a missing rescale is off by p
    assert not torch.allclose(attend(q, k, v, dropout_p=dropout_p, backend="math"), plain)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nq,nk,masked", [(5, 9, True), (3, 1031, False), (64, 200, True)])
def test_cpu_dropout_forward_and_gradients_match_float64_with_the_same_mask(dtype, nq, nk, masked):
    """The CPU dropout path (in-place softmax and softmax gradient) against autograd through the written-out formula
    in float64, drawing the same mask from the same seed."""
    from pretrain.perf.attention import _drop_mask

    batch, heads, dqk, dv, p = 3, 2, 16, 24, 0.3
    q, k, v = qkv(batch, nq, nk, heads, dqk, dv, dtype=dtype, requires_grad=True)
    key_mask = padding_mask(batch, nk) if masked else None
    grad_out = torch.randn(batch, nq, heads, dv, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(7)
    out = attend(q, k, v, key_mask, dropout_p=p, backend="math")
    grads = torch.autograd.grad(out, (q, k, v), grad_out.to(dtype))

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    scores = torch.einsum("bqhd,bkhd->bhqk", q64, k64) / math.sqrt(dqk)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    torch.manual_seed(7)
    drop = _drop_mask(scores.shape, p, CPU)
    probs = torch.softmax(scores, dim=-1).masked_fill(drop, 0.0) / (1 - p)
    ref = torch.einsum("bhqk,bkhd->bqhd", probs, v64)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad_out.double())
    assert drop.any() and rel_err(out, ref) < TOLERANCE[dtype]
    for grad, ref_grad in zip(grads, ref_grads):
        assert rel_err(grad, ref_grad) < TOLERANCE[dtype]
