"""Everything a training run holds, built in order: run directory and log, model, engine, streams, tracker,
checkpointer (restored when resuming). The loop in ``loop.py`` only uses what this returns."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import torch
from omegaconf import OmegaConf

from launch.env import DistEnv
from ..checkpoint import CHECKPOINTS, Checkpointer, RngState
from ..config import Config, config_to_dict, global_batch
from ..data import DataStream, ValidationPass, expand_spec, listed_classes, saved_streams
from ..model.hf import export_refusal
from ..tracking import Tracker
from .engine import build_engine, resolve_precision
from .schedule import apply_optim_config, parameter_groups

if TYPE_CHECKING:  # pretrain.start imports this package
    from ..start import Start

log = logging.getLogger("pretrain")


@dataclass
class Progress:
    """Optimizer steps taken and samples seen (over all ranks)."""

    step: int = 0
    samples: int = 0

    def state_dict(self) -> Dict[str, int]:
        return {"step": self.step, "samples": self.samples}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.step, self.samples = int(state["step"]), int(state["samples"])


@dataclass
class Run:
    cfg: Config
    env: DistEnv
    device: torch.device
    dtype: torch.dtype
    run_dir: Path
    engine: Any
    stream: DataStream
    val: Optional[ValidationPass]
    progress: Progress
    tracker: Tracker
    checkpointer: Checkpointer
    class_names: List[str]


def checkpoint_dir(cfg: Config) -> Path:
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else Path(cfg.run.dir) / CHECKPOINTS


def setup_logging(run_dir: Path, rank: int) -> None:
    """Rank 0 logs INFO (the step lines among it) to stderr and ``run_dir/train.log``; the other ranks log their
    warnings and errors to both (appending: a line is one write)."""
    handlers = [logging.StreamHandler(sys.stderr), logging.FileHandler(run_dir / "train.log")]
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    for handler in handlers:
        handler.setFormatter(fmt)
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, handlers=handlers, force=True)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def build_run(cfg: Config, env: DistEnv, device: torch.device, start: Start) -> Run:
    """The run ``start`` (``pretrain.start.decide_start``) describes, its model, weights and state in place."""
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    setup_logging(run_dir, env.rank)
    log.info("rank %d of %d (%s launcher), master %s:%s, %s", env.rank, env.world_size, env.launcher,
             env.master_addr, env.master_port or "(a free port)", device)
    resolved = config_to_dict(cfg)
    if env.rank == 0:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved))
    resume_from, saved, init, universal = start.resume_from, start.saved, start.init, start.universal
    refusal = export_refusal(cfg.model)
    if refusal and env.rank == 0:
        log.warning("%s", refusal)
    if cfg.optim.warmup_steps > cfg.train.max_steps and env.rank == 0:
        log.warning("optim.warmup_steps %d > train.max_steps %d: the learning rate never reaches optim.lr %g (it "
                    "ends the run at %.0f%% of it); lower optim.warmup_steps", cfg.optim.warmup_steps,
                    cfg.train.max_steps, cfg.optim.lr, 100 * cfg.train.max_steps / cfg.optim.warmup_steps)
    model = start.model
    if init.summary:
        log.info("%s", init.summary)
    frozen = init.apply(model, cfg.train.freeze)
    if frozen:
        trainable = [p for p in model.parameters() if p.requires_grad]
        log.info("train.freeze %s: %d tensors frozen, %d tensors (%s parameters) train", list(cfg.train.freeze),
                 len(frozen), len(trainable), f"{sum(p.numel() for p in trainable):,}")
    pretrained = init.pretrained.loaded
    engine = build_engine(cfg, model, env.world_size, device, run_dir, universal, pretrained)
    stream = DataStream(cfg.data, cfg.model, env.rank, env.world_size, global_batch(cfg, env.world_size),
                        saved_streams(start.data_state))
    val = None
    if cfg.data.val_shards and cfg.train.eval_every_steps:
        val = ValidationPass(cfg.data, cfg.model, env.rank, env.world_size)
    progress = Progress()
    resume_step = start.step if saved else None
    tracker = Tracker(cfg.wandb, run_dir, env.rank, resolved, cfg.run.name, resume_step)
    checkpointer = Checkpointer(checkpoint_dir(cfg), engine, cfg.checkpoint.keep_last,
                                shared={"progress": progress, "tracker": tracker, "pretrained": init.pretrained},
                                per_rank={"data": stream, "rng": RngState()}, config=resolved)
    if resume_from is not None:
        if universal:
            log.info("checkpoint %s was saved by %d processes, resuming with %d: loading it as a DeepSpeed universal "
                     "checkpoint", resume_from, saved["world_size"], env.world_size)
        checkpointer.load(resume_from, universal)
        kinds = [kind for kind, _ in parameter_groups(engine.module, pretrained)]
        for change in apply_optim_config(engine.optimizer, engine.lr_scheduler, cfg.optim, kinds):
            log.info("resuming with the config's optimizer setting, not the checkpoint's: %s", change)
        log.info("resumed from %s at step %d (%d samples seen)", resume_from, progress.step, progress.samples)
    dtype = torch.bfloat16 if resolve_precision(cfg, device) == "bf16" else torch.float32
    class_names = max((listed_classes(expand_spec(spec, f"data.val_shards[{i}]"))
                       for i, spec in enumerate(cfg.data.val_shards)), key=len, default=[])
    return Run(cfg, env, device, dtype, run_dir, engine, stream, val, progress, tracker, checkpointer, class_names)
