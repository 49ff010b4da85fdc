"""The training engine with real DeepSpeed and 2 gloo processes on a tiny multimodal config: each ZeRO stage trains
and checkpoints. The other ``test_train_*``/``test_checkpoint*`` modules import the helpers from here: they write tiny
shards and a config, start the ranks as separate processes (RANK/WORLD_SIZE/... set, as torchrun or srun would) so a
test can signal or kill one rank, and read back what a run wrote."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import pytest
import torch
import yaml
from test_data_shards import multimodal_model, multimodal_sample, write_shards

from launch import free_port
from pretrain.checkpoint import MODEL_STATES, read_latest
from pretrain.config import model_config_to_dict

ROOT = Path(__file__).resolve().parents[1]
RUN_TIMEOUT = 240


def tiny_config(tmp_path: Path, **sections) -> Path:
    """Shards under ``tmp_path/shards`` (once) and a YAML config of the tiny multimodal model; ``sections`` update the
    config's sections (``train={"max_steps": 4}``)."""
    shards = tmp_path / "shards"
    if not shards.is_dir():
        write_shards(shards / "train", [24] * 4, multimodal_sample)
        write_shards(shards / "val", [8] * 2, multimodal_sample, first=10)
    cfg = {
        "model": model_config_to_dict(multimodal_model()),
        "data": {"train_shards": [str(shards / "train")], "val_shards": [str(shards / "val")], "batch_size": 4,
                 "num_workers": 1, "shuffle_buffer": 16, "audio_sample_rate": 1000},
        "train": {"max_steps": 6, "precision": "fp32"},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "deepspeed": {"zero_stage": 2},
        "checkpoint": {"every_steps": 0},
        "wandb": {"mode": "disabled"},
        "run": {"dir": str(tmp_path / "run"), "log_every_steps": 1, "progress_bar": False},
    }
    for section, values in sections.items():
        cfg[section].update(values)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def launch(config: Path, nproc: int = 2, args: Sequence[str] = (), log_dir: Optional[Path] = None,
           preexec: Optional[Dict[int, Callable[[], None]]] = None) -> List[subprocess.Popen]:
    """``nproc`` ranks of ``python -m pretrain train``, each its own process (stdout+stderr to ``rank<r>.log``);
    ``preexec[rank]`` runs in that rank's child before it starts (e.g. to set a resource limit)."""
    port, log_dir = free_port(), log_dir or config.parent
    procs = []
    for rank in range(nproc):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nproc),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        out = open(log_dir / f"rank{rank}.log", "a")
        procs.append(subprocess.Popen([sys.executable, "-m", "pretrain", "train", "--config", str(config), *args],
                                      cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                      preexec_fn=(preexec or {}).get(rank)))
    return procs


def children(pid: int) -> List[int]:
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def ended(pid: int, timeout: float) -> bool:
    """Whether process ``pid`` (not necessarily ours) ends within ``timeout`` seconds."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


def rank_and_workers(pid: int) -> List[int]:
    """A rank and its data-loader workers: the children of its fork server (Linux ``/proc``). The fork server and
    the resource tracker themselves are left out: they have no SIGUSR2 handler."""
    return [pid] + [worker for server in children(pid) for worker in children(server)]


def wait(procs: List[subprocess.Popen], timeout: float = RUN_TIMEOUT) -> List[int]:
    """Exit codes; a rank still running after ``timeout`` first writes the stacks of its threads and workers into
    its log (SIGUSR2), then is killed (and the test fails on its code, with the stacks in the logs it shows)."""
    deadline = time.monotonic() + timeout
    codes = []
    for proc in procs:
        try:
            codes.append(proc.wait(max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for pid in rank_and_workers(proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGUSR2)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)  # bounded: the dump is written by the signal handler in C, at once
            proc.kill()
            codes.append(proc.wait())
    return codes


def run(config: Path, nproc: int = 2, args: Sequence[str] = ()) -> None:
    """A whole run; fails with the ranks' logs unless every rank exits 0."""
    codes = wait(launch(config, nproc, args))
    assert codes == [0] * nproc, f"exit codes {codes}\n{logs(config.parent)}"


def logs(directory: Path) -> str:
    """Every rank's whole log (a run logs a line per step: a tail would lose its start)."""
    return "\n".join(f"--- {p.name}\n{p.read_text()}" for p in sorted(directory.glob("rank*.log")))


def metrics(run_dir: Path) -> Dict[int, dict]:
    """``metrics.jsonl`` by step."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row for row in rows}


def losses(run_dir: Path) -> Dict[int, Dict[str, float]]:
    return {step: {k: v for k, v in row.items() if k == "loss" or k.startswith("loss/")}
            for step, row in metrics(run_dir).items()}


def wait_for_step(run_dir: Path, step: int, procs: List[subprocess.Popen], timeout: float = RUN_TIMEOUT) -> int:
    """Poll ``metrics.jsonl`` until it logs ``step`` or later; returns the newest logged step."""
    deadline = time.monotonic() + timeout
    path = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline:
        if path.is_file():
            steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]
            if steps and steps[-1] >= step:
                return steps[-1]
        assert all(p.poll() is None for p in procs), "a rank exited before reaching step %d" % step
        time.sleep(0.02)
    raise AssertionError(f"step {step} not logged in {timeout} s")


def signal_all(procs: List[subprocess.Popen], sig: int) -> None:
    for proc in procs:
        proc.send_signal(sig)


def checkpoint_files(tag_dir: Path, world_size: int) -> List[str]:
    """The files a complete ZeRO-1/2 checkpoint of ``world_size`` ranks holds."""
    return [MODEL_STATES] + [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world_size)]


def final_weights(checkpoint_dir: Path) -> Dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=read_latest(checkpoint_dir).name)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_trains_checkpoints_and_resumes_with_two_processes(tmp_path, stage):
    """Each stage trains, saves, and resumes from its own checkpoint (ZeRO-3 names its files per rank)."""
    for max_steps in (3, 6):
        config = tiny_config(tmp_path, deepspeed={"zero_stage": stage}, train={"max_steps": max_steps},
                             checkpoint={"every_steps": 3, "keep_last": 1})
        run(config)
    run_dir = tmp_path / "run"
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000003'} at step 3" in logs(tmp_path)
    got = losses(run_dir)
    assert sorted(got) == list(range(1, 7))
    assert all(torch.isfinite(torch.tensor(list(row.values()))).all() for row in got.values())
    assert set(got[1]) == {"loss", "loss/text", "loss/image", "loss/audio", "loss/video", "loss/label"}
    checkpoints = run_dir / "checkpoints"
    assert read_latest(checkpoints) == checkpoints / "step_00000006"
    assert sorted(p.name for p in checkpoints.iterdir() if p.is_dir()) == ["step_00000006"]  # keep_last=1
    ds_config = json.loads((run_dir / "deepspeed.json").read_text())
    assert ds_config["zero_optimization"]["stage"] == stage and ds_config["train_batch_size"] == 8
    weights = final_weights(checkpoints)
    assert "encoder.latents" in weights and all(torch.isfinite(w).all() for w in weights.values())


FP32_ACCUMULATION = {"zero_stage": 1, "fp32_grad_accumulation": True}
VARIANTS = {
    # name: (overrides of the run that is checkpointed and resumed, overrides of the uninterrupted reference)
    "offload": ({"deepspeed": {"zero_stage": 2, "offload_optimizer": True}}, {}),
    "bf16": ({"train": {"precision": "bf16"}}, {"train": {"precision": "bf16"}}),
    # ZeRO-1 accumulating bf16 gradients in fp32 runs DeepSpeed's BF16_Optimizer (other state, other files)
    "fp32_accumulation": ({"train": {"precision": "bf16"}, "deepspeed": FP32_ACCUMULATION},
                          {"train": {"precision": "bf16"}, "deepspeed": FP32_ACCUMULATION}),
    "autocast": ({"train": {"precision": "autocast"}}, {"train": {"precision": "autocast"}}),
}


def _with_steps(overrides: dict, max_steps: int) -> dict:
    return dict(overrides, train={**overrides.get("train", {}), "max_steps": max_steps}, checkpoint={"every_steps": 2})


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variant_trains_and_resumes_like_an_uninterrupted_run(tmp_path, variant):
    """ZeRO-2 with the optimizer offloaded to CPU gives the losses of a run without offload, and bf16 (DeepSpeed's
    bf16 weights with fp32 master copies; also with fp32 gradient accumulation under ZeRO-1) and autocast
    (DeepSpeed's torch_autocast) those of an uninterrupted run of its kind, across a resume from their own checkpoint
    at step 2 (the offloaded / master optimizer state saved and restored)."""
    resumed, reference = VARIANTS[variant]
    run(tiny_config(tmp_path / "reference", **_with_steps(reference, 4)))
    run(tiny_config(tmp_path / "resumed", **_with_steps(resumed, 2)))
    run(tiny_config(tmp_path / "resumed", **_with_steps(resumed, 4)))
    run_dir = tmp_path / "resumed" / "run"
    assert "resumed from" in logs(tmp_path / "resumed")
    zero = json.loads((run_dir / "deepspeed.json").read_text())
    assert zero["bf16"]["enabled"] == (variant in ("bf16", "fp32_accumulation"))
    assert ("torch_autocast" in zero) == (variant == "autocast")
    assert ("offload_optimizer" in zero["zero_optimization"]) == (variant == "offload")
    assert zero.get("data_types") == ({"grad_accum_dtype": "fp32"} if variant == "fp32_accumulation" else None)
    want, got = losses(tmp_path / "reference" / "run"), losses(run_dir)
    assert sorted(got) == [1, 2, 3, 4]
    for step in want:
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-5, abs=1e-6), step


@pytest.mark.slow
def test_autocast_computes_in_bf16_over_fp32_weights(tmp_path):
    """``train.precision=autocast``: the forward runs under bf16 autocast (its losses round away from an fp32 run's,
    by bf16's precision) while the weights the checkpoint holds stay fp32."""
    for name, precision in (("fp32", "fp32"), ("autocast", "autocast")):
        run(tiny_config(tmp_path / name, train={"max_steps": 2, "precision": precision},
                        checkpoint={"every_steps": 2}), nproc=1)
    fp32, autocast = losses(tmp_path / "fp32" / "run"), losses(tmp_path / "autocast" / "run")
    for step in (1, 2):
        assert autocast[step]["loss"] != fp32[step]["loss"]
        assert autocast[step]["loss"] == pytest.approx(fp32[step]["loss"], rel=2e-2), step
    module = torch.load(read_latest(tmp_path / "autocast" / "run" / "checkpoints") / MODEL_STATES,
                        map_location="cpu", weights_only=False)["module"]
    assert {w.dtype for w in module.values() if w.is_floating_point()} == {torch.float32}


@pytest.mark.slow
def test_compiled_model_trains_like_the_eager_one(tmp_path, monkeypatch):
    """``train.compile`` compiles the model in place under DeepSpeed (inductor writes its kernels to a cache of this
    test's own): the losses follow the eager run's (fused kernels round differently), attention was tuned eagerly
    before the compiled steps (compiled code cannot time kernels), and the checkpoint keeps the eager parameter
    names. Attention tuned in both runs may pick different kernels: without dropout they differ only in rounding."""
    model = {"attention_backend": "autotune", "attention_dropout": 0.0}
    run(tiny_config(tmp_path / "eager", train={"max_steps": 4}, model=model))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    config = tiny_config(tmp_path / "compiled", train={"max_steps": 4, "compile": "default"},
                         checkpoint={"every_steps": 4}, model=model)
    run(config)
    assert "autotune attention" in (tmp_path / "compiled" / "run" / "train.log").read_text()
    eager, compiled = losses(tmp_path / "eager" / "run"), losses(tmp_path / "compiled" / "run")
    assert sorted(compiled) == [1, 2, 3, 4]
    for step in eager:
        assert compiled[step]["loss"] == pytest.approx(eager[step]["loss"], rel=2e-3), step
    assert any((tmp_path / "inductor").rglob("*.py")), "inductor generated no kernels: the model ran eagerly"
    weights = final_weights(tmp_path / "compiled" / "run" / "checkpoints")
    assert "encoder.latents" in weights and not any("_orig_mod" in name for name in weights)


@pytest.mark.slow
def test_sigusr2_prints_every_thread_stack_and_training_goes_on(tmp_path):
    """The hung-rank diagnostic: SIGUSR2 to a rank and its data-loader worker writes their Python stacks to the
    rank's log, and the run still finishes."""
    config = tiny_config(tmp_path, train={"max_steps": 12})
    procs = launch(config)
    wait_for_step(tmp_path / "run", 3, procs)
    tree = rank_and_workers(procs[1].pid)
    assert len(tree) >= 2, "rank 1 should have a data-loader worker"
    for pid in tree:
        os.kill(pid, signal.SIGUSR2)
    assert wait(procs) == [0, 0], logs(tmp_path)
    rank1 = (tmp_path / "rank1.log").read_text()
    assert rank1.count("Current thread") + rank1.count("Thread 0x") >= len(tree)
    assert "pretrain/train/loop.py" in rank1 and "torch/utils/data/_utils/worker.py" in rank1
    assert sorted(losses(tmp_path / "run")) == list(range(1, 13))
