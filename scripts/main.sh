#!/usr/bin/env bash
# The main job for now: installs, then benchmarks a training step of our Perceiver IO against transformers' on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python3 bench/model_bench.py --device cpu "$@"
