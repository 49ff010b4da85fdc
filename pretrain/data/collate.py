"""Raw samples -> one batch of the contract in ``pretrain/data/__init__.py``: decode, transform, mask, stack.

One builder call makes one batch from exactly ``batch_size`` raw samples. A sample whose media fail to decode keeps its
row, empty (``valid`` False, every mask False, label -100): the row count never depends on decoding, which is what lets
a resumed worker fast-forward by counting raw samples without decoding them. ``None`` in place of a sample is such an
empty row too, with the key ``""`` (the padding of a validation pass's last batch).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from ..config import MASKED, DataConfig, ModelConfig, data_roles
from ..modalities import IGNORE_INDEX, REGISTRY
from ..modalities.masking import num_predicted
from .decode import decode
from .reader import Sample, SkipCounter

__all__ = ["BatchBuilder", "IGNORE_INDEX"]


class BatchBuilder:
    """Knows the model's shapes, what the run reads (``data.objective``) and the masking ratios; turns a list of raw
    samples into tensors, each modality by its unit (``pretrain.modalities``). ``training``: the random crops and
    shifts of ``data`` apply (validation: none)."""

    def __init__(self, model: ModelConfig, data: DataConfig, training: bool):
        self.model, self.data = model, data
        self.random_crop = training and data.random_crop
        self.image_shift = data.image_shift if training else 0
        roles = data_roles(data, model)
        self.units = [REGISTRY[name] for name in roles]
        self.slots = {name: num_predicted(getattr(data.masking, name), REGISTRY[name].positions(model))
                      if role == MASKED else 0 for name, role in roles.items()}
        self._noted: set = set()  # what the transforms did to data of another shape, each said once
        self._new_notes: List[str] = []

    def note(self, name: str, found: str, wanted: str, key: str) -> None:
        """Say (once) that a transform turned data of one shape into the model's (``key`` sets the latter)."""
        note = f"{name}: {found} in the data -> {wanted} ({key})"
        if found != wanted and note not in self._noted:
            self._noted.add(note)
            self._new_notes.append(note)

    def drain_notes(self) -> List[str]:
        """The conversions first met since the last drain (the stream says each once)."""
        notes, self._new_notes = self._new_notes, []
        return notes

    def __call__(self, samples: List[Optional[Sample]], rngs: Sequence[Optional[np.random.Generator]],
                 counter: SkipCounter) -> Dict[str, object]:
        """``rngs[i]`` makes every random choice of sample ``i`` (crop, masks), so that a sample is cropped and masked
        alike whichever batch it falls in; ``None`` for a padding row."""
        rows = [None if sample is None else self._decode_row(sample, rng, counter)
                for sample, rng in zip(samples, rngs)]
        batch: Dict[str, object] = {"inputs": {}, "decode": {}, "decode_mask": {}, "targets": {}}
        for unit in self.units:
            unit.stack(rows, rngs, batch, self)
        batch["keys"] = ["" if sample is None else str(sample["__key__"]) for sample in samples]
        batch["valid"] = torch.tensor([row is not None for row in rows])
        return batch

    def _decode_row(self, sample: Sample, rng: np.random.Generator, counter: SkipCounter) -> Optional[dict]:
        """Every modality of one sample in its fixed shape, or None (counted) when any of its media is undecodable."""
        row = {}
        key = ""
        try:
            for unit in self.units:
                key = next((k for k in unit.fields if k in sample), "")
                if key:
                    row[unit.name] = unit.prepare(decode(key, sample[key]), self, rng)
        except Exception as exc:  # noqa: BLE001 -- odd media content makes PIL/numpy/torch raise anything
            counter.skip(f"undecodable:{key}", sample["__url__"], exc, sample["__key__"])
            return None
        return row
