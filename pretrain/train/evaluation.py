"""The evaluation pass: every validation sample scored once, the same samples and masks every time.

Ranks hold different numbers of samples (shards do not split evenly), so each evaluates while any rank still has a
batch, empty batches once its own are done: every rank runs the model the same number of times (ZeRO-3 gathers
parameters inside the forward). Losses are sums over targets divided by the targets' count over every rank, so a
sample weighs the same whichever rank or batch holds it, and the total is the weighted sum of the parts shown.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Dict, Optional

import torch

from ..modalities import REGISTRY
from .batches import to_device
from .distributed import any_over_ranks, sum_over_ranks
from .objective import predict, target_counts, weighted_total
from .run import Run


@torch.no_grad()
def evaluate(run: Run) -> Dict[str, float]:
    """``val/loss`` and ``val/loss/<modality>`` (mean over every target of the validation samples), ``val/samples``
    (the samples scored, all ranks: those that decoded), and each decoded modality's metrics (with a label target,
    top-1 accuracy over those samples, overall and per class). ``train.eval_batches`` > 0 stops each rank after that many batches."""
    run.engine.eval()
    names = None
    sums: Optional[torch.Tensor] = None  # per modality: the sum of its losses over targets, then the targets' count
    scored = torch.zeros((), device=run.device)
    counted: Dict[str, torch.Tensor] = {}  # per modality with metrics beyond its loss, their counts
    padding = None
    limit = run.cfg.train.eval_batches
    with contextlib.closing(iter(run.val)) as batches:
        for _ in range(limit) if limit else itertools.count():
            batch = next(batches, None)
            if not any_over_ranks(batch is not None, run.device):
                break
            if batch is None:  # moved to the device once, as it is the same every time
                padding = padding or to_device(run.val.padding(), run.device, run.dtype)
            batch = padding if batch is None else to_device(batch, run.device, run.dtype)
            summed, out = predict(run.engine, batch)
            counts = target_counts(batch)
            names = names or sorted(counts)
            found = torch.stack([summed[n].float() for n in names] + [counts[n].float() for n in names])
            sums = found if sums is None else sums + found
            scored += batch["valid"].sum()
            for name, pred in out.items():
                found = REGISTRY[name].metric_counts(pred, batch["targets"][name])
                if found is not None:
                    counted[name] = counted[name] + found if name in counted else found
    run.engine.train()
    if sums is None:  # no rank had a batch: every rank left the loop at once
        return {"val/samples": 0.0}
    totals = sum_over_ranks(torch.cat([sums, scored[None]])).tolist()
    losses = {name: totals[i] / totals[len(names) + i] for i, name in enumerate(names) if totals[len(names) + i]}
    metrics = {f"val/loss/{name}": loss for name, loss in losses.items()}
    metrics["val/loss"] = float(weighted_total(losses, run.cfg.train.loss_weights))
    metrics["val/samples"] = totals[-1]
    for name in sorted(counted):  # every rank decodes the same modalities: the same collectives, in one order
        found = REGISTRY[name].metrics(sum_over_ranks(counted[name]), run.class_names)
        metrics.update({f"val/{k}": v for k, v in found.items()})
    return metrics
