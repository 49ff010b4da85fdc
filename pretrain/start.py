"""How a training run starts, decided once before any process group: fresh, from ``model.init_from``, or resumed
(on its world size or another one), from one read of the checkpoint's client state, with the model built once.

Everything here is checked before training: a mistake is found by every rank alike and reported once
(``pretrain.__main__``), before any process group or run directory exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from .checkpoint import check_fits, peek_client_state, resolve_resume
from .config import Config, ConfigError, global_batch
from .data import check_before_start, expand_spec, listed_classes
from .init_from import InitPlan, plan_start
from .model import PerceiverIO
from .train.run import checkpoint_dir


@dataclass
class Start:
    """The run's model (``train.seed``'s initial weights, on the CPU), what it starts from and, when it resumes, the
    checkpoint and its client state."""

    model: PerceiverIO
    init: InitPlan
    resume_from: Optional[Path] = None
    saved: Optional[Dict[str, Any]] = None
    world_size: int = 1

    @property
    def step(self) -> int:
        """The steps already trained: the checkpoint's, else 0."""
        return self.saved["shared"]["progress"]["step"] if self.saved else 0

    @property
    def data_state(self) -> Optional[Dict[str, Any]]:
        return saved_data_state(self.saved)

    @property
    def universal(self) -> bool:
        """The checkpoint was saved by another number of processes: it loads as a DeepSpeed universal checkpoint."""
        return self.saved is not None and self.saved["world_size"] != self.world_size


def saved_data_state(saved: Optional[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The training stream's state in a checkpoint's client state, or None."""
    return saved["per_rank"][0].get("data") if saved else None


def check_data_paths(cfg: Config, world_size: int, saved_data: Optional[dict]) -> None:
    """Every shard spec names shards, the model takes every class their indexes list, and the streams can run
    (``pretrain.data.check_before_start``): what ``cfg`` alone cannot tell, once :meth:`Config.validate` passed it."""
    for key in ("train_shards", "val_shards"):
        for i, spec in enumerate(getattr(cfg.data, key)):
            classes = listed_classes(expand_spec(spec, f"data.{key}[{i}]"))
            if len(classes) > cfg.model.num_classes > 0:  # else most samples would be skipped for their label
                raise ConfigError(f"model.num_classes: {cfg.model.num_classes}, but data.{key}[{i}] has "
                                  f"{len(classes)} classes ({', '.join(classes[:5])}{', ...' * (len(classes) > 5)} in "
                                  f"its index.json); set model.num_classes={len(classes)}")
    splits = ["train", "val"] if cfg.train.eval_every_steps else ["train"]
    check_before_start(cfg.data, splits, world_size, global_batch(cfg, world_size), saved_data)


def decide_start(cfg: Config, world_size: int, resume: str) -> Start:
    """The run's start (``--resume``: ``auto``, ``none`` or a path), every part of it checked. A run already at
    ``train.max_steps`` is returned without its first weights planned: it trains nothing."""
    resume_from = resolve_resume(resume, checkpoint_dir(cfg))
    saved = peek_client_state(resume_from) if resume_from is not None else None
    check_data_paths(cfg, world_size, saved_data_state(saved))
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = PerceiverIO(cfg.model)
    start = Start(model, InitPlan(), resume_from, saved, world_size)
    if resume_from is not None:
        check_fits(resume_from, model)
        if start.step >= cfg.train.max_steps:
            return start
    start.init = plan_start(cfg, model, resume_from, saved)
    return start
