"""The evaluation pass: losses (and accuracy with a label target) over the same validation batches every time."""

from __future__ import annotations

import itertools
from collections import defaultdict
from typing import Dict, Optional

import torch

from .batches import to_device
from .distributed import mean_over_ranks, sum_over_ranks
from .objective import accuracy_metrics, label_counts, over_present, predict, present, weighted_total
from .run import Run


@torch.no_grad()
def evaluate(run: Run) -> Dict[str, float]:
    """Per-modality and total loss over the first ``train.eval_batches`` validation batches (all when 0), the same
    batches every time, averaged over ranks; with a label target, top-1 accuracy over all those samples and per
    class."""
    run.engine.eval()
    run.val.load_state_dict({"epoch": 0, "batches": 0})
    sums: Dict[str, float] = defaultdict(float)
    counts: Optional[torch.Tensor] = None
    batches = run.cfg.train.eval_batches or len(run.val)
    for batch in itertools.islice(run.val, batches):
        batch = to_device(batch, run.device, run.dtype)
        losses, out = predict(run.engine, batch)
        losses["total"] = weighted_total(losses, run.cfg.train.loss_weights)
        for name, loss in losses.items():
            sums[name] += float(loss) / batches
        for name, share in present(batch).items():
            sums[f"present/{name}"] += float(share) / batches
        if "label" in out:
            found = label_counts(out["label"], batch["targets"]["label"])
            counts = found if counts is None else counts + found
    run.engine.train()
    metrics = {("val/loss" if k == "total" else f"val/loss/{k}"): v
               for k, v in over_present(mean_over_ranks(sums, run.device), "").items()}
    if counts is not None:  # every rank has a label target or none
        metrics.update({f"val/{k}": v for k, v in accuracy_metrics(sum_over_ranks(counts), run.class_names).items()})
    return metrics
