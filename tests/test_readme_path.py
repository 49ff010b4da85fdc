"""README's "Your path" on a dataset of a user's own: 60 PNGs of three shapes in class folders, from ``shard`` with its
validation split through 2-process training, export and fine-tuning. Each command is taken from README.md as written
and run in a folder that holds the images; only the run length is shortened (appended ``key=value`` overrides)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
from PIL import Image, ImageDraw
from test_readme import commands
from test_train_engine import ROOT

CLASSES = ("circle", "square", "triangle")
SHORT = ["train.max_steps=4", "train.eval_every_steps=2", "optim.warmup_steps=1", "run.log_every_steps=2"]


def draw_photos(root: Path, per_class: int = 20) -> None:
    """``root/<shape>/<n>.png``: a filled shape of random size, place and colour on a random background, 32x32 RGB."""
    rng = np.random.default_rng(0)
    for shape in CLASSES:
        (root / shape).mkdir(parents=True)
        for n in range(per_class):
            image = Image.new("RGB", (32, 32), tuple(int(v) for v in rng.integers(0, 100, 3)))
            size = int(rng.integers(10, 20))
            x, y = (int(v) for v in rng.integers(2, 30 - size, 2))
            colour = tuple(int(v) for v in rng.integers(150, 256, 3))
            draw = ImageDraw.Draw(image)
            if shape == "circle":
                draw.ellipse([x, y, x + size, y + size], fill=colour)
            elif shape == "square":
                draw.rectangle([x, y, x + size, y + size], fill=colour)
            else:
                draw.polygon([(x, y + size), (x + size, y + size), (x + size // 2, y)], fill=colour)
            image.save(root / shape / f"{n:03d}.png")


def readme_path() -> List[List[str]]:
    """The command lines of the README's "Your path" section, in order."""
    section = (ROOT / "README.md").read_text().split("## Your path", 1)[1].split("\n## ", 1)[0]
    return [words for body in re.findall(r"^```bash\n(.*?)^```", section, flags=re.M | re.S)
            for words in commands(body)]


def step(found: List[List[str]], *marks: str) -> List[str]:
    """The first README command holding every one of ``marks``."""
    return next(words for words in found if all(mark in words for mark in marks))


def run(words: List[str], cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    assert words[0] == "python", words
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline"}
    done = subprocess.run([sys.executable, *words[1:], *extra], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"{' '.join(words)}\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    assert "Traceback" not in done.stderr, done.stderr[-5000:]
    return done


def last_eval(run_dir: Path) -> Dict[str, float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line for line in lines if "val/loss" in line][-1]


@pytest.mark.slow
def test_the_readme_path_on_sixty_images_of_ones_own(tmp_path):
    draw_photos(tmp_path / "photos")
    (tmp_path / "photos" / "circle" / "README.md").write_text("drawn by the test\n")  # not data: passed over
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    found = readme_path()

    shard = run(step(found, "shard", "--label-from-folder", "--val-fraction"), tmp_path)
    indexes = {split: json.loads((tmp_path / "shards" / split / "index.json").read_text()) for split in ("train", "val")}
    counts = {split: sum(s["samples"] for s in index["shards"]) for split, index in indexes.items()}
    assert counts["train"] + counts["val"] == 60 and counts["val"] > 0, shard.stdout
    assert all(index["info"]["classes"] == list(CLASSES) and not index["rejected"] for index in indexes.values())
    assert "README.md" in shard.stdout
    for words in found:
        if words[:4] == ["python", "-m", "data_prep", "validate"] or words[:4] == ["python", "-m", "data_prep", "stats"]:
            run(words, tmp_path)

    run(step(found, "configs/demo.yaml", "run.dir=runs/mine"), tmp_path, *SHORT)
    assert last_eval(tmp_path / "runs" / "mine")["val/samples"] == counts["val"]  # every validation sample, once
    assert f"on {counts['val']} samples" in (tmp_path / "runs" / "mine" / "train.log").read_text()

    run(step(found, "export", "runs/mine"), tmp_path)
    assert (tmp_path / "exported" / "mine").is_dir()

    tune = run(step(found, "configs/finetune_demo.yaml", "model.init_from=exported/mine"), tmp_path, *SHORT)
    assert "model.init_from exported/mine (" in tune.stderr + tune.stdout
    scored = last_eval(tmp_path / "runs" / "mine-ft")
    assert scored["val/samples"] == counts["val"]
    right = scored["val/accuracy"] * counts["val"]
    assert abs(right - round(right)) < 1e-6  # a share of all validation samples, none dropped
