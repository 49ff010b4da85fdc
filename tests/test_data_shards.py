"""Real tar shards for the data-stream tests (written with webdataset's TarWriter), and checks of the shard specs.

The other ``test_data_*`` modules import the helpers from here.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import numpy as np
import pytest
import soundfile
import torch
import webdataset as wds
from PIL import Image

from pretrain.config import AudioConfig, DataConfig, ImageConfig, ModelConfig, TextConfig, VideoConfig
from pretrain.data import DataError, DataStream, expand_spec
from pretrain.shard_format import writing_marker

Sample = Dict[str, object]


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def flac_bytes(wave: np.ndarray, rate: int) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, wave.astype(np.float32), rate, format="FLAC")
    return buffer.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def text_sample(shard: int, i: int) -> Sample:
    return {"__key__": f"s{shard:02d}-{i:04d}", "txt": f"shard {shard} sample {i} " * (1 + i % 4)}


def multimodal_sample(shard: int, i: int) -> Sample:
    """Every modality on some samples, none missing text, deterministic content."""
    rng = np.random.default_rng(shard * 1000 + i)
    sample = {"__key__": f"s{shard:02d}-{i:04d}", "txt": f"caption {i} of shard {shard}", "cls": str(i % 5)}
    if i % 2 == 0:
        sample["png"] = png_bytes(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8))
    if i % 3 == 0:
        sample["flac"] = flac_bytes(rng.standard_normal(300) * 0.1, 8000)
    if i % 4 == 0:
        sample["npy"] = npy_bytes(rng.integers(0, 256, (3, 10, 12, 3), dtype=np.uint8))
    return sample


def write_shards(
    directory: Path, sizes: Sequence[int], make: Callable[[int, int], Sample] = text_sample, index: bool = True,
    first: int = 0,
) -> List[Path]:
    """One tar per entry of ``sizes`` (shard ids from ``first``), plus ``index.json`` in data_prep's format."""
    directory.mkdir(parents=True, exist_ok=True)
    paths, entries = [], []
    for shard, size in enumerate(sizes, start=first):
        path = directory / f"shard-{shard:06d}.tar"
        with wds.TarWriter(str(path)) as writer:
            for i in range(size):
                writer.write(make(shard, i))
        paths.append(path)
        entries.append({"name": path.name, "samples": size, "bytes": path.stat().st_size, "modalities": {}})
    if index:
        (directory / "index.json").write_text(json.dumps({"shards": entries}))
    return paths


def truncate_inside_sample(path: Path, sample: int) -> None:
    """Cut ``path`` inside the data of sample number ``sample`` (0-based): that many samples stay readable."""
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    keys = list(dict.fromkeys(m.name.split(".")[0] for m in members))
    member = next(m for m in members if m.name.startswith(keys[sample] + "."))
    data = path.read_bytes()
    path.write_bytes(data[: member.offset_data + max(1, member.size // 2)])


def text_model(max_length: int = 32) -> ModelConfig:
    return ModelConfig(text=TextConfig(max_length=max_length))


def multimodal_model() -> ModelConfig:
    """A tiny model reading every streamed modality, with labels."""
    return ModelConfig(
        d_model=32, num_latents=8, d_latents=32, num_self_attends_per_block=1, num_self_attention_heads=2,
        num_cross_attention_heads=2, decoder_num_heads=2, decoder_qk_channels=16, num_classes=5,
        text=TextConfig(max_length=32),
        image=ImageConfig(size=[8, 8], channels=3, patch_size=4, fourier_bands=2),
        audio=AudioConfig(num_samples=64, patch_size=16, fourier_bands=2),
        video=VideoConfig(frames=4, size=[8, 8], channels=3, tubelet=[2, 4, 4], fourier_bands=2),
    )


def data_config(shards: List[str], **overrides) -> DataConfig:
    """A small stream's config; a failed shard is not read again unless a test asks (each retry waits a second)."""
    values = dict(train_shards=shards, val_shards=shards, batch_size=4, num_workers=2, shuffle_buffer=16,
                  audio_sample_rate=1000, shard_retries=0)
    values.update(overrides)
    return DataConfig(**values)


def shard_of(key: str) -> str:
    return key.split("-")[0]


def assert_batches_equal(got: List[dict], expected: List[dict]) -> None:
    """Exact equality of every tensor and key list, recursively."""
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.keys() == b.keys()
        for name in a:
            if isinstance(a[name], dict):
                assert_batches_equal([a[name]], [b[name]])
            elif torch.is_tensor(a[name]):
                assert torch.equal(a[name], b[name]), name
            else:
                assert a[name] == b[name], name


def test_brace_pattern_finds_counts_in_the_index(tmp_path):
    write_shards(tmp_path, [3, 4, 5])
    shards = expand_spec(str(tmp_path / "shard-{000000..000002}.tar"), "data.train_shards[0]")
    assert [(Path(s.url).name, s.samples) for s in shards] == [
        ("shard-000000.tar", 3), ("shard-000001.tar", 4), ("shard-000002.tar", 5)]
    assert [s.samples for s in expand_spec(str(tmp_path), "k")] == [3, 4, 5]


def test_a_folder_of_shard_directories_is_one_dataset(tmp_path):
    """One ``data_prep shard`` output per corpus file, all under one folder: the folder names them all."""
    write_shards(tmp_path / "c4" / "00001", [4, 5])
    write_shards(tmp_path / "c4" / "00000", [3])
    (tmp_path / "c4" / "notes").mkdir()  # no index: not a shard directory
    shards = expand_spec(str(tmp_path / "c4"), "k")
    assert [(str(Path(s.url).relative_to(tmp_path / "c4")), s.samples) for s in shards] == [
        ("00000/shard-000000.tar", 3), ("00001/shard-000000.tar", 4), ("00001/shard-000001.tar", 5)]
    (tmp_path / "c4" / "00001" / "index.json").unlink()  # as a data_prep run cut off leaves it
    with pytest.raises(DataError, match=r"k: 1 of the shard directories in .*c4' hold shards but no index.json "
                                        r"\(first: 00001\): a data_prep shard run cut off there; finish it "
                                        r"\(the same command with --resume\)"):
        expand_spec(str(tmp_path / "c4"), "k")
    (tmp_path / "c4" / "00000" / "index.json").unlink()  # every one cut off: said so, not "no shards here"
    (tmp_path / "c4" / "00000" / ".writing").write_text("{}")
    with pytest.raises(DataError, match=r"k: 2 of the shard directories in .*c4' hold shards but no index.json "
                                        r"\(first: 00000\)"):
        expand_spec(str(tmp_path / "c4"), "k")
    (tmp_path / "c4" / "00001" / ".writing").write_text(writing_marker("shard", stopped="rejected 50.0% of 18 inputs"))
    with pytest.raises(DataError, match=r"k: '.*c4/00001' is a data_prep shard output without its index.json: "
                                        r"data_prep stopped it: rejected 50.0% of 18 inputs, and run the same "
                                        r"command with --overwrite$"):  # stopped: no run to finish with --resume
        expand_spec(str(tmp_path / "c4"), "k")


def test_pipe_specs_and_joined_specs_expand(tmp_path):
    write_shards(tmp_path / "a", [2, 2])
    spec = f"pipe:cat {tmp_path}/a/shard-{{000000..000001}}.tar::{tmp_path / 'a'}"
    shards = expand_spec(spec, "k")
    assert [s.url for s in shards[:2]] == [f"pipe:cat {tmp_path}/a/shard-00000{i}.tar" for i in range(2)]
    assert [s.samples for s in shards] == [None, None, 2, 2]


def test_missing_shard_and_directory_without_shards_are_clear_errors(tmp_path):
    write_shards(tmp_path, [2])
    with pytest.raises(DataError, match=r"data.train_shards\[1\]: shard .*shard-000001.tar.* does not exist"):
        expand_spec(str(tmp_path / "shard-{000000..000001}.tar"), "data.train_shards[1]")
    with pytest.raises(DataError, match=r"k: 'ftp://h/shard-000000.tar': unknown scheme; shards are paths, "
                                        r"http\(s\)://, s3:// or gs:// URLs, or pipe:COMMAND"):
        expand_spec("ftp://h/shard-{000000..000001}.tar", "k")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"neither index.json nor shards \(\*.tar, \*.tar.gz, \*.tgz\)"):
        expand_spec(str(tmp_path / "empty"), "k")
    (tmp_path / "index.json").write_text("{not json")
    with pytest.raises(DataError, match="not a valid shard index"):
        expand_spec(str(tmp_path), "k")


def test_unknown_counts_need_epoch_samples(tmp_path):
    write_shards(tmp_path, [4, 4], index=False)
    with pytest.raises(DataError, match="set data.epoch_samples"):
        DataStream(data_config([str(tmp_path)], num_workers=1), text_model())
    assert len(DataStream(data_config([str(tmp_path)], num_workers=1, epoch_samples=8), text_model())) == 2
