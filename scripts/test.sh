#!/usr/bin/env bash
# Installs everything the tests need, then runs the whole suite (slow tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash scripts/install_demo_sources.sh
command -v g++ >/dev/null || bash scripts/apt_install.sh g++  # torch.compile on CPU (train.compile tests) builds C++
# a local Slurm cluster (tests/slurm_cluster.py) runs slurm/pretrain.sbatch
command -v slurmctld >/dev/null || bash scripts/apt_install.sh slurmctld slurmd slurm-client munge
# tests/test_checkpoint_space.py mounts a small tmpfs (a disk that fills up)
command -v mount >/dev/null || bash scripts/apt_install.sh mount
# http(s):// shards are read through curl (tests/test_shards_remote.py)
command -v curl >/dev/null || bash scripts/apt_install.sh curl
# two workers, each taking whole files (module fixtures, the one Slurm cluster): 2 cores sit half idle otherwise
python3 -m pytest -q -ra -n 2 --dist loadfile --durations=20 "$@"
