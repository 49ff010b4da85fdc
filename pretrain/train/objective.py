"""Masked multimodal modelling: predict what the data stream hid, one loss per modality, a weighted sum optimised.

Each modality's unit (``pretrain.modalities``) gives its loss: text and labels cross-entropy on the decoded positions
(targets -100 on padding slots and absent rows); the patch modalities the squared error between the decoded patches
and their original values, which come with the batch, over the slots ``decode_mask`` keeps. Each is a sum over the batch's targets, divided
by a target count: the batch's own (:func:`modality_losses`), or the whole step's over every rank and micro-batch in
training, so that the gradient does not depend on how the step's samples are split. Classification is the same objective
with the label as the only target (``data.objective``); its metric (top-1 accuracy) is the label unit's.
"""

from __future__ import annotations

from typing import Callable, Dict, Mapping, Tuple

import torch

from ..modalities import REGISTRY

Forward = Callable[[Mapping[str, torch.Tensor], Mapping[str, torch.Tensor]], Dict[str, torch.Tensor]]
Losses = Dict[str, torch.Tensor]


def predict(forward: Forward, batch: Mapping[str, dict]) -> Tuple[Losses, Dict[str, torch.Tensor]]:
    """Per decoded modality of ``batch`` (the contract of ``pretrain.data``), its loss summed over the targets, and
    the outputs."""
    inputs, decode, mask, targets = batch["inputs"], batch["decode"], batch["decode_mask"], batch["targets"]
    out = forward(inputs, decode)
    losses = {name: REGISTRY[name].loss(pred, targets[name], mask[name]) for name, pred in out.items()}
    return losses, out


def target_counts(batch: Mapping[str, dict]) -> Dict[str, torch.Tensor]:
    """The targets of each decoded modality of ``batch`` (what :func:`predict`'s sums are over)."""
    return {name: mask.sum() for name, mask in batch["decode_mask"].items()}


def per_target(sums: Losses, counts: Mapping[str, torch.Tensor]) -> Losses:
    """Summed losses over target counts: 0 (not nan) for a modality without any, and no test of that on the host (a
    GPU would wait for the step's kernels)."""
    return {name: total / counts[name].clamp(min=1) for name, total in sums.items()}


def modality_losses(forward: Forward, batch: Mapping[str, dict]) -> Losses:
    """Each decoded modality's mean loss over the targets of ``batch`` alone."""
    return per_target(predict(forward, batch)[0], target_counts(batch))


def over_present(means: Dict[str, float], prefix: str) -> Dict[str, float]:
    """Per-modality means taken over the steps that had targets of the modality: ``means`` holds the mean losses
    ``<prefix><name>`` over all of them and the shares ``present/<name>`` of the steps that had targets. A modality with
    no targets at all is left out, not reported as a zero loss; a share below 1 is kept as ``loss_share/<name>``, since
    the total (the mean of each step's weighted sum) is then the sum of weight x share x loss over the parts."""
    out = {key: value for key, value in means.items() if not key.startswith("present/")}
    for key, share in means.items():
        if key.startswith("present/"):
            modality = key[len("present/"):]
            name = prefix + modality
            if share > 0:
                out[name] /= share
                if share < 1:
                    out[f"loss_share/{modality}"] = share
            else:
                out.pop(name, None)
    return out


def weighted_total(losses: Mapping[str, torch.Tensor], weights: Mapping[str, float]) -> torch.Tensor:
    """The optimised loss: the per-modality losses weighed by ``train.loss_weights`` (default 1)."""
    return sum(weights.get(name, 1.0) * loss for name, loss in losses.items())
