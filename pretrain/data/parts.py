"""A reader's part of a step on its way to the trainer: packed into one shared-memory buffer in the DataLoader worker,
unpacked into views of that buffer in the trainer's process, and cut into the step's micro-batches with as little
copying as the cut allows.

Why one buffer: a tensor crossing from a worker travels as a file descriptor, and each descriptor costs the trainer
a socket round trip to a thread of the (busy) worker. A multimodal batch holds about twenty tensors; packed, it is
one descriptor per part (numbers in ``bench/README.md``, data_bench).
"""

from __future__ import annotations

import itertools
from typing import Callable, Dict, List, NamedTuple, Sequence, Tuple

import torch

ALIGN = 64  # bytes; every dtype's view of the buffer starts aligned


class Slot(NamedTuple):
    """Where a tensor lies in its part's buffer."""

    offset: int
    dtype: torch.dtype
    shape: Tuple[int, ...]

    def view(self, buffer: torch.Tensor) -> torch.Tensor:
        size = self.dtype.itemsize * int(torch.Size(self.shape).numel())
        return buffer[self.offset:self.offset + size].view(self.dtype).view(self.shape)


Packed = Tuple[torch.Tensor, Dict[str, object]]


def _map(tree: object, leaf: Callable[[object], object]) -> object:
    if isinstance(tree, dict):
        return {key: _map(value, leaf) for key, value in tree.items()}
    return leaf(tree)


def packed(part: Dict[str, object]) -> Packed:
    """``part``'s tensors copied into one new shared-memory buffer, and the part with a :class:`Slot` in place of
    each (its other leaves as they are)."""
    placed: List[Tuple[Slot, torch.Tensor]] = []
    end = 0

    def place(value: object) -> object:
        nonlocal end
        if not isinstance(value, torch.Tensor):
            return value
        offset = -(-end // ALIGN) * ALIGN
        end = offset + value.numel() * value.element_size()
        placed.append((Slot(offset, value.dtype, tuple(value.shape)), value))
        return placed[-1][0]

    layout = _map(part, place)
    # allocated in shared memory at once, as torch's default_collate does in workers: sending then moves nothing
    buffer = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(end))
    for slot, tensor in placed:
        slot.view(buffer).copy_(tensor)
    return buffer, layout


def unpacked(part: Packed) -> Dict[str, object]:
    """The part again, its tensors views of the buffer."""
    buffer, layout = part
    return _map(layout, lambda value: value.view(buffer) if isinstance(value, Slot) else value)


def _rows(tree: object, rows: slice) -> object:
    """The ``rows`` of every leaf (views of the tensors)."""
    return _map(tree, lambda value: value[rows])


def _joined(values: Sequence[object], pin: bool) -> object:
    """Several parts' rows as one, leaf by leaf (tensors concatenated, key lists chained); one part as it is, unless
    ``pin``: then every tensor is a copy in page-locked memory (where a GPU copies from without the host waiting)."""
    first = values[0]
    if len(values) == 1 and not pin:
        return first
    if isinstance(first, dict):
        return {key: _joined([value[key] for value in values], pin) for key in first}
    if isinstance(first, torch.Tensor):
        rows = sum(value.shape[0] for value in values)
        return torch.cat(values, out=torch.empty((rows, *first.shape[1:]), dtype=first.dtype, pin_memory=pin))
    return [item for value in values for item in value]


def micro_batches(parts: Sequence[Dict[str, object]], size: int, count: int, pin: bool) -> List[Dict[str, object]]:
    """A step's ``count`` micro-batches of ``size`` rows from its ``parts`` (rows in the parts' order): one within a
    part is a view of it, one across parts is joined from the rows it spans. Which micro-batch holds a sample changes
    no sum: the losses are divided by the whole step's targets (``pretrain.train.loop``)."""
    ends = list(itertools.accumulate(len(part["keys"]) for part in parts))
    if ends[-1] != size * count:
        raise RuntimeError(f"a step's parts hold {ends[-1]} rows, not {count} micro-batches of {size}")
    starts = [0, *ends[:-1]]
    batches = []
    for first in range(0, size * count, size):
        last = first + size
        pieces = [_rows(part, slice(max(first, start) - start, min(last, end) - start))
                  for part, start, end in zip(parts, starts, ends) if start < last and first < end]
        batches.append(_joined(pieces, pin))
    return batches
