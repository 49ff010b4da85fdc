"""A disk too full for the next checkpoint: every rank stops before writing it (exit 4, the latest checkpoint
intact, the reason named), and the run resumes once there is room. Runs on a small tmpfs (needs root)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from test_train_engine import launch, logs, run, tiny_config, wait

from pretrain.checkpoint import read_latest
from pretrain.train.stopping import EXIT_NO_ROOM


@pytest.fixture
def small_disk(tmp_path: Path):
    """A mount point whose size the test sets with ``resize(kilobytes)``."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1800k", "tmpfs", str(disk)]).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")

    def resize(kilobytes: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={kilobytes}k", str(disk)], check=True)

    yield disk, resize
    subprocess.run(["umount", str(disk)], check=True)


@pytest.mark.slow
def test_a_full_disk_stops_every_rank_before_the_checkpoint_and_the_run_resumes(tmp_path: Path, small_disk):
    disk, resize = small_disk  # 1800 KB: room for two checkpoints of the tiny model (~740 KB each), not three
    run_dir = disk / "run"
    config = tiny_config(tmp_path, train={"max_steps": 8}, checkpoint={"every_steps": 2},
                         run={"dir": str(run_dir), "log_every_steps": 1, "progress_bar": False})
    assert wait(launch(config)) == [EXIT_NO_ROOM] * 2, logs(tmp_path)
    checkpoints = run_dir / "checkpoints"
    assert read_latest(checkpoints).name == "step_00000004"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_00000002", "step_00000004"]
    for rank in (0, 1):
        log = (tmp_path / f"rank{rank}.log").read_text()
        assert "no room for checkpoint step_00000006" in log and "rank 1 has 0." in log and "needs about 0.7 MB" in log
        assert "Nothing was written; the latest checkpoint, step_00000004, is intact" in log

    resize(4000)
    run(config)
    assert read_latest(checkpoints).name == "step_00000008"


@pytest.mark.slow
def test_no_room_for_the_first_checkpoint_is_found_from_an_estimate(tmp_path: Path, small_disk):
    disk, resize = small_disk
    resize(300)
    config = tiny_config(tmp_path, train={"max_steps": 2}, checkpoint={"every_steps": 2},
                         run={"dir": str(disk / "run"), "log_every_steps": 1, "progress_bar": False})
    assert wait(launch(config)) == [EXIT_NO_ROOM] * 2, logs(tmp_path)
    assert "Nothing was written; no checkpoint was saved yet" in (tmp_path / "rank0.log").read_text()
    assert not list((disk / "run").glob("checkpoints/step_*"))
