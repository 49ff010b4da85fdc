"""Does the pretraining help, against what a user would try first? Fine-tune the pretrained model on a labelled
image split and train the same model from scratch with the same steps, seeds, batch and schedule; also a linear probe
(the pretrained weights frozen, only the label query and classifier train); and, on the same labels and evaluation
images as the model sees them (resized and normalised by the fine-tuning config), the classical references: logistic
regression and k-nearest neighbours on the raw pixels (scikit-learn). A benchmark, not a test: nothing is asserted.

    PYTHONPATH=. python bench/finetune_gain.py                 # reuses runs/demo (bash scripts/main.sh) if it is done
    PYTHONPATH=. python bench/finetune_gain.py --seeds 5 --steps 300
    PYTHONPATH=. python bench/finetune_gain.py --train-shards mine/train --eval-shards mine/eval   # a task of one's own

Each run is ``python -m torch.distributed.run -m pretrain train --config configs/finetune_demo.yaml`` as a user
would start it (``--nproc`` processes), evaluated once at its last step on every image of ``--eval-shards``. The
pretraining must be self-supervised (no label head): a run of another config is refused. A missing pretraining run
is trained (and resumed) with configs/demo.yaml on ``--pretrain-shards``, and exported; the demo corpus is built
only where every split given is a default one and missing, and nothing a user gave is ever written.

The table gives per variant the steps, the mean wall time of a run (process start to end), the final training loss
(the mean of the last logged window) and the evaluation top-1 (mean, standard deviation and range over the seeds;
the references have no seed). The last line is ``gain_points=<fine-tuned minus scratch> vs_best_baseline_points=<
fine-tuned minus the best classical reference>`` (top-1, means over seeds, in points).
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
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
FINETUNE_CONFIG = ROOT / "configs" / "finetune_demo.yaml"
DEMO = Path("data/demo")
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


def ensure_corpus(specs: Sequence[str], out: Path) -> None:
    """Build the demo corpus where every spec given is a demo split and one is missing; a spec of the user's is
    never built or rewritten (a missing one is the pretrain run's own error)."""
    demo = {str(DEMO / split) for split in SPLITS}
    if not set(specs) <= demo or all((Path(spec) / "index.json").is_file() for spec in specs):
        return
    if DEMO.exists():
        sys.exit(f"{DEMO} lacks a split of {sorted(demo)}: rebuild it with `python -m data_prep build-demo --out "
                 f"{DEMO} --overwrite` (it replaces every split there), or give the shards with --pretrain-shards, "
                 f"--train-shards and --eval-shards")
    print(f"building the demo corpus in {DEMO}", flush=True)
    call([sys.executable, "-m", "data_prep", "build-demo", "--out", str(DEMO), "--size", "small"],
         out / "build-demo.log")


def ensure_pretrained(run_dir: Path, shards: str, nproc: int, out: Path) -> Path:
    """The export of ``run_dir``'s checkpoint at ``train.max_steps`` of configs/demo.yaml, trained on ``shards`` and
    exported where missing; a run pretrained with labels, or on other shards, is refused."""
    demo = yaml.safe_load(DEMO_CONFIG.read_text())
    given = shards != str(DEMO / "train")
    overrides = [f"data.train_shards=[{shards}]", *(["data.val_shards=[]", "train.eval_every_steps=0"] * given)]
    saved = run_dir / "config.yaml"
    if saved.is_file():
        config = yaml.safe_load(saved.read_text())
        if config["model"].get("num_classes"):
            sys.exit(f"{run_dir} was pretrained with a {config['model']['num_classes']}-class label head (an older "
                     f"configs/demo.yaml): its pretraining saw the labels. Remove it (bash scripts/main.sh trains it "
                     f"anew) or give --pretrained another run")
        if [(ROOT / spec).resolve() for spec in config["data"]["train_shards"]] != [(ROOT / shards).resolve()]:
            sys.exit(f"{run_dir} was pretrained on {config['data']['train_shards']}, not {shards}: give --pretrained "
                     f"a new run directory")
    tag = f"step_{demo['train']['max_steps']:08d}"
    if not (run_dir / "checkpoints" / tag).is_dir():
        print(f"pretraining {run_dir} with {DEMO_CONFIG.name} on {shards} (continuing its checkpoints, if any)",
              flush=True)
        seconds = call(train_command(nproc, DEMO_CONFIG, [f"run.dir={run_dir}", "run.progress_bar=false", *overrides]),
                       out / "pretrain.log")
        print(f"  pretrained in {seconds:.0f} s", flush=True)
    exported = run_dir / "exported" / tag
    if not exported.is_dir():
        call([sys.executable, "-m", "pretrain", "export", str(run_dir / "checkpoints" / tag), "--out", str(exported)],
             out / "export.log")
    return exported


def labelled_images(spec: str, task: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
    """Every labelled image of ``spec`` as the fine-tuning runs give it to the model (resized and normalised by
    configs/finetune_demo.yaml), flattened, and the labels."""
    from pretrain.config import load_config
    from pretrain.data import IGNORE_INDEX, ValidationPass

    cfg = load_config(str(FINETUNE_CONFIG), [*task, f"data.val_shards=[{spec}]", "data.num_workers=0"])
    pixels, labels = [], []
    for batch in ValidationPass(cfg.data, cfg.model):
        kept = batch["targets"]["label"] != IGNORE_INDEX
        pixels.append(batch["inputs"]["image"][kept].flatten(1).numpy())
        labels.append(batch["targets"]["label"][kept].numpy())
    return np.concatenate(pixels), np.concatenate(labels)


def references() -> Dict[str, Callable[[], object]]:
    """The classical models a user tries first on a few hundred labelled images, scikit-learn's defaults but for
    logistic regression's iteration cap (raised from 100 so that it converges)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier

    return {
        "logistic regression on pixels": lambda: LogisticRegression(max_iter=2000),
        "1-nearest neighbour on pixels": lambda: KNeighborsClassifier(n_neighbors=1),
        "5-nearest neighbours on pixels": lambda: KNeighborsClassifier(n_neighbors=5),
    }


def class_count(spec: str, given: int) -> int:
    """``given``, else the classes listed in the shards' index.json (``data_prep shard --label-from-folder``), else
    the fine-tuning config's."""
    from pretrain.data import expand_spec, listed_classes

    return given or len(listed_classes(expand_spec(spec, "--train-shards"))) or \
        yaml.safe_load(FINETUNE_CONFIG.read_text())["model"]["num_classes"]


def result(run_dir: Path) -> Dict[str, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"loss": rows[-1]["loss"], "top1": 100 * rows[-1]["val/accuracy"], "scored": rows[-1]["val/samples"]}


def spread(values: List[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {std:.2f} [{min(values):.1f}..{max(values):.1f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained", type=Path, default=Path("runs/demo"), help="the pretraining run directory")
    parser.add_argument("--pretrain-shards", default=str(DEMO / "train"), help="what a missing pretraining reads")
    parser.add_argument("--train-shards", default=str(DEMO / "downstream_train"), help="labelled images to learn from")
    parser.add_argument("--eval-shards", default=str(DEMO / "downstream_eval"), help="labelled images to score")
    parser.add_argument("--num-classes", type=int, default=0,
                        help="0: the classes listed in --train-shards' index.json, else the config's")
    parser.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds (train.seed and data.seed)")
    parser.add_argument("--steps", type=int, default=0, help="train.max_steps of every run (0: the config's)")
    parser.add_argument("--nproc", type=int, default=2, help="processes per run")
    parser.add_argument("--out", type=Path, default=Path("bench/out/finetune_gain"), help="the runs (replaced)")
    args = parser.parse_args()
    started = time.perf_counter()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    ensure_corpus([args.pretrain_shards, args.train_shards, args.eval_shards], args.out)
    exported = ensure_pretrained(args.pretrained, args.pretrain_shards, args.nproc, args.out)
    steps = args.steps or yaml.safe_load(FINETUNE_CONFIG.read_text())["train"]["max_steps"]
    classes = class_count(args.train_shards, args.num_classes)
    task = [f"data.train_shards=[{args.train_shards}]", f"data.val_shards=[{args.eval_shards}]",
            f"model.num_classes={classes}"]
    (train_x, train_y), (eval_x, eval_y) = (labelled_images(spec, task) for spec in (args.train_shards,
                                                                                     args.eval_shards))
    classical = {name: 100 * make().fit(train_x, train_y).score(eval_x, eval_y) for name, make in references().items()}
    for name, top1 in classical.items():
        print(f"  {name}: top-1 {top1:.2f}", flush=True)
    found: Dict[str, List[Dict[str, float]]] = {name: [] for name in VARIANTS}
    for seed in range(args.seeds):
        for name, (pretrained, extra) in VARIANTS.items():
            run_dir = args.out / f"{list(VARIANTS).index(name)}_seed{seed}"
            overrides = [f"model.init_from={exported if pretrained else ''}", f"train.seed={seed}",
                         f"data.seed={seed}", f"train.max_steps={steps}", f"train.eval_every_steps={steps}",
                         f"run.dir={run_dir}", "run.progress_bar=false", "wandb.mode=disabled", *task, *extra]
            seconds = call(train_command(args.nproc, FINETUNE_CONFIG, overrides), args.out / f"{run_dir.name}.log")
            found[name].append({**result(run_dir), "wall": seconds})
            print(f"  seed {seed}, {name}: top-1 {found[name][-1]['top1']:.2f} in {seconds:.0f} s", flush=True)
    scored = {int(r["scored"]) for rows in found.values() for r in rows}
    print(f"\ntask: {len(train_y)} labelled images ({args.train_shards}, {classes} classes, "
          f"{np.bincount(train_y, minlength=classes).min()}-{np.bincount(train_y, minlength=classes).max()} per "
          f"class) -> top-1 on the {len(eval_y)} images of {args.eval_shards} (the runs scored {sorted(scored)}); "
          f"{args.seeds} seeds, {args.nproc} processes per run, {steps} steps, pretrained model {exported}\n")
    print("| model | steps | wall s per run | final train loss | eval top-1 % (mean ± std [range]) |")
    print("|---|---|---|---|---|")
    for name, rows in found.items():
        print(f"| {name} | {steps} | {statistics.mean(r['wall'] for r in rows):.0f} | "
              f"{statistics.mean(r['loss'] for r in rows):.3f} | {spread([r['top1'] for r in rows])} |")
    for name, top1 in classical.items():
        print(f"| {name} | - | - | - | {top1:.2f} (no seed) |")
    tuned, scratch = ([r["top1"] for r in found[name]] for name in list(VARIANTS)[:2])
    gain = statistics.mean(tuned) - statistics.mean(scratch)
    best = max(classical, key=classical.get)
    widest = max(max(v) - min(v) for v in (tuned, scratch))
    print(f"\nper seed, fine-tuned {[round(v, 2) for v in tuned]}, scratch {[round(v, 2) for v in scratch]}; the "
          f"widest range over seeds {widest:.2f} points; the best classical reference: {best}; "
          f"{time.perf_counter() - started:.0f} s in all")
    print(f"gain_points={gain:.2f} vs_best_baseline_points={statistics.mean(tuned) - classical[best]:.2f}")


if __name__ == "__main__":
    main()
