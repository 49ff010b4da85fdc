"""Exact resume: a run stopped by SIGTERM (checkpoint one step boundary later, exit 143) and resumed gives the same
per-step losses, bit for bit (fp32 on CPU), and the same final weights as an uninterrupted run. A signal while the
ranks start (before torch is even imported) makes them exit 143 for a requeue, their checkpoint untouched."""

from __future__ import annotations

import signal
import time
from pathlib import Path

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


def catches(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has a handler for ``sig`` (Linux ``/proc``: the SigCgt mask)."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return bool(int(status["SigCgt"], 16) >> (sig - 1) & 1)


@pytest.mark.slow
def test_signal_while_the_ranks_start_exits_for_a_requeue_with_the_checkpoint_untouched(tmp_path):
    """Slurm may signal a job as it starts (a preemption with a grace time sends SIGUSR1, whose default action ends a
    process with no requeue): the ranks catch it from their first lines, before torch is imported, and exit 143
    without training; the checkpoint they resumed from stays the latest, and the requeued run goes on from it."""
    run(tiny_config(tmp_path, train={"max_steps": 2}))
    config = tiny_config(tmp_path, train={"max_steps": 4})
    run_dir = config.parent / "run"
    procs = launch(config)
    deadline = time.monotonic() + 60
    while not all(catches(p.pid, signal.SIGUSR1) for p in procs):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), logs(config.parent)
        time.sleep(0.005)
    signal_all(procs, signal.SIGUSR1)
    codes = wait(procs)
    assert codes == [EXIT_PREEMPTED] * 2, f"exit codes {codes}\n{logs(config.parent)}"
    assert f"signal {int(signal.SIGUSR1)} during the start: exiting with 143" in logs(config.parent)
    assert read_latest(run_dir / "checkpoints").name == "step_00000002" and max(metrics(run_dir)) == 2
    run(config)
    assert sorted(metrics(run_dir)) == [1, 2, 3, 4]
