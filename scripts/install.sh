#!/usr/bin/env bash
# Installs the project and what it needs on a fresh machine (Python 3.10+ with pip).
# torch is pinned first to the CPU build 2.13.0: a range left to pip would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.13.0") else 1)' 2>/dev/null; then
  python3 -m pip install -q torch==2.13.0
fi
python3 -m pip install -q -e ".[dev]"
