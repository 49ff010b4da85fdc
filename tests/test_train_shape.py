"""The shape of a run is not part of its result (issue 26): the same config trained on 1 or 2 processes, with 1 or 2
data-loader workers, in 1, 2 or 4 accumulation micro-batches, killed and resumed on another shape, gives the same
losses at every step. The global batches come from the data's logical streams in one global order, each sample's
masks from its place in it, and each modality's loss is divided by its targets in the whole step. Without dropout:
its masks are drawn per rank and micro-batch, not per sample (the one part of a step that still depends on the
shape)."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Dict

import pytest
from test_train_engine import launch, logs, losses, run, tiny_config, wait, wait_for_step

STEPS = 8
SHAPES = {  # processes, data.batch_size, data.num_workers: a global batch of 8 each
    "1x8": (1, 8, 1), "2x4": (2, 4, 1), "1x4x2acc": (1, 4, 1), "1x2x4acc": (1, 2, 1), "2x2x2acc_2workers": (2, 2, 2),
}


def config(directory: Path, batch_size: int, workers: int, **sections) -> Path:
    """The tiny multimodal model on 4 shards (4 streams), a global batch of 8, checkpoints every 4 steps."""
    return tiny_config(directory, data={"batch_size": batch_size, "num_workers": workers},
                       train={"max_steps": STEPS, "global_batch_size": 8}, checkpoint={"every_steps": 4},
                       model={"attention_dropout": 0.0}, **sections)


def assert_same_losses(got: Dict[int, dict], want: Dict[int, dict], steps: range) -> None:
    for step in steps:
        assert set(got[step]) == set(want[step]), step
        for name, value in want[step].items():
            assert got[step][name] == pytest.approx(value, rel=1e-5, abs=1e-7), (step, name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Dict[int, dict]:
    directory = tmp_path_factory.mktemp("reference")
    run(config(directory, 8, 1), nproc=1)
    return losses(directory / "run")


@pytest.mark.slow
@pytest.mark.parametrize("shape", sorted(set(SHAPES) - {"1x8"}))
def test_every_shape_of_one_global_batch_trains_alike(tmp_path, reference, shape):
    processes, batch_size, workers = SHAPES[shape]
    run(config(tmp_path, batch_size, workers), nproc=processes)
    assert sorted(reference) == list(range(1, STEPS + 1))
    assert_same_losses(losses(tmp_path / "run"), reference, range(1, STEPS + 1))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_two_process_run_stopped_resumes_on_one_process_with_two_workers(tmp_path, reference, sig):
    """Stopped after step 5 (SIGTERM: it checkpoints there; SIGKILL: the step-4 checkpoint stays), then resumed by
    one process with two data-loader workers and micro-batches of 4: the losses of the run that was never stopped."""
    procs = launch(config(tmp_path, 4, 1), nproc=2)
    wait_for_step(tmp_path / "run", 5, procs)
    for proc in procs:
        proc.send_signal(sig)
    wait(procs)
    run(config(tmp_path, 4, 2), nproc=1)
    text = logs(tmp_path)
    assert "data: resuming on 1 processes x 2 workers, micro-batches of 4 (saved: 2 x 1, 4)" in text
    assert "the global batches and their samples stay the same" in text
    assert_same_losses(losses(tmp_path / "run"), reference, range(1, STEPS + 1))


@pytest.mark.slow
def test_a_resume_that_would_change_the_order_is_refused_unless_new_order(tmp_path):
    """Another seed at a resume: one line before training names what changed and data.new_order (exit 2); with it
    the run goes on, saying that the samples to come differ."""
    first = config(tmp_path, 8, 1)
    run(first, nproc=1)
    codes = wait(launch(first, 1, ["train.max_steps=10", "data.seed=1"]))
    errors = [line for line in logs(tmp_path).splitlines() if line.startswith("error: ")]
    assert codes == [2] and errors == [
        "error: data.new_order: the checkpoint's training data was ordered under other settings (seed: 0 -> 1), so "
        "its next steps would not get the samples they would have had; resume with the saved values, or set "
        "data.new_order=true to go on from the same point of the epoch in the new order"]
    run(first, nproc=1, args=["train.max_steps=10", "data.seed=1", "data.new_order=true"])
    assert "data.new_order: the training data's order changed (seed: 0 -> 1): going on from step 8 of epoch 0" \
        in logs(tmp_path)
    assert sorted(losses(tmp_path / "run")) == list(range(1, 11))
