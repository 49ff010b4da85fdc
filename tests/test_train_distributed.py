"""The loop's decisions that every rank takes together: the stop/save agreement (``DeferredAgreement``, read one step
late, with the other collectives of a step in between), the time-based checkpoints it decides, and stopping on a
diverged run before anything non-finite is saved, in real 2-rank runs."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from test_train_engine import ROOT, final_weights, launch, logs, metrics, run, tiny_config, wait

from launch import free_port
from pretrain.checkpoint import read_latest
from pretrain.train.distributed import DeferredAgreement
from pretrain.train.stopping import EXIT_DIVERGED, divergence

TWO_RANKS = """
import torch, torch.distributed as dist
from pretrain.train.distributed import DeferredAgreement, mean_over_ranks
dist.init_process_group("gloo")
rank, device = dist.get_rank(), torch.device("cpu")
agreement = DeferredAgreement(3, device)
answers = [agreement.result()]
agreement.post([rank == 0, rank == 1, False])
means = mean_over_ranks({"x": float(rank)}, device)  # a collective issued while the agreement is in flight
answers.append(agreement.result())
agreement.post([False, False, False])
answers.append(agreement.result())
print("ANSWERS", answers, means["x"], flush=True)
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_ranks_agree_on_the_or_of_their_flags_one_read_late():
    port = free_port()
    procs = [
        subprocess.Popen([sys.executable, "-c", TWO_RANKS], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                  MASTER_PORT=str(port), PYTHONPATH=str(ROOT)))
        for rank in range(2)
    ]
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    want = "ANSWERS [[False, False, False], [True, True, False], [False, False, False]] 0.5"
    assert [line for out in outputs for line in out.splitlines() if line.startswith("ANSWERS")] == [want] * 2


@pytest.fixture
def one_rank_group(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_misuse_is_refused(one_rank_group):
    agreement = DeferredAgreement(2, torch.device("cpu"))
    with pytest.raises(ValueError, match="3 flags, expected 2"):
        agreement.post([True, False, False])
    agreement.post([True, False])
    with pytest.raises(RuntimeError, match="previous post was not read"):
        agreement.post([True, False])
    assert agreement.result() == [True, False]
    assert agreement.result() == [False, False]  # read once: nothing pending any more


@pytest.mark.slow
def test_checkpoint_every_minutes_saves_on_both_ranks(tmp_path):
    """A 0.6 ms interval is due after the first step: both ranks save at step 2 (a rank that did not would leave the
    other waiting in the save's collectives), and at the last step as always."""
    config = tiny_config(tmp_path, train={"max_steps": 4}, checkpoint={"every_steps": 0, "every_minutes": 1e-5,
                                                                        "keep_last": 10})
    run(config)
    checkpoints = tmp_path / "run" / "checkpoints"
    saved = {p.name for p in checkpoints.iterdir() if p.is_dir()}
    assert {"step_00000002", "step_00000004"} <= saved and "step_00000001" not in saved
    assert read_latest(checkpoints) == checkpoints / "step_00000004"


@pytest.mark.parametrize("line, found", [
    ({"loss": 2.5, "grad_norm": 0.7}, None),
    ({"loss": 2.5, "grad_norm": 0.0}, None),
    ({"val/loss": float("nan")}, None),  # an evaluation line alone: the training loss decides
    ({"loss": float("nan"), "grad_norm": 0.7}, "loss nan"),
    ({"loss": float("inf")}, "loss inf"),
    ({"loss": 2.5, "grad_norm": -1.0}, "gradient norm -1.0"),
    ({"loss": 2.5, "grad_norm": float("inf")}, "gradient norm inf"),
])
def test_divergence_reads_the_log_line(line, found):
    got = divergence(line)
    assert got == found if found is None else got.startswith(found)


@pytest.mark.slow
def test_diverged_run_stops_before_saving_and_resumes_with_the_configs_learning_rate(tmp_path):
    """A run saved at step 1 resumes with lr 1e30 from its changed config: step 2 updates the weights to ~1e30 (its
    loss still finite, so step 2 is saved), step 3's loss is NaN, and the check before step 3's save stops both ranks
    (EXIT_DIVERGED, no requeue) with step 3 never saved. Resumed from step 1 (saved with the original lr) under the
    original config, the run goes on with finite losses."""
    def config(lr: float, max_steps: int):
        return tiny_config(tmp_path, train={"max_steps": max_steps}, optim={"lr": lr, "warmup_steps": 0},
                           checkpoint={"every_steps": 1, "keep_last": 10},
                           run={"dir": str(tmp_path / "run"), "log_every_steps": 100, "progress_bar": False})

    run(config(3e-3, 1))
    codes = wait(launch(config(1e30, 6)))
    assert codes == [EXIT_DIVERGED] * 2, f"exit codes {codes}\n{logs(tmp_path)}"
    log = logs(tmp_path)
    assert "resuming with the config's optimizer setting, not the checkpoint's: param group 0 lr: 0.003 -> 1e+30" in log
    checkpoints = tmp_path / "run" / "checkpoints"
    assert read_latest(checkpoints) == checkpoints / "step_00000002"
    assert not (checkpoints / "step_00000003").exists()
    assert all(torch.isfinite(w).all() for w in final_weights(checkpoints).values())
    assert f"training diverged by step 3: loss nan. Stopped without saving: the last checkpoint, " \
           f"{checkpoints / 'step_00000002'}" in log

    run(config(3e-3, 3), args=["--resume", str(checkpoints / "step_00000001")])
    log = logs(tmp_path)
    assert f"resumed from {checkpoints / 'step_00000001'} at step 1" in log
    losses = {step: line["loss"] for step, line in metrics(tmp_path / "run").items()}
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(loss) for loss in losses.values())
