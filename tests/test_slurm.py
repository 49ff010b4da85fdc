"""``slurm/pretrain.sbatch`` on a real local Slurm cluster (``slurm_cluster.py``: two emulated nodes): a job of two
srun tasks on two nodes trains; a job interrupted by ``scontrol requeue``, by the time-limit warning or by a
higher-priority job's preemption (with and without a grace time) checkpoints, is requeued, resumes and finishes; a
cancelled one checkpoints and stays cancelled; one whose rank hangs fails instead of holding its nodes."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import time
from pathlib import Path
from typing import Dict

import pytest
from slurm_cluster import LocalSlurm, available
from test_tracking import offline_runs
from test_train_engine import ROOT, metrics, run, tiny_config
from test_train_wandb import history

from launch.env import SLURM_PORT_BASE, SLURM_PORT_SPAN
from pretrain.checkpoint import read_latest
from pretrain.tracking import RUN_ID_FILE

pytestmark = pytest.mark.slow
SBATCH = ROOT / "slurm" / "pretrain.sbatch"
JOB_TIMEOUT = 300.0
STEPS = 40  # of an interrupted job: enough that the signal comes well before the end


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = available()
    if reason:
        pytest.skip(reason)
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


def submit(slurm: LocalSlurm, config: Path, partition: str = "local", *options: str, overrides: tuple = ()) -> str:
    """Two tasks on two nodes, one CPU each; returns the job id. The job inherits this environment (as a user's
    activated environment), with the repository importable, one thread per task, W&B's own state next to the config,
    and a launcher's variables, which the script must not let override srun's. ``overrides``: the script's
    ``key=value`` arguments."""
    done = slurm.run("sbatch", "--parsable", f"--partition={partition}", "--nodes=2", "--ntasks-per-node=1",
                     "--cpus-per-task=1", f"--chdir={ROOT}", f"--output={config.parent / 'slurm-%j.out'}", *options,
                     str(SBATCH), str(config), *overrides,
                     env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "RANK": "5", "WORLD_SIZE": "8",
                          "WANDB_CONFIG_DIR": str(config.parent / "wandb-home"),
                          "WANDB_CACHE_DIR": str(config.parent / "wandb-home")})
    return done.stdout.strip().split(";")[0]


def job(slurm: LocalSlurm, job_id: str) -> Dict[str, str]:
    """``scontrol show job``'s fields."""
    out = slurm.run("scontrol", "show", "job", "-o", job_id).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_until(slurm: LocalSlurm, job_id: str, predicate, what: str) -> Dict[str, str]:
    deadline = time.monotonic() + JOB_TIMEOUT
    while time.monotonic() < deadline:
        fields = job(slurm, job_id)
        if predicate(fields):
            return fields
        time.sleep(0.5)
    raise AssertionError(f"job {job_id}: no {what} in {JOB_TIMEOUT} s: {job(slurm, job_id)}\n{slurm.logs()}")


def job_end(slurm: LocalSlurm, job_id: str) -> Dict[str, str]:
    """The job's fields once it has ended (a job still COMPLETING has processes left, which may yet requeue it)."""
    return wait_until(slurm, job_id, lambda f: f["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"),
                      "end")


def finished(slurm: LocalSlurm, job_id: str, config: Path) -> Dict[str, str]:
    fields = job_end(slurm, job_id)
    output = (config.parent / f"slurm-{job_id}.out").read_text()
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), f"{fields}\n{output[-6000:]}"
    return fields


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Dict[int, Dict[str, float]]:
    """The metrics of the interrupted jobs' config trained without interruption (two processes, no Slurm)."""
    path = tmp_path_factory.mktemp("uninterrupted")
    run(tiny_config(path, train={"max_steps": STEPS}))
    return metrics(path / "run")


def reached_step(run_dir: Path, step: int):
    def check(fields: Dict[str, str]) -> bool:
        assert fields["JobState"] in ("PENDING", "RUNNING", "CONFIGURING"), fields
        steps = metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else {}
        return bool(steps) and max(steps) >= step
    return check


def test_two_node_job_trains(slurm, tmp_path):
    """With the script's overrides, a list-valued key in its one-value form among them."""
    config = tiny_config(tmp_path, train={"max_steps": 2})
    job_id = submit(slurm, config, overrides=("train.max_steps=3", f"data.train_shards={tmp_path / 'shards' / 'train'}"))
    fields = finished(slurm, job_id, config)
    assert fields["NodeList"] == "n[1-2]" and fields["Restarts"] == "0"
    log = (tmp_path / "run" / "train.log").read_text()
    assert f"rank 0 of 2 (slurm launcher), master n1:{SLURM_PORT_BASE + int(job_id) % SLURM_PORT_SPAN}" in log
    assert sorted(metrics(tmp_path / "run")) == [1, 2, 3]


def preempt(slurm: LocalSlurm, job_id: str, output: Path) -> str:
    """Submits a job to the higher-priority partition that needs every CPU of both nodes, so Slurm preempts the
    running job; returns its id."""
    done = slurm.run("sbatch", "--parsable", "--partition=urgent", "--nodes=2", "--ntasks-per-node=2",
                     f"--output={output}", "--wrap", "srun true")
    return done.stdout.strip().split(";")[0]


# interruption -> (partition, the signal(s) the ranks may act on, whether the script requeues the job itself)
INTERRUPTIONS = {
    "scontrol requeue": ("local", 15, False),
    "time-limit signal": ("local", 10, True),
    # the batch shell is signalled too (scancel --full) or alone (--batch, as #SBATCH --signal=B:USR1@... does): it
    # must outlive SIGUSR1, pass it on to the ranks and requeue the job
    "signal to the whole job": ("local", 10, True),
    "signal to the batch script": ("local", 10, True),
    # SIGTERM; SlurmctldParameters=preempt_send_user_signal may send --signal's SIGUSR1 first (seen under load)
    "preemption": ("local", (15, 10), False),
    # GraceTime with preempt_send_user_signal: the tasks get --signal's SIGUSR1 at once, and a job that ends within
    # its grace time is not requeued by Slurm (measured: it completes), so the script must requeue it
    "preemption with grace time": ("graced", 10, True),
}


@pytest.mark.parametrize("interruption", INTERRUPTIONS)
def test_interrupted_job_checkpoints_requeues_and_resumes(slurm, uninterrupted, tmp_path, interruption):
    """``scontrol requeue`` and a preemption (PreemptMode=REQUEUE, no grace time) send SIGTERM and requeue the job
    themselves; the time-limit warning (``--signal=USR1@180``, here sent at once with ``scancel --signal=USR1``) and a
    preemption with a grace time send SIGUSR1, and the script requeues the job on the ranks' exit 143; so it does
    when SIGUSR1 reaches it too (``--full``) or alone (``--batch``). Either way the ranks checkpoint first (the data
    loader's workers, signalled too, keep serving them; W&B's service, which SIGTERM ends, does not stop them), and
    the restarted job resumes there, trains every step with the losses and gradient norms of an uninterrupted run and
    logs them to the same W&B run."""
    partition, signum, script_requeues = INTERRUPTIONS[interruption]
    # no periodic checkpoints: only the signal saves; W&B offline, whose service the signals reach too
    config = tiny_config(tmp_path, train={"max_steps": STEPS}, wandb={"mode": "offline"})
    job_id = submit(slurm, config, partition)
    run_dir = tmp_path / "run"
    wait_until(slurm, job_id, reached_step(run_dir, 2), "step 2")
    urgent = None
    if interruption == "scontrol requeue":
        slurm.run("scontrol", "requeue", job_id)
    elif interruption == "time-limit signal":
        slurm.run("scancel", "--signal=USR1", job_id)
    elif interruption == "signal to the whole job":
        slurm.run("scancel", "--signal=USR1", "--full", job_id)
    elif interruption == "signal to the batch script":
        slurm.run("scancel", "--signal=USR1", "--batch", job_id)
    else:
        urgent = preempt(slurm, job_id, tmp_path / "urgent.out")
    fields = finished(slurm, job_id, config)
    assert fields["Restarts"] == "1"
    log = (run_dir / "train.log").read_text()
    signals = "|".join(map(str, signum if isinstance(signum, tuple) else (signum,)))
    stopped = int(re.search(rf"signal (?:{signals}): checkpointed step (\d+), exiting with 143", log).group(1))
    assert 2 <= stopped < STEPS
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{stopped:08d}'} at step {stopped}" in log
    got = metrics(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step, want in uninterrupted.items():
        for key in ("loss", "grad_norm"):
            assert got[step][key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (step, key)
    output = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert "(restart 1)" in output
    assert ("checkpointed after a signal: requeueing job" in output) == script_requeues
    run_id = (run_dir / RUN_ID_FILE).read_text().strip()
    (first_ids, first), (second_ids, second) = [history(path) for path in offline_runs(run_dir)]
    assert first_ids <= {run_id} and second_ids == {run_id}  # the service SIGTERM ends may have written nothing
    assert sorted(first) == list(range(1, len(first) + 1)) and len(first) <= stopped
    assert sorted(second) == list(range(stopped + 1, STEPS + 1))
    if urgent:
        fields = job_end(slurm, urgent)
        assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0")


def test_scancel_ends_the_job_for_good_after_a_checkpoint(slurm, tmp_path):
    """``scancel`` sends SIGTERM as a requeue does, and it also ends the batch script: the ranks checkpoint, and the
    job ends cancelled, not requeued (the script must not undo a user's cancel), its work saved."""
    config = tiny_config(tmp_path, train={"max_steps": STEPS})
    job_id = submit(slurm, config)
    run_dir = tmp_path / "run"
    wait_until(slurm, job_id, reached_step(run_dir, 2), "step 2")
    slurm.run("scancel", job_id)
    fields = job_end(slurm, job_id)
    assert (fields["JobState"], fields["Restarts"]) == ("CANCELLED", "0")
    stopped = int(re.search(r"signal 15: checkpointed step (\d+)", (run_dir / "train.log").read_text()).group(1))
    assert read_latest(run_dir / "checkpoints").name == f"step_{stopped:08d}"
    assert "requeueing" not in (tmp_path / f"slurm-{job_id}.out").read_text()


def test_a_time_limit_within_the_warnings_reach_is_refused(slurm, tmp_path):
    """The time-limit warning comes 3 minutes before the limit: a job of 6 minutes or less would be warned as it
    starts, requeue itself and start again, forever. The script refuses it, naming --time, before any rank starts."""
    config = tiny_config(tmp_path, train={"max_steps": 3})
    job_id = submit(slurm, config, "local", "--time=6")
    fields = job_end(slurm, job_id)
    assert (fields["JobState"], fields["ExitCode"], fields["Restarts"]) == ("FAILED", "2:0", "0")
    output = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert "error: time limit 6:00: give sbatch a --time above 6 minutes" in output
    assert not (tmp_path / "run").exists()


def trainer_pid(job_id: str, rank: int) -> int:
    """The pid of the job's ``rank`` (the emulated nodes run their tasks on this machine)."""
    wanted = {f"SLURM_JOB_ID={job_id}".encode(), f"SLURM_PROCID={rank}".encode()}
    for proc in Path("/proc").iterdir():
        try:
            cmdline, environ = (proc / "cmdline").read_bytes(), (proc / "environ").read_bytes()
        except OSError:  # not a process, or gone
            continue
        if b"\0pretrain\0train\0" in cmdline and wanted <= set(environ.split(b"\0")):
            return int(proc.name)
    raise AssertionError(f"no trainer of rank {rank} in job {job_id}")


def test_a_hung_rank_fails_the_job_instead_of_holding_its_nodes(slurm, tmp_path):
    """A rank stops answering (SIGSTOP): its peer fails after ``train.collective_timeout_minutes``, and srun kills
    the stopped rank ``RANK_EXIT_WAIT_S`` later, so the job ends (FAILED, not requeued) long before its time limit."""
    config = tiny_config(tmp_path, train={"max_steps": 10_000, "collective_timeout_minutes": 0.25},
                         checkpoint={"every_steps": 3})
    job_id = submit(slurm, config, "local", "--export=ALL,RANK_EXIT_WAIT_S=5")
    run_dir = tmp_path / "run"
    wait_until(slurm, job_id, reached_step(run_dir, 4), "step 4")
    os.kill(trainer_pid(job_id, 1), signal.SIGSTOP)
    fields = job_end(slurm, job_id)
    output = (tmp_path / f"slurm-{job_id}.out").read_text()
    assert (fields["JobState"], fields["Restarts"]) == ("FAILED", "0"), f"{fields}\n{output[-6000:]}"
    assert "Timed out waiting 15000ms" in output and "requeueing" not in output
    latest = read_latest(run_dir / "checkpoints")
    assert latest is not None and int(latest.name.split("_")[1]) % 3 == 0


def test_the_cluster_takes_free_ports_and_a_failed_start_leaves_nothing_running(tmp_path, monkeypatch):
    """The ports it once fixed (16817, 17001-17002) held by someone else do not matter; a start that fails (here a
    configuration slurmctld refuses) is tried again on other ports, and stops every daemon it started."""
    reason = available()
    if reason:
        pytest.skip(reason)
    held = []
    for port in (16817, 17001, 17002):
        sock = socket.socket()
        with contextlib.suppress(OSError):
            sock.bind(("127.0.0.1", port))
            sock.listen()
            held.append(sock)
    try:
        cluster = LocalSlurm(tmp_path / "second").start()
        try:
            assert cluster.run("sinfo", "-h", "-o", "%D %t").stdout.split() == ["2", "idle"]
        finally:
            cluster.stop()
        assert all(proc.poll() is not None for proc in cluster.procs)
    finally:
        for sock in held:
            sock.close()
    broken = LocalSlurm(tmp_path / "broken")
    monkeypatch.setattr(broken, "_write_config", lambda: broken.conf.write_text("NoSuchKey=1\n"))
    with pytest.raises(RuntimeError, match="local Slurm: no both nodes idle in sinfo \\(exited: slurmctld"):
        broken.start()
    assert broken.procs and all(proc.poll() is not None for proc in broken.procs)
