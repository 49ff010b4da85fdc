"""Exact resume: a run stopped by SIGTERM (checkpoint one step boundary later, exit 143) and resumed gives the same
per-step losses, bit for bit (fp32 on CPU), and the same final weights as an uninterrupted run."""

from __future__ import annotations

import signal

import pytest
import torch
from test_train_engine import final_weights, launch, logs, losses, metrics, run, signal_all, tiny_config, wait, \
    wait_for_step

from pretrain.checkpoint import read_latest
from pretrain.train import EXIT_PREEMPTED

STEPS = 24


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_checkpoint_resume_matches_uninterrupted_run(tmp_path, sig):
    sections = dict(train={"max_steps": STEPS, "eval_every_steps": 8, "eval_batches": 2},
                    checkpoint={"every_steps": 0})
    reference = tiny_config(tmp_path / "reference", **sections)
    run(reference)

    config = tiny_config(tmp_path / "interrupted", **sections)
    run_dir = config.parent / "run"
    procs = launch(config)
    wait_for_step(run_dir, 3, procs)
    signal_all(procs, sig)
    codes = wait(procs)
    assert codes == [EXIT_PREEMPTED] * 2, f"exit codes {codes}\n{logs(config.parent)}"
    stopped = int(read_latest(run_dir / "checkpoints").name.split("_")[1])
    assert 3 <= stopped < STEPS and max(metrics(run_dir)) == stopped

    run(config)  # --resume auto
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stopped:08d}'} at step {stopped}" in logs(config.parent)
    expected, got = losses(reference.parent / "run"), losses(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == expected  # bit-equal floats
    assert metrics(run_dir)[16]["val/loss"] == metrics(reference.parent / "run")[16]["val/loss"]
    weights, reference_weights = final_weights(run_dir / "checkpoints"), final_weights(reference.parent / "run" / "checkpoints")
    assert weights.keys() == reference_weights.keys()
    assert all(torch.equal(weights[k], reference_weights[k]) for k in weights)
