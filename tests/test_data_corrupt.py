"""Bad data is skipped, counted by reason and readable from the main process; the run goes on, never hangs."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from test_data_shards import (
    data_config,
    flac_bytes,
    multimodal_model,
    multimodal_sample,
    png_bytes,
    truncate_inside_sample,
    write_shards,
)

from pretrain.data import DataError, DataStream, ValidationPass
from pretrain.shards import SkipCounter, read_shard


def _damaged_media(shard: int, i: int) -> dict:
    sample = {"__key__": f"s{shard:02d}-{i:04d}", "txt": f"sample {i}", "cls": "1"}
    if i == 1:
        sample["png"] = b"\x89PNG\r\n\x1a\n" + b"garbage" * 20
    elif i == 2:
        sample["png"] = png_bytes(np.zeros((9, 9, 3), np.uint8))[:-40]  # a truncated PNG
    elif i == 3:
        sample["flac"] = b"fLaC" + b"\x00garbage" * 30
    elif i == 4:
        sample.pop("txt")  # data.require lists txt
        sample["png"] = png_bytes(np.zeros((9, 9, 3), np.uint8))
    elif i == 5:
        sample["cls"] = "seven"
    elif i == 6:
        sample["flac"] = flac_bytes(np.zeros(100), 8000)
    elif i in (7, 8):
        sample["__key__"] = "s00-dup"  # two samples with one key: one sample holding .txt twice
    return sample


def test_each_kind_of_damage_is_skipped_and_counted_exactly(tmp_path):
    damaged = write_shards(tmp_path / "a", [9], _damaged_media, index=False)[0]
    truncated = write_shards(tmp_path / "b", [10], multimodal_sample, index=False, first=1)[0]
    truncate_inside_sample(truncated, 4)
    good = write_shards(tmp_path / "c", [40], multimodal_sample, index=False, first=2)[0]
    # Validation reads shards in the listed order, once each: the counts are exact.
    spec = f"{damaged}::{truncated}::pipe:exit 3::pipe:cat {tmp_path / 'missing.tar'}::{good}"
    cfg = data_config([spec], num_workers=0, batch_size=5, require=["txt"])
    stream = ValidationPass(cfg, multimodal_model())
    batches = list(stream)
    keys = [k for b in batches for k in b["keys"] if k]
    assert len(keys) == len(set(keys)) and sum(k.startswith("s02-") for k in keys) == 40  # all, once each
    assert stream.skipped() == {
        "missing_key:txt": 1, "undecodable:png": 2, "undecodable:flac": 1, "undecodable:cls": 1,
        "duplicate_file": 1, "corrupt_tar": 1, "unreadable_shard": 2,
    }
    valid = {k: bool(v) for b in batches for k, v in zip(b["keys"], b["valid"])}
    assert [k for k, v in valid.items() if not v] == ["s00-0001", "s00-0002", "s00-0003", "s00-0005"]
    assert "s00-0004" not in valid and "s00-dup" not in valid and "s01-0004" not in valid
    assert valid["s00-0006"] and valid["s01-0003"]  # a short FLAC; the last sample before the truncation
    broken = next(b for b in batches if "s00-0001" in b["keys"])
    row = broken["keys"].index("s00-0001")
    assert not broken["inputs"]["text_mask"][row].any() and broken["targets"]["label"][row] == -100


def test_damage_under_two_ranks_and_workers_keeps_batch_counts_equal(tmp_path):
    paths = write_shards(tmp_path, [12] * 8, lambda s, i: _damaged_media(s, i) if i < 7 else multimodal_sample(s, i))
    truncate_inside_sample(paths[2], 6)
    truncate_inside_sample(paths[5], 1)
    cfg = data_config([str(tmp_path)], require=["txt"], batch_size=3)
    streams = [DataStream(cfg, multimodal_model(), rank=r, world_size=2) for r in range(2)]
    assert [len(list(s)) for s in streams] == [16, 16]
    counts = [s.skipped() for s in streams]
    for reason in ("missing_key:txt", "undecodable:png", "undecodable:flac", "undecodable:cls"):
        assert all(c.get(reason, 0) >= 1 for c in counts), reason
    assert sum(c.get("corrupt_tar", 0) for c in counts) >= 2


def test_a_dataset_with_no_readable_shard_fails_instead_of_hanging(tmp_path):
    for i in range(2):
        (tmp_path / f"shard-{i:06d}.tar").write_bytes(b"not a tar file" * 100)
    cfg = data_config([str(tmp_path / "shard-{000000..000001}.tar")], epoch_samples=8)
    with pytest.raises(DataError, match=r"no usable sample in any of its 1 shards.*data_prep validate"):
        list(DataStream(cfg, multimodal_model()))


def _process_gone(pid_file, within: float = 10.0) -> bool:
    """Whether the process dies (gone, or a zombie left for init to reap) within ``within`` seconds of a SIGKILL."""
    stat = Path(f"/proc/{int(pid_file.read_text())}/stat")
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except (FileNotFoundError, ProcessLookupError):
            return True
        time.sleep(0.01)
    return False


@pytest.mark.slow
def test_a_pipe_that_stalls_is_killed_and_its_shard_skipped(tmp_path):
    """A ``pipe:`` command that stops sending (a download over a dead connection) is killed with what it started
    after ``data.pipe_stall_timeout_s``; the samples before the stall are kept and the epoch completes."""
    shard = write_shards(tmp_path / "a", [10], multimodal_sample, index=False)[0]
    good = write_shards(tmp_path / "b", [40], multimodal_sample, index=False, first=1)[0]
    half = shard.stat().st_size // 2
    stalls = f"pipe:head -c {half} {shard}; sleep 600 & echo $! > {tmp_path / 'sleep.pid'}; wait"
    cfg = data_config([f"{stalls}::{good}"], num_workers=0, batch_size=5, pipe_stall_timeout_s=1.0)
    stream = ValidationPass(cfg, multimodal_model())
    started = time.monotonic()
    batches = list(stream)
    assert time.monotonic() - started < 60
    assert stream.skipped() == {"stalled_shard": 1}
    keys = [k for b in batches for k in b["keys"] if k]
    assert 0 < sum(k.startswith("s00-") for k in keys) < 10 and sum(k.startswith("s01-") for k in keys) == 40
    assert _process_gone(tmp_path / "sleep.pid")  # the sleep under the shell was killed too


def test_a_pipe_left_early_is_not_waited_for(tmp_path):
    """A reader that stops before a ``pipe:`` shard's end closes it; a command that keeps its output open but sends
    nothing would be waited for forever, and is killed after the stall timeout."""
    shard = write_shards(tmp_path, [10], multimodal_sample, index=False)[0]
    command = f"pipe:cat {shard}; sleep 600 & echo $! > {tmp_path / 'sleep.pid'}; wait"
    samples = read_shard(command, SkipCounter(), stall_timeout_s=1.0)
    assert next(samples)["__key__"] == "s00-0000"
    samples.close()
    assert _process_gone(tmp_path / "sleep.pid")


def test_a_slow_reader_of_a_healthy_pipe_is_not_a_stall(tmp_path):
    """Only time spent waiting inside a read counts: a consumer slower than the timeout reads the whole shard."""
    shard = write_shards(tmp_path, [3], multimodal_sample, index=False)[0]
    counter = SkipCounter()
    keys = []
    for sample in read_shard(f"pipe:cat {shard}", counter, stall_timeout_s=0.3):
        keys.append(sample["__key__"])
        time.sleep(0.5)  # the consumer's own work, longer than the stall timeout
    assert keys == ["s00-0000", "s00-0001", "s00-0002"] and not counter.total
