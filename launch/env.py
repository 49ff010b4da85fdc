"""The process environment of one training process, from whichever launcher started it.

torchrun and the deepspeed launcher set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT themselves; plain
``srun`` (one task per GPU) sets only SLURM_* variables, from which the same five are derived here. DeepSpeed, given
only SLURM_* variables, falls back to MPI discovery and fails without mpi4py, so :func:`exported_env` writes the five
variables into ``os.environ`` while the process group lives.

Slurm facts this relies on (checked on slurm 22.05): every srun task has SLURM_STEP_ID, SLURM_STEP_NUM_TASKS and
SLURM_STEP_NODELIST; the batch shell of ``sbatch`` (and an ``salloc`` shell) has SLURM_PROCID=0 and the job's
SLURM_NTASKS but no SLURM_STEP_ID, so a process started there directly is one process, not rank 0 of many.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, List, Mapping, Sequence

import torch

log = logging.getLogger(__name__)

TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
SLURM_PORT_BASE, SLURM_PORT_SPAN = 15000, 20000


@dataclass(frozen=True)
class DistEnv:
    """Who this process is in the job. ``launcher`` says where the values came from: torchrun, the deepspeed
    launcher, ``env`` (RANK/WORLD_SIZE set by hand or by another tool), ``slurm`` (an srun task) or ``single``.
    ``master_port`` 0 (a single process given none): the process group's store binds a free port itself, so no
    other program can take it between a choice and its use."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str


def detect_env(environ: Mapping[str, str] = os.environ) -> DistEnv:
    """The DistEnv of this process. RANK/WORLD_SIZE win over SLURM_* (torchrun started by srun is torchrun);
    nothing set means one process on a port its store picks. Inconsistent values raise ValueError naming the
    variable."""
    if "RANK" in environ or "WORLD_SIZE" in environ:
        return _from_torch_vars(environ)
    if "SLURM_PROCID" in environ and "SLURM_STEP_ID" in environ:
        return _from_slurm(environ)
    return _single(environ)


@contextmanager
def exported_env(env: DistEnv) -> Iterator[None]:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT in ``os.environ`` for ``env://`` initialisation
    (torch.distributed, deepspeed.init_distributed), whatever launcher started the process; on exit the variables are
    as they were, so a second run in the same process (a notebook, a test) does not take the first one's port."""
    before = {name: os.environ.get(name) for name in TORCH_VARS}
    values = (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port)
    os.environ.update({name: str(value) for name, value in zip(TORCH_VARS, values)})
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def device_for(env: DistEnv) -> torch.device:
    """This process's GPU (by local rank) when CUDA is there, else the CPU. One visible GPU means the launcher
    bound one GPU to each task (``srun --gpus-per-task=1``): that GPU, whatever the local rank."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if env.local_rank < count:
        return torch.device("cuda", env.local_rank)
    if count == 1:
        return torch.device("cuda", 0)
    raise ValueError(
        f"LOCAL_RANK={env.local_rank} but only {count} GPUs are visible on this node; start at most one process per GPU"
    )


def backend_for(device: torch.device) -> str:
    """NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if device.type == "cuda" else "gloo"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now, for a rendezvous of several processes that a helper starts (one
    process needs none: its store binds a free port itself)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def first_host(nodelist: str) -> str:
    """The first host of a Slurm host list, as ``scontrol show hostnames`` gives it; where scontrol is missing or
    cannot run (no Slurm configuration on this machine), as :func:`expand_nodelist` reads the list."""
    try:
        hosts = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                               timeout=60, check=True).stdout.split()
    except (OSError, subprocess.SubprocessError):
        hosts = []
    return hosts[0] if hosts else expand_nodelist(nodelist)[0]


def expand_nodelist(spec: str) -> List[str]:
    """Slurm's compressed host list (``n[1-2,5]``, ``gpu-[01-04]``, ``a1,b[3-4]``, ``r[1-2]-n[1-2]``) as host names,
    in Slurm's order, zero padding kept: :func:`first_host`'s fallback where ``scontrol`` cannot run."""
    hosts: List[str] = []
    for item in _split_outside_brackets(spec.strip()):
        hosts.extend(_expand_host(item))
    return hosts


def _from_torch_vars(environ: Mapping[str, str]) -> DistEnv:
    for name, other in (("RANK", "WORLD_SIZE"), ("WORLD_SIZE", "RANK")):
        if name not in environ:
            raise ValueError(f"{name} is not set but {other} is: set both (torchrun and the deepspeed launcher do), "
                             "or neither for one process")
    if "CROSS_RANK" in environ or "CROSS_SIZE" in environ:
        launcher = "deepspeed"
    elif "TORCHELASTIC_RUN_ID" in environ:
        launcher = "torchrun"
    else:
        launcher = "env"
    world_size = _int(environ, "WORLD_SIZE")
    if world_size < 1:
        raise ValueError(f"WORLD_SIZE={world_size} must be >= 1")
    if world_size == 1:
        return _single(environ, _int(environ, "RANK"), launcher)
    env = DistEnv(
        rank=_int(environ, "RANK"),
        world_size=world_size,
        local_rank=_int(environ, "LOCAL_RANK"),
        master_addr=_str(environ, "MASTER_ADDR"),
        master_port=_int(environ, "MASTER_PORT"),
        launcher=launcher,
    )
    return _checked(env, TORCH_VARS)


def _from_slurm(environ: Mapping[str, str]) -> DistEnv:
    size_var = _first_set(environ, ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "SLURM_NPROCS"))
    if "MASTER_ADDR" in environ:
        master_addr = environ["MASTER_ADDR"]
    else:
        list_var = _first_set(environ, ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"))
        nodelist = _str(environ, list_var)
        try:
            master_addr = first_host(nodelist)
        except ValueError as exc:
            raise ValueError(f"{list_var}={nodelist!r} is not a Slurm host list: {exc}") from None
    port_var = "MASTER_PORT" if "MASTER_PORT" in environ else "SLURM_JOB_ID"
    port = _int(environ, port_var)
    env = DistEnv(
        rank=_int(environ, "SLURM_PROCID"),
        world_size=_int(environ, size_var),
        local_rank=_int(environ, "SLURM_LOCALID"),
        master_addr=master_addr,
        master_port=port if port_var == "MASTER_PORT" else SLURM_PORT_BASE + port % SLURM_PORT_SPAN,
        launcher="slurm",
    )
    return _checked(env, ("SLURM_PROCID", size_var, "SLURM_LOCALID", port_var))


def _single(environ: Mapping[str, str], rank: int = 0, launcher: str = "single") -> DistEnv:
    """One process: rank 0 of 1, on MASTER_ADDR/MASTER_PORT when given, else on the port its store binds (0)."""
    if rank != 0:
        raise ValueError(f"RANK={rank} must be 0 when WORLD_SIZE=1")
    tasks = environ.get("SLURM_NTASKS", "1")
    if "SLURM_PROCID" in environ and "SLURM_STEP_ID" not in environ and tasks != "1":
        log.warning("SLURM_NTASKS=%s but this process is not an srun task (no SLURM_STEP_ID): running as one "
                    "process; start the job with srun to use every task", tasks)
    addr = environ.get("MASTER_ADDR", "127.0.0.1")
    port = _int(environ, "MASTER_PORT") if "MASTER_PORT" in environ else 0
    return _checked(DistEnv(0, 1, 0, addr, port, launcher), TORCH_VARS)


def _checked(env: DistEnv, names: Sequence[str]) -> DistEnv:
    """The relations every launcher guarantees (``names``: the variables that gave rank, world size, local rank and
    port); a violation means a hand-set or mixed-up environment."""
    rank, size, local, port = names[0], names[1], names[2], names[-1]
    if env.world_size < 1:
        raise ValueError(f"{size}={env.world_size} must be >= 1")
    if not 0 <= env.rank < env.world_size:
        raise ValueError(f"{rank}={env.rank} must be in [0, {size}={env.world_size})")
    if not 0 <= env.local_rank <= env.rank:
        raise ValueError(f"{local}={env.local_rank} must be in [0, {rank}={env.rank}]: a node's local ranks "
                         "count only processes of lower global rank")
    if not 0 < env.master_port < 65536 and not (env.master_port == 0 and env.world_size == 1):
        raise ValueError(f"{port}={env.master_port} is not a TCP port (1-65535)")
    return env


def _first_set(environ: Mapping[str, str], names: Sequence[str]) -> str:
    """The first of ``names`` that is set, else the first (so an error names the variable Slurm sets first)."""
    return next((name for name in names if name in environ), names[0])


def _str(environ: Mapping[str, str], name: str) -> str:
    if name not in environ:
        raise ValueError(f"{name} is not set; the launcher must set it for a multi-process job")
    return environ[name]


def _int(environ: Mapping[str, str], name: str) -> int:
    value = _str(environ, name)
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


def _split_outside_brackets(spec: str) -> List[str]:
    items, depth, start = [], 0, 0
    for i, char in enumerate(spec):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            raise ValueError(f"unbalanced brackets in {spec!r}")
        if char == "," and depth == 0:
            items.append(spec[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced brackets in {spec!r}")
    items.append(spec[start:])
    if any(not item for item in items):
        raise ValueError(f"empty host name in {spec!r}")
    return items


_BRACKET = re.compile(r"\[([^\[\]]*)\]")


def _expand_host(item: str) -> List[str]:
    match = _BRACKET.search(item)
    if match is None:
        if "[" in item or "]" in item:
            raise ValueError(f"unbalanced brackets in {item!r}")
        return [item]
    head, tail = item[: match.start()], _expand_host(item[match.end():])
    return [head + value + rest for value in _expand_ranges(match.group(1)) for rest in tail]


def _expand_ranges(body: str) -> List[str]:
    values = []
    for part in body.split(","):
        low, sep, high = part.partition("-")
        if not low.isdigit() or (sep and not high.isdigit()):
            raise ValueError(f"bad range {part!r} in [{body}]; expected numbers like 1-4 or 01-04")
        end = int(high) if sep else int(low)
        if end < int(low):
            raise ValueError(f"descending range {part!r} in [{body}]")
        values.extend(str(n).zfill(len(low)) for n in range(int(low), end + 1))
    return values
