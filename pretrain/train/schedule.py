"""The learning-rate schedule: linear warmup, then cosine decay to ``lr x min_lr_ratio`` at ``train.max_steps``.

A pure function of the step, shared by the engine and the plain-PyTorch benchmark, so both follow the same curve.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Dict, List, Tuple

import torch

from ..config import OptimConfig


def lr_factor(step: int, optim: OptimConfig, max_steps: int) -> float:
    """Multiplier of ``optim.lr`` for the optimizer step ``step`` (0-based)."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    decay_steps = max(1, max_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / decay_steps)
    return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig, max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR (its state -- the step count -- is saved in checkpoints; the curve comes from the config)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, optim=optim, max_steps=max_steps))


def apply_optim_config(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                       optim: OptimConfig) -> List[str]:
    """Put the config's hyperparameters back after a checkpoint load, which restored the saved run's: its learning
    rate (the schedule's base and the groups' current rate), betas, eps and weight decay. A resumed run follows its
    config, as the schedule's shape already does. Returns what changed, as "name: saved -> config" lines."""
    changed: List[str] = []
    for i, (group, wanted) in enumerate(zip(optimizer.param_groups, group_settings(optim))):
        for key, value in wanted.items():
            saved = tuple(group[key]) if key == "betas" else group[key]
            if saved != value:
                changed.append(f"param group {i} {key}: {saved} -> {value}")
            group[key] = value
        if scheduler.base_lrs[i] != optim.lr:
            changed.append(f"param group {i} lr: {scheduler.base_lrs[i]} -> {optim.lr}")
        scheduler.base_lrs[i] = optim.lr
        group["lr"] = optim.lr * scheduler.lr_lambdas[i](scheduler.last_epoch)
    return changed


def group_settings(optim: OptimConfig) -> List[Dict[str, Any]]:
    """The settings of the two parameter groups: weight decay on matrices, none on biases, norms and other 1-D."""
    common = {"betas": tuple(optim.betas), "eps": optim.eps}
    return [dict(common, weight_decay=optim.weight_decay), dict(common, weight_decay=0.0)]


def parameter_groups(model: torch.nn.Module) -> List[List[Tuple[str, torch.nn.Parameter]]]:
    """The trainable parameters, named, in the optimizer's groups and order (those of ``group_settings``); export
    maps the optimizer's per-group master copies back to names through it."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    return [[(name, p) for name, p in named if p.dim() >= 2], [(name, p) for name, p in named if p.dim() < 2]]


def build_optimizer(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """A client ``torch.optim.AdamW`` (DeepSpeed's FusedAdam/CPUAdam JIT-compile for ~30 s), in the groups of
    ``parameter_groups`` with the settings of ``group_settings``."""
    groups = [dict(settings, params=[p for _, p in named])
              for named, settings in zip(parameter_groups(model), group_settings(optim))]
    return torch.optim.AdamW(groups, lr=optim.lr)
