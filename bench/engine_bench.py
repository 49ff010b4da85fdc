"""Engine overhead benchmark: training steps of our DeepSpeed engine against a plain PyTorch loop, same model, same
batches, one process on CPU. A benchmark, not a test: it prints a table and asserts nothing.

Both loops run the same step -- seeded dropout, masked multimodal losses, backward, gradient clipping, AdamW, the
warmup+cosine schedule -- on the same batches, pre-loaded from the demo corpus so data loading is not measured. The
plain loop calls torch directly (under bf16 autocast with ``train.precision=bf16``); the engine goes through
``deepspeed.initialize`` with the JSON our schema generates (ZeRO stages 0, 1 and 2; bf16 weights with fp32 master
copies with ``train.precision=bf16``). Step time: median over ``--steps`` timed steps after ``--warmup``, the loops
interleaved round-robin so machine noise hits all alike. ops/step: the operators one step dispatches
(``pretrain.train.metrics.OperatorCount``), which on a GPU are the kernel launches and their host work: with tiny widths
(``model.d_latents=32 ...``) a CPU step is bound by them, as a GPU step is when the host cannot launch fast enough.

    PYTHONPATH=. OMP_NUM_THREADS=1 python bench/engine_bench.py [--config configs/demo.yaml] [--steps 40] [key=value ...]

On a machine shared with other jobs, OMP_NUM_THREADS=1 keeps OpenMP's spinning threads from turning CPU contention
into 2-10x noise in every row.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Dict, List

import torch

from launch.env import detect_env
from pretrain.config import load_config
from pretrain.data import DataStream
from pretrain.model import PerceiverIO
from pretrain.train.distributed import process_group
from pretrain.perf import optimize
from pretrain.train.batches import to_device
from pretrain.train.engine import build_engine, resolve_precision
from pretrain.train.loop import reseed
from pretrain.train.metrics import OperatorCount
from pretrain.train.objective import modality_losses, weighted_total
from pretrain.train.schedule import build_optimizer, build_scheduler


def plain_step(cfg) -> Callable[[dict, int], None]:
    torch.manual_seed(cfg.train.seed)
    model = optimize(PerceiverIO(cfg.model), cfg.model.attention_backend)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)

    bf16 = resolve_precision(cfg, torch.device("cpu")) == "bf16"
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()

    def step(batch: dict, index: int) -> None:
        reseed(cfg.train.seed, 0, index, 0)
        with autocast:
            loss = weighted_total(modality_losses(model, batch), cfg.train.loss_weights)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def engine_step(cfg, stage: int, run_dir) -> Callable[[dict, int], None]:
    cfg.deepspeed.zero_stage = stage
    torch.manual_seed(cfg.train.seed)
    engine = build_engine(cfg, PerceiverIO(cfg.model), 1, torch.device("cpu"), run_dir)

    def step(batch: dict, index: int) -> None:
        batch = to_device(batch, engine.device, next(engine.module.parameters()).dtype)
        reseed(cfg.train.seed, 0, index, 0)
        engine.backward(weighted_total(modality_losses(engine, batch), cfg.train.loss_weights))
        engine.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first; the last one is counted")
    parser.add_argument("--run-dir", default="bench/out/engine")
    parser.add_argument("--stages", type=lambda text: [int(s) for s in text.split(",")], default=[0, 1, 2],
                        help="comma-separated ZeRO stages to time, default 0,1,2 (DeepSpeed refuses some overrides "
                             "at stage 0, e.g. deepspeed.fp32_grad_accumulation=true with bf16)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1 (the last warm-up step is the counted one)")
    overrides = ["data.num_workers=0", "train.precision=fp32", *args.overrides]
    cfg = load_config(args.config, overrides)
    batches = list(itertools.islice(DataStream(cfg.data, cfg.model), args.warmup + args.steps))
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    env = detect_env({})
    with process_group(env, torch.device("cpu")):
        loops: Dict[str, Callable] = {"plain PyTorch": plain_step(cfg)}
        for stage in args.stages:
            loops[f"engine ZeRO-{stage}"] = engine_step(load_config(args.config, overrides), stage, run_dir)
        times: Dict[str, List[float]] = {name: [] for name in loops}
        ops: Dict[str, int] = {}
        for index, batch in enumerate(batches):
            for name, step in loops.items():
                if index == args.warmup - 1:
                    with OperatorCount() as count:
                        step(batch, index)
                    ops[name] = sum(count.counts.values())
                    continue
                start = time.perf_counter()
                step(batch, index)
                if index >= args.warmup:
                    times[name].append(time.perf_counter() - start)
    base = statistics.median(times["plain PyTorch"])
    print(f"\nCPU, 1 process, {torch.get_num_threads()} threads, batch {cfg.data.batch_size}, "
          f"{args.steps} timed steps (median), config {args.config}, precision {cfg.train.precision}\n")
    print("| loop | step (ms) | steps/s | samples/s | vs plain | overhead/step | ops/step |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median * 1e3:.1f} | {1 / median:.2f} | {cfg.data.batch_size / median:.1f} | "
              f"{base / median:.3f}x | {(median - base) / base * 100:+.1f}% | {ops[name]} |")


if __name__ == "__main__":
    main()
