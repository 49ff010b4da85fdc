"""Batches for the training step: the stream without end, tensors onto the device in the engine's dtype, and
``StepBatches``, which the step fetches its micro-batches from (the wait timed, the FLOPs of a step counted on the
first); the logbook only records the numbers it hands over."""

from __future__ import annotations

import time
from typing import Iterator, List, Optional, Tuple

import torch

from ..config import gradient_accumulation_steps
from ..data import DataStream
from ..perf import first_step_flops
from .metrics import input_tokens
from .run import Run


def forever(stream: DataStream) -> Iterator[dict]:
    while True:
        yield from stream


def to_device(tree, device: torch.device, dtype: torch.dtype):
    """Tensors of a (nested) batch onto ``device``; floating ones in the engine's dtype."""
    if isinstance(tree, dict):
        return {key: to_device(value, device, dtype) for key, value in tree.items()}
    if isinstance(tree, torch.Tensor):
        tree = tree.to(device, non_blocking=True)
        return tree.to(dtype) if tree.is_floating_point() else tree
    return tree


class StepBatches:
    """The training stream, a step's ``gas`` micro-batches at a time. ``flops``: a step's over every rank, counted on
    the first batch before it is trained on (None until then)."""

    def __init__(self, run: Run):
        self.run = run
        self.gas = gradient_accumulation_steps(run.cfg, run.env.world_size)
        self.stream = forever(run.stream)
        self.flops: Optional[float] = None

    def next(self) -> Tuple[List[dict], float, int]:
        """The step's micro-batches on the device, the seconds waited for them, and their input tokens over every
        rank (this rank's times the world size)."""
        run, world = self.run, self.run.env.world_size
        batches, waited, tokens = [], 0.0, 0
        for _ in range(self.gas):
            start = time.perf_counter()
            batch = next(self.stream)
            waited += time.perf_counter() - start
            tokens += input_tokens(batch["inputs"]) * world
            batch = to_device(batch, run.device, run.dtype)
            if self.flops is None:
                args, cfg = (batch["inputs"], batch["decode"]), run.cfg
                step_flops = first_step_flops(run.engine.module, args, cfg.model.attention_backend, cfg.train.compile,
                                              run.device)
                self.flops = self.gas * world * step_flops
            batches.append(batch)
        return batches, waited, tokens
