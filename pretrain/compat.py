"""Every use of torch's and DeepSpeed's private internals, for want of a public API that does the job.

Each function checks first that what it touches is still there, of the type it expects, and raises a RuntimeError
naming it otherwise: an upgrade that moves it fails at once instead of silently undoing the patch.
``tests/test_compat.py`` checks the upstream behaviour each one relies on.
"""

from __future__ import annotations

import datetime
import sys
from contextlib import contextmanager
from typing import Iterator, Sequence, Tuple

import torch
import torch.nn as nn
from torch.distributed import distributed_c10d as c10d

CHECKED_ON = "torch 2.13.0, deepspeed 0.19.8"
SHM_COMM_OP = "deepspeed_shm_comm"

_ABSENT = object()


def _changed(attribute: str) -> RuntimeError:
    found = ", ".join(f"{name} {sys.modules[name].__version__}" for name in ("torch", "deepspeed")
                      if name in sys.modules)
    return RuntimeError(f"{attribute} is not what pretrain.compat expects (checked on {CHECKED_ON}, found {found}): "
                        "recheck the patch in pretrain/compat.py against the installed version")


def _attribute(owner: object, name: str, types: type | Tuple[type, ...], shown: str) -> object:
    """``owner.name``, which must exist and be one of ``types``; ``shown`` names it in the error."""
    value = getattr(owner, name, _ABSENT)
    if not isinstance(value, types):
        raise _changed(shown)
    return value


def skip_deepspeed_shm_comm() -> None:
    """Marks the ``deepspeed_shm_comm`` op incompatible in ``deepspeed.ops.__compatible_ops__``, the table that
    ``deepspeed.comm.torch.build_shm_op`` reads: otherwise every ``init_distributed`` on CPU JIT-builds it (~25 s the
    first time) though gloo runs all our collectives. No argument or variable of DeepSpeed's turns the build off.
    Checked on torch 2.13.0, deepspeed 0.19.8."""
    import deepspeed.ops

    table = _attribute(deepspeed.ops, "__compatible_ops__", dict, "deepspeed.ops.__compatible_ops__")
    if not isinstance(table.get(SHM_COMM_OP), bool):
        raise _changed(f'deepspeed.ops.__compatible_ops__["{SHM_COMM_OP}"]')
    table[SHM_COMM_OP] = False


@contextmanager
def collective_timeout_defaults(timeout: datetime.timedelta) -> Iterator[None]:
    """While active, ``timeout`` is c10d's default timeout (``torch.distributed.distributed_c10d.default_pg_timeout``
    and ``default_pg_nccl_timeout``), the one a group made without a timeout takes; the old defaults are back on exit.
    DeepSpeed makes its groups with ``new_group(ranks)``, which would take 30 minutes on gloo and 10 on NCCL whatever
    the world's timeout, and torch has no public setter for the defaults. Checked on torch 2.13.0, deepspeed 0.19.8."""
    shown = "torch.distributed.distributed_c10d."
    defaults = (
        _attribute(c10d, "default_pg_timeout", datetime.timedelta, shown + "default_pg_timeout"),
        _attribute(c10d, "default_pg_nccl_timeout", (datetime.timedelta, type(None)),
                   shown + "default_pg_nccl_timeout"),
    )
    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout
    try:
        yield
    finally:
        c10d.default_pg_timeout, c10d.default_pg_nccl_timeout = defaults


def swap_parameters(slots: Sequence[Tuple[nn.Module, str]], tensors: Sequence[torch.Tensor]) -> None:
    """Puts each tensor in its ``(module, name)`` parameter slot (``module._parameters[name]``), where the module's
    forward reads it. An autograd copy of a parameter (a cast) can so stand in for it, which no public API allows:
    ``setattr`` takes only an ``nn.Parameter``, and ``torch.nn.utils.parametrize`` computes each tensor on its own, a
    kernel per tensor where ``perf.casting`` casts them all in one. Checked on torch 2.13.0, deepspeed 0.19.8."""
    if len(slots) != len(tensors):
        raise ValueError(f"swap_parameters: {len(slots)} slots, {len(tensors)} tensors")
    tables = [_attribute(module, "_parameters", dict, "torch.nn.Module._parameters") for module, _ in slots]
    for table, (module, name) in zip(tables, slots):
        if name not in table:
            raise _changed(f"torch.nn.Module._parameters[{name!r}] of {type(module).__name__}")
    for table, (_, name), tensor in zip(tables, slots, tensors):
        table[name] = tensor
