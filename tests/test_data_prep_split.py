"""``python -m data_prep shard --val-fraction``: a train and a val split, each a complete output, disjoint by key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_data_prep_folder import shard, write_files
from test_data_prep_media import image_bytes, write_manifest
from test_data_prep_shard import folder_bytes, read_tars

from data_prep.__main__ import main
from pretrain.shards import expand_spec

SHAPES = ("circle", "square", "triangle")


def shape_folders(root: Path, per_class: int = 20, first: int = 0) -> Path:
    """``per_class`` small PNGs in a folder per shape, as a user's own labelled images come."""
    return write_files(root, {f"{shape}/{i:03d}.png": image_bytes(100 * k + i)
                              for k, shape in enumerate(SHAPES) for i in range(first, first + per_class)})


def index_of(directory: Path) -> dict:
    return json.loads((directory / "index.json").read_text())


def test_a_folder_is_split_by_key_the_same_every_run(tmp_path: Path, capsys):
    root = shape_folders(tmp_path / "raw")
    args = ["--input-dir", str(root), "--label-from-folder", "--val-fraction", "0.2"]
    out = tmp_path / "a"
    assert shard(*args, "--out", str(out)) == 0
    printed = capsys.readouterr().out
    train, val = read_tars(out / "train"), read_tars(out / "val")
    assert len(train) + len(val) == 60 and val and not set(train) & set(val)
    assert {key: sample["cls"] for key, sample in {**train, **val}.items()} == {
        f"{shape}_{i:03d}": str(label).encode() for label, shape in enumerate(SHAPES) for i in range(20)}
    for split, samples in (("train", train), ("val", val)):
        index = index_of(out / split)
        assert index["samples"] == len(samples) and index["info"]["classes"] == list(SHAPES)  # the whole folder's
        assert (index["info"]["split"], index["info"]["val_fraction"]) == (split, 0.2)
        shards = len(index["shards"])
        assert shards >= 16 and f"{out / split}: wrote {len(samples)} samples in {shards} shards" in printed
    assert (f"val: {len(val)} of 60 samples ({len(val) / 60:.1%}; --val-fraction 0.2, by a hash of each key and "
            "--seed: the same samples every run)") in printed
    assert sum(s.samples for s in expand_spec(str(out / "train"), "data.train_shards[0]")) == len(train)
    assert sum(s.samples for s in expand_spec(str(out / "val"), "data.val_shards[0]")) == len(val)
    assert main(["validate", str(out), "--workers", "1"]) == 0

    assert shard(*args, "--out", str(tmp_path / "again")) == 0
    assert all(folder_bytes(out / split) == folder_bytes(tmp_path / "again" / split) for split in ("train", "val"))
    assert shard(*args, "--seed", "1", "--out", str(tmp_path / "other")) == 0
    assert set(read_tars(tmp_path / "other" / "val")) != set(val)

    shape_folders(root, per_class=10, first=20)  # more samples: those of the first run stay where they were
    assert shard(*args, "--out", str(tmp_path / "more")) == 0
    assert set(val) < set(read_tars(tmp_path / "more" / "val"))
    assert set(train) < set(read_tars(tmp_path / "more" / "train"))


def test_the_pieces_of_a_document_and_its_rejections_follow_its_key(tmp_path: Path, capsys):
    documents = {f"doc{i:02d}": " ".join(f"d{i}w{j}" for j in range(30)) for i in range(30)}  # ~200 bytes each
    manifest = write_manifest(tmp_path / "m.jsonl", [
        *({"key": key, "text": text} for key, text in documents.items()),
        {"key": "bad", "image": "missing.png"},  # rejected in the split of its key
        '{"text": "not closed"',  # no key: in the split of its origin
    ])
    out = tmp_path / "out"
    assert main(["shard", "--manifest", str(manifest), "--out", str(out), "--workers", "1", "--val-fraction", "0.3",
                 "--text-chunk-bytes", "64", "--max-reject-fraction", "0.5"]) == 0
    splits = {split: read_tars(out / split) for split in ("train", "val")}
    where = {key: {split for split, samples in splits.items() if any(k.startswith(f"{key}-") for k in samples)}
             for key in documents}
    assert all(len(found) == 1 for found in where.values())  # every piece of a document in one split
    assert {found.pop() for found in where.values()} == {"train", "val"}
    for key, text in documents.items():
        samples = next(s for s in splits.values() if f"{key}-0" in s)
        assert "".join(samples[f"{key}-{i}"]["txt"].decode() for i in range(len(samples))
                       if f"{key}-{i}" in samples) == text
    rejected = [json.loads(line) for split in splits for line in (out / split / "rejected.jsonl").read_text()
                .splitlines()]
    assert sorted(r["key"] or r["origin"] for r in rejected) == ["bad", "m.jsonl:32"]
    assert sum(index_of(out / split)["rejected"] for split in splits) == 2
    assert sum(index_of(out / split)["info"]["inputs"] for split in splits) == 32


def test_several_manifests_give_a_training_spec_per_split_and_resume(tmp_path: Path, capsys):
    manifests = [write_manifest(tmp_path / f"{name}.jsonl", [{"text": f"{name} {i}"} for i in range(12)])
                 for name in ("a", "b")]
    out = tmp_path / "corpus"
    args = ["shard", "--manifest", *map(str, manifests), "--out", str(out), "--workers", "2", "--val-fraction", "0.3"]
    assert main(args) == 0
    for split in ("train", "val"):
        assert sorted(p.name for p in (out / split).iterdir()) == ["a", "b"]
        assert all((out / split / name / "index.json").is_file() for name in "ab")
    counts = {split: sum(s.samples for s in expand_spec(str(out / split), "k")) for split in ("train", "val")}
    assert counts["train"] + counts["val"] == 24 and counts["val"]
    assert f"val: {counts['val']} of 24 samples" in capsys.readouterr().out

    (out / "val" / "b" / "index.json").unlink()  # killed while writing val/b
    assert main([*args, "--resume"]) == 0
    kept = [line for line in capsys.readouterr().out.splitlines() if ": kept, completed earlier" in line]
    assert sorted(Path(line.split(":")[0]).relative_to(out).as_posix() for line in kept) == [
        "train/a", "train/b", "val/a"]
    assert (out / "val" / "b" / "index.json").is_file()
    assert main([*args[:-1], "0.5", "--resume"]) == 2
    assert f"{out / 'train' / 'a'} was written with val_fraction 0.3, not 0.5" in capsys.readouterr().err


def test_a_split_that_gets_no_sample_is_left_unfinished(tmp_path: Path, capsys):
    manifest = write_manifest(tmp_path / "m.jsonl", [{"key": "only", "text": "one sample"}])
    out = tmp_path / "out"
    assert main(["shard", "--manifest", str(manifest), "--out", str(out), "--workers", "1",
                 "--val-fraction", "0.5"]) == 1
    empty = next(split for split in ("train", "val") if not (out / split / "index.json").exists())
    assert (out / empty / ".writing").exists()
    assert f"error: {out / empty}: no sample was written" in capsys.readouterr().err


@pytest.mark.parametrize("fraction", ["0", "1", "1.5", "-0.1"])
def test_a_val_fraction_outside_0_to_1_is_refused(tmp_path: Path, capsys, fraction: str):
    root = shape_folders(tmp_path / "raw", per_class=1)
    assert shard("--input-dir", str(root), "--out", str(tmp_path / "o"), "--val-fraction", fraction) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: --val-fraction {float(fraction)}: give the share")
    assert not (tmp_path / "o").exists()
