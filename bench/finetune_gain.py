"""Does the pretraining help, against what a user would try first? Fine-tune the pretrained model on a labelled
image split and train the same model from scratch with the same steps, seeds, batch and schedule; also a linear probe
(logistic regression on the pretrained encoder's latents, averaged); and, on the same labels and evaluation images
as the model sees them (resized and normalised by the fine-tuning config), the classical references: logistic
regression and k-nearest neighbours on the raw pixels (scikit-learn). A benchmark, not a test: nothing is asserted.

    PYTHONPATH=. python bench/finetune_gain.py                 # reuses runs/demo (bash scripts/main.sh) if it is done
    PYTHONPATH=. python bench/finetune_gain.py --models fine-tuned --pretrain-seeds 1 \
        --pretrained runs/masked75 --pretrain-set data.masking.image=0.75     # an ablation of the pretraining
    PYTHONPATH=. python bench/finetune_gain.py --finetune-set data.image_shift=2       # a change of every fine-tuning
    PYTHONPATH=. python bench/finetune_gain.py --train-shards mine/train --eval-shards mine/eval   # a task of one's own

Every Perceiver run trains to convergence, not to a budget: ``--steps`` (generous) steps, its accuracy on
``--held-out`` labelled images per class (kept out of its training labels) measured every ``--every`` steps, and the
checkpoint of its best step scored on every image of ``--eval-shards``; the checkpoint at ``--short`` steps is scored
too (sample efficiency, a second column). Each run is ``python -m torch.distributed.run -m pretrain train --config
configs/finetune_demo.yaml`` as a user would start it (``--nproc`` processes). The pretrained variants run once per
pretraining seed (``--pretrain-seeds``) and fine-tuning seed (``--seeds``), scratch once per fine-tuning seed.

A missing pretraining is trained (and resumed) with configs/demo.yaml on ``--pretrain-shards``, and exported; one
pretrained with a label head, on other shards or with another seed, is refused. The demo corpus is built only where
every split given is a default one and missing, and nothing a user gave is ever written.

The table gives per model the runs, the chosen step, top-1 at ``--short`` steps and at the chosen step (mean,
standard deviation and range over all runs, and the mean per pretraining seed), the final training loss and the wall
time of a run; the references have no seed. The last line is ``gain_points=<fine-tuned minus scratch>
vs_best_baseline_points=<fine-tuned minus the best classical reference>`` (top-1 at the chosen step, means, points).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple, TypeVar

import numpy as np
import yaml

T = TypeVar("T")
ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "configs" / "demo.yaml"
FINETUNE_CONFIG = ROOT / "configs" / "finetune_demo.yaml"
DEMO = Path("data/demo")
SPLITS = ("train", "val", "downstream_train", "downstream_eval")
VARIANTS = {  # --models name: (row name, starts from the pretrained export, extra overrides)
    "fine-tuned": ("fine-tuned from the pretrained export", True, []),
    "scratch": ("from scratch", False, []),
    "probe": ("label-query probe (pretrained frozen, the label query trains)", True, ["train.freeze=[pretrained]"]),
    "attentive-probe": ("attentive probe (encoder frozen, decoder trains)", True, ["train.freeze=[encoder,adapters]"]),
}
LATENT_PROBE = "linear probe"
LATENT_PROBE_ROW = "linear probe: logistic regression on the pretrained encoder's mean latents"


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


def config_changes(saved: Path, wanted: object) -> List[str]:
    """How the run config ``saved`` differs from the ``wanted`` config (``run`` and ``wandb`` apart)."""
    from pretrain.config import ConfigError, config_to_dict, dotted, load_config

    want = dotted(config_to_dict(wanted))
    try:
        have = dotted(config_to_dict(load_config(str(saved))))
    except ConfigError as exc:
        return [str(exc)]
    return [f"{key}: {have.get(key)} there, {want.get(key)} wanted" for key in sorted(set(want) | set(have))
            if not key.startswith(("run.", "wandb.")) and have.get(key) != want.get(key)]


def ensure_pretrained(run_dir: Path, shards: str, seed: int, settings: Sequence[str], nproc: int, out: Path) -> Path:
    """The export of ``run_dir``'s checkpoint at ``train.max_steps`` of configs/demo.yaml with ``settings``, trained
    with ``seed`` on ``shards`` and exported where missing; a run of another config is refused."""
    from pretrain.config import load_config

    given = shards != str(DEMO / "train")
    overrides = [f"data.train_shards=[{shards}]", f"train.seed={seed}", f"data.seed={seed}",
                 *(["data.val_shards=[]", "train.eval_every_steps=0"] * given), *settings]
    wanted = load_config(str(DEMO_CONFIG), overrides)
    saved = run_dir / "config.yaml"
    changes = config_changes(saved, wanted) if saved.is_file() else []
    if changes:
        sys.exit(f"{run_dir} was pretrained with another config ({'; '.join(changes)}): give --pretrained a new run "
                 f"directory, or remove it")
    tag = f"step_{wanted.train.max_steps:08d}"
    if not (run_dir / "checkpoints" / tag).is_dir():
        print(f"pretraining {run_dir} with {DEMO_CONFIG.name} {' '.join(overrides)} (continuing its checkpoints, if "
              f"any)", flush=True)
        seconds = call(train_command(nproc, DEMO_CONFIG, [f"run.dir={run_dir}", "run.progress_bar=false", *overrides]),
                       out / f"pretrain_seed{seed}.log")
        print(f"  pretrained in {seconds:.0f} s", flush=True)
    exported = run_dir / "exported" / tag
    if not exported.is_dir():
        call([sys.executable, "-m", "pretrain", "export", str(run_dir / "checkpoints" / tag), "--out", str(exported)],
             out / f"export_seed{seed}.log")
    return exported


def first_per_class(items: Sequence[T], key: Callable[[T], str], label: Callable[[T], int],
                    per_class: int) -> Tuple[List[T], List[T]]:
    """Per class, the ``per_class`` items first by a hash of their key, and all the others (both in that order): a
    split that depends on the keys alone, not on the order the items came in."""
    first: List[T] = []
    rest: List[T] = []
    taken: Counter = Counter()
    for item in sorted(items, key=lambda item: hashlib.sha256(key(item).encode()).hexdigest()):
        taken[label(item)] += 1
        (first if taken[label(item)] <= per_class else rest).append(item)
    return first, rest


def split_labels(spec: str, per_class: int, out: Path, shards: int = 16) -> Tuple[Path, Path]:
    """``spec``'s labelled samples as two shard directories: ``per_class`` samples of each class (the first by a hash
    of their key) to choose each run's step by, the rest to train on (in ``shards`` shards); bytes unchanged."""
    import webdataset as wds

    from pretrain.data import expand_spec
    from pretrain.shards import SkipCounter
    from pretrain.shards.read import read_shards

    urls = [shard.url for shard in expand_spec(spec, "--train-shards")]
    samples = [{k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"}
               for _, read in read_shards(urls, SkipCounter(), stall_timeout_s=600) for sample in read
               if "cls" in sample]
    select, fit = first_per_class(samples, lambda sample: sample["__key__"], lambda sample: int(sample["cls"]),
                                  per_class)
    parts = {"fit": fit, "select": select}
    directories = []
    for name, rows in parts.items():
        directory = out / name
        directory.mkdir()
        count = shards if name == "fit" else 1
        writers = [wds.TarWriter(str(directory / f"shard-{i:06d}.tar")) for i in range(count)]
        for i, sample in enumerate(rows):
            writers[i % count].write(sample)
        for writer in writers:
            writer.close()
        call([sys.executable, "-m", "data_prep", "index", str(directory)], out / f"index_{name}.log")
        directories.append(directory)
    return directories[0], directories[1]


def eval_config(spec: str, task: Sequence[str]):
    """The fine-tuning runs' config with ``spec`` as the validation split, read in the process."""
    from pretrain.config import load_config

    return load_config(str(FINETUNE_CONFIG), [*task, f"data.val_shards=[{spec}]", "data.num_workers=0"])


def labelled_images(spec: str, task: Sequence[str]) -> Tuple[np.ndarray, np.ndarray]:
    """Every labelled image of ``spec`` as the fine-tuning runs give it to the model (resized and normalised by
    configs/finetune_demo.yaml), [N, C, H, W], and the labels."""
    from pretrain.data import IGNORE_INDEX, ValidationPass

    cfg = eval_config(spec, task)
    pixels, labels = [], []
    for batch in ValidationPass(cfg.data, cfg.model):
        kept = batch["targets"]["label"] != IGNORE_INDEX
        pixels.append(batch["inputs"]["image"][kept].numpy())
        labels.append(batch["targets"]["label"][kept].numpy())
    return np.concatenate(pixels), np.concatenate(labels)


def checkpoint_top1(checkpoint: Path, spec: str, task: Sequence[str]) -> Tuple[float, int]:
    """Top-1 % of a training checkpoint's model on every labelled sample of ``spec``, and how many it scored."""
    import torch

    from pretrain.data import ValidationPass
    from pretrain.init_from import load_pretrained
    from pretrain.modalities.label import label_counts

    cfg = eval_config(spec, task)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # DeepSpeed's chatter
        model = load_pretrained(checkpoint)
    counts = None
    with torch.no_grad():
        for batch in ValidationPass(cfg.data, cfg.model):
            found = label_counts(model(batch["inputs"], batch["decode"])["label"], batch["targets"]["label"])
            counts = found if counts is None else counts + found
    right, total = counts.sum(dim=1).tolist()
    return 100 * right / total, total


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


def latent_probe() -> object:
    """Logistic regression on standardised features: MAE's linear probe normalises its features the same way (a
    BatchNorm without affine before the linear classifier)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))


def mean_latents(export: Path, *images: np.ndarray, batch: int = 256) -> List[np.ndarray]:
    """The pretrained encoder's latents of each array of ``images``, averaged over the latent array: the
    representation the pretraining shapes, read without training any of the model (a label query trained on top
    reads it 10-40 points worse: bench/README.md). The export is loaded once for all of them."""
    import torch

    from pretrain.model.pretrained import load_pretrained

    model = load_pretrained(export).eval()
    with torch.no_grad():
        return [torch.cat([model.encode({"image": torch.from_numpy(part[i:i + batch])}).mean(dim=1)
                           for i in range(0, len(part), batch)]).numpy() for part in images]


def class_count(spec: str, given: int) -> int:
    """``given``, else the classes listed in the shards' index.json (``data_prep shard --label-from-folder``), else
    the fine-tuning config's."""
    from pretrain.data import expand_spec, listed_classes

    return given or len(listed_classes(expand_spec(spec, "--train-shards"))) or \
        yaml.safe_load(FINETUNE_CONFIG.read_text())["model"]["num_classes"]


def run_variant(run_dir: Path, command: List[str], task: Sequence[str], eval_shards: str, short: int,
                out: Path) -> Dict[str, float]:
    """Train, then score on ``eval_shards`` the checkpoint of the step whose held-out accuracy is best (the earliest
    on a tie) and the one at ``short`` steps; the checkpoints are removed afterwards."""
    seconds = call(command, out / f"{run_dir.name}.log")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    held_out = {row["step"]: row["val/accuracy"] for row in rows if "val/accuracy" in row}
    best = max(held_out, key=lambda step: (held_out[step], -step))
    tags = run_dir / "checkpoints"
    (top1, scored), (early, _) = (checkpoint_top1(tags / f"step_{step:08d}", eval_shards, task)
                                  for step in (best, short))
    found = {"wall": seconds, "loss": rows[-1]["loss"], "step": best, "held_out": 100 * held_out[best],
             "top1": top1, "short": early, "scored": scored}
    shutil.rmtree(tags)
    return found


def spread(values: List[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {std:.2f} [{min(values):.1f}..{max(values):.1f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained", type=Path, default=Path("runs/demo"),
                        help="the pretraining run directory (seed s > 0: <dir>_seed<s>)")
    parser.add_argument("--pretrain-shards", default=str(DEMO / "train"), help="what a missing pretraining reads")
    parser.add_argument("--pretrain-seeds", type=int, default=2, help="pretraining runs, seeds 0, 1, ...")
    parser.add_argument("--pretrain-set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides of configs/demo.yaml for the pretraining (e.g. data.masking.image=0.75)")
    parser.add_argument("--finetune-set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides of configs/finetune_demo.yaml for every Perceiver run (data.image_shift=2)")
    parser.add_argument("--train-shards", default=str(DEMO / "downstream_train"), help="labelled images to learn from")
    parser.add_argument("--eval-shards", default=str(DEMO / "downstream_eval"), help="labelled images to score")
    parser.add_argument("--num-classes", type=int, default=0,
                        help="0: the classes listed in --train-shards' index.json, else the config's")
    parser.add_argument("--held-out", type=int, default=5,
                        help="labelled images per class kept out of training to choose each run's step by")
    parser.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds (train.seed and data.seed)")
    parser.add_argument("--models", nargs="*", choices=list(VARIANTS), default=["fine-tuned", "scratch"],
                        help="the Perceiver runs (an ablation of the pretraining need not train from scratch again; "
                             "none: only the linear probe and the references). Not run by default: probe, a label "
                             "query trained on the frozen pretrained model, and attentive-probe, the frozen encoder "
                             "read by a decoder that trains")
    parser.add_argument("--steps", type=int, default=800, help="train.max_steps of every run")
    parser.add_argument("--every", type=int, default=100, help="steps between held-out evaluations (checkpoints)")
    parser.add_argument("--short", type=int, default=200, help="the short budget also reported (a multiple of --every)")
    parser.add_argument("--nproc", type=int, default=2, help="processes per run")
    parser.add_argument("--out", type=Path, default=Path("bench/out/finetune_gain"), help="the runs (replaced)")
    args = parser.parse_args()
    if args.short % args.every or args.steps % args.every or args.short > args.steps:
        sys.exit("--short and --steps must be multiples of --every, --short at most --steps")
    started = time.perf_counter()
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    ensure_corpus([args.pretrain_shards, args.train_shards, args.eval_shards], args.out)
    exports = [ensure_pretrained(args.pretrained if seed == 0 else Path(f"{args.pretrained}_seed{seed}"),
                                 args.pretrain_shards, seed, args.pretrain_set, args.nproc, args.out)
               for seed in range(args.pretrain_seeds)]
    classes = class_count(args.train_shards, args.num_classes)
    fit, held_out = split_labels(args.train_shards, args.held_out, args.out)
    task = [f"data.train_shards=[{fit}]", f"data.val_shards=[{held_out}]", f"model.num_classes={classes}"]
    (train_x, train_y), (eval_x, eval_y) = (labelled_images(spec, task) for spec in (args.train_shards,
                                                                                     args.eval_shards))
    classical = {name: 100 * make().fit(train_x.reshape(len(train_x), -1), train_y).score(
        eval_x.reshape(len(eval_x), -1), eval_y) for name, make in references().items()}
    for name, top1 in classical.items():
        print(f"  {name}: top-1 {top1:.2f}", flush=True)
    found: Dict[str, List[Dict[str, float]]] = {LATENT_PROBE: []}
    for source, export in enumerate(exports):
        begun = time.perf_counter()
        train_latents, eval_latents = mean_latents(export, train_x, eval_x)
        top1 = 100 * latent_probe().fit(train_latents, train_y).score(eval_latents, eval_y)
        found[LATENT_PROBE].append({"top1": top1, "source": source, "wall": time.perf_counter() - begun,
                                    "scored": len(eval_y)})
        print(f"  linear probe, pretraining {source}: top-1 {top1:.2f}", flush=True)
    found.update({name: [] for name in args.models})
    for name in args.models:
        _, pretrained, extra = VARIANTS[name]
        for source in range(len(exports) if pretrained else 1):
            for seed in range(args.seeds):
                run_dir = args.out / f"{name}_pretrained{source}_seed{seed}"
                overrides = [f"model.init_from={exports[source] if pretrained else ''}", f"train.seed={seed}",
                             f"data.seed={seed}", f"train.max_steps={args.steps}",
                             f"train.eval_every_steps={args.every}",
                             f"checkpoint.every_steps={args.every}", f"checkpoint.keep_last={args.steps // args.every}",
                             f"run.dir={run_dir}", "run.progress_bar=false", "wandb.mode=disabled", *task,
                             *args.finetune_set, *extra]
                row = run_variant(run_dir, train_command(args.nproc, FINETUNE_CONFIG, overrides), task,
                                  args.eval_shards, args.short, args.out)
                found[name].append({**row, "source": source})
                print(f"  {name}, pretraining {source if pretrained else '-'}, seed {seed}: top-1 {row['top1']:.2f} "
                      f"at step {row['step']} (held out {row['held_out']:.0f}%), {row['short']:.2f} at step "
                      f"{args.short}; {row['wall']:.0f} s", flush=True)
    scored = sorted({int(r["scored"]) for rows in found.values() for r in rows})
    print(f"\ntask: {len(train_y)} labelled images ({args.train_shards}, {classes} classes, "
          f"{np.bincount(train_y, minlength=classes).min()}-{np.bincount(train_y, minlength=classes).max()} per "
          f"class); the Perceiver trains on {len(train_y) - args.held_out * classes} of them and chooses its step "
          f"by the {args.held_out * classes} others, the classical references fit all {len(train_y)}; all scored on "
          f"the {len(eval_y)} labelled images of {args.eval_shards} (each checkpoint scored {scored}). Perceiver "
          f"runs: {args.steps} steps, held-out accuracy every {args.every}, {args.seeds} fine-tuning seeds x "
          f"{len(exports)} pretraining seeds, {args.nproc} processes each; pretraining "
          f"{' '.join(args.pretrain_set) or 'as configs/demo.yaml'}; fine-tuning "
          f"{' '.join(args.finetune_set) or 'as configs/finetune_demo.yaml'}\n")
    print(f"| model | runs | chosen step (mean) | top-1 % at step {args.short} | top-1 % at the chosen step "
          f"(mean ± std [range]) | the same per pretraining seed | final train loss | wall s per run |")
    print("|---|---|---|---|---|---|---|---|")
    for name, rows in found.items():
        sources = sorted({r["source"] for r in rows})
        per_source = ", ".join(f"{statistics.mean(r['top1'] for r in rows if r['source'] == s):.2f}" for s in sources)
        top1, wall = spread([r["top1"] for r in rows]), f"{statistics.mean(r['wall'] for r in rows):.0f}"
        per_source = per_source if len(sources) > 1 else "-"
        if name == LATENT_PROBE:  # fitted, not trained: no steps, no loss
            cells = [LATENT_PROBE_ROW, len(rows), "-", "-", top1, per_source, "-", wall]
        else:
            cells = [VARIANTS[name][0], len(rows), f"{statistics.mean(r['step'] for r in rows):.0f}",
                     spread([r["short"] for r in rows]), top1, per_source,
                     f"{statistics.mean(r['loss'] for r in rows):.3f}", wall]
        print(f"| {' | '.join(map(str, cells))} |")
    for name, top1 in classical.items():
        print(f"| {name} | 1 | - | - | {top1:.2f} (no seed) | - | - | - |")
    mean = {name: statistics.mean(r["top1"] for r in rows) for name, rows in found.items()}
    best = max(classical, key=classical.get)
    probe = f"{mean[LATENT_PROBE] - classical['logistic regression on pixels']:+.2f}"
    print(f"\nthe best classical reference: {best}; the linear probe against logistic regression on pixels: "
          f"{probe} points; {time.perf_counter() - started:.0f} s in all")
    gain = f"{mean['fine-tuned'] - mean['scratch']:.2f}" if {"fine-tuned", "scratch"} <= set(mean) else "nan"
    versus = f"{mean['fine-tuned'] - classical[best]:.2f}" if "fine-tuned" in mean else "nan"
    print(f"gain_points={gain} vs_best_baseline_points={versus}")


if __name__ == "__main__":
    main()
