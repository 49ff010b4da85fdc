"""How a step ends, on its own (one process, a real gloo group): saves at checkpoint.every_steps, after the minutes and
at the last step; a signal agreed a step late saves then stops; a divergence stops without saving; a full disk
stops before writing; evaluates at train.eval_every_steps and the last step, with a validation stream only."""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch

from launch import detect_env
from pretrain.checkpoint import NoRoomError
from pretrain.config import Config
from pretrain.preemption import EXIT_PREEMPTED, Preemption
from pretrain.train.distributed import process_group
from pretrain.train.stopping import EXIT_DIVERGED, EXIT_NO_ROOM, Stopping

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def group():
    with process_group(detect_env({}), CPU):
        yield


@pytest.fixture
def preemption():
    caught = Preemption()
    yield caught
    caught.restore()


def stopping(tmp_path, preemption, saved, max_steps=6, every_steps=0, every_minutes=0.0, full_disk=False,
             eval_every=0, validates=False):
    cfg = Config()
    cfg.train.max_steps, cfg.checkpoint.every_steps, cfg.checkpoint.every_minutes = max_steps, every_steps, every_minutes
    cfg.train.eval_every_steps = eval_every

    def save(step: int) -> None:
        if full_disk:
            raise NoRoomError(f"no room for step {step}")
        saved.append(step)

    return Stopping(cfg, CPU, preemption, save, tmp_path, validates=validates)


def run(stops: Stopping, steps: int, line=lambda step: {}) -> tuple:
    """Steps 1..steps as the loop ends them: the exit code (None: it ran to the end) and the last step taken."""
    for step in range(1, steps + 1):
        end = stops.decide(step)
        code = stops.end_step(step, end, line(step))
        if code is not None:
            return code, step
    return None, steps


def test_saves_every_n_steps_and_at_the_last(group, tmp_path, preemption):
    saved = []
    assert run(stopping(tmp_path, preemption, saved, max_steps=7, every_steps=3), 7) == (None, 7)
    assert saved == [3, 6, 7]


def test_checkpoint_minutes_are_agreed_a_step_late(group, tmp_path, preemption):
    saved = []
    run(stopping(tmp_path, preemption, saved, max_steps=4, every_minutes=1e-9), 4)
    assert saved == [2, 3, 4]  # step 1's flag is read at step 2; each save restarts the clock


def test_a_signal_saves_the_next_step_and_stops(group, tmp_path, preemption):
    saved = []
    os.kill(os.getpid(), signal.SIGUSR1)
    assert preemption.requested
    stops = stopping(tmp_path, preemption, saved)
    assert stops.signalled_at_start()
    assert run(stops, 6) == (EXIT_PREEMPTED, 2)
    assert saved == [2]


def test_a_diverged_line_stops_without_saving(group, tmp_path, preemption, caplog):
    saved = []
    stops = stopping(tmp_path, preemption, saved, every_steps=1)
    assert run(stops, 6, lambda step: {"loss": math.nan} if step == 3 else {"loss": 1.0}) == (EXIT_DIVERGED, 3)
    assert saved == [1, 2]
    assert "training diverged by step 3: loss nan" in caplog.text and "no checkpoint was saved" in caplog.text


def test_a_full_disk_stops_before_writing(group, tmp_path, preemption):
    stops = stopping(tmp_path, preemption, [], every_steps=2, full_disk=True)
    assert not stops.signalled_at_start()
    assert run(stops, 6) == (EXIT_NO_ROOM, 2)


def test_evaluates_every_n_steps_and_at_the_last_with_a_validation_stream(group, tmp_path, preemption):
    for validates, evaluated in ((True, [3, 6, 7]), (False, [])):
        stops = stopping(tmp_path, preemption, [], max_steps=7, eval_every=3, validates=validates)
        assert [step for step in range(1, 8) if stops.decide(step).evaluate] == evaluated
