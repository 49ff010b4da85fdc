"""The numeric series modality, added through the modality registry: ``data_prep`` reads ``.series.npy`` and
``.csv`` files from folders and manifests and rejects bad ones with a reason; the trainer skips and counts bad series
in shards of any writer; series alone, and with an image and a text in each sample, shard, train, resume exactly,
export and fine-tune."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from test_data_shards import data_config
from test_export import saved_module
from test_train_engine import logs, losses, metrics, run, tiny_config

from data_prep.__main__ import main as data_prep
from pretrain import load_pretrained
from pretrain.config import ImageConfig, ModelConfig, SeriesConfig, TextConfig, model_config_to_dict
from pretrain.data import ValidationPass
from pretrain.export import export_checkpoint
from pretrain.init_from import match, read_source
from pretrain.modalities.image import encode_png
from pretrain.model import PerceiverIO
from pretrain.shards import SkipCounter, read_shard

STEPS = 64  # the model's series.max_length


def recording(seed: int, steps: int = 40, channels: int = 2, label: int = 0) -> np.ndarray:
    """A float64 [steps, channels] series: a sine per channel whose frequency tells the label, and noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(steps)[:, None]
    return np.sin(2 * np.pi * (0.05 + 0.1 * label) * t + rng.uniform(0, 6, channels)) + rng.normal(0, 0.1,
                                                                                                  (steps, channels))


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def csv_text(values: np.ndarray, header: str = "x,y") -> str:
    return "\n".join([header, *(",".join(f"{v:.6f}" for v in row) for row in values)]) + "\n"


def rejections(out: Path) -> dict:
    """``rejected.jsonl`` as {origin: reason}."""
    rows = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    return {row["origin"]: row["reason"] for row in rows}


def stored(out: Path) -> dict:
    """Every sample of the shards under ``out``, by key."""
    counter = SkipCounter()
    return {s["__key__"]: s for shard in sorted(out.glob("shard-*.tar")) for s in read_shard(str(shard), counter, 60)}


def test_data_prep_reads_series_from_folders_and_manifests_and_rejects_bad_files_with_a_reason(tmp_path):
    raw, good = tmp_path / "raw", recording(0)
    (raw / "a").mkdir(parents=True)
    (raw / "b").mkdir()
    np.save(raw / "a" / "mixed.series.npy", good)  # float64: stored as float32
    (raw / "a" / "mixed.txt").write_text("a sensor and its plot")
    (raw / "a" / "mixed.png").write_bytes(encode_png(np.zeros((8, 8), np.uint8)))
    (raw / "a" / "table.csv").write_text(csv_text(good))
    np.save(raw / "a" / "counts.series.npy", np.arange(30, dtype=np.int16))  # integers, one channel
    np.save(raw / "b" / "complex.series.npy", good.astype(np.complex64))
    np.save(raw / "b" / "words.series.npy", np.array(["1", "2", "3"]))
    with_nan = good.copy()
    with_nan[7, 1] = np.nan
    np.save(raw / "b" / "nan.series.npy", with_nan)
    np.save(raw / "b" / "long.series.npy", recording(1, steps=100))
    (raw / "b" / "ragged.csv").write_text("x,y\n1,2\n3,4\n5\n")
    out = tmp_path / "out"
    assert data_prep(["shard", "--input-dir", str(raw), "--out", str(out), "--series-max-length", "64",
                      "--max-reject-fraction", "1", "--min-shards", "1", "--workers", "1"]) == 0
    reasons = rejections(out)
    assert set(reasons) == {"b/complex", "b/words", "b/nan", "b/long", "b/ragged"}
    assert "dtype complex64" in reasons["b/complex"] and "dtype <U1" in reasons["b/words"]
    assert "1 values are NaN or infinite, the first at step 7, channel 1" in reasons["b/nan"]
    assert "100 steps, more than --series-max-length 64" in reasons["b/long"]
    assert "ragged CSV: data row 3 has 1 values, the first has 2" in reasons["b/ragged"]
    samples = stored(out)
    assert sorted(samples) == ["a_counts", "a_mixed", "a_table"]
    series = {key: np.load(io.BytesIO(s["series.npy"])) for key, s in samples.items()}
    assert series["a_mixed"].dtype == np.float32 and np.array_equal(series["a_mixed"], good.astype(np.float32))
    assert np.allclose(series["a_table"], good, atol=1e-6) and series["a_counts"].shape == (30, 1)
    assert {"png", "txt", "series.npy"} <= set(samples["a_mixed"])
    index = json.loads((out / "index.json").read_text())
    assert sum(shard["layouts"].get("png.series.npy.txt", 0) for shard in index["shards"]) == 1
    assert index["info"]["series_max_length"] == 64  # given: recorded with the options that made the shards

    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(row) for row in (
        {"key": "one", "series": "raw/a/table.csv", "text": "a table"}, {"key": "two", "series": "raw/b/ragged.csv"},
        {"key": "three", "series": 5})) + "\n")
    out = tmp_path / "from_manifest"
    assert data_prep(["shard", "--manifest", str(manifest), "--out", str(out), "--max-reject-fraction", "1",
                      "--min-shards", "1", "--workers", "1"]) == 0
    reasons = rejections(out)
    assert "ragged CSV" in reasons["m.jsonl:2"] and reasons["m.jsonl:3"] == "must be str, got int"
    assert np.allclose(np.load(io.BytesIO(stored(out)["one"]["series.npy"])), good, atol=1e-6)
    assert data_prep(["validate", str(out)]) == 0  # the stored field passes its full decode check


def series_model(mixed: bool = False, num_classes: int = 0) -> ModelConfig:
    """A tiny model of series (64 steps, 2 channels, patches of 8), with a text and an image when ``mixed``."""
    return ModelConfig(
        d_model=32, num_latents=8, d_latents=32, num_self_attends_per_block=1, num_self_attention_heads=2,
        num_cross_attention_heads=2, decoder_num_heads=2, decoder_qk_channels=16, num_classes=num_classes,
        text=TextConfig(max_length=32) if mixed else None,
        image=ImageConfig(size=[8, 8], channels=1, patch_size=4, fourier_bands=2) if mixed else None,
        series=SeriesConfig(max_length=STEPS, channels=2, patch_size=8, fourier_bands=4),
    )


def _bad_series(shard: int, i: int) -> dict:
    """Series of another writer (webdataset's TarWriter): good ones, and one fault each in samples 1-5."""
    faults = {1: good_array(i).astype(np.complex128), 2: np.full((10, 2), np.nan, np.float32),
              3: recording(i, steps=STEPS + 1).astype(np.float32), 4: np.zeros((4, 3, 2), np.float32)}
    data = b"\x93NUMPY garbage" if i == 5 else npy(faults.get(i, good_array(i)))
    return {"__key__": f"s{shard}-{i:03d}", "series.npy": data, "txt": f"sample {i}"}


def good_array(i: int) -> np.ndarray:
    return recording(i, steps=20 + 4 * i).astype(np.float32)


def test_the_trainer_skips_and_counts_bad_series_of_any_writer_and_masks_spans_of_patches(tmp_path):
    path = tmp_path / "shard-000000.tar"
    with wds.TarWriter(str(path)) as writer:
        for i in range(8):
            writer.write(_bad_series(0, i))
    stream = ValidationPass(data_config([str(path)], num_workers=0, batch_size=8), series_model(mixed=True))
    batch = next(iter(stream))
    assert stream.skipped() == {"undecodable:series.npy": 5}
    assert batch["valid"].tolist() == [True, False, False, False, False, False, True, True]
    series, visible = batch["inputs"]["series"], batch["inputs"]["series_mask"]
    assert series.shape == (8, STEPS, 2) and visible.shape == (8, STEPS // 8)
    for row in (0, 6, 7):
        steps = 20 + 4 * row
        values = series[row, :steps]
        assert torch.allclose(values.mean(0), torch.zeros(2), atol=1e-5)  # standardised per channel
        assert torch.allclose(values.std(0, unbiased=False), torch.ones(2), atol=1e-4)
        assert not series[row, steps:].any()  # zero padding
        where = batch["decode"]["series"][row][batch["decode_mask"]["series"][row]]
        patches = -(-steps // 8)
        assert len(where) == round(0.5 * patches) and (where < patches).all()  # hidden among its own patches
        assert visible[row].sum() == patches - len(where) and not visible[row, where].any()
    assert not visible[1:6].any() and batch["targets"]["series"].shape[-1] == 8 * 2


def _series_folder(root: Path, mixed: bool, count: int = 48) -> Path:
    """Two classes of series (a folder each), each sample with a caption and a picture when ``mixed``."""
    for i in range(count):
        label = i % 2
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        values = recording(i, steps=24 + i % 40, label=label)
        if i % 3 == 0:
            (folder / f"{i:03d}.csv").write_text(csv_text(values))
        else:
            np.save(folder / f"{i:03d}.series.npy", values)
        if mixed:
            (folder / f"{i:03d}.txt").write_text(f"recording {i}, {len(values)} steps")
            (folder / f"{i:03d}.png").write_bytes(encode_png(np.full((8, 8), 30 * label, np.uint8)))
    return root


@pytest.mark.slow
@pytest.mark.parametrize("mixed", [False, True], ids=["alone", "mixed"])
def test_series_shards_train_resume_exactly_export_and_finetune(tmp_path, mixed):
    shards = tmp_path / "shards"
    assert data_prep(["shard", "--input-dir", str(_series_folder(tmp_path / "raw", mixed)), "--out", str(shards),
                      "--label-from-folder", "--val-fraction", "0.25", "--min-shards", "4", "--workers", "1"]) == 0
    data = {"train_shards": [str(shards / "train")], "val_shards": [str(shards / "val")],
            "masking": {"series": 0.5, "series_mean_span": 2.0, "image": 0.5, "text": 0.15}}
    model = model_config_to_dict(series_model(mixed))

    def pretrain(name: str, steps: int) -> Path:
        run(tiny_config(tmp_path / name, model=model, data=data, train={"max_steps": steps, "eval_every_steps": 4,
                                                                          "eval_batches": 2},
                        checkpoint={"every_steps": 2}))
        return tmp_path / name / "run"

    reference = pretrain("reference", 4)
    pretrain("resumed", 2)
    resumed = pretrain("resumed", 4)
    assert "resumed from" in logs(tmp_path / "resumed")
    want, got = losses(reference), losses(resumed)
    assert sorted(got) == [1, 2, 3, 4] and got == want  # bit-exact across the resume
    assert {"loss/series"} | ({"loss/text", "loss/image"} if mixed else set()) <= set(got[4])
    assert metrics(resumed)[4]["val/loss/series"] == metrics(reference)[4]["val/loss/series"]

    export_checkpoint(resumed, tmp_path / "exported")
    exported, module = load_pretrained(tmp_path / "exported").state_dict(), saved_module(resumed)
    assert set(exported) == set(module) and all(torch.equal(exported[n], module[n]) for n in module)
    assert "adapters.series.input_projection.weight" in exported

    classifier = series_model(mixed, num_classes=2)
    plan = match(read_source(str(tmp_path / "exported")), PerceiverIO(classifier))
    assert "adapters.series.input_projection.weight" in plan.pretrained.loaded
    run(tiny_config(tmp_path / "finetune", model=dict(model_config_to_dict(classifier),
                                                      init_from=str(tmp_path / "exported")),
                    data={**data, "objective": {"series": "input", "label": "target"}},
                    train={"max_steps": 4, "eval_every_steps": 4, "eval_batches": 2}))
    assert "model.init_from" in logs(tmp_path / "finetune")
    assert 0.0 <= metrics(tmp_path / "finetune" / "run")[4]["val/accuracy"] <= 1.0
