"""A real Slurm cluster on this machine for the tests: munged, slurmctld and two slurmd daemons emulating the nodes
n1 and n2 (both at 127.0.0.1), all configured and logging under one private directory, started under ``setsid`` and
stopped by their recorded PIDs. Needs root and Debian's ``slurmctld slurmd slurm-client munge`` (``scripts/test.sh``
installs them); client commands find the cluster through ``SLURM_CONF`` (``LocalSlurm.environ``).

The scheduler looks at its queue every 2 s and a requeued job starts again within ~12 s (``bf_interval=1``,
``sched_interval=2`` and ``cred_expire=10``: with the defaults, ~140 s). Both nodes share the host name, so a job
tells them apart by ``SLURMD_NODENAME``; the launcher derives ``MASTER_ADDR`` from the node list, so ``n1`` and ``n2``
must resolve: ``start`` adds them to ``/etc/hosts`` when missing.

Nothing is shared with a Slurm or munge already on the machine: the daemons take free ports (chosen at each start, and
chosen again if one was taken meanwhile), munged a private socket and key, and a start that fails stops what it
started.

Partitions: ``local`` (the default) and ``graced`` hold preemptible jobs (PreemptMode=REQUEUE; ``graced`` with a
grace time, in which the jobs get their ``--signal`` at once: ``preempt_send_user_signal``); a job in ``urgent``, the
higher priority tier, preempts them.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional

from launch import free_port

NODES = ("n1", "n2")
STARTUP_TIMEOUT = 60.0
START_ATTEMPTS = 3  # a port chosen free may be taken before the daemon binds it
GRACE_TIME = 60


def available() -> str:
    """Why this machine cannot run the cluster, or '' when it can."""
    missing = [tool for tool in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(tool) is None]
    if missing:
        return f"Slurm is not installed (missing {', '.join(missing)}: apt-get install slurmctld slurmd slurm-client munge)"
    if os.geteuid() != 0:
        return "the local Slurm cluster needs root"
    return ""


def _ensure_hosts() -> None:
    hosts = Path("/etc/hosts")
    known = hosts.read_text().split()
    missing = [node for node in NODES if node not in known]
    if missing:
        with hosts.open("a") as file:
            file.write(f"127.0.0.1 {' '.join(missing)}\n")


class LocalSlurm:
    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.socket = root / "munge" / "munge.socket"
        self.procs: List[subprocess.Popen] = []
        self.ports: List[int] = []  # the controller's, then one per node
        self.started = False

    @property
    def environ(self) -> Dict[str, str]:
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def _daemon(self, name: str, command: List[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "w")
        self.procs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))

    def _write_config(self) -> None:
        r = self.root
        self.conf.write_text("\n".join([
            "ClusterName=local",
            f"SlurmctldHost={socket.gethostname()}(127.0.0.1)",
            f"SlurmctldPort={self.ports[0]}",
            "SlurmUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.socket},cred_expire=10",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}/%n",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd'}-%n.pid",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log'}/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=bf_interval=1,sched_interval=2",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "ReturnToService=2",
            "SlurmdParameters=config_overrides",
            "KillWait=30",
            "PreemptType=preempt/partition_prio",
            "PreemptMode=REQUEUE",
            "SlurmctldParameters=preempt_send_user_signal",
            *(f"NodeName={node} NodeAddr=127.0.0.1 Port={port} CPUs=2 State=UNKNOWN"
              for node, port in zip(NODES, self.ports[1:])),
            "PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1",
            f"PartitionName=graced Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=1 GraceTime={GRACE_TIME}",
            "PartitionName=urgent Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF",
            "",
        ]))

    def start(self) -> "LocalSlurm":
        """Start the daemons on free ports; a failed start stops what it started, and tries other ports."""
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                self._start()
                self.started = True
                return self
            except RuntimeError:
                self.stop()
                if attempt == START_ATTEMPTS:
                    raise
        return self

    def _start(self) -> None:
        self.procs, self.ports = [], []
        while len(self.ports) < 1 + len(NODES):
            port = free_port()
            if port not in self.ports:
                self.ports.append(port)
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for node in NODES:
            (self.root / "spool" / node).mkdir(exist_ok=True)
        self.socket.unlink(missing_ok=True)  # a failed attempt's
        os.chmod(self.root / "munge", 0o755)
        _ensure_hosts()
        key = self.root / "munge" / "munge.key"
        subprocess.run(["mungekey", "--create", "--force", f"--keyfile={key}"], check=True, capture_output=True)
        os.chmod(key, 0o600)
        self._daemon("munged", ["munged", "--foreground", "--force", f"--socket={self.socket}", f"--key-file={key}",
                                f"--pid-file={self.root / 'munge' / 'munged.pid'}",
                                f"--log-file={self.root / 'log' / 'munged.log'}",
                                f"--seed-file={self.root / 'munge' / 'munged.seed'}"])
        self._wait(lambda: self.socket.exists(), "munged's socket")
        self._write_config()
        self._daemon("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        for node in NODES:
            self._daemon(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
        self._wait(self._nodes_idle, "both nodes idle in sinfo")

    def _nodes_idle(self) -> bool:
        done = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.environ, capture_output=True, text=True)
        states = dict(line.split() for line in done.stdout.splitlines() if line.strip())
        return all(states.get(node) == "idle" for node in NODES)

    def _wait(self, ready, what: str) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not ready():
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(f"local Slurm: no {what} ({'exited: ' + ', '.join(dead) if dead else 'timed out'})"
                                   f"\n{self.logs()}")
            time.sleep(0.2)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted((self.root / "log").glob("*")))

    def run(self, *command: str, env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
        """A Slurm client command against this cluster (``env``: more variables, which a submitted job inherits);
        fails with its output unless it exits 0."""
        done = subprocess.run(list(command), env={**self.environ, **(env or {})}, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, f"{' '.join(command)}: exit {done.returncode}\n{done.stdout}{done.stderr}"
        return done

    def stop(self) -> None:
        """Cancel what still runs (a failed test's job), then stop the daemons."""
        if self.started and all(p.poll() is None for p in self.procs):
            subprocess.run(["scancel", "--full", "--user=root"], env=self.environ, capture_output=True, timeout=60)
            self._wait(lambda: not self.run("squeue", "-h").stdout.strip(), "empty queue")
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
