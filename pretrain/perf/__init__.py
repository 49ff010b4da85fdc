"""The performance layer, applied to a plain ``PerceiverIO`` from outside: attention kernels (and their autotuning),
the cast-together of Linear weights under autocast, and ``torch.compile``. ``optimize`` installs all of it; the model
computes the same function with or without it."""

from __future__ import annotations

import functools

import torch.nn as nn

from ..model.layers import PerceiverLayer
from .attention import attend
from .casting import cast_linear_weights_together
from .flops import count_flops, first_step_flops


def use_attention_backend(module: nn.Module, backend: str) -> None:
    """Every Perceiver layer in ``module`` attends through ``backend`` (``model.attention_backend``'s values)."""
    for layer in module.modules():
        if isinstance(layer, PerceiverLayer):
            layer.attend = functools.partial(attend, backend=backend)


def optimize(model: nn.Module, attention_backend: str = "auto", compile_mode: str = "none") -> nn.Module:
    """``model`` (in place: parameter names, checkpoints and exports stay as they are) with the attention backend, the
    Linear weights cast together under autocast and, unless ``compile_mode`` is ``none``, ``torch.compile``."""
    use_attention_backend(model, attention_backend)
    cast_linear_weights_together(model)
    if compile_mode != "none":
        model.compile(mode=compile_mode)
    return model


__all__ = ["optimize", "use_attention_backend", "count_flops", "first_step_flops"]
