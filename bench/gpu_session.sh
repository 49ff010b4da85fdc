#!/usr/bin/env bash
# The GPU measurements the project needs, in one call of the device tool: `bash bench/gpu_session.sh [STEP ...]`
# (default: the steps in `order`, most important first; the others by name). No step starts past SESSION_SECONDS
# (default 540) from the start, so the call ends inside the device tool's limit and what was measured comes back.
# Each step writes $OUT/<step>.txt (default OUT bench/out/gpu; the default steps write 8 files, as many as the
# device tool returns) and a failing step does not stop the others.
# Collect the wheels the GPU image lacks into .whl/ first, here (with pillow soundfile cffi pycparser too)
# then, through the device tool, with .whl carried:  bash bench/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/out/gpu}
deadline=$((SECONDS + ${SESSION_SECONDS:-540}))
mkdir -p "$out"
source bench/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

bench=(python3 bench/model_bench.py --device cuda)
# Eager runs interleave the models block by block (model_bench's --block, 5 steps run back to back on CUDA): the eager
# step is bound by the host's kernel launches, and the host's speed drifts on a shared machine, so separately timed
# rows are not comparable.
eager=("${bench[@]}" --interleave --steps 30 --no-masked)
declare -A steps=(
  [model_eager]="${eager[*]} --no-sweep --profile --out $out/model_eager.json"  # headline: tuned attention
  [model_eager_each]="${eager[*]} --no-sweep --block 1"  # each step timed alone
  [model_sweep]="${eager[*]} --steps 10"  # + M = 2k, 8k, 32k at B=16
  # Both models with CUDA graphs: the launch-bound host out of both, so the ratio is the GPU work's.
  [model_graphs_both]="${bench[*]} --interleave --no-sweep --no-masked --compile --compile-mode reduce-overhead --compile-hf"
  # Both models as `pretrain train` trains on GPU (DeepSpeed's bf16: bf16 weights, fp32 master copies): no
  # per-weight casts, ~30% of an autocast step's kernels, so a launch-bound host weighs less. With the 15%-decode
  # row, the model alone against the engine check's bf16 run (the same decoding): what DeepSpeed costs per step.
  [model_bf16]="${bench[*]} --interleave --steps 30 --no-sweep --precision bf16 --profile"
  [model_static_sdpa]="${eager[*]} --no-sweep --attention-backend sdpa"  # the untuned choice before
  [model_cudagraphs]="${bench[*]} --no-sweep --no-masked --compile --compile-mode reduce-overhead"
  [model_compiled_both]="${bench[*]} --interleave --no-sweep --no-masked --compile --compile-hf"
  [attention]="python3 bench/attention_check.py"
  # Its corpus and checkpoints stay on the machine. The engines whose speed is open (~200 s), steps 11-13 of each
  # profiled: where the engine's step (95-125 ms on an H100) spends the time beyond the model's own (60 ms,
  # model_bf16's 15%-decode row), and whether DeepSpeed's torch_autocast is faster.
  [engine]="env OUT=/tmp/engine RUNS=bf16,zero2,autocast,autocast_zero2 bash bench/engine_gpu_check.sh
            run.profile_steps=3 run.profile_after_steps=10"
  [engine_all]="env OUT=/tmp/engine bash bench/engine_gpu_check.sh"  # every run (~380 s: STEP_TIMEOUT=450)
  [engine_offload]="env OUT=/tmp/engine RUNS=bf16,offload bash bench/engine_gpu_check.sh"  # offload against bf16
)
order=(engine model_bf16 model_eager model_graphs_both model_cudagraphs model_sweep attention)

for name in "${@:-${order[@]}}"; do
  [[ -v "steps[$name]" ]] || { echo "unknown step $name; steps: ${order[*]}"; exit 2; }
  left=$((deadline - SECONDS)) limit=${STEP_TIMEOUT:-300}
  if ((left < 30)); then echo "== $name: skipped, ${left} s left of SESSION_SECONDS"; continue; fi
  ((left < limit)) && limit=$left
  start=$SECONDS
  PYTHONUNBUFFERED=1 timeout "$limit" ${steps[$name]} > "$out/$name.txt" 2>&1
  echo "== $name: exit $? in $((SECONDS - start)) s (limit $limit s)"
  grep -E "ratio_vs_hf|attention_accuracy|^(run|bf16|offload|zero2|compiled|autocast[a-z0-9_]*|wall) |done in|FAILED|failed|autotune|kernels/step|M=|samples/s" \
    "$out/$name.txt" | tail -40
done
