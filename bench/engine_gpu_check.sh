#!/usr/bin/env bash
# The training engine on a GPU: what CPU CI cannot show. nccl, bf16 on CUDA, the MFU and memory metrics, a checkpoint
# and its resume on the GPU (the shipped engine: ZeRO-1 accumulating gradients in fp32), ZeRO-2 (bf16 gradients in
# per-tensor buckets), ZeRO-2 with the optimizer offloaded to (pinned) CPU memory, train.compile with CUDA graphs
# (the samples/s of its last 10 steps against the eager run's), and train.precision=autocast under ZeRO-1 and ZeRO-2
# (DeepSpeed's torch_autocast, fp32 weights under bf16 autocast).
# Model: the paper's 201M language Perceiver (configs/mlm_bytes_201m.yaml) on a synthetic byte corpus written here.
# Every run takes the same 40 steps (the same seed, batches and schedule), so each must end near the bf16 run's loss,
# not only below its own first: a 20-step run's second window (peak learning rate) can sit above its first while
# training is sound. Prints a table and every logged window's loss, and exits non-zero when a check fails.
#
#   bash bench/engine_gpu_check.sh [key=value ...]        # extra overrides go to every run
#   RUNS=bf16,offload bash bench/engine_gpu_check.sh       # some of the runs (all: $all_runs below)
#   bash bench/engine_gpu_check.sh run.profile_steps=3 run.profile_after_steps=10   # + each run's profile tables
#
# On the GPU machine (device tool): collect the wheels the image lacks first, here, and carry .whl:
#   the development environment's GPU wheel script, for pillow soundfile cffi pycparser too, into .whl/
# CPU dry run of the script itself (a small model, gloo):
#   NPROC=2 bash bench/engine_gpu_check.sh model.num_self_attends_per_block=1 model.d_latents=128 \
#     model.qk_channels=64 model.v_channels=128 model.num_latents=32 model.d_model=64 model.text.max_length=256 \
#     data.batch_size=2 train.global_batch_size=4 data.num_workers=1
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/gpu_env.sh
out=${OUT:-bench/out}/engine_gpu  # a folder of its own: it is emptied first
nproc=${NPROC:-1}
all_runs="bf16 resume zero2 offload compiled autocast autocast_zero2"
runs=${RUNS:-$all_runs}
runs=${runs//,/ }  # spaces or commas
for name in $runs; do
  [[ " $all_runs " == *" $name "* ]] || { echo "unknown run $name in RUNS; runs: $all_runs"; exit 2; }
done
rm -rf "$out" && mkdir -p "$out"

python3 - "$out/corpus" <<'EOF'
import json, random, sys
from pathlib import Path
root = Path(sys.argv[1])
rng = random.Random(0)
words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(3000)]
for split, count in (("train", 4096), ("val", 256)):
    (root / split).mkdir(parents=True)
    with open(root / split / "manifest.jsonl", "w") as f:
        for i in range(count):
            f.write(json.dumps({"key": f"{split}{i:05d}", "text": " ".join(rng.choices(words, k=420))}) + "\n")
EOF
for split in train val; do
  python3 -m data_prep shard --manifest "$out/corpus/$split/manifest.jsonl" --out "$out/shards/$split" \
    --max-samples-per-shard 32 >/dev/null
done

common=(data.train_shards="[$out/shards/train]" data.val_shards="[$out/shards/val]" wandb.mode=disabled
        train.global_batch_size=32 optim.warmup_steps=10 train.eval_every_steps=20 train.eval_batches=2
        checkpoint.every_steps=20 checkpoint.every_minutes=0 run.log_every_steps=10 run.progress_bar=false)
train() {  # run name, then overrides
  local name=$1 start=$SECONDS; shift
  torchrun --standalone --nproc_per_node "$nproc" -m pretrain train \
    --config configs/mlm_bytes_201m.yaml "${common[@]}" "$@" > "$out/$name.log" 2>&1 \
    || { echo "run $name failed; the first traceback, then the end of its log:"
         grep -m1 -A60 "Traceback" "$out/$name.log"; tail -15 "$out/$name.log"; exit 1; }
  echo $((SECONDS - start)) > "$out/$name.wall"  # no /usr/bin/time on the GPU image
  # At once, so a run cut off by a time limit still leaves the runs before it on the record.
  echo "$name done in $((SECONDS - start)) s: $(grep -E '^step [0-9]+/' "$out/$name.log" | tail -1 | cut -c1-150)"
}
zero2=(deepspeed.zero_stage=2 deepspeed.fp32_grad_accumulation=false)
for name in $runs; do
  case $name in
    bf16) train bf16 run.dir="$out/bf16" train.max_steps=40 "$@" ;;
    resume) train resume run.dir="$out/bf16" train.max_steps=60 "$@" ;;  # the bf16 run's directory, from step 40
    zero2) train zero2 run.dir="$out/zero2" train.max_steps=40 "${zero2[@]}" "$@" ;;
    offload) train offload run.dir="$out/offload" train.max_steps=40 "${zero2[@]}" deepspeed.offload_optimizer=true \
               "$@" ;;
    compiled) train compiled run.dir="$out/compiled" train.max_steps=40 train.compile=reduce-overhead "$@" ;;
    autocast) train autocast run.dir="$out/autocast" train.max_steps=40 train.precision=autocast "$@" ;;
    autocast_zero2) train autocast_zero2 run.dir="$out/autocast_zero2" train.max_steps=40 train.precision=autocast \
                      "${zero2[@]}" "$@" ;;
  esac
done

python3 - "$out" $runs <<'EOF'
import json, sys
from pathlib import Path
out, runs = Path(sys.argv[1]), sys.argv[2:]
failures = []
def windows(name):  # a run directory's logged training windows; each loss is the mean over the window's steps
    rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "samples_per_s" in r]
def check(ok, what):
    if not ok:
        failures.append(what)
trained = [name for name in runs if name != "resume"]
reference = {r["step"]: r["loss"] for r in windows("bf16")} if "bf16" in runs else {}
print(f"{'run':<15}{'steps':>6}{'samples/s':>11}{'step s':>8}{'MFU':>7}{'mem GB':>8}{'loss first':>11}{'loss last':>10}")
for name in trained:
    train = windows(name)
    last = train[-1]
    mfu = f"{last['mfu']:.1%}" if "mfu" in last else "-"
    mem = f"{last['memory_gb']:.1f}" if "memory_gb" in last else "-"
    print(f"{name:<15}{last['step']:>6}{last['samples_per_s']:>11.1f}{last['step_time_s']:>8.3f}{mfu:>7}{mem:>8}"
          f"{train[0]['loss']:>11.3f}{last['loss']:>10.3f}")
    check(all(r["loss"] == r["loss"] for r in train), f"{name}: a NaN loss")
    at_40 = {r["step"]: r["loss"] for r in train}.get(40)
    check(at_40 is not None and at_40 < train[0]["loss"], f"{name}: the loss did not fall by step 40")
    if name != "bf16" and 40 in reference:
        check(at_40 is not None and abs(at_40 - reference[40]) < 0.05,
              f"{name}: loss {at_40} at step 40, the bf16 run's {reference[40]:.4f} (same batches and schedule)")
for name in trained:
    print(f"loss by step, {name}: " + " ".join(f"{r['step']}:{r['loss']:.4f}" for r in windows(name)))
for name in trained:  # with run.profile_steps=N among the overrides: where each engine's step goes
    profile = out / name / "profile" / "rank0.txt"
    if profile.is_file():
        print(f"profile, {name} (rank 0):\n{profile.read_text()}")
if "resume" in runs:
    log = (out / "bf16" / "train.log").read_text()
    check("resumed from" in log and "at step 40" in log, "resume: the second run did not resume from step 40")
    check([r["step"] for r in windows("bf16")] == list(range(10, 61, 10)), "resume: logged steps")
for name in trained:
    config = json.loads((out / name / "deepspeed.json").read_text())
    print(f"deepspeed {name}: bf16={config['bf16']['enabled']} zero={config['zero_optimization']} "
          f"data_types={config.get('data_types', {})} torch_autocast={config.get('torch_autocast', {})}")
print("wall s: " + ", ".join(f"{n} {(out / f'{n}.wall').read_text().split()[-1]}" for n in runs))
for failure in failures:
    print("FAILED:", failure)
sys.exit(1 if failures else 0)
EOF
