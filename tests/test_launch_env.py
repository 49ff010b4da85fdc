"""The process environment from torchrun, the deepspeed launcher, srun, or nothing; the real launchers and a gloo
process group over the exported variables show the values are the ones torch.distributed needs."""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from launch import DistEnv, backend_for, detect_env, device_for, expand_nodelist, exported_env, first_host
from launch import env as env_module

ROOT = Path(__file__).resolve().parents[1]

# Variables of task 3 of `srun` in a 2-node x 2-task job (captured on slurm 22.05, trimmed to what matters).
SRUN_TASK = {
    "SLURM_JOB_ID": "123456", "SLURM_STEP_ID": "0", "SLURM_STEPID": "0", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
    "SLURM_NTASKS": "4", "SLURM_NPROCS": "4", "SLURM_STEP_NUM_TASKS": "4", "SLURM_JOB_NODELIST": "n[1-2]",
    "SLURM_NODELIST": "n[1-2]", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
}
# The batch shell of that job: task 0 of the batch step, with the job's task count but no srun step.
BATCH_SHELL = {
    "SLURM_JOB_ID": "123456", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "4", "SLURM_NPROCS": "4",
    "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NODELIST": "n[1-2]", "SLURM_TASKS_PER_NODE": "2(x2)",
}
TORCH_VARS = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node-a", "MASTER_PORT": "29500"}
TORCHRUN_EXTRA = {"GROUP_RANK": "2", "LOCAL_WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "none", "ROLE_NAME": "default"}
DEEPSPEED_EXTRA = {"CROSS_RANK": "2", "CROSS_SIZE": "4", "LOCAL_SIZE": "2"}
# Each process writes its own file: the launchers share one stdout between their children, whose lines can interleave.
SHOW_ENV = (
    "import json, pathlib, sys; from launch import detect_env\n"
    "env = detect_env(); pathlib.Path(sys.argv[-1], f'env_{env.rank}.json').write_text(json.dumps(env.__dict__))\n"
)


def clean_environ() -> dict:
    """This process's environment without launcher variables, with the repository importable."""
    base = {key: value for key, value in os.environ.items() if key not in TORCH_VARS and not key.startswith("SLURM")}
    return {**base, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.parametrize("extra, launcher", [(TORCHRUN_EXTRA, "torchrun"), (DEEPSPEED_EXTRA, "deepspeed"),
                                             ({}, "env")])
def test_torch_variables(extra, launcher):
    env = detect_env({**TORCH_VARS, **extra, **SRUN_TASK})  # torchrun started by srun: torchrun's values win
    assert env == DistEnv(rank=5, world_size=8, local_rank=1, master_addr="node-a", master_port=29500,
                          launcher=launcher)


def test_srun_task():
    env = detect_env(SRUN_TASK)
    assert env == DistEnv(rank=3, world_size=4, local_rank=1, master_addr="n1", master_port=15000 + 123456 % 20000,
                          launcher="slurm")
    assert detect_env({**SRUN_TASK, "MASTER_PORT": "29999"}).master_port == 29999
    one_node_step = {**SRUN_TASK, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_STEP_NUM_TASKS": "1",
                     "SLURM_STEP_NODELIST": "n2"}  # `srun -N1 -n1 -w n2` inside the 2-node job
    assert detect_env(one_node_step) == DistEnv(0, 1, 0, "n2", 18456, "slurm")


NODELISTS = [
    ("n[1-2,5]", ["n1", "n2", "n5"]),
    ("gpu-[01-04]", ["gpu-01", "gpu-02", "gpu-03", "gpu-04"]),
    ("a1,b[3-4]", ["a1", "b3", "b4"]),
    ("node[8-11]", ["node8", "node9", "node10", "node11"]),
    ("r[1-2]-n[01-02],x7", ["r1-n01", "r1-n02", "r2-n01", "r2-n02", "x7"]),
]


@pytest.fixture
def without_scontrol(monkeypatch):
    """No ``scontrol`` on PATH: the host list is read by the fallback parser."""
    monkeypatch.setenv("PATH", "/nonexistent")


@pytest.fixture
def scontrol(tmp_path, monkeypatch):
    """``scontrol`` with the smallest configuration it reads (``show hostnames`` needs no running cluster)."""
    if shutil.which("scontrol") is None:
        pytest.skip("scontrol is not installed (scripts/test.sh installs slurm-client)")
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=test\nSlurmctldHost=localhost\nNodeName=localhost CPUs=1 State=UNKNOWN\n"
                    "PartitionName=p Nodes=localhost Default=YES\n")
    monkeypatch.setenv("SLURM_CONF", str(conf))


@pytest.mark.parametrize("nodelist, hosts", NODELISTS)
def test_compressed_nodelists_by_the_fallback_parser(nodelist, hosts, without_scontrol):
    assert expand_nodelist(nodelist) == hosts
    job = {key: value for key, value in SRUN_TASK.items() if not key.endswith("NODELIST")}
    assert detect_env({**job, "SLURM_JOB_NODELIST": nodelist}).master_addr == hosts[0]


@pytest.mark.parametrize("nodelist, hosts", NODELISTS)
def test_compressed_nodelists_by_scontrol_as_the_parser_reads_them(nodelist, hosts, scontrol):
    listed = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    assert listed.stdout.split() == hosts
    assert first_host(nodelist) == hosts[0]


def test_nothing_set_is_one_process_on_the_port_its_store_binds():
    """No port is picked and released before the process group binds it (another job could take it between):
    port 0, and the store binds a free one itself."""
    env = detect_env({})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.launcher) == (0, 1, 0, "127.0.0.1", "single")
    assert env.master_port == 0
    with pytest.raises(ValueError, match="MASTER_PORT=0 is not a TCP port"):  # only a single process may leave it open
        detect_env({**TORCH_VARS, "MASTER_PORT": "0"})


def test_batch_shell_is_one_process(caplog):
    env = detect_env(BATCH_SHELL)
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single")
    assert "SLURM_NTASKS=4" in caplog.text and "srun" in caplog.text


@pytest.mark.parametrize("environ, variable", [
    ({"RANK": "0"}, "WORLD_SIZE"),
    ({"WORLD_SIZE": "2"}, "RANK"),
    ({**TORCH_VARS, "RANK": "x"}, "RANK"),
    ({**TORCH_VARS, "RANK": "8"}, "RANK"),
    ({**TORCH_VARS, "WORLD_SIZE": "0"}, "WORLD_SIZE"),
    ({**TORCH_VARS, "LOCAL_RANK": "6"}, "LOCAL_RANK"),
    ({**TORCH_VARS, "MASTER_PORT": "70000"}, "MASTER_PORT"),
    ({key: v for key, v in TORCH_VARS.items() if key != "MASTER_ADDR"}, "MASTER_ADDR"),
    ({"RANK": "1", "WORLD_SIZE": "1"}, "RANK"),
    ({**SRUN_TASK, "SLURM_PROCID": "4"}, "SLURM_PROCID"),
    ({**SRUN_TASK, "SLURM_STEP_NUM_TASKS": "four"}, "SLURM_STEP_NUM_TASKS"),
    ({**SRUN_TASK, "SLURM_LOCALID": "-1"}, "SLURM_LOCALID"),
    ({**SRUN_TASK, "SLURM_JOB_ID": "12a"}, "SLURM_JOB_ID"),
    ({**SRUN_TASK, "SLURM_STEP_NODELIST": "n[1-"}, "SLURM_STEP_NODELIST"),
    ({**SRUN_TASK, "SLURM_STEP_NODELIST": "n[3-1]"}, "SLURM_STEP_NODELIST"),
    ({key: v for key, v in SRUN_TASK.items() if "NODELIST" not in key}, "SLURM_STEP_NODELIST"),
])
def test_inconsistent_values_name_the_variable(environ, variable, without_scontrol):
    with pytest.raises(ValueError, match=variable):
        detect_env(environ)


def test_exported_env_drives_torch_distributed_and_is_undone_after(monkeypatch):
    """One process, exactly as every rank does it: detect, export, ``env://`` initialisation of a gloo group. Once
    the group is gone the variables are as they were: a second run in this process must not take the first's port."""
    for name in env_module.TORCH_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    env = detect_env({})
    with exported_env(env):
        assert detect_env(os.environ) == DistEnv(0, 1, 0, "127.0.0.1", env.master_port, "env")
        device = device_for(env)
        assert device == torch.device("cpu") and backend_for(device) == "gloo"
        assert backend_for(torch.device("cuda", 0)) == "nccl"
        dist.init_process_group(backend_for(device), init_method="env://")
        try:
            assert (dist.get_rank(), dist.get_world_size()) == (0, 1)
        finally:
            dist.destroy_process_group()
    assert {name: os.environ.get(name) for name in env_module.TORCH_VARS} == {
        "RANK": None, "WORLD_SIZE": None, "LOCAL_RANK": None, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": None}


@pytest.mark.slow
def test_two_srun_tasks_form_a_gloo_group():
    """Two processes with only srun's variables (port derived from the job id) all-reduce over gloo."""
    port = next(p for p in random.sample(range(15000, 35000), 200) if port_is_free(p))
    script = (
        "import torch, torch.distributed as dist\n"
        "from launch import detect_env, exported_env\n"
        "env = detect_env()\n"
        "with exported_env(env):\n"
        "    dist.init_process_group('gloo', init_method='env://')\n"
        "    t = torch.tensor([env.rank + 1.0]); dist.all_reduce(t)\n"
        "    print(env.rank, env.master_port, int(t.item()), flush=True)\n"
        "    dist.destroy_process_group()\n"
    )
    procs = []
    for rank in range(2):
        env = {**clean_environ(), "SLURM_JOB_ID": str(port - 15000), "SLURM_STEP_ID": "0", "SLURM_PROCID": str(rank),
               "SLURM_LOCALID": str(rank), "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2",
               "SLURM_STEP_NODELIST": "localhost", "SLURM_JOB_NODELIST": "localhost"}
        procs.append(subprocess.Popen([sys.executable, "-c", script], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                      text=True))
    outputs = [proc.communicate(timeout=120)[0].split() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0]
    assert outputs == [["0", str(port), "3"], ["1", str(port), "3"]]


def launched(command: list, out_dir: Path) -> list:
    """The DistEnv of each process a real launcher started with SHOW_ENV writing into out_dir, sorted by rank."""
    out_dir.mkdir()
    out = subprocess.run([*command, str(out_dir)], env=clean_environ(), cwd=ROOT, capture_output=True, text=True,
                         timeout=180, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return [json.loads(path.read_text()) for path in sorted(out_dir.glob("env_*.json"))]


@pytest.mark.slow
def test_real_torchrun_and_deepspeed_launchers(tmp_path):
    script = tmp_path / "show_env.py"
    script.write_text(SHOW_ENV)
    port = next(p for p in random.sample(range(20000, 30000), 200) if port_is_free(p))
    torchrun = launched([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                         f"--master_port={port}", str(script)], tmp_path / "torchrun")
    assert [(e["rank"], e["world_size"], e["local_rank"], e["master_port"], e["launcher"]) for e in torchrun] == [
        (0, 2, 0, port, "torchrun"), (1, 2, 1, port, "torchrun")]
    world_info = base64.urlsafe_b64encode(json.dumps({"localhost": [0, 1]}).encode()).decode()
    ds = launched([sys.executable, "-m", "deepspeed.launcher.launch", f"--world_info={world_info}",
                   "--master_addr=127.0.0.1", f"--master_port={port}", str(script)], tmp_path / "deepspeed")
    assert ds == [dict(rank=r, world_size=2, local_rank=r, master_addr="127.0.0.1", master_port=port,
                       launcher="deepspeed") for r in (0, 1)]
