"""Training-step benchmark: our Perceiver IO against transformers' ``PerceiverForMaskedLM``, same config, same weights.

A benchmark, not a test: it prints numbers and asserts nothing. One training step is forward, cross-entropy against
random target ids, backward, ``torch.optim.AdamW.step`` and ``zero_grad``; both models run in train mode with the
config's attention dropout (0.1). transformers' model is built first (seeded), ours is converted from its state dict
(``pretrain.model.hf``), so the weights are identical; a fp32 eval-mode logits comparison is printed as a check.

    PYTHONPATH=. python bench/model_bench.py                      # CPU: small config, ~2 minutes on 2 cores
    PYTHONPATH=. python bench/model_bench.py --device cuda        # GPU: the 201M language Perceiver, bf16, B=32, M=2048

Rows: transformers, ours decoding every position (``text_logits``, the like-for-like comparison), ours decoding only 15%
of the positions (the pretraining objective's subsampled decoding; not part of the ratio) and a length sweep, where both
models decode all M positions (transformers needs ``max_position_embeddings = M`` for that; so does ours).

Measurements:
* step time: median over ``--steps`` timed steps after ``--warmup`` steps (CUDA events on GPU, perf_counter on CPU),
  timed in blocks of ``--block`` steps run back to back, as a training loop runs them: the host may queue the next
  step while the GPU finishes this one, unless the model waits for the GPU itself (transformers reads a mask value
  back to the host in every forward). Each block's mean per step is one sample of the median.
* FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over one extra step of each model (matmuls and attention only;
  ours counts the zero padding of the q/k head dim up to the v head dim that its fused attention kernels need).
* MFU (GPU): achieved FLOP/s over a bf16 matmul rate measured in the same run (8192^3 matmuls timed with CUDA events).
* peak memory: on GPU ``torch.cuda.max_memory_allocated`` during the timed steps (weights, grads and optimizer state
  included; after the warm-up, so not the first step's attention tuning or compilation). On CPU every measurement runs in a fresh worker process (forkserver, torch preloaded) and reports the
  growth of the process's peak RSS (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``; falls back to
  ``getrusage`` ``ru_maxrss``) over its RSS right after the model was built: grads, optimizer state and activations.

The last line printed is ``ratio_vs_hf=<our samples/s over transformers', full decode, same run>``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import multiprocessing as mp
import os
import platform
import resource
import statistics
import sys
import time
import traceback
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from pretrain.timing import elapsed_s

# The 201M language Perceiver (Jaegle et al. 2021, transformers' deepmind/language-perceiver).
GPU_CONFIG = dict(
    d_model=768, num_latents=256, d_latents=1280, num_blocks=1, num_self_attends_per_block=26,
    num_self_attention_heads=8, num_cross_attention_heads=8, qk_channels=256, v_channels=1280, vocab_size=262,
)
# The same shape ratios (q/k head dim smaller than v's, v_channels = d_latents), small enough for 2 CPU cores.
CPU_CONFIG = dict(
    d_model=256, num_latents=128, d_latents=512, num_blocks=1, num_self_attends_per_block=6,
    num_self_attention_heads=8, num_cross_attention_heads=8, qk_channels=128, v_channels=512, vocab_size=262,
)
DEFAULTS = {
    # batch, length, steps, warmup, sweep lengths, sweep batch
    "cpu": dict(batch=8, length=1024, steps=8, warmup=2, sweep_lengths=[256, 1024, 4096], sweep_batch=2,
                precision="fp32", block=1),
    "cuda": dict(batch=32, length=2048, steps=20, warmup=3, sweep_lengths=[2048, 8192, 32768], sweep_batch=16,
                 precision="autocast", block=5),
}
PRECISIONS = {  # --precision: what it means, for the header line
    "autocast": "bf16 autocast over fp32 weights (fp32 AdamW)",
    "bf16": "bf16 weights, fp32 master copies in AdamW (DeepSpeed's bf16 mode, as `pretrain train` runs on GPU)",
    "fp32": "fp32",
}
MASK_FRACTION = 0.15
HF = "transformers"
OURS = "ours"
OURS_MASKED = "ours-15%-decode"


# ----------------------------------------------------------------------------------------------------------- helpers
def _register_cpu_flash_flops() -> None:
    """FlopCounterMode knows the CUDA SDPA kernels but not the CPU flash one; count it like the others."""
    from torch.utils import flop_counter as fc

    aten = torch.ops.aten
    ops = [(getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None), False),
           (getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None), True)]
    for op, backward in ops:
        if op is None:
            continue
        try:
            if backward:
                fc.register_flop_formula(op)(
                    lambda grad_out, q, k, v, *a, out_shape=None, **kw: fc.sdpa_backward_flop_count(grad_out, q, k, v))
            else:
                fc.register_flop_formula(op)(
                    lambda q, k, v, *a, out_shape=None, **kw: fc.sdpa_flop_count(q, k, v))
        except Exception:  # already registered (a newer torch): theirs is fine
            pass


def _rss_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class CpuPeakMemory:
    """Peak RSS growth of this process from ``start()``: VmHWM after a clear_refs reset, else ru_maxrss."""

    def start(self) -> None:
        gc.collect()
        try:  # hand freed heap back so that reuse shows up as growth
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except Exception:
            pass
        self.method = "ru_maxrss"
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = "VmHWM"
        except OSError:
            pass
        self.base_kib = _rss_kib("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def peak_bytes(self) -> int:
        peak = _rss_kib("VmHWM") if self.method == "VmHWM" else None
        if peak is None:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return max(0, peak - self.base_kib) * 1024


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def build_models(cfg: dict, length: int, device: torch.device, want: str, attention_backend: str = "auto",
                 latent_attention_backend: str | None = None):
    """transformers' model with seed 0 and, for ``want != HF``, ours converted from it (theirs is then dropped)."""
    from transformers import PerceiverConfig, PerceiverForMaskedLM

    from pretrain.model.hf import config_from_hf, hf_to_state_dict
    from pretrain.model.perceiver import PerceiverIO
    from pretrain.perf import optimize, use_attention_backend

    hf_cfg = PerceiverConfig(**cfg, max_position_embeddings=length, attention_probs_dropout_prob=0.1)
    torch.manual_seed(0)
    with device:
        hf = PerceiverForMaskedLM(hf_cfg)
    if want == HF:
        return hf, None
    with device:
        ours = PerceiverIO(config_from_hf(hf_cfg.to_dict()))
    ours.load_state_dict(hf_to_state_dict(hf.state_dict()))
    optimize(ours, attention_backend)
    if latent_attention_backend:
        use_attention_backend(ours.encoder.self_attends, latent_attention_backend)
    return ours, hf


@torch.no_grad()
def parity(ours, hf, length: int, device: torch.device) -> dict:
    """Max |logit difference| in eval mode on one sample (dropout off): against transformers in fp32 (the models are
    the same function), and, under bf16 autocast, ours' forward (its Linear weights cast together) against its encode
    and decode called directly (autocast's own per-tensor casts), which must agree bit for bit."""
    ids = torch.randint(0, ours.config.text.vocab_size, (1, length), device=device,
                        generator=torch.Generator(device).manual_seed(1))
    ours.eval(), hf.eval()
    fp32 = (ours.text_logits(ids) - hf(input_ids=ids).logits).abs().max().item()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        own = ours.decode(ours.encode({"text": ids}), {"text": None})["text"]
        together = (ours.text_logits(ids) - own).abs().max().item()
    ours.train(), hf.train()
    return {"fp32_vs_transformers": fp32, "autocast_casts_together_vs_own": together}


def prepare(spec: dict) -> dict:
    """Build one variant with its optimizer, inputs and a ``step()`` closure (one full training step)."""
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"
    batch, length, variant = spec["batch"], spec["length"], spec["variant"]
    model, hf = build_models(spec["config"], length, device, HF if variant == HF else OURS,
                             spec.get("attention_backend", "auto"), spec.get("latent_attention_backend"))
    check = parity(model, hf, length, device) if (hf is not None and spec.get("parity")) else None
    del hf
    model.train()

    gen = torch.Generator(device).manual_seed(1234)
    vocab = spec["config"]["vocab_size"]
    ids = torch.randint(0, vocab, (batch, length), device=device, generator=gen)
    if variant == OURS_MASKED:
        count = max(1, round(MASK_FRACTION * length))
        positions = torch.rand(batch, length, device=device, generator=gen).argsort(dim=1)[:, :count].sort(dim=1).values
        targets = torch.randint(0, vocab, (batch, count), device=device, generator=gen)
        forward = lambda: model({"text": ids}, {"text": positions})["text"]
    else:
        targets = torch.randint(0, vocab, (batch, length), device=device, generator=gen)
        if variant == HF:
            forward = lambda: model(input_ids=ids).logits
        else:
            forward = lambda: model.text_logits(ids)
    optimizer, autocast = for_precision(model, spec["precision"], device, fused=cuda)
    compiled = bool(spec.get("compile") and (variant != HF or spec.get("compile_hf")))
    if compiled:
        if variant != HF:  # attention is tuned eagerly (never while tracing): the compiled graph takes its picks
            with autocast:
                forward()
        forward = torch.compile(forward, mode=spec.get("compile_mode"))
    return dict(step=training_step(forward, targets, optimizer, autocast), device=device, parity=check,
                params=sum(p.numel() for p in model.parameters()),
                graphed=compiled and spec.get("compile_mode") == "reduce-overhead")


def for_precision(model: torch.nn.Module, precision: str, device: torch.device, fused: bool):
    """``model`` set up for ``precision`` (see PRECISIONS; bf16 weights for ``bf16``), with its AdamW and the autocast
    context its forward runs in."""
    adamw = dict(lr=1e-4, **({"fused": True} if fused else {}))
    if precision == "bf16":
        model.to(torch.bfloat16)
        return MasterWeightAdamW(model.parameters(), **adamw), nullcontext()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "autocast" else nullcontext()
    return torch.optim.AdamW(model.parameters(), **adamw), autocast


class MasterWeightAdamW:
    """AdamW on fp32 master copies of bf16 weights: the step copies the bf16 gradients up and the updated weights
    back down, one multi-tensor copy each (``_foreach_copy_`` converts dtypes in its fused CUDA kernel)."""

    def __init__(self, params, **adamw):
        self.params = list(params)
        self.masters = [p.detach().float() for p in self.params]
        for master in self.masters:
            master.grad = torch.empty_like(master)
        self.adamw = torch.optim.AdamW(self.masters, **adamw)

    @torch.no_grad()
    def step(self) -> None:
        torch._foreach_copy_([m.grad for m in self.masters], [p.grad for p in self.params])
        self.adamw.step()
        torch._foreach_copy_(self.params, self.masters)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None


def training_step(forward, targets: torch.Tensor, optimizer: torch.optim.Optimizer, autocast):
    """The measured step: forward under ``autocast``, cross-entropy against ``targets``, backward, optimizer step."""

    def step() -> None:
        with autocast:
            logits = forward()
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _timed(prepared: dict, block: int) -> float:
    """Seconds per step over ``block`` steps run back to back (CUDA events around them on GPU): a training loop does
    not wait for the GPU between steps, so timing each step alone would charge every step the host's time to its
    first kernel launches and the GPU's tail, which overlap in training."""
    def run() -> None:
        for _ in range(block):
            prepared["step"]()

    return elapsed_s(run, prepared["device"]) / block


def _blocks(spec: dict) -> int:
    return spec["steps"] // spec["block"]


def _timing(spec: dict, times: list[float], compile_s: float | None) -> dict:
    step_s = statistics.median(times)
    return dict(step_ms=step_s * 1e3, samples_per_s=spec["batch"] / step_s, step_ms_min=min(times) * 1e3,
                step_ms_all=[t * 1e3 for t in times], compile_s=compile_s)


def measure(spec: dict) -> dict:
    """One variant on its own: peak memory, FLOPs and (unless spec["steps"] == 0) the median step time."""
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    prepared = prepare(spec)
    step = prepared["step"]
    memory = None
    cuda = prepared["device"].type == "cuda"
    if not cuda:
        memory = CpuPeakMemory()
        memory.start()
    compile_s = None
    if spec.get("compile"):
        t0 = time.perf_counter()
        step()
        compile_s = time.perf_counter() - t0
    for _ in range(max(1, spec["warmup"])):
        step()
    if cuda:  # steady state: not the first step's attention tuning or compilation
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = [_timed(prepared, spec["block"]) for _ in range(_blocks(spec))]
    if cuda and not times:  # timed interleaved elsewhere: one step here for the steady-state peak
        step()
    if cuda:
        torch.cuda.synchronize()
        peak, peak_method = torch.cuda.max_memory_allocated(), "cuda.max_memory_allocated"
        if prepared["graphed"]:
            # CUDA graphs' private memory pools do not count as allocated: take what the process holds instead
            peak, peak_method = torch.cuda.max_memory_reserved(), "cuda.max_memory_reserved (CUDA graphs)"
    else:
        peak, peak_method = memory.peak_bytes(), f"peak RSS growth ({memory.method})"

    from torch.utils.flop_counter import FlopCounterMode

    _register_cpu_flash_flops()
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    result = dict(variant=spec["variant"], batch=spec["batch"], length=spec["length"],
                  flops_per_step=counter.get_total_flops(), peak_mem_bytes=peak, peak_mem_method=peak_method,
                  parity=prepared["parity"], params=prepared["params"])
    if spec.get("profile"):
        result["profile"], result["gpu_busy_ms"] = profile_steps(prepared)
    if times:
        result.update(_timing(spec, times, compile_s))
        result["tflops"] = result["flops_per_step"] / (result["step_ms"] / 1e3) / 1e12
    return result


def profile_steps(prepared: dict, steps: int = 3) -> tuple[str, float | None]:
    """Where a step's time goes, from ``torch.profiler`` over a few steps (``pretrain.train.profiling.summarize``),
    and the GPU's busy ms per step (None on CPU)."""
    from pretrain.train.profiling import start_profiler, stop_and_summarize

    device = prepared["device"]
    prof, started = start_profiler(device), time.perf_counter()
    for _ in range(steps):
        prepared["step"]()
    return stop_and_summarize(prof, started, steps, device)


def measure_interleaved(specs: list[dict]) -> dict:
    """Step times of several variants built side by side and stepped in turn (A B C A B C ...), so that a change in
    machine load (other processes on a shared CPU) hits every variant alike. Returns {variant: timing}."""
    if specs[0].get("threads"):
        torch.set_num_threads(specs[0]["threads"])
    prepared = [prepare(dict(spec, parity=False)) for spec in specs]
    compile_s = {}
    for spec, p in zip(specs, prepared):
        t0 = time.perf_counter()
        p["step"]()
        compile_s[spec["variant"]] = time.perf_counter() - t0 if spec.get("compile") else None
    for _ in range(specs[0]["warmup"]):
        for p in prepared:
            p["step"]()
    times = {spec["variant"]: [] for spec in specs}
    for _ in range(_blocks(specs[0])):
        for spec, p in zip(specs, prepared):
            times[spec["variant"]].append(_timed(p, spec["block"]))
    return {spec["variant"]: _timing(spec, times[spec["variant"]], compile_s[spec["variant"]]) for spec in specs}


def _worker(fn, spec, conn) -> None:
    try:
        conn.send(fn(spec))
    except BaseException as exc:  # report, never hang the parent
        conn.send({"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
    finally:
        conn.close()


def _failed(result: dict) -> bool:
    return bool(result.get("oom") or result.get("error"))


class Runner:
    """Runs measurements in fresh forkserver workers (CPU: peak RSS per measurement) or in this process (CUDA)."""

    def __init__(self, isolate: bool, interleave: bool):
        self.ctx = None
        self.interleave = interleave
        if isolate:
            self.ctx = mp.get_context("forkserver")
            self.ctx.set_forkserver_preload(["torch", "transformers", "transformers.models.perceiver",
                                             "pretrain.model.perceiver", "pretrain.model.hf"])

    def call(self, fn, spec):
        if self.ctx is None:
            result = None
            try:
                result = fn(spec)
            except torch.cuda.OutOfMemoryError:
                pass
            gc.collect()  # the exception's frames (models, activations) are gone now
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return {"oom": True} if result is None else result
        parent, child = self.ctx.Pipe(duplex=False)
        proc = self.ctx.Process(target=_worker, args=(fn, spec, child))
        proc.start()
        child.close()
        try:
            result = parent.recv()
        except EOFError:  # killed (the kernel's OOM killer) before it could answer
            result = {"oom": True, "error": "worker died"}
        proc.join()
        if proc.exitcode not in (0, None) and "error" not in result:
            result["error"] = f"worker exit code {proc.exitcode}"
        return result

    def group(self, specs: list[dict]) -> dict:
        """Measure variants at one (batch, length): {variant: row numbers}."""
        if not self.interleave:
            return {s["variant"]: dict(self.call(measure, s), batch=s["batch"], length=s["length"]) for s in specs}
        results = {s["variant"]: dict(self.call(measure, dict(s, steps=0, warmup=1)), batch=s["batch"],
                                      length=s["length"]) for s in specs}
        ok = [s for s in specs if not _failed(results[s["variant"]])]
        if ok:
            timing = self.call(measure_interleaved, ok)
            for s in ok:
                results[s["variant"]].update(timing if _failed(timing) else timing[s["variant"]])
        for r in results.values():
            if not _failed(r):
                r["tflops"] = r["flops_per_step"] / (r["step_ms"] / 1e3) / 1e12
        return results


def matmul_peak_tflops(device: torch.device, n: int = 8192, iters: int = 50) -> float:
    """bf16 dense matmul rate measured now (the MFU denominator)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)

    def products() -> None:
        for _ in range(iters):
            a @ b

    products()  # warm-up
    return 2 * n**3 * iters / elapsed_s(products, device) / 1e12


# ----------------------------------------------------------------------------------------------------------- output
COLUMNS = ("row", "B", "M", "samples/s", "step ms", "GFLOP/step", "TFLOP/s", "MFU", "peak mem MiB", "vs HF")


def _row(label: str, r: dict, peak_tflops: float | None, ref: dict | None) -> list[str]:
    if _failed(r):
        what = "OOM" if r.get("oom") else "ERROR " + r["error"][:60]
        return [label, str(r.get("batch", "")), str(r.get("length", "")), what] + [""] * 6
    mfu = f"{r['tflops'] / peak_tflops:.1%}" if peak_tflops else "-"
    ratio = "-"
    if ref is not None and not _failed(ref):
        ratio = f"{r['samples_per_s'] / ref['samples_per_s']:.3f}x"
    return [label, str(r["batch"]), str(r["length"]), f"{r['samples_per_s']:.2f}", f"{r['step_ms']:.1f}",
            f"{r['flops_per_step'] / 1e9:.1f}", f"{r['tflops']:.3f}", mfu,
            f"{r['peak_mem_bytes'] / 2**20:.0f}", ratio]


def format_table(rows: list[list[str]]) -> str:
    widths = [max(len(COLUMNS[i]), *(len(r[i]) for r in rows)) for i in range(len(COLUMNS))]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(COLUMNS), line(["-" * w for w in widths])] + [line(r) for r in rows])


# ----------------------------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, help="headline batch (cpu 8, cuda 32)")
    p.add_argument("--length", type=int, help="headline input length M (cpu 1024, cuda 2048)")
    p.add_argument("--steps", type=int, help="timed steps; the median is reported (cpu 8, cuda 20)")
    p.add_argument("--warmup", type=int, help="untimed steps first (cpu 2, cuda 3)")
    p.add_argument("--block", type=int,
                   help="steps timed back to back, without waiting for the GPU between them, per sample of the "
                        "median (cpu 1, cuda 5; 1 times each step alone)")
    p.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True, help="length sweep (default on)")
    p.add_argument("--sweep-lengths", type=lambda s: [int(x) for x in s.split(",")],
                   help="comma-separated M values (cpu 256,1024,4096; cuda 2048,8192,32768)")
    p.add_argument("--sweep-batch", type=int, help="batch for the sweep (cpu 2, cuda 16)")
    p.add_argument("--masked", action=argparse.BooleanOptionalAction, default=True,
                   help="extra row: ours decoding only 15%% of the positions (default on)")
    p.add_argument("--compile", action="store_true", help="torch.compile our forward (off: it did not help, see README)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. reduce-overhead (CUDA graphs)")
    p.add_argument("--attention-backend", default="auto", help="our model's model.attention_backend")
    p.add_argument("--latent-attention-backend", default=None,
                   help="another backend for our latent self-attention layers only (e.g. math: 256 x 256 scores, "
                        "where a fused kernel is latency-bound)")
    p.add_argument("--compile-hf", action="store_true", help="with --compile, compile transformers' model too")
    p.add_argument("--precision", choices=sorted(PRECISIONS),
                   help="both models: autocast (cuda default), bf16 (bf16 weights, fp32 master copies) or fp32 "
                        "(cpu default)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads in each measurement (CPU)")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="one worker process per measurement (default: on for CPU, where peak RSS needs it)")
    p.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                   help="time the variants side by side, stepping them in turn (default: on for CPU, where other "
                        "processes share the cores; memory and FLOPs then come from separate workers)")
    p.add_argument("--omp-passive", action="store_true",
                   help="OMP_WAIT_POLICY=PASSIVE in the worker processes: on a CPU shared with other jobs, spinning "
                        "OpenMP threads turn contention into 3-10x step-time spikes; passive waiting keeps it ~2x")
    p.add_argument("--profile", action="store_true",
                   help="after timing, profile a few steps of each headline variant and print where the time goes "
                        "(kernels per step, GPU busy time, top kernels or CPU operators)")
    p.add_argument("--out", help="also write the table and the raw numbers as JSON here")
    args = p.parse_args(argv)
    for key, value in DEFAULTS[args.device].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if min(args.batch, args.length, args.sweep_batch, *args.sweep_lengths, args.steps, args.block) < 1 or args.warmup < 0:
        p.error("--batch, --length, --sweep-batch, --sweep-lengths, --steps and --block must be positive, --warmup >= 0")
    if args.steps < args.block:
        p.error(f"--steps {args.steps} is less than one --block of {args.block} steps")
    if args.isolate is None:
        args.isolate = args.device == "cpu"
    if args.interleave is None:
        args.interleave = args.device == "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here")
    if args.device == "cuda" and args.isolate:
        p.error("--isolate is for CPU (CUDA peak memory is per measurement already)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="  %(name)s: %(message)s")
    logging.getLogger("pretrain.perf.autotune").setLevel(logging.INFO)  # which attention kernel won, per shape
    device = torch.device(args.device)
    cfg = GPU_CONFIG if args.device == "cuda" else CPU_CONFIG
    base = dict(device=args.device, config=cfg, steps=args.steps, warmup=args.warmup, block=args.block,
                precision=args.precision,
                threads=args.threads, compile_mode=args.compile_mode, compile_hf=args.compile_hf,
                attention_backend=args.attention_backend, latent_attention_backend=args.latent_attention_backend)
    if args.omp_passive:
        if args.isolate:
            os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # read by the workers' OpenMP runtime at start-up
        else:
            print("--omp-passive only reaches worker processes (--isolate); set OMP_WAIT_POLICY=PASSIVE yourself",
                  file=sys.stderr)
    run = Runner(args.isolate, args.interleave)
    import transformers

    header = (f"device={args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else cpu_name()}, "
              f"{torch.get_num_threads()} threads) torch={torch.__version__} transformers={transformers.__version__} "
              f"precision={args.precision}: {PRECISIONS[args.precision]}")
    print(header, flush=True)
    print("config: " + ", ".join(f"{k}={v}" for k, v in cfg.items()) + ", attention dropout 0.1, train mode", flush=True)

    peak = None
    if args.device == "cuda":
        peak = matmul_peak_tflops(device)
        torch.cuda.empty_cache()  # its operands' blocks: not the variants' memory
        print(f"bf16 matmul 8192^3: {peak:.1f} TFLOP/s (MFU denominator)", flush=True)

    def show(results: dict) -> None:
        for variant, r in results.items():
            what = (r.get("error") or "OOM") if _failed(r) else f"{r['step_ms']:.1f} ms/step"
            print(f"  measured {variant} B={r['batch']} M={r['length']}: {what}", flush=True)

    t_start = time.perf_counter()
    labels = {HF: "transformers PerceiverForMaskedLM", OURS: "ours, full decode (text_logits)",
              OURS_MASKED: "ours, 15% masked decode [not like-for-like]"}
    variants = [HF, OURS] + ([OURS_MASKED] if args.masked else [])
    specs = [dict(base, variant=v, batch=args.batch, length=args.length, parity=v == OURS,
                  compile=args.compile, profile=args.profile) for v in variants]
    results = {"headline": run.group(specs), "sweep": []}
    show(results["headline"])
    ref = results["headline"][HF]
    rows = [_row(labels[v], results["headline"][v], peak, None if v == HF else ref) for v in variants]

    if args.sweep:
        rows.append(["length sweep (full decode)"] + [""] * (len(COLUMNS) - 1))
        for length in args.sweep_lengths:
            pair = run.group([dict(base, variant=v, batch=args.sweep_batch, length=length,
                                   compile=args.compile) for v in (HF, OURS)])
            show(pair)
            results["sweep"].append({"length": length, **pair})
            rows.append(_row(f"  transformers M={length}", pair[HF], peak, None))
            rows.append(_row(f"  ours M={length}", pair[OURS], peak, pair[HF]))

    table = format_table(rows)
    print()
    print(table)
    ours = results["headline"][OURS]
    notes = [
        f"peak mem: {'torch.cuda.max_memory_allocated (weights, grads, optimizer state, activations)' if args.device == 'cuda' else 'growth of the worker process peak RSS over its RSS after building the model (grads, optimizer state, activations; not the weights)' if args.isolate else 'peak RSS growth in one process (order-dependent: use --isolate)'}",
        "GFLOP/step: FlopCounterMode over one step (matmuls + attention; ours includes the q/k head-dim zero padding)",
        (f"step ms: median of {args.steps // args.block} blocks of {args.block} steps run back to back"
         if args.block > 1 else f"step ms: median of {args.steps} steps, each timed alone")
        + (", the variants interleaved" if args.interleave else ""),
    ]
    if ours.get("parity") is not None:
        notes.append(f"same weights: max |logits(ours) - logits(transformers)| = "
                     f"{ours['parity']['fp32_vs_transformers']:.2e} (fp32, eval); ours under bf16 autocast, Linear "
                     f"weights cast together vs autocast's own casts: "
                     f"{ours['parity']['autocast_casts_together_vs_own']:.2e}")
    timed = [r for r in [*results["headline"].values(), *(x[v] for x in results["sweep"] for v in (HF, OURS))]
             if not _failed(r)]
    spread = max((max(r["step_ms_all"]) / min(r["step_ms_all"]) for r in timed), default=1.0)
    if spread > 1.5:
        notes.append(f"WARNING: step times of one row vary up to {spread:.1f}x (another process on these cores?); "
                     f"the medians are unreliable: rerun on a quiet machine" +
                     ("" if args.omp_passive or args.device == "cuda" else " or with --omp-passive"))
    if os.environ.get("OMP_WAIT_POLICY"):
        notes.append(f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
    notes.append(f"bench wall time {time.perf_counter() - t_start:.0f} s")
    print("\n".join(notes))

    ratio = float("nan")
    if not (_failed(ours) or _failed(ref)):
        ratio = ours["samples_per_s"] / ref["samples_per_s"]
    for variant, r in results["headline"].items():
        if r.get("profile"):
            print(f"\nprofile: {labels[variant]}, B={r['batch']} M={r['length']}: {r['profile']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"header": header, "args": vars(args), "config": cfg, "matmul_peak_tflops": peak,
                       "table": table, "notes": notes, "ratio_vs_hf": ratio, **results}, f, indent=2)
    for r in [*results["headline"].values(), *(x[v] for x in results["sweep"] for v in (HF, OURS))]:
        if r.get("traceback"):
            print(r["traceback"], file=sys.stderr)
    if ours.get("gpu_busy_ms") and ref.get("gpu_busy_ms"):  # the ratio of GPU work, whatever the host's speed
        print(f"gpu_busy_ratio_vs_hf={ref['gpu_busy_ms'] / ours['gpu_busy_ms']:.3f}")
    print(f"ratio_vs_hf={ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
