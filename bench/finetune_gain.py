"""Does the demo pretraining help? Fine-tune the pretrained demo model on the labelled downstream split and train the
same model from scratch with the same steps, seeds, batch and schedule; also a linear probe (the pretrained weights
frozen, only the label query and classifier train). A benchmark, not a test: nothing is asserted.

    PYTHONPATH=. python bench/finetune_gain.py                 # reuses runs/demo (bash scripts/main.sh) if it is done
    PYTHONPATH=. python bench/finetune_gain.py --seeds 5 --steps 300

Each run is ``python -m torch.distributed.run -m pretrain train --config configs/finetune_demo.yaml`` as a user
would start it (``--nproc`` processes), evaluated once at its last step on the 2,048 held-out images. The pretraining
must be self-supervised (no label head): a run of another config is refused. Missing corpus splits are built, a
missing or unfinished pretraining run is trained (and resumed) with configs/demo.yaml, and exported.

The table gives per variant the steps, the mean wall time of a run (process start to end), the final training loss
(the mean of the last logged window) and the evaluation top-1 (mean, standard deviation and range over the seeds).
The last line is ``gain_points=<fine-tuned top-1 minus scratch top-1, mean over seeds, in points>``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Sequence

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
FINETUNE_CONFIG = ROOT / "configs" / "finetune_demo.yaml"
SPLITS = ("train", "val", "downstream_train", "downstream_eval")
VARIANTS = {  # name: (starts from the pretrained export, extra overrides)
    "fine-tuned from the pretrained export": (True, []),
    "from scratch": (False, []),
    "linear probe (pretrained frozen)": (True, ["train.freeze=[pretrained]"]),
}


def call(command: Sequence[str], log: Path) -> float:
    """Run ``command`` in the repository with its output in ``log``; its wall time, or exit with the log's tail."""
    start = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{log.read_text()[-3000:]}")
    return time.perf_counter() - start


def train_command(nproc: int, config: Path, overrides: Sequence[str]) -> List[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "pretrain", "train", "--config", str(config), *overrides]


def ensure_corpus(corpus: Path, out: Path) -> None:
    if all((corpus / split / "index.json").is_file() for split in SPLITS):
        return
    print(f"building the demo corpus in {corpus} (its downstream split is missing)", flush=True)
    call([sys.executable, "-m", "data_prep", "build-demo", "--out", str(corpus), "--size", "small", "--overwrite"],
         out / "build-demo.log")


def ensure_pretrained(run_dir: Path, nproc: int, out: Path) -> Path:
    """The export of ``run_dir``'s checkpoint at ``train.max_steps`` of configs/demo.yaml, trained and exported
    where missing; a run pretrained with labels is refused."""
    demo = yaml.safe_load(DEMO_CONFIG.read_text())
    saved = run_dir / "config.yaml"
    if saved.is_file():
        model = yaml.safe_load(saved.read_text())["model"]
        if model.get("num_classes"):
            sys.exit(f"{run_dir} was pretrained with a {model['num_classes']}-class label head (an older "
                     f"configs/demo.yaml): its pretraining saw the labels. Remove it (bash scripts/main.sh trains it "
                     f"anew) or give --pretrained another run")
    tag = f"step_{demo['train']['max_steps']:08d}"
    if not (run_dir / "checkpoints" / tag).is_dir():
        print(f"pretraining {run_dir} with {DEMO_CONFIG.name} (continuing its checkpoints, if any)", flush=True)
        seconds = call(train_command(nproc, DEMO_CONFIG, [f"run.dir={run_dir}", "run.progress_bar=false"]),
                       out / "pretrain.log")
        print(f"  pretrained in {seconds:.0f} s", flush=True)
    exported = run_dir / "exported" / tag
    if not exported.is_dir():
        call([sys.executable, "-m", "pretrain", "export", str(run_dir / "checkpoints" / tag), "--out", str(exported)],
             out / "export.log")
    return exported


def result(run_dir: Path) -> Dict[str, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"loss": rows[-1]["loss"], "top1": 100 * rows[-1]["val/accuracy"]}


def spread(values: List[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {std:.2f} [{min(values):.1f}..{max(values):.1f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained", type=Path, default=Path("runs/demo"), help="the pretraining run directory")
    parser.add_argument("--corpus", type=Path, default=Path("data/demo"))
    parser.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds (train.seed and data.seed)")
    parser.add_argument("--steps", type=int, default=0, help="train.max_steps of every run (0: the config's)")
    parser.add_argument("--nproc", type=int, default=2, help="processes per run")
    parser.add_argument("--out", type=Path, default=Path("bench/out/finetune_gain"), help="the runs (replaced)")
    args = parser.parse_args()
    started = time.perf_counter()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    ensure_corpus(args.corpus, args.out)
    exported = ensure_pretrained(args.pretrained, args.nproc, args.out)
    steps = args.steps or yaml.safe_load(FINETUNE_CONFIG.read_text())["train"]["max_steps"]
    corpus = [f"data.train_shards=[{args.corpus / 'downstream_train'}]",
              f"data.val_shards=[{args.corpus / 'downstream_eval'}]"]
    found: Dict[str, List[Dict[str, float]]] = {name: [] for name in VARIANTS}
    for seed in range(args.seeds):
        for name, (pretrained, extra) in VARIANTS.items():
            run_dir = args.out / f"{list(VARIANTS).index(name)}_seed{seed}"
            overrides = [f"model.init_from={exported if pretrained else ''}", f"train.seed={seed}",
                         f"data.seed={seed}", f"train.max_steps={steps}", f"train.eval_every_steps={steps}",
                         f"run.dir={run_dir}", "run.progress_bar=false", "wandb.mode=disabled", *corpus, *extra]
            seconds = call(train_command(args.nproc, FINETUNE_CONFIG, overrides), args.out / f"{run_dir.name}.log")
            found[name].append({**result(run_dir), "wall": seconds})
            print(f"  seed {seed}, {name}: top-1 {found[name][-1]['top1']:.2f} in {seconds:.0f} s", flush=True)
    print(f"\nfine-tuning on {args.corpus / 'downstream_train'} (30 labelled images per class), evaluated on "
          f"{args.corpus / 'downstream_eval'} (2,048 images); {args.seeds} seeds, {args.nproc} processes per run, "
          f"pretrained model {exported}\n")
    print("| run | steps | wall s per run | final train loss | eval top-1 % (mean ± std [range]) |")
    print("|---|---|---|---|---|")
    for name, rows in found.items():
        print(f"| {name} | {steps} | {statistics.mean(r['wall'] for r in rows):.0f} | "
              f"{statistics.mean(r['loss'] for r in rows):.3f} | {spread([r['top1'] for r in rows])} |")
    tuned, scratch = ([r["top1"] for r in found[name]] for name in list(VARIANTS)[:2])
    gain = statistics.mean(tuned) - statistics.mean(scratch)
    widest = max(max(v) - min(v) for v in (tuned, scratch))
    print(f"\nper seed, fine-tuned {[round(v, 2) for v in tuned]}, scratch {[round(v, 2) for v in scratch]}; the "
          f"widest range over seeds {widest:.2f} points; {time.perf_counter() - started:.0f} s in all")
    print(f"gain_points={gain:.2f}")


if __name__ == "__main__":
    main()
