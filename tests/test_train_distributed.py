"""The loop's stop/save agreement across ranks (``DeferredAgreement``): read one step late, the same on every rank,
with the other collectives of a step in between, and the time-based checkpoints it decides in a real 2-rank run."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from test_train_engine import ROOT, free_port, run, tiny_config

from pretrain.checkpoint import read_latest
from pretrain.train.distributed import DeferredAgreement

TWO_RANKS = """
import sys, torch, torch.distributed as dist
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
