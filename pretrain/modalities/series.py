"""Numeric series: multichannel arrays ``[T, C]`` (sensor readings, climate records, patient vitals) of any length up
to ``model.series.max_length`` steps, stored as a float32 ``series.npy`` field.

``data_prep`` reads them from ``.series.npy`` (``[T]`` or ``[T, C]``, any real dtype) and ``.csv`` files (a row per
step, a column per channel, an optional header of channel names) and rejects, naming the file and why, what is no
such series: another dtype or shape, NaN or infinite values, more steps than ``--series-max-length``, a CSV whose rows
differ in length. The trainer skips and counts the same faults in shards of any writer, and series longer than the
model's ``max_length`` or with more channels than its ``channels`` (fewer are padded with zero channels).

Each series is standardised per channel over its steps (values of any scale -- volts, degrees, beats a minute --
become comparable; RevIN does the same), zero-padded to ``max_length`` and cut into patches of ``patch_size`` steps
with the 1-D Fourier features of their index; patches wholly in the padding are masked out. A patch's values lie step
by step, channel by channel, so every channel has its own weights in the input projection: that is how the model
tells the channels apart. Pretraining hides contiguous spans of patches (``data.masking.series`` of them, spans of
``series_mean_span`` patches on average, like the text's) and reconstructs their values; a label head fine-tunes it.
"""

from __future__ import annotations

import csv
import io
from typing import Any, Mapping, Tuple

import numpy as np
import torch

from ..config import SeriesConfig
from ..shard_format import Rejected
from .base import Builder, Rngs, Rows, load_npy, npy_bytes, sequences
from .masking import text_positions
from .patched import PatchModality

SERIES_FIELD = "series.npy"


def series_array(array: np.ndarray, field: str) -> np.ndarray:
    """``[T]`` or ``[T, C]`` real numbers -> float32 ``[T, C]``; raises :class:`Rejected` for another dtype or shape,
    an empty series or a value that is not finite."""
    if array.dtype.kind not in "iuf":
        raise Rejected(field, f"a series holds real numbers (float or integer), got dtype {array.dtype}")
    values = array[:, None] if array.ndim == 1 else array
    if values.ndim != 2 or 0 in values.shape:
        raise Rejected(field, f"a series is [T] or [T, C] with T, C > 0, got shape {list(array.shape)}")
    values = values.astype(np.float32)
    bad = ~np.isfinite(values)
    if bad.any():
        step, channel = np.argwhere(bad)[0]
        raise Rejected(field, f"{int(bad.sum())} values are NaN or infinite, the first at step {step}, channel "
                              f"{channel}")
    return values


def read_npy_series(data: bytes, field: str) -> np.ndarray:
    """The series in ``.npy`` bytes."""
    return series_array(load_npy(data, field), field)


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def read_csv_series(data: bytes, field: str) -> np.ndarray:
    """The series in CSV bytes: a row per step, a column per channel; a first row that is not all numbers is the
    header (channel names). Blank lines are passed over; rows of another length than the first are an error."""
    try:
        rows = [row for row in csv.reader(io.StringIO(data.decode("utf-8-sig"))) if row]
    except (UnicodeDecodeError, csv.Error) as e:
        raise Rejected(field, f"cannot read the CSV ({e})") from None
    if rows and not all(_is_number(cell) for cell in rows[0]):
        rows = rows[1:]  # the header
    if not rows:
        raise Rejected(field, "the CSV has no rows of numbers")
    width = len(rows[0])
    for number, row in enumerate(rows, 1):
        if len(row) != width:
            raise Rejected(field, f"ragged CSV: data row {number} has {len(row)} values, the first has {width}")
    try:
        values = np.array([[float(cell) for cell in row] for row in rows], dtype=np.float64)
    except ValueError as e:
        raise Rejected(field, f"the CSV holds a value that is no number ({e})") from None
    return series_array(values, field)


def encode_series(values: np.ndarray) -> bytes:
    """``series.npy`` bytes: float32 ``[T, C]``."""
    return npy_bytes(values.astype(np.float32, copy=False))


def standardised(values: np.ndarray) -> np.ndarray:
    """Each channel less its mean, over its standard deviation (a constant channel becomes zeros)."""
    centred = values - values.mean(axis=0)
    return centred / np.maximum(centred.std(axis=0), 1e-5)


class Series(PatchModality):
    name = "series"
    shape_keys = ("d_model", "series.channels", "series.patch_size", "series.fourier_bands")
    source_suffixes = (".series.npy", ".csv")
    prep_options = {"series_max_length": (65_536, "the most steps a numeric series may have (longer ones are "
                                                  "rejected)")}

    def decode(self, field: str, data: bytes) -> np.ndarray:
        return read_npy_series(data, field)

    def prepare(self, values: np.ndarray, builder: Builder, rng: np.random.Generator) -> Tuple[np.ndarray, int]:
        cfg = builder.model.series
        steps, channels = values.shape
        if steps > cfg.max_length:
            raise ValueError(f"{steps} steps, more than model.series.max_length={cfg.max_length}")
        if channels > cfg.channels:
            raise ValueError(f"{channels} channels, more than model.series.channels={cfg.channels}")
        builder.note("series", f"{channels} channels", f"{cfg.channels} channels", "model.series.channels: zeros added")
        out = np.zeros((cfg.max_length, cfg.channels), dtype=np.float32)
        out[:steps, :channels] = standardised(values)
        return out, steps

    def stack(self, rows: Rows, rngs: Rngs, batch: dict, builder: Builder) -> None:
        cfg = builder.model.series
        values, lengths = sequences(rows, self.name, (cfg.max_length, cfg.channels), np.float32)
        batch["inputs"]["series"] = torch.from_numpy(values)
        patches = -(-lengths // cfg.patch_size)  # a patch with any step of the series is valid
        valid = np.arange(cfg.num_patches) < patches[:, None]
        slots = builder.slots[self.name]
        masking = builder.data.masking
        spans = text_positions(patches, masking.series, masking.series_mean_span, slots, rngs) if slots else None
        self.mask_patches(batch, valid, rngs, builder, spans)

    def raw_shape(self, cfg: SeriesConfig) -> tuple:
        return (None, cfg.max_length, cfg.channels)

    @staticmethod
    def channels_first(x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)  # [B, T, C]

    def store(self, data: bytes, source: str, options: Mapping[str, Any]) -> Tuple[str, bytes]:
        """A ``.csv`` or ``.series.npy`` file -> float32 ``series.npy``, no longer than ``--series-max-length``."""
        values = (read_csv_series if source.lower().endswith(".csv") else read_npy_series)(data, self.name)
        most = options["series_max_length"]
        if len(values) > most:
            raise Rejected(self.name, f"{source} has {len(values)} steps, more than --series-max-length {most}")
        return SERIES_FIELD, encode_series(values)

    def check(self, field: str, data: bytes) -> None:
        read_npy_series(data, field)


SERIES = Series()
