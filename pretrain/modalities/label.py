"""Classification: the ``cls`` field, one learned decoder query per sample and a linear head (an output only, never an
input); cross-entropy, and top-1 accuracy as the metric, overall and per class."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..config import ModelConfig
from .base import Builder, IGNORE_INDEX, Modality, Rngs, Rows
from ..shard_format import LABEL_FIELD, Rejected
from .text import cross_entropy_sum


class LabelAdapter(nn.Module):
    name = "label"

    def __init__(self, num_classes: int, d_model: int):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(1, d_model))
        self.classifier = nn.Linear(d_model, num_classes)

    def num_positions(self, _inputs: object = None) -> int:
        return 1

    def queries(self, positions: torch.Tensor) -> torch.Tensor:
        return self.query[positions]

    def head(self, decoded: torch.Tensor) -> torch.Tensor:
        """[B, 1, d_model] -> class logits [B, num_classes]."""
        return self.classifier(decoded[:, 0])


def encode_label(label: int) -> bytes:
    """A ``cls`` field: the integer in ASCII, as webdataset's decoders expect."""
    return str(label).encode("ascii")


class Label(Modality):
    name = "label"
    shape_keys = ("d_model", "num_classes")
    source_suffixes = (".cls",)
    manifest_type = int
    manifest_inline = True

    @property
    def fields(self) -> tuple:
        return (LABEL_FIELD,)

    def enabled(self, model: ModelConfig) -> bool:
        return model.num_classes > 0

    def decode(self, field: str, data: bytes) -> int:
        return int(data.decode("ascii").strip())

    def prepare(self, value: int, builder: Builder, rng: np.random.Generator) -> int:
        if not 0 <= value < builder.model.num_classes:
            raise ValueError(f"label {value} outside [0, model.num_classes={builder.model.num_classes})")
        return value

    def positions(self, model: ModelConfig) -> int:
        return 1

    def stack(self, rows: Rows, rngs: Rngs, batch: dict, builder: Builder) -> None:
        labels = torch.tensor([IGNORE_INDEX if row is None else row.get("label", IGNORE_INDEX) for row in rows])
        batch["targets"]["label"] = labels
        batch["decode"]["label"] = torch.zeros(len(rows), 1, dtype=torch.long)
        batch["decode_mask"]["label"] = labels[:, None] != IGNORE_INDEX

    def store(self, data: bytes, source: str, options: Mapping[str, Any]) -> Tuple[str, bytes]:
        try:
            return LABEL_FIELD, encode_label(int(data.decode("ascii").strip()))
        except (UnicodeDecodeError, ValueError):
            raise Rejected("label", f"{source} must hold one integer, got {data[:20]!r}") from None

    def check(self, field: str, data: bytes) -> None:
        try:
            int(data.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise Rejected(field, f"label must be an integer in ASCII, got {data[:20]!r}") from None

    def adapter(self, model: ModelConfig) -> nn.Module:
        return LabelAdapter(model.num_classes, model.d_model)

    def loss(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return cross_entropy_sum(pred, target)

    def metric_counts(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return label_counts(pred, target)

    def metrics(self, counts: torch.Tensor, class_names: Sequence[str]) -> Dict[str, float]:
        return accuracy_metrics(counts, class_names)


def label_counts(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[2, classes]: per true class, the samples whose top-1 class is right and all samples, rows without a label
    (``IGNORE_INDEX``) left out. Counts add over batches and ranks, which means of accuracies would not."""
    kept = targets != IGNORE_INDEX
    truth = targets[kept]
    right = truth[logits[kept].argmax(-1) == truth]
    classes = logits.shape[-1]
    return torch.stack([torch.bincount(right, minlength=classes), torch.bincount(truth, minlength=classes)])


def accuracy_metrics(counts: torch.Tensor, class_names: Sequence[str] = ()) -> Dict[str, float]:
    """``accuracy`` (top-1 over every labelled sample) and ``accuracy/<class>`` for each class with samples, named
    as ``class_names`` lists them (``/`` made ``_``: W&B groups by it) or by index."""
    right, total = (row.tolist() for row in counts)
    if not sum(total):
        return {}
    out = {"accuracy": sum(right) / sum(total)}
    for index, (r, n) in enumerate(zip(right, total)):
        if n:
            name = class_names[index] if index < len(class_names) else str(index)
            out[f"accuracy/{name.replace('/', '_')}"] = r / n
    return out


LABEL = Label()
