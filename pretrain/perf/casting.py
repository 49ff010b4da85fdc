"""Under autocast, the weights and biases of every ``nn.Linear`` cast to the autocast dtype together, once a forward.

Autocast casts each fp32 weight and bias as its matmul runs, and the backward casts each of their gradients back:
two kernel launches per tensor and step, a large share of an eager GPU step's launches (``bench/README.md``). Here one
multi-tensor copy casts them all and one more casts their gradients back: the same roundings, so the same outputs and
gradients as autocast's own casts, bit for bit.

Nothing changes where nothing would be cast (no autocast, weights already in the autocast dtype, as under DeepSpeed's
bf16 mode) or with DeepSpeed ZeRO-3's partitioned weights (gathered by hooks only when each layer runs). Compiled code
should not enter it: inductor fuses the casts itself.
"""

from __future__ import annotations

import contextlib
from contextlib import contextmanager
from typing import Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..compat import swap_parameters


class _CastTogether(torch.autograd.Function):
    """Casts of many tensors in one ``_foreach_copy_``; their gradients cast back in another."""

    @staticmethod
    def forward(ctx, dtype: torch.dtype, *tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        ctx.set_materialize_grads(False)  # an unused copy (a head this forward does not decode) gets no gradient
        ctx.dtypes = [t.dtype for t in tensors]
        copies = [torch.empty_like(t, dtype=dtype) for t in tensors]
        torch._foreach_copy_(copies, tensors)
        return tuple(copies)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        present = [i for i, g in enumerate(grads) if g is not None]
        # Tensors of their own (not views of one buffer), so that each parameter's gradient is taken as it is.
        up = [torch.empty_like(grads[i], dtype=ctx.dtypes[i]) for i in present]
        if up:
            torch._foreach_copy_(up, [grads[i] for i in present])
        out: List[torch.Tensor | None] = [None] * len(grads)
        for i, g in zip(present, up):
            out[i] = g
        return (None, *out)


def _castable(linears: Sequence[nn.Linear]) -> Optional[Tuple[torch.dtype, list, list]]:
    """The autocast dtype, the (module, name) slots and the parameters to cast together, or None where autocast would
    not cast them. Autocast is checked first: without it (DeepSpeed's bf16 training) nothing else runs."""
    if not linears:
        return None
    device = linears[0].weight.device
    if not torch.is_autocast_enabled(device.type) or torch.get_autocast_dtype(device.type) == torch.float32:
        return None
    slots = [(module, name) for module in linears
             for name, _ in module.named_parameters(recurse=False, remove_duplicate=False)]
    params = [getattr(module, name) for module, name in slots]
    if not all(p.dtype == torch.float32 and p.device == device and not hasattr(p, "ds_id") for p in params):
        return None
    return torch.get_autocast_dtype(device.type), slots, params


@contextmanager
def linear_weights_cast_together(linears: Sequence[nn.Linear]) -> Iterator[None]:
    """While active, ``linears`` hold their weights and biases cast to the autocast dtype (see the module docstring);
    their parameters are back in place on exit, also after an error."""
    plan = _castable(linears)
    if plan is None:
        yield
        return
    dtype, slots, params = plan
    copies = _CastTogether.apply(dtype, *params)
    try:
        swap_parameters(slots, copies)
        yield
    finally:
        swap_parameters(slots, params)


def cast_linear_weights_together(model: nn.Module) -> None:
    """Every forward of ``model`` outside compiled code runs in ``linear_weights_cast_together`` of its Linears
    (entered by a forward pre-hook, left by a forward hook that also runs when the forward fails)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    active: List[contextlib.AbstractContextManager] = []

    def enter(module: nn.Module, args) -> None:
        if not torch.compiler.is_compiling():
            context = linear_weights_cast_together(linears)
            context.__enter__()
            active.append(context)

    def leave(module: nn.Module, args, output) -> None:
        if active:
            active.pop().__exit__(None, None, None)

    model.register_forward_pre_hook(enter)
    model.register_forward_hook(leave, always_call=True)
