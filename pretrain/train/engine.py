"""DeepSpeed engine set-up: the JSON generated from our schema (one source of truth), written to the run directory.

The optimizer is a client ``torch.optim.AdamW`` and the schedule a ``LambdaLR`` (no JIT-compiled ops); DeepSpeed
steps the schedule on every optimizer step and saves both in its checkpoints.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Collection, Dict

import torch

from ..config import Config, gradient_accumulation_steps
from ..perf import optimize
from .schedule import build_optimizer, build_scheduler


def resolve_precision(cfg: Config, device: torch.device) -> str:
    """``auto`` is bf16 on GPU and fp32 on CPU."""
    if cfg.train.precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return cfg.train.precision


def _merge(base: Dict[str, Any], extra: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def deepspeed_config(cfg: Config, world_size: int, device: torch.device, universal: bool = False) -> Dict[str, Any]:
    """The DeepSpeed JSON for ``cfg``; ``deepspeed.extra`` is merged last (it may override anything)."""
    micro, gas = cfg.data.batch_size, gradient_accumulation_steps(cfg, world_size)
    precision = resolve_precision(cfg, device)
    zero: Dict[str, Any] = {"stage": cfg.deepspeed.zero_stage}
    if cfg.deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    generated = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "train_batch_size": micro * gas * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        # No per-tensor overflow scan: operators per gradient tensor and a host sync every step (bench/README.md).
        # The loop stops on a non-finite loss or gradient norm instead, before any save.
        "bf16": {"enabled": precision == "bf16", "check_grad_overflow": False},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": universal},
    }
    if precision == "autocast":
        generated["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    if cfg.deepspeed.fp32_grad_accumulation:
        generated["data_types"] = {"grad_accum_dtype": "fp32"}
    return _merge(generated, cfg.deepspeed.extra)


def build_engine(cfg: Config, model: torch.nn.Module, world_size: int, device: torch.device, run_dir: Path,
                 universal: bool = False, pretrained: Collection[str] = ()):
    """``deepspeed.initialize`` on ``model``, first given the performance layer (``pretrain.perf.optimize``), with the
    generated config, also saved as ``run_dir/deepspeed.json``;
    ``pretrained``: the parameters ``model.init_from`` loaded (their own optimizer groups)."""
    import deepspeed

    ds_config = deepspeed_config(cfg, world_size, device, universal)
    if cfg.deepspeed.zero_stage == 0 and ds_config["bf16"]["enabled"]:
        logging.getLogger("pretrain").warning(
            "deepspeed.zero_stage=0 with bf16 runs DeepSpeed's unfused bf16 optimizer, which reads an overflow flag "
            "of every gradient tensor back to the host at each step (a GPU sync per tensor); zero_stage 1 keeps the "
            "weights whole and has none of them")
    if int(torch.distributed.get_rank()) == 0:
        (run_dir / "deepspeed.json").write_text(json.dumps(ds_config, indent=2) + "\n")
    optimize(model, cfg.model.attention_backend, cfg.train.compile)
    optimizer = build_optimizer(model, cfg.optim, pretrained)
    engine, _, _, _ = deepspeed.initialize(
        model=model.to(device), optimizer=optimizer, config=ds_config,
        lr_scheduler=lambda wrapped: build_scheduler(wrapped, cfg.optim, cfg.train.max_steps),
    )
    return engine
