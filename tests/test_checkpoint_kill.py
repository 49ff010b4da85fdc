"""A rank that dies -- SIGKILL at a random step, SIGKILL while blocked inside the write of its checkpoint shard, or an
I/O error mid-way through that write -- never leaves a ``latest`` that names an incomplete checkpoint, and the next
start resumes from the last complete one."""

from __future__ import annotations

import fcntl
import os
import random
import re
import resource
import select
import signal

import pytest
from test_train_engine import (checkpoint_files, launch, logs, losses, run, tiny_config, wait, wait_for_step)

from pretrain.checkpoint import read_latest


def assert_complete(tag_dir, world_size=2):
    present = {p.name for p in tag_dir.iterdir()}
    assert set(checkpoint_files(tag_dir, world_size)) <= present, f"{tag_dir} lacks files: {sorted(present)}"


@pytest.mark.slow
def test_sigkill_at_a_random_step_resumes_from_the_last_complete_checkpoint(tmp_path):
    kill_step = random.Random().randint(4, 14)
    config = tiny_config(tmp_path, train={"max_steps": 20}, checkpoint={"every_steps": 3})
    run_dir = config.parent / "run"
    procs = launch(config)
    wait_for_step(run_dir, kill_step, procs)
    procs[1].send_signal(signal.SIGKILL)
    codes = wait(procs, timeout=120)
    assert codes[1] == -signal.SIGKILL and codes[0] > 0, codes  # rank 0 fails on its own, not by the timeout
    before = losses(run_dir)
    latest = read_latest(run_dir / "checkpoints")
    assert latest is not None, f"no checkpoint after killing at step >= {kill_step}\n{logs(tmp_path)}"
    assert_complete(latest)
    resumed_at = int(latest.name.split("_")[1])
    assert resumed_at % 3 == 0 and resumed_at <= max(before)

    run(config)
    assert f"resumed from {latest} at step {resumed_at}" in logs(tmp_path)
    after = losses(run_dir)
    assert sorted(after) == list(range(1, 21))
    assert {s: after[s] for s in before} == before  # the re-run steps repeat the killed run's losses exactly


def _limit_file_size(limit: int):
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.mark.slow
def test_rank_dying_while_writing_its_shard_leaves_latest_on_the_previous_checkpoint(tmp_path):
    config = tiny_config(tmp_path, train={"max_steps": 6}, checkpoint={"every_steps": 3})
    run(config)
    checkpoints = config.parent / "run" / "checkpoints"
    assert read_latest(checkpoints).name == "step_00000006"
    shard_size = (checkpoints / "step_00000006" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").stat().st_size

    # Rank 1 may write no file larger than half a shard: its write of the step-9 checkpoint breaks off mid-file
    # (Python ignores SIGXFSZ, so the write fails with EFBIG and the rank dies in the middle of the checkpoint).
    config = tiny_config(tmp_path, train={"max_steps": 12}, checkpoint={"every_steps": 3})
    codes = wait(launch(config, preexec={1: _limit_file_size(shard_size // 2)}), timeout=120)
    assert codes[0] > 0 and codes[1] > 0, codes  # each fails on its own, not by the timeout
    rank1 = (tmp_path / "rank1.log").read_text()
    assert "in save_checkpoint" in rank1 and "iostream error" in rank1  # it died inside the write
    partial = checkpoints / "step_00000009"
    written = partial / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    assert partial.is_dir() and (not written.exists() or written.stat().st_size < shard_size)
    assert read_latest(checkpoints).name == "step_00000006"
    assert_complete(checkpoints / "step_00000006")

    run(config)
    assert f"resumed from {checkpoints / 'step_00000006'} at step 6" in logs(tmp_path)
    assert read_latest(checkpoints).name == "step_00000012"
    assert_complete(checkpoints / "step_00000009")
    assert sorted(losses(config.parent / "run")) == list(range(1, 13))


def _pipe_capacity(fd: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)


@pytest.mark.slow
def test_sigkill_while_a_rank_is_inside_its_shard_write(tmp_path):
    """Rank 1's shard file of the step-9 checkpoint is a FIFO (the tag directory is a symlink, which the cleanup of a
    cut-off tag leaves alone): the rank blocks inside ``write`` once the pipe is full, and gets SIGKILL there."""
    config = tiny_config(tmp_path, train={"max_steps": 6}, checkpoint={"every_steps": 3})
    run(config)
    checkpoints = config.parent / "run" / "checkpoints"
    shard_name = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard_size = (checkpoints / "step_00000006" / shard_name).stat().st_size

    trap = tmp_path / "trap"
    trap.mkdir()
    os.mkfifo(trap / shard_name)
    (checkpoints / "step_00000009").symlink_to(trap, target_is_directory=True)
    reader = os.open(trap / shard_name, os.O_RDONLY | os.O_NONBLOCK)
    assert shard_size > _pipe_capacity(reader), "the shard must not fit into the pipe, or its write would complete"
    config = tiny_config(tmp_path, train={"max_steps": 12}, checkpoint={"every_steps": 3})
    procs = launch(config)
    poller = select.poll()
    poller.register(reader, select.POLLIN)
    while not poller.poll(100):  # until rank 1 has written the first bytes of its shard
        assert all(p.poll() is None for p in procs), f"a rank exited before writing step 9\n{logs(tmp_path)}"
    procs[1].send_signal(signal.SIGKILL)
    codes = wait(procs, timeout=120)
    assert codes[1] == -signal.SIGKILL and codes[0] > 0, codes  # rank 0 fails on its own, not by the timeout
    written = b"".join(iter(lambda: os.read(reader, 1 << 16), b""))
    os.close(reader)
    assert 0 < len(written) < shard_size  # killed mid-file
    assert read_latest(checkpoints).name == "step_00000006"
    assert_complete(checkpoints / "step_00000006")

    # Leave what a killed write leaves on a real disk: the tag directory with the truncated shard.
    (checkpoints / "step_00000009").unlink()
    (trap / shard_name).unlink()
    (trap / shard_name).write_bytes(written)
    trap.rename(checkpoints / "step_00000009")
    run(config)
    assert f"resumed from {checkpoints / 'step_00000006'} at step 6" in logs(tmp_path)
    assert read_latest(checkpoints).name == "step_00000012"
    assert (checkpoints / "step_00000009" / shard_name).stat().st_size > len(written)
    assert_complete(checkpoints / "step_00000009")
    assert sorted(losses(config.parent / "run")) == list(range(1, 13))


@pytest.mark.slow
def test_a_hung_rank_fails_its_peer_after_the_collective_timeout(tmp_path):
    """A rank that stops answering (SIGSTOP: its sockets stay open, so no peer sees it die) must not hold the job until
    its time limit: its peer gives up after ``train.collective_timeout_minutes``, the last checkpoint intact."""
    config = tiny_config(tmp_path, train={"max_steps": 10_000, "collective_timeout_minutes": 0.25},
                         checkpoint={"every_steps": 3})
    run_dir = config.parent / "run"
    procs = launch(config)
    wait_for_step(run_dir, 4, procs)
    procs[1].send_signal(signal.SIGSTOP)
    try:
        code = wait(procs[:1], timeout=120)[0]  # not the default 30 minutes
    finally:
        procs[1].kill()
        procs[1].wait()
    assert code not in (0, 143) and code > 0, f"rank 0 exit code {code}\n{logs(tmp_path)}"
    # gloo's words for the 15 s timeout, in DeepSpeed's own group too: the operation that timed out, or another on
    # the same connection, closed by that timeout (which of the two a rank reports depends on thread timing)
    assert re.search(r"Timed out waiting 15000ms|Application timeout caused pair closure",
                     (tmp_path / "rank0.log").read_text())
    assert_complete(read_latest(run_dir / "checkpoints"))
