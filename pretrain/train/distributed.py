"""The process group: one context that starts it (gloo on CPU, nccl on GPU) and destroys it on every exit path.

Without ``destroy_process_group`` some 2-rank gloo runs abort at exit.
"""

from __future__ import annotations

import datetime
import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist

from launch.env import DistEnv, backend_for, device_for, exported_env
from ..compat import collective_timeout_defaults, skip_deepspeed_shm_comm
from ..config import TrainConfig


def device_of(env: DistEnv, data_workers: int) -> torch.device:
    """This process's device (``launch.env.device_for``), made the current CUDA device on GPU; on CPU the process
    takes its share of the cores (``share_cores``)."""
    device = device_for(env)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        share_cores(data_workers, int(os.environ.get("LOCAL_WORLD_SIZE", env.world_size)))
    return device


def share_cores(data_workers: int, local_processes: int) -> None:
    """Unless OMP_NUM_THREADS says otherwise, this process's torch threads are its share of the cores less one per
    DataLoader worker: more threads than cores makes OpenMP's spinning threads and the workers starve each other
    (``bench/README.md``)."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_processes - data_workers))


@contextmanager
def process_group(env: DistEnv, device: torch.device,
                  timeout_minutes: float = TrainConfig.collective_timeout_minutes) -> Iterator[None]:
    """``deepspeed.init_distributed`` from ``env`` (exported as RANK/WORLD_SIZE/... first, so DeepSpeed never tries
    MPI discovery), without the shm_comm op it would otherwise JIT-build at every start.

    ``timeout_minutes`` bounds every collective, those of the groups DeepSpeed makes too: it makes them with
    ``new_group(ranks)``, which takes torch's default timeout (30 minutes on gloo, 10 on NCCL), not the world's. So the
    defaults are ours while the group lives. DeepSpeed's ``destroy_process_group`` ends it: unlike torch's, it also
    drops DeepSpeed's clone of the world group, which a later group in this process (a notebook, a test) would
    otherwise meet destroyed ("Group ... is not registered")."""
    import deepspeed.comm

    skip_deepspeed_shm_comm()
    timeout = datetime.timedelta(minutes=timeout_minutes)
    with collective_timeout_defaults(timeout):
        try:
            with exported_env(env):
                deepspeed.init_distributed(
                    dist_backend=backend_for(device),
                    auto_mpi_discovery=False,
                    timeout=timeout,
                    rank=env.rank,
                    world_size=env.world_size,
                )
                yield
        finally:
            if dist.is_initialized():
                deepspeed.comm.destroy_process_group()


def all_gather(obj: Any) -> List[Any]:
    """Every rank's ``obj``, in rank order."""
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class DeferredAgreement:
    """Element-wise OR over all ranks of per-rank flags, read one step after they were posted, so that every rank
    takes the same decision without the host waiting for the GPU.

    ``post`` starts the all_reduce of this step's flags; ``result`` returns the previous post's agreed flags (all
    False before the first). An answer read at once would make the host wait, every step, for all the work queued on
    the GPU: the reduction runs behind it. Read a step later, it has long been done unless the GPU is more than a step
    behind. On CUDA the flags go up from pinned memory and come back into pinned memory, ordered by an event, so no
    copy syncs the stream either (a copy from pageable memory, or ``tolist`` of a GPU tensor, would)."""

    def __init__(self, size: int, device: torch.device):
        self.size, self.device = size, device
        self._pending: Optional[Tuple[Callable[[], Any], torch.Tensor]] = None

    def post(self, flags: List[bool]) -> None:
        """Every rank must post the same number of times, in the same order relative to other collectives."""
        if len(flags) != self.size:
            raise ValueError(f"DeferredAgreement.post: {len(flags)} flags, expected {self.size}")
        if self._pending is not None:
            raise RuntimeError("DeferredAgreement.post: the previous post was not read (call result() first)")
        tensor = torch.tensor([float(f) for f in flags])
        if self.device.type != "cuda":
            self._pending = (dist.all_reduce(tensor, op=dist.ReduceOp.MAX, async_op=True).wait, tensor)
            return
        tensor = tensor.pin_memory().to(self.device, non_blocking=True)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)  # NCCL: queued on its stream, the host goes on
        host = torch.empty(self.size, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record()
        self._pending = (copied.synchronize, host)

    def result(self) -> List[bool]:
        if self._pending is None:
            return [False] * self.size
        ready, values = self._pending
        ready()
        self._pending = None
        return [bool(v) for v in values.tolist()]


def mean_over_ranks(values: dict, device: torch.device) -> dict:
    """The mean over ranks of a dict of numbers with the same keys on every rank."""
    if not values:
        return {}
    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    return dict(zip(keys, (sum_over_ranks(tensor) / dist.get_world_size()).tolist()))


def any_over_ranks(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on any rank (a collective read back at once: the host waits for it)."""
    tensor = torch.tensor([float(flag)], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum over ranks of a tensor of the same shape on every rank (in place)."""
    dist.all_reduce(tensor)
    return tensor
