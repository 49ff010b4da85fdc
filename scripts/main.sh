#!/usr/bin/env bash
# The main job: installs, builds the demo corpus if missing, pretrains configs/demo.yaml (a small multimodal
# Perceiver IO, self-supervised, DeepSpeed ZeRO-2, 2 CPU processes, a few minutes), exports its last checkpoint as a
# model directory, then says where the checkpoint, the exported model, metrics and W&B files are, and how to
# fine-tune the export. Extra arguments are config overrides, e.g. `bash scripts/main.sh train.max_steps=50`.
# Rerunning continues the run from its latest checkpoint (--resume auto); `rm -rf runs/demo` starts over.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
bash scripts/install_demo_sources.sh
for split in train val downstream_train downstream_eval; do
  if [ ! -f "data/demo/$split/index.json" ]; then
    python3 -m data_prep build-demo --out data/demo --size small --overwrite
    break
  fi
done
NPROC="${NPROC:-2}"
python3 -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m pretrain train --config configs/demo.yaml "$@"
RUN_DIR="$(python3 -m pretrain train --config configs/demo.yaml "$@" --print-config \
  | python3 -c 'import sys, yaml; print(yaml.safe_load(sys.stdin)["run"]["dir"])')"
TAG="$(cat "$RUN_DIR/checkpoints/latest")"
EXPORTED="$RUN_DIR/exported/$TAG"
[ -d "$EXPORTED" ] || python3 -m pretrain export "$RUN_DIR" --out "$EXPORTED"
echo
echo "checkpoint: $RUN_DIR/checkpoints/$TAG"
echo "model:      $EXPORTED  (python: pretrain.load_pretrained(\"$EXPORTED\"))"
echo "metrics:    $RUN_DIR/metrics.jsonl (log: $RUN_DIR/train.log)"
echo "W&B:        $(ls -d "$RUN_DIR"/wandb/offline-run-* | tail -1)  (upload: wandb sync $RUN_DIR/wandb/offline-run-*)"
echo "fine-tune:  python3 -m torch.distributed.run --standalone --nproc_per_node $NPROC -m pretrain train \\"
echo "              --config configs/finetune_demo.yaml model.init_from=$EXPORTED"
