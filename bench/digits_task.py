"""A second labelled image task, not Fashion-MNIST, for ``bench/finetune_gain.py``: scikit-learn's handwritten digits
(1,797 grey 8x8 images, 10 classes, shipped inside the package: nothing to download). Written as a user would bring
their own: PNG files in one folder per class, sharded by ``python -m data_prep shard --input-dir ...
--label-from-folder``. The model reads them at its own 28x28 (``pretrain.modalities.transforms.to_pixels`` resizes).

    PYTHONPATH=. python bench/digits_task.py --out data/digits
    PYTHONPATH=. python bench/finetune_gain.py --train-shards data/digits/train --eval-shards data/digits/eval

``--per-class`` images of each class (the first by a hash of their index: ``finetune_gain.first_per_class``) are
the labelled training split, all the others the evaluation split. An existing ``--out`` is refused: nothing is
overwritten.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from finetune_gain import first_per_class  # this script's folder is on sys.path


def write_folders(root: Path, per_class: int) -> None:
    """root/train/<digit>/<i>.png and root/eval/<digit>/<i>.png, the 16 grey levels stretched to 0-255."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    splits = first_per_class(range(len(digits.target)), str, lambda i: int(digits.target[i]), per_class)
    for split, indices in zip(("train", "eval"), splits):
        for i in indices:
            folder = root / split / f"digit_{digits.target[i]}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = np.rint(digits.images[i] * (255 / 16)).astype(np.uint8)
            Image.fromarray(pixels, mode="L").save(folder / f"{i:04d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("data/digits"), help="new directory: train/ and eval/")
    parser.add_argument("--per-class", type=int, default=30, help="labelled training images per class")
    args = parser.parse_args()
    if args.out.exists():
        sys.exit(f"{args.out} exists: give a new --out (nothing is overwritten)")
    with tempfile.TemporaryDirectory() as folders:
        write_folders(Path(folders), args.per_class)
        for split in ("train", "eval"):
            subprocess.run([sys.executable, "-m", "data_prep", "shard", "--input-dir", str(Path(folders) / split),
                            "--label-from-folder", "--min-shards", "16", "--out", str(args.out / split)], check=True)


if __name__ == "__main__":
    main()
