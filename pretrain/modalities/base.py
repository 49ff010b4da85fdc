"""What a modality unit provides (:class:`Modality`), and the checks and batch helpers the units share.

A unit is everything one modality is to the system: the shard fields it reads, their decoding, the transform to the
model's fixed shape, the masking and stacking of a batch, the adapter (input embedding, decoder queries and output
head: one module, which is what lets the text head be tied to the text input embedding), the loss and metric, and
what ``data_prep`` stores and checks of its files. ``pretrain.modalities.REGISTRY`` lists the units; the data stream,
the model, the objective, the evaluation, ``init_from`` and ``data_prep`` iterate it and name no modality.
"""

from __future__ import annotations

import io
from typing import Any, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from ..config import DataConfig, ModelConfig
from ..shard_format import MODALITY_FIELDS, Rejected

Rows = List[Optional[dict]]  # one decoded sample per batch row (None: a row that holds nothing)
Rngs = Sequence[Optional[np.random.Generator]]  # one per batch row
IGNORE_INDEX = -100


class Builder(Protocol):
    """What the units read of the batch builder that calls them (``pretrain.data.collate.BatchBuilder``)."""

    model: ModelConfig
    data: DataConfig
    random_crop: bool  # training crops long values at a random offset (else from the start)
    image_shift: int
    slots: Dict[str, int]  # per modality, the positions each row predicts (0: none)

    def note(self, name: str, found: str, wanted: str, key: str) -> None:
        """Say once that a transform turned data of one shape into the model's."""


def check_tensor(x: torch.Tensor, name: str, shape: Sequence[Optional[int]], floating: bool) -> None:
    """Raise naming ``name`` unless ``x`` has ``shape`` (None = any size) and a float / integer dtype."""
    kind = "floating" if floating else "integer"
    ok_dtype = x.is_floating_point() if floating else (not x.is_floating_point() and not x.is_complex()
                                                       and x.dtype != torch.bool)
    expected = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
    if not ok_dtype or x.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, x.shape)):
        raise ValueError(f"{name}: expected a {kind} tensor of shape {expected}, got {x.dtype} {list(x.shape)}")


def element_mask(mask: Optional[torch.Tensor], name: str, batch: int, length: int) -> Optional[torch.Tensor]:
    """A [batch, length] bool key mask from a per-sample [batch] or a per-element [batch, length] one; None stays None
    (every element valid), which lets the attention run without a mask."""
    if mask is None:
        return None
    if mask.dtype != torch.bool and (mask.is_floating_point() or mask.is_complex()):
        raise ValueError(f"{name}_mask: expected a bool or 0/1 integer tensor, got {mask.dtype}")
    if tuple(mask.shape) == (batch,):
        return mask.bool()[:, None].expand(batch, length)
    if tuple(mask.shape) == (batch, length):
        return mask.bool()
    raise ValueError(
        f"{name}_mask: expected shape [{batch}] (sample present) or [{batch}, {length}] (per element), "
        f"got {list(mask.shape)}"
    )


class Modality:
    """One modality. ``name`` is its key everywhere: the model config's section, the batch's ``inputs``/``decode``/
    ``targets`` entries, the adapter, the loss. Subclasses fill in what their modality does."""

    name = ""
    # The model keys that shape this adapter's tensors (``init_from`` starts them anew when they differ).
    shape_keys: Tuple[str, ...] = ()

    @property
    def fields(self) -> Tuple[str, ...]:
        """The shard fields it reads, the first one present taken (``pretrain.shard_format``); none for a modality
        given to the model directly."""
        return MODALITY_FIELDS.get(self.name, ())

    def enabled(self, model: ModelConfig) -> bool:
        return getattr(model, self.name) is not None

    # --- data -----------------------------------------------------------------------------------------------------

    def decode(self, field: str, data: bytes) -> Any:
        """The bytes of one stored field -> a native value; raises on anything undecodable."""
        raise NotImplementedError

    def prepare(self, value: Any, builder: Builder, rng: np.random.Generator) -> Any:
        """A decoded value -> the model's fixed shape (crops, resizes: ``rng`` makes their random choices)."""
        raise NotImplementedError

    def positions(self, model: ModelConfig) -> int:
        """Positions of one sample (what masking ratios are a fraction of)."""
        raise NotImplementedError

    def stack(self, rows: Rows, rngs: Rngs, batch: Dict[str, dict], builder: Builder) -> None:
        """The batch's entries of this modality from the prepared rows: inputs and key mask, and with slots to
        predict (``builder.slots``), the positions, their mask and targets."""
        raise NotImplementedError

    # --- model and objective --------------------------------------------------------------------------------------

    def adapter(self, model: ModelConfig) -> nn.Module:
        raise NotImplementedError

    def loss(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The loss summed over the targets ``mask`` keeps."""
        raise NotImplementedError

    def metric_counts(self, pred: torch.Tensor, target: torch.Tensor) -> Optional[torch.Tensor]:
        """Counts of one batch that add over batches and ranks (means would not), from which :meth:`metrics`
        makes the evaluation's metrics beyond the loss; None where there are none."""
        return None

    def metrics(self, counts: torch.Tensor, class_names: Sequence[str]) -> Dict[str, float]:
        """The metrics of the summed :meth:`metric_counts` (``class_names``: the dataset's, for per-class ones)."""
        return {}

    # --- data_prep ------------------------------------------------------------------------------------------------

    # The file suffixes ``data_prep shard --input-dir`` reads as this modality (lower case).
    source_suffixes: Tuple[str, ...] = ()
    # What a manifest line holds for it: the value itself (``manifest_inline``: text, a label) or a file's path.
    manifest_type: type = str
    manifest_inline = False
    # ``data_prep shard`` options of this modality: {name: (default, help)}; the flag is ``--name-with-dashes``.
    prep_options: Dict[str, Tuple[Any, str]] = {}

    def store(self, data: bytes, source: str, options: Mapping[str, Any]) -> Tuple[str, bytes]:
        """A source file's bytes (or an inline value's) -> (field, bytes) to write, decoded in full first; raises
        :class:`~pretrain.shard_format.Rejected` naming the modality. ``options``: ``data_prep shard``'s settings
        (``audio_rate`` and every unit's ``prep_options``)."""
        raise NotImplementedError

    def check(self, field: str, data: bytes) -> None:
        """Decode a stored field in full (``data_prep validate``); raises ``Rejected`` naming the field."""
        raise NotImplementedError


def load_npy(data: bytes, field: str) -> np.ndarray:
    """The array in ``.npy`` bytes; pickled objects are refused (they could run code)."""
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # numpy raises ValueError/EOFError/OSError for bad or truncated files
        raise Rejected(field, f"cannot read .npy ({type(e).__name__}: {e})") from None


def npy_bytes(array: np.ndarray) -> bytes:
    """``.npy`` bytes in C order, so that they depend only on the values."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def present(rows: Rows, name: str) -> np.ndarray:
    return np.array([row is not None and name in row for row in rows])


def sequences(rows: Rows, name: str, shape: Tuple[int, ...], dtype: type) -> Tuple[np.ndarray, np.ndarray]:
    """Stacked cropped/padded values [B, *shape] and their valid lengths [B] (0 where the row lacks them); a row's
    value is (values, valid length)."""
    values = np.zeros((len(rows), *shape), dtype=dtype)
    lengths = np.zeros(len(rows), dtype=np.int64)
    for b in np.flatnonzero(present(rows, name)):
        values[b], lengths[b] = rows[b][name]
    return values, lengths


def add_decode(batch: Dict[str, dict], name: str, where: np.ndarray, used: np.ndarray) -> None:
    batch["decode"][name], batch["decode_mask"][name] = torch.from_numpy(where), torch.from_numpy(used)
