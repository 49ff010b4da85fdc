"""Which positions the encoder does not see and the decoder predicts, for the masked multimodal objective.

Every modality predicts a FIXED number of positions per batch row (``num_predicted``), so batch shapes are static;
rows with less content predict fewer and pad the rest (decode mask False). Text is hidden in contiguous spans
(like T5's random span corruption: exact counts, spans of a given mean length); patches uniformly at random.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np


def num_predicted(ratio: float, size: int) -> int:
    """Positions predicted per row for a modality of ``size`` positions (0 when the ratio is 0: input only)."""
    return 0 if ratio <= 0 else max(1, min(size, round(ratio * size)))


def row_counts(valid: np.ndarray, ratio: float, slots: int) -> np.ndarray:
    """How many of each row's ``valid`` positions to hide: the ratio of them, at least one, at most ``slots``."""
    return np.minimum(slots, np.where(valid > 0, np.maximum(1, np.rint(ratio * valid)), 0)).astype(np.int64)


def span_positions(length: int, count: int, mean_span: float, rng: np.random.Generator) -> np.ndarray:
    """``count`` sorted positions in [0, length) forming about count / mean_span contiguous spans.

    The ``length - count`` visible bytes leave ``length - count + 1`` slots (before, between, after them); each span
    takes a distinct slot, so spans never touch, and the masked bytes are split into spans by a random composition.
    The layout is then rotated by a random offset (spans wrap around), which gives every position the same chance of
    being hidden -- without it the ends would be hidden far less often.
    """
    spans = int(min(max(1, round(count / mean_span)), count, length - count + 1))
    slots = np.sort(rng.choice(length - count + 1, spans, replace=False, shuffle=False))
    span_starts = np.zeros(count, dtype=np.int64)
    span_starts[rng.choice(count - 1, spans - 1, replace=False, shuffle=False) + 1] = 1
    positions = np.arange(count) + slots[np.cumsum(span_starts)]
    return np.sort((positions + rng.integers(length)) % length)


def text_positions(
    lengths: np.ndarray, ratio: float, mean_span: float, slots: int, rngs: Sequence[np.random.Generator],
    whole: Optional[np.ndarray] = None,
) -> Tuple[np.ndarray, np.ndarray]:
    """Span-masked positions of each row's first ``lengths[b]`` bytes, drawn from the row's own ``rngs[b]``; a row
    that ``whole[b]`` marks hides its first ``slots`` bytes instead (all of a text no longer) -> (positions
    [B, slots], valid [B, slots])."""
    counts = row_counts(lengths, ratio, slots)
    positions = np.zeros((len(lengths), slots), dtype=np.int64)
    for row, (length, count) in enumerate(zip(lengths, counts)):
        if whole is not None and whole[row]:
            counts[row] = min(int(length), slots)
            positions[row, :counts[row]] = np.arange(counts[row])
        elif count:
            positions[row, :count] = span_positions(int(length), int(count), mean_span, rngs[row])
    return positions, np.arange(slots) < counts[:, None]


def patch_positions(
    valid: np.ndarray, ratio: float, slots: int, rngs: Sequence[np.random.Generator]
) -> Tuple[np.ndarray, np.ndarray]:
    """Uniformly chosen positions among each row's valid patches ``valid`` [B, N], drawn from the row's own
    ``rngs[b]`` (rows without a valid patch draw nothing) -> (positions [B, slots] sorted, padded with 0, and their
    mask [B, slots])."""
    counts = row_counts(valid.sum(axis=1), ratio, slots)
    draws = np.full(valid.shape, 2.0)
    for row in np.flatnonzero(counts):
        draws[row] = rngs[row].random(valid.shape[1])
    keys = np.where(valid, draws, 2.0)
    chosen = np.argsort(keys, axis=1)[:, :slots]
    used = np.arange(slots) < counts[:, None]
    positions = np.sort(np.where(used, chosen, valid.shape[1]), axis=1)
    return np.where(used, positions, 0), used


def hide(valid: np.ndarray, positions: np.ndarray, used: np.ndarray) -> np.ndarray:
    """The encoder's key mask: ``valid`` with the predicted positions switched off."""
    visible = valid.copy()
    visible[np.nonzero(used)[0], positions[used]] = False
    return visible
