"""The optimizer and its schedule across a resume: a checkpoint restores the saved run's hyperparameters, and
``apply_optim_config`` puts the config's back, the current rate at the schedule's point included."""

from __future__ import annotations

import pytest
import torch

from pretrain.config import OptimConfig
from pretrain.train.schedule import GroupKind, apply_optim_config, build_optimizer, build_scheduler, lr_factor

MAX_STEPS = 20
KINDS = [GroupKind(decay=True), GroupKind(decay=False)]


def stepped(optim: OptimConfig, steps: int):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = build_optimizer(model, optim)
    scheduler = build_scheduler(optimizer, optim, MAX_STEPS)
    for _ in range(steps):
        model(torch.randn(4, 3)).sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return optimizer, scheduler


def test_resumed_optimizer_takes_the_configs_settings():
    saved = OptimConfig(lr=1e-2, weight_decay=0.1, betas=[0.9, 0.95], eps=1e-8, warmup_steps=4)
    optimizer, scheduler = stepped(saved, 6)
    wanted = OptimConfig(lr=2e-3, weight_decay=0.01, betas=[0.8, 0.9], eps=1e-6, warmup_steps=4)
    resumed_optimizer, resumed_scheduler = stepped(wanted, 0)
    resumed_optimizer.load_state_dict(optimizer.state_dict())
    resumed_scheduler.load_state_dict(scheduler.state_dict())
    assert resumed_scheduler.base_lrs == [1e-2, 1e-2]  # what a load alone leaves: the saved run's rate

    changed = apply_optim_config(resumed_optimizer, resumed_scheduler, wanted, KINDS)
    assert "param group 0 lr: 0.01 -> 0.002" in changed and "param group 0 weight_decay: 0.1 -> 0.01" in changed
    assert "param group 1 betas: (0.9, 0.95) -> (0.8, 0.9)" in changed and len(changed) == 7  # group 1 keeps wd 0
    decay, rest = resumed_optimizer.param_groups
    assert (decay["weight_decay"], rest["weight_decay"]) == (0.01, 0.0)
    for group in (decay, rest):
        assert group["betas"] == (0.8, 0.9) and group["eps"] == 1e-6
        assert group["lr"] == 2e-3 * lr_factor(6, wanted, MAX_STEPS)  # the rate of the step about to be taken
    assert resumed_scheduler.base_lrs == [2e-3, 2e-3] and resumed_scheduler.last_epoch == 6


def test_same_config_changes_nothing():
    optim = OptimConfig(lr=1e-2, warmup_steps=4)
    optimizer, scheduler = stepped(optim, 6)
    rates = [group["lr"] for group in optimizer.param_groups]
    assert apply_optim_config(optimizer, scheduler, optim, KINDS) == []
    assert [group["lr"] for group in optimizer.param_groups] == rates  # bit-equal: exact resume is kept


@pytest.mark.parametrize("steps", [0, 3, 10])
def test_group_rate_follows_the_schedule(steps):
    optim = OptimConfig(lr=1e-2, warmup_steps=4)
    optimizer, _ = stepped(optim, steps)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * lr_factor(steps, optim, MAX_STEPS))
