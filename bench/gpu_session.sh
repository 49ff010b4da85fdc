#!/usr/bin/env bash
# Every GPU measurement the project still needs, in one call of the device tool (about 8 minutes on an H100 once the
# machine is up). Each step writes its output to $OUT (default bench/out/gpu) and a failing step does not stop the
# others. Collect the wheels first, here:  bash ../shared/tools/gpu-wheels.sh pillow soundfile cffi pycparser
# then, through the device tool, with .whl carried:  bash bench/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/out/gpu}
mkdir -p "$out"
source bench/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"

step() {  # name, command...: output to $out/<name>.txt, the last lines echoed; a step over STEP_TIMEOUT is stopped
  local name=$1; shift
  local start=$SECONDS
  timeout "${STEP_TIMEOUT:-240}" "$@" > "$out/$name.txt" 2>&1
  echo "== $name: exit $? in $((SECONDS - start)) s"
  grep -E "ratio_vs_hf|attention_accuracy|^(run|bf16|offload) |FAILED|autotune|kernels/step" "$out/$name.txt" | tail -12
}
bench=(python3 bench/model_bench.py --device cuda)
# The headline first: attention tuned per shape (auto) and where the time goes (--profile).
step model_eager "${bench[@]}" --no-sweep --profile --out "$out/model_eager.json"
step model_static_sdpa "${bench[@]}" --no-sweep --no-masked --attention-backend sdpa  # the untuned choice before
step attention python3 bench/attention_check.py
step model_sweep "${bench[@]}" --no-masked --out "$out/model_sweep.json"  # M = 2k, 8k, 32k at B=16
step model_cudagraphs "${bench[@]}" --no-sweep --no-masked --compile --compile-mode reduce-overhead
step engine bash bench/engine_gpu_check.sh
