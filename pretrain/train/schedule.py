"""The learning-rate schedule: linear warmup, then cosine decay to ``lr x min_lr_ratio`` at ``train.max_steps``.

A pure function of the step, shared by the engine and the plain-PyTorch benchmark, so both follow the same curve.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Collection, Dict, List, Sequence, Tuple

import torch

from ..config import OptimConfig


def lr_factor(step: int, optim: OptimConfig, max_steps: int) -> float:
    """Multiplier of ``optim.lr`` for the optimizer step ``step`` (0-based)."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    decay_steps = max(1, max_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / decay_steps)
    return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig,
                    max_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR (its state -- the step count -- is saved in checkpoints; the curve comes from the config)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, partial(lr_factor, optim=optim, max_steps=max_steps))


@dataclass(frozen=True)
class GroupKind:
    """What sets an optimizer group's settings: weight decay (matrices) or none (biases, norms and other 1-D), and
    whether its parameters came from ``model.init_from`` (their learning rate is scaled)."""

    decay: bool
    pretrained: bool = False

    def settings(self, optim: OptimConfig) -> Dict[str, Any]:
        scale = optim.pretrained_lr_scale if self.pretrained else 1.0
        return {"lr": optim.lr * scale, "betas": tuple(optim.betas), "eps": optim.eps,
                "weight_decay": optim.weight_decay if self.decay else 0.0}


ParamGroups = List[Tuple[GroupKind, List[Tuple[str, torch.nn.Parameter]]]]


def parameter_groups(model: torch.nn.Module, pretrained: Collection[str] = ()) -> ParamGroups:
    """The trainable parameters, named, in the optimizer's groups and order (empty groups left out); export maps the
    optimizer's per-group master copies back to names through it. ``pretrained``: the names ``model.init_from``
    loaded, grouped apart from the new ones."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    kinds = [GroupKind(decay, from_source) for from_source in ((True, False) if pretrained else (False,))
             for decay in (True, False)]
    groups = [(kind, [(name, p) for name, p in named
                      if (p.dim() >= 2) == kind.decay and (name in pretrained) == kind.pretrained]) for kind in kinds]
    return [(kind, params) for kind, params in groups if params]


def build_optimizer(model: torch.nn.Module, optim: OptimConfig, pretrained: Collection[str] = ()) -> torch.optim.AdamW:
    """A client ``torch.optim.AdamW`` (DeepSpeed's FusedAdam/CPUAdam JIT-compile at start-up) over the groups of
    :func:`parameter_groups`, each with its kind's settings."""
    groups = [dict(kind.settings(optim), params=[p for _, p in named])
              for kind, named in parameter_groups(model, pretrained)]
    return torch.optim.AdamW(groups, lr=optim.lr)


def apply_optim_config(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                       optim: OptimConfig, kinds: Sequence[GroupKind]) -> List[str]:
    """Put the config's hyperparameters back after a checkpoint load, which restored the saved run's: its learning
    rate (the schedule's base and the groups' current rate), betas, eps and weight decay. A resumed run follows its
    config, as the schedule's shape already does. ``kinds``: those of the groups, as :func:`parameter_groups` made
    them. Returns what changed, as "name: saved -> config" lines."""
    changed: List[str] = []
    for i, (group, kind) in enumerate(zip(optimizer.param_groups, kinds)):
        wanted = kind.settings(optim)
        base_lr = wanted.pop("lr")
        for key, value in wanted.items():
            saved = tuple(group[key]) if key == "betas" else group[key]
            if saved != value:
                changed.append(f"param group {i} {key}: {saved} -> {value}")
            group[key] = value
        if scheduler.base_lrs[i] != base_lr:
            changed.append(f"param group {i} lr: {scheduler.base_lrs[i]} -> {base_lr}")
        scheduler.base_lrs[i] = base_lr
        group["lr"] = base_lr * scheduler.lr_lambdas[i](scheduler.last_epoch)
    return changed
