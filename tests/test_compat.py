"""The upstream behaviour each patch in ``pretrain.compat`` relies on, checked on the installed torch and DeepSpeed:
a test here fails when an upgrade changes it (one process, real gloo groups)."""

from __future__ import annotations

import datetime

import deepspeed.utils.groups
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from deepspeed.comm.torch import build_shm_op

from launch.env import detect_env
from pretrain.compat import CHECKED_ON, collective_timeout_defaults, skip_deepspeed_shm_comm, swap_parameters
from pretrain.train.distributed import process_group

CPU = torch.device("cpu")


def timeout_of(group: dist.ProcessGroup) -> datetime.timedelta:
    return group._get_backend(CPU).options._timeout


def test_deepspeed_builds_no_shm_comm_op_once_skipped():
    """DeepSpeed still reads the flag ``skip_deepspeed_shm_comm`` clears: were it to read another (a renamed op, a
    table of its own), ``build_shm_op`` would JIT-build the op here and return it."""
    skip_deepspeed_shm_comm()
    assert build_shm_op() is None


def test_a_group_made_without_a_timeout_takes_the_defaults_set_while_active(tmp_path):
    """``new_group`` without a timeout reads c10d's defaults when it is called, not the world's timeout nor a value
    taken at import; on exit the old defaults are back."""
    c10d = dist.distributed_c10d
    before = c10d.default_pg_timeout, c10d.default_pg_nccl_timeout
    ours = datetime.timedelta(minutes=7)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            timeout=datetime.timedelta(minutes=3))
    try:
        with collective_timeout_defaults(ours):
            assert timeout_of(dist.new_group([0])) == ours
        assert (c10d.default_pg_timeout, c10d.default_pg_nccl_timeout) == before
        assert timeout_of(dist.new_group([0])) == before[0]
    finally:
        dist.destroy_process_group()


def test_deepspeed_groups_take_the_collective_timeout_and_go_with_the_world():
    """DeepSpeed makes its data-parallel group (a clone of the world, kept in ``groups._WORLD_GROUP``) without a
    timeout, so it takes ours; ``deepspeed.comm.destroy_process_group`` drops the clone, so the next process group in
    this process makes a live one."""
    with process_group(detect_env({}), CPU, timeout_minutes=0.5):
        group = deepspeed.utils.groups._get_data_parallel_group()
        assert group is deepspeed.utils.groups._WORLD_GROUP
        assert timeout_of(group) == datetime.timedelta(minutes=0.5)
    assert deepspeed.utils.groups._WORLD_GROUP is None
    with process_group(detect_env({}), CPU):
        ones = torch.ones(2)
        dist.all_reduce(ones, group=deepspeed.utils.groups._get_data_parallel_group())
        assert ones.tolist() == [1.0, 1.0]


def test_a_linear_forward_uses_the_tensor_in_its_parameter_slot():
    """What ``perf.casting`` relies on: the forward reads ``_parameters`` as it is, autograd graph included, and the
    parameters are the very same objects after the swap back."""
    linear = nn.Linear(3, 2)
    slots, params = [(linear, "weight"), (linear, "bias")], [linear.weight, linear.bias]
    base = torch.randn(2, 3, requires_grad=True)
    weight, bias, x = base * 2, torch.randn(2), torch.randn(4, 3)
    swap_parameters(slots, [weight, bias])
    try:
        out = linear(x)
    finally:
        swap_parameters(slots, params)
    assert torch.equal(out, F.linear(x, weight, bias))
    out.sum().backward()
    assert base.grad is not None and linear.weight.grad is None
    assert [linear.weight, linear.bias] == params


def test_swap_parameters_refuses_a_slot_the_module_lacks_naming_the_checked_versions():
    linear = nn.Linear(3, 2, bias=False)
    with pytest.raises(RuntimeError, match=f"_parameters\\['scale'\\].*{CHECKED_ON}"):
        swap_parameters([(linear, "weight"), (linear, "scale")], [torch.zeros(2, 3), torch.zeros(2)])
    assert isinstance(linear.weight, nn.Parameter)
