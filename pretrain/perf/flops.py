"""FLOPs of a training micro-step, counted on its first batch."""

from __future__ import annotations

from typing import Sequence

import torch

from .attention import tunes


def count_flops(model: torch.nn.Module, args: Sequence) -> float:
    """FLOPs of one training micro-step: 3 x a counted forward (backward ~ 2 x forward).

    The model runs eagerly, past a ``train.compile`` wrapper (``_call_impl``: hooks as usual, no dynamo): a compiled
    call under a dispatch mode is not compiled, and dynamo then marks the forward's code never to compile, so training
    would silently run eagerly. Grad mode stays on: the counter's module tracker hooks the gradients of module inputs,
    and a view of a parameter made under no_grad (the latents given a batch dimension) requires grad without a gradient
    function, which it rejects."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        model._call_impl(*args)
    return 3.0 * counter.get_total_flops()


def first_step_flops(model: torch.nn.Module, args: Sequence, attention_backend: str, compile_mode: str,
                     device: torch.device) -> float:
    """``count_flops``; on a compiled model whose attention tunes (``optimize``'s arguments), after one eager forward
    outside the counter that tunes it for these shapes: neither compiled code nor a counted forward can time kernels,
    so the compiled graph would otherwise keep the static order."""
    if compile_mode != "none" and tunes(attention_backend, device):
        model._call_impl(*args)
    return count_flops(model, args)
