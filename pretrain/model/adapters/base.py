"""What every modality adapter provides, and the input checks they share.

An adapter owns all parameters of one modality: its input embedding (``embed``), the decoder queries for the positions
to predict (``queries``) and the output head (``head``). Keeping them together is what lets the text head be tied to
the text input embedding.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


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
