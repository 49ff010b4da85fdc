"""Operators dispatched per training step, ours against transformers' Perceiver, at the 201M config's depth.

On a GPU a step of small kernels is bound by how many operators Python and the dispatcher hand to the device (the
H100 step at B=8 took as long as at B=32), and that count does not depend on the device. This counts them on the CPU:
the 201M language config's structure (26 latent self-attends, 8 heads, unequal q/k and v widths) with tiny widths,
bf16 autocast like the GPU benchmark (``--precision bf16``: bf16 weights with fp32 master copies, model_bench's
other mode), attention dropout 0 (so that SDPA is one operator here as on CUDA), forward, backward and a fused AdamW
step (one operator, as on CUDA). It also times those tiny steps: per-operator overhead with almost no arithmetic.

    PYTHONPATH=. python bench/dispatch_count.py [--precision bf16]

The last line printed is ``dispatch_ratio=<our operators per step over transformers'>``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

import model_bench as mb
from pretrain.train.metrics import OperatorCount

TINY = dict(mb.GPU_CONFIG, d_model=16, d_latents=32, qk_channels=16, v_channels=32, num_latents=8)


def measure(variant: str, batch: int, length: int, steps: int, precision: str) -> dict:
    cfg = dict(TINY)
    model, _ = mb.build_models(cfg, length, torch.device("cpu"), variant, "auto")
    for module in model.modules():  # dropout 0 everywhere: SDPA stays one operator, as on CUDA
        if hasattr(module, "dropout") and isinstance(module.dropout, float):
            module.dropout = 0.0
        elif isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.train()
    ids = torch.randint(0, cfg["vocab_size"], (batch, length))
    targets = torch.randint(0, cfg["vocab_size"], (batch, length))
    forward = (lambda: model(input_ids=ids).logits) if variant == mb.HF else (lambda: model.text_logits(ids))
    optimizer, autocast = mb.for_precision(model, precision, torch.device("cpu"), fused=True)
    step = mb.training_step(forward, targets, optimizer, autocast)
    for _ in range(3):
        step()
    with OperatorCount() as total:
        step()
    with OperatorCount() as fwd, autocast:
        forward()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return dict(ops=sum(total.counts.values()), launches=total.launches, fwd_ops=sum(fwd.counts.values()),
                ms=statistics.median(times) * 1e3, top=total.counts.most_common(8))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--length", type=int, default=32)
    p.add_argument("--steps", type=int, default=15, help="timed tiny steps (median reported)")
    p.add_argument("--precision", choices=("autocast", "bf16"), default="autocast",
                   help="bf16 autocast over fp32 weights, or bf16 weights with fp32 master copies (model_bench's)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    results = {v: measure(v, args.batch, args.length, args.steps, args.precision) for v in (mb.HF, mb.OURS)}
    print(f"201M config depth, tiny widths (d_latents {TINY['d_latents']}), B={args.batch} M={args.length}, "
          f"{mb.PRECISIONS[args.precision]}, torch {torch.__version__}, 1 thread")
    print(f"{'model':<14}{'ops/step':>10}{'kernels':>9}{'fwd ops':>10}{'tiny step ms':>14}  most frequent")
    for variant, r in results.items():
        top = ", ".join(f"{name} {count}" for name, count in r["top"][:5])
        print(f"{variant:<14}{r['ops']:>10}{r['launches']:>9}{r['fwd_ops']:>10}{r['ms']:>14.1f}  {top}")
    print("kernels: the operators that would launch a GPU kernel (not views, allocations or profiler marks)")
    ours, hf = results[mb.OURS], results[mb.HF]
    print(f"tiny step time ours/transformers: {ours['ms'] / hf['ms']:.3f}")
    print(f"dispatch_ratio={ours['ops'] / hf['ops']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
