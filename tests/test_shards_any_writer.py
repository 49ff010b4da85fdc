"""Shards we did not write: webdataset's ShardWriter output (png + cls, jpg + json + txt; .tar and .tar.gz) is
indexed by ``data_prep index``, validated and described with or without that index, and trained on; training on
shards without an index stops before start-up naming the command that makes one."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from test_data_shards import data_config, multimodal_model, png_bytes, truncate_inside_sample
from test_train_engine import metrics, run, tiny_config

from data_prep.__main__ import main as data_prep
from pretrain.__main__ import main as pretrain
from pretrain.data import DataStream, expand_spec

SAMPLES = 24


def jpg_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def png_sample(i: int) -> dict:
    rng = np.random.default_rng(i)
    return {"__key__": f"p{i:04d}", "png": png_bytes(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)),
            "cls": str(i % 5)}


def jpg_sample(i: int) -> dict:
    """img2dataset's layout: an image, its caption and a JSON record (with a field no modality reads)."""
    rng = np.random.default_rng(100 + i)
    return {"__key__": f"j{i:04d}", "jpg": jpg_bytes(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)),
            "txt": f"caption {i}", "json": {"url": f"http://example.com/{i}.jpg", "width": 10}, "caption": "x"}


def shard_writer(directory: Path, make, pattern: str = "shard-%06d.tar", per_shard: int = 6) -> Path:
    """``SAMPLES`` samples through webdataset's own ShardWriter (a ``.gz`` pattern gzips them)."""
    directory.mkdir(parents=True)
    with wds.ShardWriter(str(directory / pattern), maxcount=per_shard, verbose=0) as writer:
        for i in range(SAMPLES):
            writer.write(make(i))
    return directory


@pytest.mark.parametrize("make, pattern, layout", [
    (png_sample, "shard-%06d.tar", "cls.png"),
    (jpg_sample, "shard-%06d.tar", "caption.jpg.json.txt"),
    (png_sample, "part-%04d.tar.gz", "cls.png"),
], ids=["png+cls", "jpg+json+txt", "tar.gz"])
def test_index_validate_stats_and_train_on_shardwriter_shards(tmp_path, capsys, make, pattern, layout):
    shards = shard_writer(tmp_path / "shards", make, pattern)
    assert data_prep(["validate", str(shards), "--workers", "2"]) == 0  # without an index: counted, and said so
    out = capsys.readouterr().out
    assert f"{shards}: checked 4 shards, {SAMPLES} samples: no problems" in out
    assert f"note: {shards}: no index.json: counted by reading" in out
    assert ("fields no modality reads, passed over by training: .caption (24 samples)" in out) == ("caption" in layout)

    assert data_prep(["index", str(shards), "--workers", "2"]) == 0
    assert capsys.readouterr().out.startswith(f"{shards / 'index.json'}: 4 shards, {SAMPLES} samples (")
    index = json.loads((shards / "index.json").read_text())
    names = sorted(p.name for p in shards.iterdir() if p.name != "index.json")
    assert [s["name"] for s in index["shards"]] == names
    assert [(s["samples"], s["layouts"], s["bytes"]) for s in index["shards"]] == [
        (6, {layout: 6}, (shards / name).stat().st_size) for name in names]
    assert data_prep(["index", str(shards)]) == 2  # an index is never replaced unasked
    assert f"{shards / 'index.json'} exists; pass --overwrite" in capsys.readouterr().err

    assert data_prep(["validate", str(shards), "--workers", "1"]) == 0  # now against the index: sizes included
    assert capsys.readouterr().out.splitlines()[-1] == f"{shards}: checked 4 shards, {SAMPLES} samples: no problems"
    assert data_prep(["stats", str(shards)]) == 0
    assert capsys.readouterr().out.startswith(f"{shards}: 4 shards, {SAMPLES} samples, ")

    assert [s.samples for s in expand_spec(str(shards), "k")] == [6] * 4
    stream = DataStream(data_config([str(shards)], num_workers=2, batch_size=4, shuffle_buffer=0), multimodal_model())
    keys = [k for batch in stream for k in batch["keys"]]
    assert len(stream) == SAMPLES // 4 and sorted(keys) == sorted(make(i)["__key__"] for i in range(SAMPLES))
    assert stream.skipped() == {}


def test_an_index_elsewhere_names_the_shards_by_path(tmp_path, capsys):
    """Shards in a folder one may not write to: --out puts the index elsewhere, naming them by absolute path, and
    that folder is the training spec."""
    shards = shard_writer(tmp_path / "shards", png_sample)
    spec = f"{shards}/shard-{{000000..000003}}.tar"
    assert data_prep(["index", spec, "--out", str(tmp_path / "indexed"), "--workers", "1"]) == 0
    index = json.loads((tmp_path / "indexed" / "index.json").read_text())
    assert [s["name"] for s in index["shards"]] == [str(shards / f"shard-{i:06d}.tar") for i in range(4)]
    assert not (shards / "index.json").exists()
    assert [(s.url, s.samples) for s in expand_spec(str(tmp_path / "indexed"), "k")] == [
        (str(shards / f"shard-{i:06d}.tar"), 6) for i in range(4)]
    paths = [str(p) for p in sorted(shards.glob("*.tar"))[:2]]  # a shell's glob: several SPECs are one list
    capsys.readouterr()
    assert data_prep(["validate", *paths, "--workers", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"{'::'.join(paths)}: checked 2 shards, 12 samples: no problems"


def test_damaged_and_empty_shards_are_reported_and_indexed_as_read(tmp_path, capsys):
    shards = shard_writer(tmp_path / "shards", png_sample)
    truncate_inside_sample(shards / "shard-000001.tar", 1)
    (shards / "shard-000002.tar").write_bytes(b"")
    assert data_prep(["index", str(shards), "--workers", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("shard-000001.tar: key p0007: truncated or corrupt tar (unexpected end of data")
    assert out[0].endswith("in 'p0007.cls'); rewrite this shard")
    assert out[1] == "shard-000002.tar: cannot be read (no data); check the address and credentials"
    assert out[2].startswith(f"{shards / 'index.json'}: 3 shards, 13 samples (") and out[2].endswith(
        "; 1 unreadable shard left out; 2 problems above (damaged shards are listed with the samples they give)")
    index = json.loads((shards / "index.json").read_text())
    assert [(s["name"], s["samples"]) for s in index["shards"]] == [
        ("shard-000000.tar", 6), ("shard-000001.tar", 1), ("shard-000003.tar", 6)]


def test_shard_refuses_a_folder_of_shards_and_names_index(tmp_path, capsys):
    shards = shard_writer(tmp_path / "shards", png_sample)
    assert data_prep(["shard", "--input-dir", str(shards), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (
        f"error: --input-dir {shards} holds WebDataset shards (shard-000000.tar, ...): they need no re-sharding; "
        f"`python -m data_prep index {shards}` writes their index.json, and training reads them as they are\n")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_training_on_shards_without_an_index_stops_before_start_naming_the_command(tmp_path, capsys):
    """The message's command is the fix: once it ran, the same training command trains."""
    shards = shard_writer(tmp_path / "theirs", png_sample)
    config = tiny_config(tmp_path, train={"max_steps": 2, "eval_every_steps": 0},
                         data={"train_shards": [str(shards)]})
    assert pretrain(["train", "--config", str(config)]) == 2
    assert capsys.readouterr().err == (
        f"error: data.train_shards[0]: the samples per epoch are unknown, no index.json lists these shards' counts; "
        f"`python -m data_prep index {shards}` writes one (reading every shard once, in parallel; into the shards' "
        f"folder, or --out DIR for remote shards: then train on DIR), or set data.epoch_samples to the samples per "
        f"epoch\n")
    assert not (tmp_path / "run").exists()
    assert data_prep(["index", str(shards), "--workers", "1"]) == 0
    run(config, nproc=1)
    logged = metrics(tmp_path / "run")
    assert sorted(logged) == [1, 2] and {"loss/image", "loss/label"} <= set(logged[2])  # their png and cls


def test_a_hand_written_index_without_sizes_validates(tmp_path, capsys):
    """An index of names and counts only (written by hand for one's own tars) trains and validates: sizes and
    layouts it does not give are not compared."""
    shards = shard_writer(tmp_path / "shards", png_sample)
    (shards / "index.json").write_text(json.dumps(
        {"shards": [{"name": f"shard-{i:06d}.tar", "samples": 6} for i in range(4)]}))
    assert data_prep(["validate", str(shards), "--workers", "1"]) == 0
    assert capsys.readouterr().out == f"{shards}: checked 4 shards, {SAMPLES} samples: no problems\n"


def test_a_gzipped_shard_is_read_whatever_its_name(tmp_path):
    """gzip is told by the bytes: a .tar holding gzip (and a .tgz) read like the others."""
    shards = shard_writer(tmp_path / "gz", png_sample, "s-%02d.tar.gz", per_shard=SAMPLES)
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "a.tar").write_bytes((shards / "s-00.tar.gz").read_bytes())
    (plain / "b.tgz").write_bytes((shards / "s-00.tar.gz").read_bytes())
    assert tarfile.open(plain / "a.tar").getnames()[:2] == ["p0000.cls", "p0000.png"]  # tarfile sniffs it too
    cfg = data_config([str(plain)], num_workers=0, batch_size=6, shuffle_buffer=0, epoch_samples=2 * SAMPLES)
    stream = DataStream(cfg, multimodal_model())
    keys = [k for batch in stream for k in batch["keys"]]
    assert sorted(keys) == sorted([png_sample(i)["__key__"] for i in range(SAMPLES)] * 2)
    assert stream.skipped() == {}
