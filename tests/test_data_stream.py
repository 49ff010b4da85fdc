"""The stream end to end on real shards: batch contract, rank/worker split, equal batch counts, mixing, errors."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch
from test_data_shards import (
    data_config, flac_bytes, multimodal_model, multimodal_sample, npy_bytes, png_bytes, shard_of,
    text_model, text_sample, truncate_inside_sample, write_shards,
)
from test_train_engine import ROOT, children, ended, rank_and_workers

from pretrain import vocab
from pretrain.config import ConfigError, MaskingConfig
from pretrain.data import IGNORE_INDEX, DataError, DataStream, ValidationPass
from pretrain.data.reader import sample_selector
from pretrain.shards import SkipCounter
from pretrain.model.perceiver import PerceiverIO


def test_batches_follow_the_contract_and_feed_the_model(tmp_path):
    write_shards(tmp_path, [10, 10], multimodal_sample)
    model_cfg = multimodal_model()
    batch = next(iter(DataStream(data_config([str(tmp_path)], num_workers=1), model_cfg)))
    inputs, decode, mask = batch["inputs"], batch["decode"], batch["decode_mask"]
    assert inputs["text"].shape == (4, 32) and inputs["text"].dtype == torch.long
    assert inputs["image"].shape == (4, 3, 8, 8) and inputs["image_mask"].shape == (4, 4)
    assert inputs["audio"].shape == (4, 64) and inputs["audio_mask"].shape == (4, 4)
    assert inputs["video"].shape == (4, 4, 3, 8, 8) and inputs["video_mask"].shape == (4, 8)
    assert {k: tuple(v.shape) for k, v in decode.items()} == {
        "text": (4, 5), "image": (4, 2), "audio": (4, 2), "video": (4, 4), "label": (4, 1)}
    assert all(mask[k].shape == decode[k].shape and mask[k].dtype == torch.bool for k in decode)
    assert batch["targets"]["text"].shape == (4, 5) and batch["targets"]["label"].shape == (4,)
    assert len(batch["keys"]) == 4 and batch["valid"].all()
    # Hidden patches are off in the key mask, and only patches of present images are predicted.
    for b in range(4):
        hidden = decode["image"][b][mask["image"][b]]
        assert not inputs["image_mask"][b, hidden].any()
        if not mask["image"][b].any():
            assert not inputs["image_mask"][b].any() and (inputs["image"][b] == 0).all()
    outputs = PerceiverIO(model_cfg)(inputs, decode)
    assert outputs["text"].shape == (4, 5, model_cfg.text.vocab_size)
    assert outputs["image"].shape == (4, 2, 4 * 4 * 3) and outputs["label"].shape == (4, 5)


def test_a_classification_objective_reads_its_inputs_whole_and_nothing_else(tmp_path):
    """data.objective {image: input, label: target} on samples with captions, audio and video: the batch holds the
    image whole (nothing hidden, nothing to reconstruct) and the label; the caption never reaches the model's inputs,
    and samples without an image are passed over (counted as unused, not as skipped)."""
    write_shards(tmp_path, [10, 10], multimodal_sample)
    cfg = data_config([str(tmp_path)], num_workers=1, objective={"image": "input", "label": "target"})
    stream = DataStream(cfg, multimodal_model())
    batch = next(iter(stream))
    assert set(batch["inputs"]) == {"image", "image_mask"} and batch["inputs"]["image_mask"].all()
    assert set(batch["decode"]) == {"label"} and set(batch["targets"]) == {"label"}
    assert (batch["targets"]["label"] != IGNORE_INDEX).all()
    assert all(int(key[-4:]) % 2 == 0 for key in batch["keys"])  # the samples holding an image
    assert stream.skipped()["unused"] > 0 and "no_usable_modality" not in stream.skipped()
    masked = next(iter(DataStream(dataclasses.replace(cfg, objective={"image": "masked", "audio": "input"}),
                                  multimodal_model())))
    assert set(masked["decode"]) == {"image"} and set(masked["inputs"]) == {"image", "image_mask", "audio",
                                                                           "audio_mask"}


def test_training_images_shift_at_random_and_validation_images_never(tmp_path):
    """data.image_shift=2: each training image is its validation image moved by at most 2 pixels each way, edge
    pixels filling in, and some do move; validation images, and training ones without the setting, stay as they
    are. Pixels are normalised alike, so the comparison is of the model's inputs."""
    write_shards(tmp_path, [10, 10], multimodal_sample)

    def images(stream) -> dict:
        return {key: b["inputs"]["image"][i] for b in stream for i, key in enumerate(b["keys"]) if key}

    cfg = data_config([str(tmp_path)], num_workers=1, shuffle_buffer=0, epoch_samples=8, image_shift=2,
                      objective={"image": "input", "label": "target"})
    seen = images(ValidationPass(cfg, multimodal_model()))
    moved = images(DataStream(cfg, multimodal_model()))
    still = images(DataStream(dataclasses.replace(cfg, image_shift=0), multimodal_model()))
    assert len(moved) == 8 and set(moved) <= set(seen) and set(still) == set(moved)
    assert all(torch.equal(still[key], seen[key]) for key in still)
    offsets = []
    for key, image in moved.items():
        padded = torch.nn.functional.pad(seen[key][None], (2, 2, 2, 2), mode="replicate")[0]
        found = [(dy, dx) for dy in range(5) for dx in range(5) if torch.equal(padded[:, dy:dy + 8, dx:dx + 8], image)]
        assert found, key
        offsets.append(found[0])
    assert any(offset != (2, 2) for offset in offsets)


def test_a_caption_is_hidden_whole_where_masking_caption_whole_says(tmp_path):
    """data.masking.caption_whole=1: every text that comes with an image, audio or video is hidden from its first
    byte, as many bytes as the text has prediction slots (5 here), so it is predicted from the other modality; a text
    alone is still span-masked (15% of it: fewer bytes)."""
    write_shards(tmp_path, [10, 10], multimodal_sample)
    cfg = data_config([str(tmp_path)], num_workers=1, shuffle_buffer=0, masking=MaskingConfig(caption_whole=1.0))
    batches = list(itertools.islice(DataStream(cfg, multimodal_model()), 4))
    paired = alone = 0
    for batch in batches:
        for b, key in enumerate(batch["keys"]):
            i = int(key[-4:])
            where = batch["decode"]["text"][b][batch["decode_mask"]["text"][b]]
            assert (batch["inputs"]["text"][b, where] == vocab.MASK_ID).all()
            if i % 2 == 0 or i % 3 == 0 or i % 4 == 0:  # multimodal_sample's image, audio, video
                assert where.tolist() == list(range(5)), key
                paired += 1
            else:
                assert 0 < len(where) < 5, key
                alone += 1
    assert paired and alone


@pytest.mark.parametrize("objective, message", [
    ({"text": "input", "label": "target"}, r"data.objective.text: the model has no 'text' modality; it reads "
                                           r"\['image', 'audio', 'video', 'label'\]"),
    ({"image": "target"}, r"data.objective.image: must be one of \('masked', 'input'\), got 'target'"),
    ({"image": "input", "label": "input"}, r"data.objective.label: must be one of \('target',\)"),
    ({"label": "target"}, r"data.objective: names no input"),
    ({"image": "input", "audio": "input"}, r"data.objective: nothing to predict"),
])
def test_an_objective_the_model_cannot_run_names_its_key(tmp_path, objective, message):
    write_shards(tmp_path, [8, 8], multimodal_sample)
    with pytest.raises(ConfigError, match=message):
        DataStream(data_config([str(tmp_path)], objective=objective),
                   dataclasses.replace(multimodal_model(), text=None))


def test_the_first_conversion_of_each_kind_is_said_once(tmp_path, caplog):
    """Images, audio and clips of another shape than the model's are converted: said once, so a user who meant another
    size sees it."""
    write_shards(tmp_path, [10, 10], multimodal_sample)
    with caplog.at_level(logging.INFO, logger="pretrain.data"):
        for _ in zip(range(3), DataStream(data_config([str(tmp_path)], num_workers=1), multimodal_model())):
            pass
    notes = [r.getMessage() for r in caplog.records if "in the data ->" in r.getMessage()]
    assert sorted(notes) == [
        "data (train): audio: 8000 Hz in the data -> 1000 Hz (data.audio_sample_rate)",
        "data (train): image: 3-channel 12x10 in the data -> 3-channel 8x8 (model.image)",
        "data (train): video: 3 frames, 3-channel 10x12 in the data -> 4 frames, 3-channel 8x8 (model.video)"]


def test_text_ids_masks_and_targets(tmp_path):
    texts = ["héllo wörld, a longer line of text that is cropped", "short", "x" * 20]
    write_shards(tmp_path, [3], lambda s, i: {"__key__": f"k{i}", "txt": texts[i]})
    cfg = data_config([str(tmp_path)], num_workers=0, batch_size=3, shuffle_buffer=0, random_crop=False,
                      masking=MaskingConfig(text=0.25, text_mean_span=3.0))
    batch = next(iter(DataStream(cfg, text_model(max_length=24))))
    ids, inputs = batch["inputs"]["text"], batch["inputs"]
    for b, key in enumerate(batch["keys"]):
        original = vocab.encode_utf8(texts[int(key[1:])])[:24]
        expected = torch.full((24,), vocab.PAD_ID)
        expected[: len(original)] = torch.tensor(original)
        positions = batch["decode"]["text"][b][batch["decode_mask"]["text"][b]]
        assert len(positions) == max(1, round(0.25 * len(original)))
        assert torch.equal(batch["targets"]["text"][b][: len(positions)], expected[positions])
        assert (batch["targets"]["text"][b][len(positions):] == IGNORE_INDEX).all()
        assert (ids[b, positions] == vocab.MASK_ID).all()
        unmasked = torch.ones(24, dtype=torch.bool)
        unmasked[positions] = False
        assert torch.equal(ids[b][unmasked], expected[unmasked])
        assert torch.equal(inputs["text_mask"][b], expected != vocab.PAD_ID)


def test_pixels_audio_and_video_transforms(tmp_path):
    frames = np.stack([np.full((10, 12, 3), 10 * t, np.uint8) for t in range(3)])
    sample = {"__key__": "k", "txt": "t", "png": png_bytes(np.full((16, 16, 3), 51, np.uint8)),
              "flac": flac_bytes(np.full(200, 0.5), 8000), "npy": npy_bytes(frames)}
    write_shards(tmp_path, [1], lambda s, i: sample)
    cfg = data_config([str(tmp_path)], num_workers=0, batch_size=1, pixel_mean=[0.1], pixel_std=[0.5])
    inputs = next(iter(DataStream(cfg, multimodal_model())))["inputs"]
    assert torch.allclose(inputs["image"], torch.full((1, 3, 8, 8), (0.2 - 0.1) / 0.5))
    # 200 samples at 8 kHz -> 25 at 1 kHz: two of the four 16-sample patches hold audio, the rest is padding.
    assert torch.allclose(inputs["audio"][0, :25], torch.tensor(0.5), atol=0.02)
    assert (inputs["audio"][0, 25:] == 0).all() and not inputs["audio_mask"][0, 2:].any()
    # 3 frames -> 4 evenly spaced: 0, 1, 1, 2.
    levels = [(10 * t / 255 - 0.1) / 0.5 for t in (0, 1, 1, 2)]
    assert torch.allclose(inputs["video"][0].mean(dim=(1, 2, 3)), torch.tensor(levels), atol=1e-6)


def test_normalized_patch_targets_are_each_patch_standardised(tmp_path):
    """data.masking.normalized_patches: each hidden image patch's target is its own values standardised (mean 0,
    standard deviation 1), the same patches as the raw targets."""
    rng = np.random.default_rng(0)
    write_shards(tmp_path, [4], lambda s, i: {"__key__": f"k{i}", "png": png_bytes(
        rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))})
    batches = []
    for normalized in (False, True):
        cfg = data_config([str(tmp_path)], num_workers=0, batch_size=4, shuffle_buffer=0,
                          masking=MaskingConfig(image=0.5, normalized_patches=normalized))
        batches.append(next(iter(DataStream(cfg, multimodal_model()))))
    raw, normalized = (b["targets"]["image"] for b in batches)
    assert torch.equal(batches[0]["decode"]["image"], batches[1]["decode"]["image"])
    assert torch.allclose(normalized, (raw - raw.mean(-1, keepdim=True)) / raw.std(-1, keepdim=True), atol=1e-4)
    assert torch.allclose(normalized.mean(-1), torch.tensor(0.0), atol=1e-5)


def test_two_ranks_two_workers_disjoint_shards_equal_batches(tmp_path):
    """Eight shards of unequal sizes, four streams (the largest highly composite number not above 8 that the four
    readers divide), one a reader: the readers' shards are disjoint and cover the dataset, each rank sees only its
    own, and both ranks make the same number of batches although one loses most of a big shard."""
    paths = write_shards(tmp_path, [3, 40, 7, 25, 12, 9, 6, 18])
    truncate_inside_sample(paths[1], 5)
    cfg = data_config([str(tmp_path)], epoch_samples=96)
    streams = [DataStream(cfg, text_model(), rank=r, world_size=2) for r in range(2)]
    assert [s.plan.streams for s in streams] == [4, 4]
    runs = [list(s) for s in streams]
    assert [len(run) for run in runs] == [12, 12] == [len(s) for s in streams]
    planned = [{f"s{int(Path(u).stem[-6:]):02d}" for u in s.shards(0, w)} for s in streams for w in range(2)]
    assert all(planned) and sum(map(len, planned)) == len(set().union(*planned)) == 8
    for rank, run in enumerate(runs):
        seen = {shard_of(k) for b in run for k in b["keys"]}
        assert seen <= planned[2 * rank] | planned[2 * rank + 1]
    assert sum(s.skipped().get("corrupt_tar", 0) for s in streams) >= 1


def test_epochs_reshuffle_shards_with_the_seed(tmp_path):
    write_shards(tmp_path, [5] * 12)
    a, b = (DataStream(data_config([str(tmp_path)]), text_model(), rank=1, world_size=2) for _ in range(2))
    other = DataStream(data_config([str(tmp_path)], seed=1), text_model(), rank=1, world_size=2)
    assert a.shards(0, 0) == b.shards(0, 0) and a.shards(3, 1) == b.shards(3, 1)
    assert any(a.shards(0, w) != a.shards(1, w) for w in range(2))
    assert any(a.shards(0, w) != other.shards(0, w) for w in range(2))


def test_too_few_shards_is_a_clear_error_unless_resampling(tmp_path):
    write_shards(tmp_path, [20, 20, 20])
    with pytest.raises(DataError, match=r"3 shards for data.streams 4 .*data.resample=true"):
        DataStream(data_config([str(tmp_path)]), text_model(), rank=0, world_size=2)
    cfg = data_config([str(tmp_path)], resample=True)
    runs = [list(DataStream(cfg, text_model(), rank=r, world_size=2)) for r in range(2)]
    assert [len(run) for run in runs] == [7, 7]
    assert len({k for run in runs for b in run for k in b["keys"]}) > 20


def test_datasets_mix_by_weight(tmp_path):
    write_shards(tmp_path / "a", [50] * 4)
    write_shards(tmp_path / "b", [50] * 4, first=10)
    cfg = data_config([str(tmp_path / "a"), str(tmp_path / "b")], weights=[3.0, 1.0], batch_size=20,
                      epoch_samples=600)
    keys = [k for b in DataStream(cfg, text_model()) for k in b["keys"]]
    share = sum(int(shard_of(k)[1:]) < 10 for k in keys) / len(keys)
    assert len(keys) == 600 and 0.69 < share < 0.81


def test_validation_repeats_the_same_batches(tmp_path):
    write_shards(tmp_path, [9, 9])
    stream = ValidationPass(data_config([str(tmp_path)]), text_model())
    first, second = list(stream), list(stream)
    assert [b["keys"] for b in first] == [b["keys"] for b in second]
    assert all(torch.equal(x["inputs"]["text"], y["inputs"]["text"]) for x, y in zip(first, second))
    # two workers, one shard each, batches of 4 taken in turn; each worker's last batch padded with empty rows
    pad = [""] * 3
    assert [b["keys"] for b in first] == [
        [f"s00-{i:04d}" for i in range(4)], [f"s01-{i:04d}" for i in range(4)],
        [f"s00-{i:04d}" for i in range(4, 8)], [f"s01-{i:04d}" for i in range(4, 8)],
        ["s00-0008", *pad], ["s01-0008", *pad]]
    last = first[-1]
    assert last["valid"].tolist() == [True, False, False, False]
    assert not last["inputs"]["text_mask"][1:].any() and (last["targets"]["text"][1:] == IGNORE_INDEX).all()


def test_validation_reads_every_sample_once_and_masks_it_alike_on_any_layout(tmp_path):
    """Uneven shards (and fewer shards than readers) on any number of ranks and workers: every sample of the split
    is in exactly one rank's batches, once, with the same masks on every layout; no shard count or sample count is
    too small."""
    write_shards(tmp_path, [7, 2, 11])
    masks = []
    for world_size, workers in [(1, 0), (2, 2), (3, 1)]:
        cfg = data_config([str(tmp_path)], num_workers=workers, batch_size=4)
        batches = [b for rank in range(world_size) for b in ValidationPass(cfg, text_model(), rank, world_size)]
        masks.append({key: b["decode"]["text"][row].tolist() for b in batches for row, key in enumerate(b["keys"])
                      if key})
        assert sum(len(b["keys"]) - b["keys"].count("") for b in batches) == len(masks[-1])
        assert sorted(masks[-1]) == sorted(f"s{s:02d}-{i:04d}" for s, n in enumerate([7, 2, 11]) for i in range(n))
        padding = ValidationPass(cfg, text_model(), 0, world_size).padding()
        assert padding["keys"] == [""] * 4 and not padding["valid"].any() and not padding["inputs"]["text_mask"].any()
    assert masks[0] == masks[1] == masks[2]


def test_bad_config_values_name_their_key(tmp_path):
    write_shards(tmp_path, [8, 8])
    with pytest.raises(ConfigError, match=r"data.weights: has 1 entries for 2 train_shards"):
        DataStream(data_config([str(tmp_path), str(tmp_path)], weights=[1.0]), text_model())
    with pytest.raises(ConfigError, match=r"data.masking.image: must be in \[0, 1\]"):
        DataStream(data_config([str(tmp_path)], masking=MaskingConfig(image=1.5)), text_model())
    with pytest.raises(DataError, match="data.train_shards is empty"):
        DataStream(data_config([]), text_model())
    with pytest.raises(DataError, match="less than one global batch of 64"):
        DataStream(data_config([str(tmp_path)], batch_size=64), text_model())


def test_text_only_stream_passes_over_samples_without_text(tmp_path, caplog):
    """An image-only sample is not read by a text model by design: counted as unused, quietly, and announced once at
    the start from the index; a sample holding no medium at all (metadata alone) is a skip, logged."""
    def sample(s: int, i: int) -> dict:
        if i % 3 == 0:
            return {"__key__": f"s{s:02d}-{i:04d}", "png": png_bytes(np.zeros((4, 4, 3), np.uint8))}
        return {"__key__": f"s{s:02d}-{i:04d}", "json": b"{}"} if i == 1 else text_sample(s, i)
    write_shards(tmp_path, [6, 6], sample)
    index = json.loads((tmp_path / "index.json").read_text())
    for entry in index["shards"]:  # as data_prep records them
        entry["layouts"] = {"png": 2, "json": 1, "txt": 3}
    (tmp_path / "index.json").write_text(json.dumps(index))
    with caplog.at_level(logging.INFO, logger="pretrain.data"):
        stream = DataStream(data_config([str(tmp_path)], num_workers=1, shuffle_buffer=0, epoch_samples=8),
                            text_model())
        keys = [k for b in stream for k in b["keys"]]
    assert len(keys) == 8 and all(int(k[-4:]) % 3 and int(k[-4:]) != 1 for k in keys)
    assert Counter(stream.skipped())["unused"] >= 2 and Counter(stream.skipped())["no_usable_modality"] >= 1
    messages = [r.getMessage() for r in caplog.records]
    assert ("data (train): 4 samples hold nothing this run reads (it reads ['text']): 4 with image only (png); "
            "passed over and counted as unused_samples, not as skipped") in messages

    counter = SkipCounter()  # the workers' counting, in this process: the unused sample logs nothing
    select = sample_selector([], ["txt"])
    with caplog.at_level(logging.WARNING, logger="pretrain.shards.read"):
        assert select({"__key__": "a", "__url__": "u", "png": b""}, counter) is None
        assert select({"__key__": "b", "__url__": "u", "json": b""}, counter) is None
    assert counter.total == {"unused": 1, "no_usable_modality": 1}
    assert [r.getMessage() for r in caplog.records if r.name == "pretrain.shards.read"] == [
        "data: skipped no_usable_modality at u:b: keys ['__key__', '__url__', 'json']"]


WORKER_SIGNALS = """
import itertools, sys
from pretrain.data import DataStream
from test_data_shards import data_config, text_model
batches = iter(DataStream(data_config([sys.argv[1]], num_workers=2, prefetch_factor=1), text_model()))
next(batches)
print("started", flush=True)
sys.stdin.readline()  # meanwhile the test signals the workers and their fork server
print("batches", sum(1 for _ in itertools.islice(batches, 4)), flush=True)  # 2 prefetched before the signals
if sys.stdin.readline() == "exit\\n":  # with the workers running: multiprocessing's exit stops them (SIGTERM)
    sys.exit(3)
sys.stdin.readline()  # meanwhile the test kills this process
"""


EPOCHS_UNDER_SIGNALS = """
import sys
from pretrain.data import DataStream
from test_data_shards import data_config, text_model
stream = DataStream(data_config([sys.argv[1]], num_workers=2, prefetch_factor=1), text_model())
print("started", flush=True)
print("batches", sum(1 for epoch in range(int(sys.argv[2])) for _ in stream), flush=True)
"""


def descendants(pid: int) -> List[int]:
    return [d for child in children(pid) for d in [child] + descendants(child)]


@pytest.mark.slow
def test_workers_started_while_slurm_signals_survive(tmp_path):
    """Each epoch starts new workers, and Slurm may signal the job step while they start: a worker takes SIGTERM and
    SIGUSR1 without effect from its first instruction (before torch's worker loop and our init replace or block its
    handlers), not only once it serves. Every process the trainer started is signalled over and over while it reads
    several epochs."""
    epochs = 8
    write_shards(tmp_path / "shards", [8] * 2)
    trainer = subprocess.Popen([sys.executable, "-c", EPOCHS_UNDER_SIGNALS, str(tmp_path / "shards"), str(epochs)],
                               cwd=ROOT, env=dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert trainer.stdout.readline() == "started\n"
        signalled, deadline = set(), time.monotonic() + 120
        while trainer.poll() is None:
            assert time.monotonic() < deadline, "the trainer did not finish its epochs"
            for pid in descendants(trainer.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
                    os.kill(pid, signal.SIGUSR1)
                    signalled.add(pid)
        out, err = trainer.communicate(timeout=60)
        assert trainer.returncode == 0, err[-3000:]
        assert out == f"batches {epochs * 4}\n"  # 16 samples in batches of 4
        assert len(signalled) >= 2 * epochs  # the workers of every epoch, at least
    finally:
        trainer.kill()


@pytest.mark.parametrize("end", ["exit", "SIGKILL"])
def test_workers_outlive_slurms_signals_but_not_the_trainer(tmp_path, end):
    """Slurm signals every process of a job step (SIGTERM at a requeue or preemption, SIGUSR1 before the time limit):
    the data-loader workers and their fork server take both without effect, so the trainer reads on while it
    checkpoints. When the trainer ends, exiting with its workers running (multiprocessing stops them with SIGTERM,
    then waits for them) or killed by SIGKILL, its workers and fork server end too."""
    write_shards(tmp_path / "shards", [16] * 2)
    trainer = subprocess.Popen([sys.executable, "-c", WORKER_SIGNALS, str(tmp_path / "shards")], cwd=ROOT,
                               env=dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}"), stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    try:
        assert trainer.stdout.readline() == "started\n"
        servers = [pid for pid in children(trainer.pid) if "forkserver" in Path(f"/proc/{pid}/cmdline").read_text()]
        workers = rank_and_workers(trainer.pid)[1:]
        assert len(servers) == 1 and len(workers) == 2
        for pid in servers + workers:
            os.kill(pid, signal.SIGTERM)
            os.kill(pid, signal.SIGUSR1)
        trainer.stdin.write("\n")
        trainer.stdin.flush()
        assert trainer.stdout.readline() == "batches 4\n"  # each worker made batches after the signals
        if end == "exit":
            trainer.stdin.write("exit\n")
            trainer.stdin.flush()
        else:
            trainer.kill()
        assert trainer.wait(30) == (3 if end == "exit" else -signal.SIGKILL)
        assert all(ended(pid, 30) for pid in workers + servers)
    finally:
        trainer.kill()


def test_a_sample_is_cropped_and_masked_alike_in_any_batch_size(tmp_path):
    """Each sample's random choices come from its place in the global order, not from the batch that holds it:
    batches of 8 and of 4 hold the same samples with the same crops, masks and targets (what makes gradient
    accumulation and another number of processes exact)."""
    write_shards(tmp_path, [12, 12])

    def rows(batch_size: int) -> dict:
        cfg = data_config([str(tmp_path)], num_workers=1, batch_size=batch_size, epoch_samples=16, random_crop=True,
                          shuffle_buffer=0)
        return {key: tuple(b[part]["text"][i] for part in ("inputs", "decode", "targets"))
                for b in DataStream(cfg, text_model()) for i, key in enumerate(b["keys"])}

    whole, halves = rows(8), rows(4)
    assert sorted(whole) == sorted(halves) and len(whole) == 16
    assert all(torch.equal(x, y) for key in whole for x, y in zip(whole[key], halves[key]))
    assert any((targets != IGNORE_INDEX).any() for _, _, targets in whole.values())
