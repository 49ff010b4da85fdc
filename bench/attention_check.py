"""GPU check of the attention entry point: every backend present agrees with a float64 reference (forward and
gradients), and fwd+bwd time of each backend on the 201M model's attention shapes. Not a test: needs CUDA.

    python bench/attention_check.py            # prints two tables; exit 1 if any accuracy check fails
"""

from __future__ import annotations

import argparse
import logging
import math
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from pretrain.perf.attention import attend, available_backends
from pretrain.timing import elapsed_s

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def reference(q, k, v, key_mask, scale):
    """float64 softmax(q k^T scale) v over valid keys; all-masked queries give zeros."""
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    scores = (q @ k.transpose(-1, -2)) * scale
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    probs = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)
    return (probs @ v).transpose(1, 2)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make_mask(case: str, batch: int, keys: int, device) -> torch.Tensor | None:
    if case == "none":
        return None
    lengths = torch.randint(1, keys + 1, (batch,), device=device)
    mask = torch.arange(keys, device=device)[None] < lengths[:, None]
    if case == "empty_row":
        mask[0] = False
    return mask


def accuracy(device) -> bool:
    ok = True
    print(f"{'backend':<11}{'dtype':<10}{'dqk/dv':<9}{'mask':<11}{'fwd rel':>10}{'grad rel':>10}  ok")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for dqk, dv in ((32, 160), (64, 64), (96, 32)):
            for case in ("none", "padded", "empty_row"):
                q = torch.randn(4, 64, 8, dqk, device=device)
                k = torch.randn(4, 300, 8, dqk, device=device)
                v = torch.randn(4, 300, 8, dv, device=device)
                mask = make_mask(case, 4, 300, device)
                scale = 1.0 / math.sqrt(dqk)
                ref_inputs = [t.double().requires_grad_() for t in (q, k, v)]
                ref = reference(*ref_inputs, mask, scale)
                grad_out = torch.randn_like(ref)
                ref_grads = torch.autograd.grad(ref, ref_inputs, grad_out)
                for backend in available_backends(q.device, dtype):
                    inputs = [t.to(dtype).requires_grad_() for t in (q, k, v)]
                    out = attend(*inputs, mask, backend=backend)
                    grads = torch.autograd.grad(out, inputs, grad_out.to(dtype))
                    fwd = rel(out, ref)
                    grad = max(rel(g, r) for g, r in zip(grads, ref_grads))
                    good = fwd <= TOLERANCE[dtype] and grad <= 5 * TOLERANCE[dtype] and out.isfinite().all().item()
                    if case == "empty_row":
                        good = good and out[0].abs().max().item() == 0.0
                    ok &= good
                    print(f"{backend:<11}{str(dtype)[6:]:<10}{f'{dqk}/{dv}':<9}{case:<11}{fwd:>10.2e}{grad:>10.2e}  "
                          f"{'yes' if good else 'NO'}")
    return ok


def time_ms(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    times = [elapsed_s(fn, torch.device("cuda")) * 1e3 for _ in range(iters)]
    return sorted(times)[len(times) // 2]


def speed(device) -> None:
    shapes = {
        "encoder cross 256x2048": (256, 2048, 32, 160),
        "latent self 256x256": (256, 256, 32, 160),
        "decoder cross 2048x256": (2048, 256, 32, 96),
    }
    sdpa_kernels = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                    "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    print(f"\nfwd+bwd ms, bf16, batch 32, 8 heads (median of 20)\n{'shape':<25}{'variant':<26}{'ms':>8}")
    for label, (nq, nk, dqk, dv) in shapes.items():
        q = torch.randn(32, nq, 8, dqk, device=device, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(32, nk, 8, dqk, device=device, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(32, nk, 8, dv, device=device, dtype=torch.bfloat16, requires_grad=True)
        padded = make_mask("padded", 32, nk, device)

        def step(mask, backend, kernel=None, dropout_p=0.0):
            def run():
                if kernel is None:
                    out = attend(q, k, v, mask, backend=backend, dropout_p=dropout_p)
                else:
                    with sdpa_kernel([kernel]):
                        out = attend(q, k, v, mask, backend=backend, dropout_p=dropout_p)
                out.sum().backward()
            return run

        variants = {f"sdpa/{n} nomask": step(None, "sdpa", kern) for n, kern in sdpa_kernels.items()}
        for dropout_p in (0.0, 0.1):  # training runs with attention dropout 0.1
            tag = f" drop{dropout_p}" if dropout_p else ""
            # SDPA on the unequal head dims as they are: is attend's padding for the fused kernels worth its FLOPs?
            variants.update({f"sdpa_unpadded/{n}{tag}": step(None, "sdpa_unpadded", kern, dropout_p)
                             for n, kern in sdpa_kernels.items()})
            if dropout_p:
                variants[f"sdpa/auto{tag}"] = step(None, "sdpa", dropout_p=dropout_p)
                variants[f"math{tag}"] = step(None, "math", dropout_p=dropout_p)
                variants[f"auto (tuned){tag}"] = step(None, "auto", dropout_p=dropout_p)
        variants["sdpa/auto nomask"] = step(None, "sdpa")
        variants["sdpa/auto padded"] = step(padded, "sdpa")
        for backend in available_backends(q.device, torch.bfloat16):
            if backend not in ("sdpa", "sdpa_unpadded"):
                variants[f"{backend} nomask"] = step(None, backend)
                variants[f"{backend} padded"] = step(padded, backend)
        for name, fn in variants.items():
            try:
                ms = f"{time_ms(fn):8.3f}"
            except RuntimeError as exc:
                ms = f"  n/a ({str(exc).splitlines()[0][:40]})"
            print(f"{label:<25}{name:<26}{ms}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--no-speed", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("attention_check: needs a CUDA device")
        return 2
    device = torch.device("cuda")
    logging.basicConfig(level=logging.WARNING, format="  %(name)s: %(message)s")
    logging.getLogger("pretrain.perf.autotune").setLevel(logging.INFO)  # the "auto (tuned)" rows' decisions
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    ok = accuracy(device)
    if not args.no_speed:
        speed(device)
    print(f"attention_accuracy={'pass' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
