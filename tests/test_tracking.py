"""metrics.jsonl and W&B tracking with the real wandb in offline mode (never the network): what a run logs is read
back from W&B's own transaction log (``run-<id>.wandb``), resumed runs continue the same W&B run, rank 1 writes
nothing, ``disabled`` never needs wandb, and ``online`` without credentials or server logs offline instead."""

from __future__ import annotations

import json
import logging
import os
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import pytest
import torch
from test_train_engine import children, ended

from launch.env import free_port
from pretrain.config import ConfigError, WandbConfig
from pretrain.tracking import METRICS_FILE, RUN_ID_FILE, Tracker, format_metrics, wandb_credentials_found

CONFIG = {"train": {"max_steps": 7, "seed": 3}, "model": {"d_model": 32}}
BLOCK, HEADER = 32768, 7  # W&B's transaction log is a LevelDB log: 32 KiB blocks of 7-byte-header records


@pytest.fixture(autouse=True)
def offline_wandb(tmp_path, monkeypatch):
    """No credentials, no server, W&B's own state under tmp_path; a fresh wandb service for the next test."""
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    yield
    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()


def wandb_records(path: Path) -> Iterator:
    """The Record protobufs of a ``.wandb`` file: a 7-byte file header (":W&B", magic, version), then records of
    (crc32 of type + payload, length, type FULL/FIRST/MIDDLE/LAST) that never straddle a 32 KiB block."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, payload = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if left < HEADER or kind == 0:  # a block's zero-filled tail
            pos += left
            continue
        chunk = data[pos + HEADER:pos + HEADER + length]
        assert crc == zlib.crc32(chunk, zlib.crc32(bytes([kind]))), f"bad checksum at byte {pos} of {path}"
        payload = chunk if kind in (1, 2) else payload + chunk
        pos += HEADER + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            yield record


def read_wandb_run(run_dir: Path) -> Tuple[str, dict, List[Tuple[int, Dict[str, float]]]]:
    """(run id, config, [(step, metrics)]) of the single offline W&B run under ``run_dir/wandb``."""
    (log_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    run_ids, config, history = [], {}, []
    for record in wandb_records(log_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_ids.append(record.run.run_id)
            config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.append((record.history.step.num, {k: v for k, v in row.items() if not k.startswith("_")}))
    assert len(set(run_ids)) == 1, run_ids
    return run_ids[0], config, history


def offline_runs(run_dir: Path) -> List[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def jsonl(run_dir: Path) -> List[dict]:
    return [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]


def fake_metrics(step: int) -> Dict[str, float]:
    """What the loop logs, with values that differ per step."""
    return {"loss": 5.0 / step, "loss/text": 3.0 / step, "loss/image": 2.0 / step, "lr": 1e-4 * step,
            "samples": 16 * step}


def run_steps(tracker: Tracker, steps) -> None:
    for step in steps:
        tracker.log(fake_metrics(step), step)


def test_offline_run_holds_the_logged_metrics_and_config(tmp_path):
    """Enough steps that W&B's log spans several 32 KiB blocks, so the reader (and the data) are checked across them."""
    with Tracker(WandbConfig(mode="offline"), tmp_path, 0, CONFIG, run_name="demo") as tracker:
        run_steps(tracker, range(1, 401))
    run_id, config, history = read_wandb_run(tmp_path)
    assert next(tmp_path.glob("wandb/offline-run-*/run-*.wandb")).stat().st_size > 2 * BLOCK
    assert run_id == tracker.run_id == (tmp_path / RUN_ID_FILE).read_text().strip()
    assert config["train"] == CONFIG["train"] and config["model"] == CONFIG["model"]
    assert history == [(step, fake_metrics(step)) for step in range(1, 401)]
    lines = jsonl(tmp_path)
    assert [next(iter(line)) for line in lines] == ["step"] * 400
    assert lines == [{"step": step, **fake_metrics(step)} for step in range(1, 401)]


def test_the_finish_timeout_reaches_wandb(tmp_path):
    """wandb.finish_timeout_s bounds W&B's upload at the end (a job warned of its time limit must requeue in time),
    raising so that the tracker can say where the rest waits."""
    import wandb

    with Tracker(WandbConfig(mode="offline", finish_timeout_s=7.5), tmp_path, 0, CONFIG) as tracker:
        tracker.log({"loss": 1.0}, 1)
        assert (wandb.run.settings.finish_timeout, wandb.run.settings.finish_timeout_raises) == (7.5, True)


def test_resume_in_the_same_run_dir_continues_the_run_and_the_metrics_file(tmp_path):
    """A run killed after logging step 5 resumes from its step-3 checkpoint: W&B continues the same run id, and
    metrics.jsonl ends up byte-identical to the one of a run that was never interrupted."""
    killed = Tracker(WandbConfig(mode="offline"), tmp_path / "run", 0, CONFIG)
    run_steps(killed, range(1, 6))
    killed.finish()
    with (tmp_path / "run" / METRICS_FILE).open("a") as torn:
        torn.write('{"step": 6, "lo')  # the kill came mid-write
    with Tracker(WandbConfig(mode="offline"), tmp_path / "run", 0, CONFIG, resume_step=3) as resumed:
        assert resumed.run_id == killed.run_id
        run_steps(resumed, range(4, 9))
    with Tracker(WandbConfig(mode="disabled"), tmp_path / "straight", 0, CONFIG) as straight:
        run_steps(straight, range(1, 9))

    assert (tmp_path / "run" / METRICS_FILE).read_bytes() == (tmp_path / "straight" / METRICS_FILE).read_bytes()
    first, second = offline_runs(tmp_path / "run")
    assert killed.run_id in first.name and killed.run_id in second.name
    log_files = [next(d.glob("run-*.wandb")) for d in (first, second)]
    runs = [next(r.run for r in wandb_records(f) if r.WhichOneof("record_type") == "run") for f in log_files]
    assert {run.run_id for run in runs} == {killed.run_id}
    steps = [[r.history.step.num for r in wandb_records(f) if r.WhichOneof("record_type") == "history"]
             for f in log_files]
    assert steps == [[1, 2, 3, 4, 5], [4, 5, 6, 7, 8]]


def test_wandbs_service_ending_mid_run_leaves_the_run_going(tmp_path, caplog):
    """Slurm signals every process of a job it requeues or preempts, and W&B's service exits on SIGTERM: the ranks'
    next log (before their checkpoint) and the end of the run go on, W&B off, with one warning; metrics.jsonl keeps
    every step. (W&B's own files lose what its service had not written yet: here, all of it.) A later run in the
    same process starts a new service."""
    tracker = Tracker(WandbConfig(mode="offline"), tmp_path, 0, CONFIG)
    run_steps(tracker, [1, 2])
    (service,) = [pid for pid in children(os.getpid()) if "wandb" in Path(f"/proc/{pid}/cmdline").read_text()]
    os.kill(service, signal.SIGTERM)
    assert ended(service, 30)
    with caplog.at_level(logging.WARNING, logger="pretrain.tracking"):
        run_steps(tracker, [3, 4])
        tracker.finish(exit_code=143)
    # ours alone: wandb's own records (its warnings outside a git checkout, its debug lines) are not the test's
    ours = [r.getMessage() for r in caplog.records if r.name == "pretrain.tracking"]
    assert len(ours) == 1 and "W&B failed at step 3" in ours[0]
    assert f"continues W&B run {tracker.run_id}" in ours[0]
    assert jsonl(tmp_path) == [{"step": step, **fake_metrics(step)} for step in range(1, 5)]
    with Tracker(WandbConfig(mode="offline"), tmp_path / "next", 0, CONFIG) as tracker:
        run_steps(tracker, [1])
    assert read_wandb_run(tmp_path / "next")[2] == [(1, fake_metrics(1))]


def test_checkpoint_state_carries_the_run_id_to_a_new_run_dir(tmp_path):
    with Tracker(WandbConfig(mode="offline"), tmp_path / "a", 0, CONFIG) as first:
        run_steps(first, [1])
    state = first.state_dict()
    second = Tracker(WandbConfig(mode="offline"), tmp_path / "b", 0, CONFIG, resume_step=1)
    assert second.run_id != state["run_id"]
    second.load_state_dict(state)
    run_steps(second, [2])
    with pytest.raises(RuntimeError, match="before the first log"):
        second.load_state_dict({"run_id": "another1"})
    second.finish()
    run_id, _, history = read_wandb_run(tmp_path / "b")
    assert run_id == state["run_id"] == second.state_dict()["run_id"]
    assert (tmp_path / "b" / RUN_ID_FILE).read_text().strip() == state["run_id"]
    assert history == [(2, fake_metrics(2))]


def test_disabled_writes_metrics_jsonl_without_wandb_installed(tmp_path):
    """The GPU image has no wandb: with ``disabled`` it is never imported (here it cannot be)."""
    script = f"""
import sys
sys.modules["wandb"] = None  # import wandb now raises ImportError, as where it is not installed
from pretrain.config import WandbConfig
from pretrain.tracking import Tracker
with Tracker(WandbConfig(mode="disabled"), {str(tmp_path)!r}, 0, {{}}) as tracker:
    tracker.log({{"loss": 1.5, "grad_norm": 0.25}}, 1)
    tracker.log({{"loss": 1.25}}, 2)
    assert tracker.state_dict() == {{"run_id": None}}
"""
    subprocess.run([sys.executable, "-c", script], check=True, cwd=Path(__file__).resolve().parents[1])
    assert jsonl(tmp_path) == [{"step": 1, "loss": 1.5, "grad_norm": 0.25}, {"step": 2, "loss": 1.25}]
    assert sorted(p.name for p in tmp_path.iterdir()) == [METRICS_FILE]


def test_online_without_credentials_logs_offline(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="pretrain.tracking"), \
            Tracker(WandbConfig(mode="online"), tmp_path, 0, CONFIG) as tracker:
        run_steps(tracker, [1, 2])
    assert [r.message for r in caplog.records if "no W&B API key" in r.message and "offline" in r.message]
    run_id, _, history = read_wandb_run(tmp_path)
    assert run_id == tracker.run_id and history == [(1, fake_metrics(1)), (2, fake_metrics(2))]


@pytest.mark.slow
def test_online_with_an_unreachable_server_logs_offline(tmp_path, caplog, monkeypatch):
    """A key but no server (a closed local port): after init_timeout (+ W&B's ~10 s login check) it logs offline."""
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{free_port()}")
    with caplog.at_level(logging.WARNING, logger="pretrain.tracking"), \
            Tracker(WandbConfig(mode="online"), tmp_path, 0, CONFIG, init_timeout=1.0) as tracker:
        run_steps(tracker, [1])
    assert [r.message for r in caplog.records if "W&B online start failed" in r.message]
    run_id, _, history = read_wandb_run(tmp_path)
    assert run_id == tracker.run_id and history == [(1, fake_metrics(1))]


def test_rank_1_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    with Tracker(WandbConfig(mode="offline"), run_dir, 1, CONFIG, resume_step=0) as tracker:
        run_steps(tracker, [1, 2])
        assert tracker.state_dict() == {"run_id": None}
    assert not run_dir.exists()


def test_metrics_file_truncation_and_fresh_start(tmp_path):
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6)]
    path = tmp_path / METRICS_FILE
    path.write_text("".join(lines) + '{"step": 6, "loss"')
    Tracker(WandbConfig(mode="disabled"), tmp_path, 0, CONFIG, resume_step=5).finish()
    assert path.read_text() == "".join(lines), "a torn last line is dropped"
    Tracker(WandbConfig(mode="disabled"), tmp_path, 0, CONFIG, resume_step=2).finish()
    assert path.read_text() == "".join(lines[:2])
    Tracker(WandbConfig(mode="disabled"), tmp_path, 0, CONFIG).finish()
    assert path.read_text() == "", "a fresh start (no checkpoint) starts the file over"


def test_fresh_start_in_a_used_run_dir_is_a_new_wandb_run(tmp_path):
    (tmp_path / RUN_ID_FILE).write_text("oldrun12\n")
    with Tracker(WandbConfig(mode="offline"), tmp_path, 0, CONFIG) as tracker:
        run_steps(tracker, [1])
    run_id, _, _ = read_wandb_run(tmp_path)
    assert run_id == tracker.run_id != "oldrun12"
    assert (tmp_path / RUN_ID_FILE).read_text().strip() == run_id


def test_log_values_are_numbers(tmp_path):
    with Tracker(WandbConfig(mode="disabled"), tmp_path, 0, CONFIG) as tracker:
        tracker.log({"loss": torch.tensor(0.5), "samples": torch.tensor(8), "nan": float("nan")}, 1)
        with pytest.raises(TypeError, match="'phase'"):
            tracker.log({"phase": "warmup"}, 2)
        with pytest.raises(ValueError, match="'step' is reserved"):
            tracker.log({"step": 3}, 3)
    (line,) = jsonl(tmp_path)
    assert line["loss"] == 0.5 and line["samples"] == 8 and line["nan"] != line["nan"]


def test_bad_mode_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="wandb.mode"):
        Tracker(WandbConfig(mode="on"), tmp_path, 0, CONFIG)


def test_credentials_from_env_or_netrc(tmp_path):
    netrc = tmp_path / "netrc"
    netrc.write_text("machine api.wandb.ai login user password " + "k" * 40 + "\nmachine wandb.example.org login u\n")
    assert wandb_credentials_found({"WANDB_API_KEY": "k" * 40, "NETRC": str(tmp_path / "none")})
    assert wandb_credentials_found({"NETRC": str(netrc)})
    assert not wandb_credentials_found({"NETRC": str(netrc), "WANDB_BASE_URL": "https://wandb.example.org"})
    assert not wandb_credentials_found({"NETRC": str(netrc), "WANDB_BASE_URL": "https://other.example.org"})
    assert not wandb_credentials_found({"NETRC": str(tmp_path / "none")})


def test_format_metrics_one_line():
    metrics = {"loss": 2.5, "loss/text": 2.0, "loss/image": 0.5, "lr": 3e-4, "grad_norm": 1.234,
               "samples_per_s": 512.26, "data_wait_frac": 0.041, "val/loss": 2.75, "samples": 4096}
    assert format_metrics(metrics, 42, 1000) == (
        "step   42/1000 | loss 2.5000 (text 2.0000, image 0.5000) | val/loss 2.7500 | lr 3.00e-04 | grad 1.23 | "
        "512.3 samples/s | data wait 4.1%"
    )
    assert format_metrics({"loss": 1.0}, 7, 7) == "step 7/7 | loss 1.0000"


def test_format_metrics_says_how_the_total_is_made():
    """A part that only some batches had carries its share (the total is the sum of share x part), and the
    validation loss says how many samples it scored."""
    metrics = {"loss": 4.9737, "loss/image": 0.9749, "loss/text": 5.4039, "loss_share/text": 0.7400,
               "val/loss": 4.41, "val/loss/image": 0.95, "val/loss/text": 3.46, "val/samples": 24.0}
    assert format_metrics(metrics, 5, 10) == (
        "step  5/10 | loss 4.9737 (image 0.9749, text 5.4039 on 74% of steps) | "
        "val/loss 4.4100 (image 0.9500, text 3.4600) on 24 samples")
