"""The stream's pieces on their own: masking, transforms, decoding, shard assignment, config checks."""

from __future__ import annotations

import importlib.util
import io

import numpy as np
import pytest
import torch
from PIL import Image
from test_data_shards import npy_bytes

from pretrain.config import ConfigError, DataConfig, ImageConfig, ModelConfig, TextConfig, validate_data_config
from pretrain.data.decode import DecodeError, decode
from pretrain.data.parts import micro_batches, packed, unpacked
from pretrain.data.plan import Dataset, balanced_split, first_of_stream, stream_count
from pretrain.modalities.masking import num_predicted, patch_positions, span_positions, text_positions
from pretrain.modalities.transforms import crop_or_pad, resample, to_pixels
from pretrain.shards import Shard


def _runs(positions: np.ndarray) -> int:
    return int(1 + np.count_nonzero(np.diff(positions) > 1))


@pytest.mark.parametrize("length,count,mean_span", [(100, 15, 3.0), (10, 10, 3.0), (7, 1, 3.0), (2048, 307, 5.0)])
def test_span_masking_hides_exactly_count_bytes_in_spans(length, count, mean_span):
    rng = np.random.default_rng(0)
    for _ in range(20):
        positions = span_positions(length, count, mean_span, rng)
        assert len(positions) == count == len(np.unique(positions))
        assert np.all(np.diff(positions) > 0) and positions[0] >= 0 and positions[-1] < length
        spans = min(max(1, round(count / mean_span)), count, length - count + 1)
        assert abs(_runs(positions) - spans) <= 1  # a span wrapping around the end is cut in two


def test_span_masking_covers_every_position_over_many_draws():
    rng = np.random.default_rng(1)
    hits = np.zeros(30, int)
    for _ in range(2000):
        hits[span_positions(30, 6, 3.0, rng)] += 1
    assert hits.min() > 0.8 * hits.mean() and hits.max() < 1.2 * hits.mean()


def test_text_positions_pad_to_fixed_slots():
    rng = np.random.default_rng(0)
    positions, used = text_positions(np.array([20, 3, 0]), 0.25, 3.0, 5, [rng] * 3)
    assert positions.shape == used.shape == (3, 5)
    assert used.sum(axis=1).tolist() == [5, 1, 0]
    assert (positions[~used] == 0).all() and (positions[1, :1] < 3).all()


def test_patch_positions_choose_only_valid_patches():
    rng = np.random.default_rng(0)
    valid = np.zeros((3, 10), bool)
    valid[0] = True
    valid[1, :4] = True
    positions, used = patch_positions(valid, 0.5, num_predicted(0.5, 10), [rng] * 3)
    assert positions.shape == (3, 5) and used.sum(axis=1).tolist() == [5, 2, 0]
    assert len(set(positions[0].tolist())) == 5 and (positions[1][used[1]] < 4).all()
    assert num_predicted(0.0, 10) == 0 and num_predicted(0.01, 10) == 1


def test_crop_pad_and_resample():
    rng = np.random.default_rng(0)
    values = np.arange(10)
    assert crop_or_pad(values, 4, False, rng)[0].tolist() == [0, 1, 2, 3]
    cropped, n = crop_or_pad(values, 4, True, rng)
    assert n == 4 and np.all(np.diff(cropped) == 1)
    padded, n = crop_or_pad(values, 12, True, rng)
    assert n == 10 and padded[10:].tolist() == [0, 0]
    tone = np.sin(2 * np.pi * 50 * np.arange(8000) / 8000).astype(np.float32)
    low = resample(tone, 8000, 1000)
    centres = ((np.arange(1000) + 0.5) * 8 - 0.5) / 8000  # output sample j covers input samples 8j .. 8j+7
    assert len(low) == 1000 and np.allclose(low[10:-10], np.sin(2 * np.pi * 50 * centres)[10:-10], atol=0.02)
    noise = resample(np.random.default_rng(0).standard_normal(8000).astype(np.float32), 8000, 1000)
    assert noise.std() < 0.6  # antialiased: most of white noise's energy lies above the new Nyquist frequency


def test_images_keep_aspect_and_get_centre_cropped():
    pixels = np.zeros((20, 10), np.uint8)
    pixels[10:] = 255
    out = to_pixels(Image.fromarray(pixels), [8, 8], 3)
    assert out.shape == (8, 8, 3)
    assert (out[:3] < 10).all() and (out[5:] > 245).all()


def test_decoders_name_the_key_that_failed():
    with pytest.raises(DecodeError, match=r"^\.png: "):
        decode("png", b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DecodeError, match=r"^\.txt: .*utf-8"):
        decode("txt", b"\xff\xfe bad")
    with pytest.raises(DecodeError, match=r"^\.npy: .*uint8"):
        decode("npy", npy_bytes(np.zeros((2, 3), np.float32)))
    assert decode("txt", "é".encode()).tolist() == [0xC3, 0xA9]


def test_mp4_clips_decode_with_pyav_or_name_the_fix():
    if importlib.util.find_spec("av") is None:
        with pytest.raises(DecodeError, match=r"^\.mp4: .*pip install av"):
            decode("mp4", b"\x00\x00\x00\x18ftypmp42")
        return
    import av

    buffer = io.BytesIO()
    with av.open(buffer, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        for t in range(6):
            frame = av.VideoFrame.from_ndarray(np.full((16, 16, 3), 40 * t, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    video = decode("mp4", buffer.getvalue())
    assert video.shape == (6, 16, 16, 3) and video.dtype == np.uint8
    assert np.allclose(video.mean(axis=(1, 2, 3)), [40 * t for t in range(6)], atol=6)
    with pytest.raises(DecodeError, match=r"^\.mp4: "):
        decode("mp4", buffer.getvalue()[:100])


def test_balanced_split_evens_out_sample_counts():
    shards = [Shard(f"s{i}", n) for i, n in enumerate([40, 3, 25, 12, 9, 7, 18, 6])]
    parts = balanced_split(shards, 4)
    loads = sorted(sum(s.samples for s in part) for part in parts)
    assert loads[-1] == 40 and loads[-2] - loads[0] <= 3  # round-robin would give 10 .. 49
    assert sorted(s.url for p in parts for s in p) == sorted(s.url for s in shards)
    assert all([s.url for s in p] == sorted((s.url for s in p), key=lambda u: int(u[1:])) for p in parts)


def test_global_order_arithmetic():
    """Global sample g is sample g // S of stream g % S: each stream's first place at or after a global index."""
    for streams in (1, 4, 12):
        for start in range(30):
            for stream in range(streams):
                place = first_of_stream(start, stream, streams)
                assert place * streams + stream >= start and (place == 0 or (place - 1) * streams + stream < start)


def test_stream_count_fits_the_data_and_the_first_start():
    def datasets(*shards: int) -> list:
        return [Dataset(f"d{i}", "", [Shard(f"s{j}", 1) for j in range(n)], 1.0) for i, n in enumerate(shards)]

    assert stream_count(datasets(16, 30), DataConfig(), readers=2) == 12
    assert stream_count(datasets(16), DataConfig(), readers=4) == 12
    assert stream_count(datasets(7), DataConfig(), readers=4) == 4  # no highly composite number: a multiple of 4
    assert stream_count(datasets(7), DataConfig(), readers=4, saved=6) == 6  # a resume keeps its streams
    assert stream_count(datasets(7), DataConfig(streams=5), readers=4, saved=6) == 5


def _part(rows: int, first: int) -> dict:
    ids = torch.arange(first, first + rows)
    return {"inputs": {"text": ids[:, None] * torch.ones(3, dtype=torch.long), "text_mask": ids % 2 == 0,
                       "audio": ids[:, None] / torch.tensor([1.0, 2.0])},
            "decode": {"none": torch.zeros(rows, 0, dtype=torch.int16)}, "keys": [str(i) for i in ids.tolist()],
            "_skipped": {"undecodable:png": 1}}


def _same(a: object, b: object) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def test_a_part_travels_in_one_buffer_and_is_cut_into_micro_batches():
    """A worker's part crosses as one shared-memory buffer (the tensors views of it on arrival); a micro-batch within
    one part is a view of it, one across parts a copy of the rows it spans: the same rows either way."""
    parts = []
    for rows, first in ((6, 0), (2, 6)):
        buffer, layout = packed(_part(rows, first))
        assert buffer.is_shared() and buffer.dtype == torch.uint8
        part = unpacked((buffer, layout))
        assert _same(part, _part(rows, first))
        assert part["inputs"]["audio"].untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
        part.pop("_skipped")  # as the stream does: what is not rows leaves before the cut
        parts.append(part)
    whole = _part(8, 0)
    whole.pop("_skipped")
    first, second = micro_batches(parts, 4, 2, pin=False)
    storage = [p["inputs"]["text"].untyped_storage().data_ptr() for p in parts]
    assert first["inputs"]["text"].untyped_storage().data_ptr() == storage[0]
    assert second["inputs"]["text"].untyped_storage().data_ptr() not in storage
    for batch, rows in ((first, slice(0, 4)), (second, slice(4, 8))):
        assert _same(batch, {"inputs": {k: v[rows] for k, v in whole["inputs"].items()},
                             "decode": {k: v[rows] for k, v in whole["decode"].items()}, "keys": whole["keys"][rows]})
    with pytest.raises(RuntimeError, match="hold 8 rows, not 3 micro-batches of 4"):
        micro_batches(parts, 4, 3, pin=False)


def test_data_config_checks_name_the_key():
    image_model = ModelConfig(image=ImageConfig(channels=3))
    with pytest.raises(ConfigError, match=r"data.pixel_mean: needs 1 value or one per image/video channel \[3\]"):
        validate_data_config(DataConfig(pixel_mean=[0.5, 0.5]), image_model)
    with pytest.raises(ConfigError, match=r"data.require: unknown sample key 'text'"):
        validate_data_config(DataConfig(require=["text"]), ModelConfig())
    with pytest.raises(ConfigError, match=r"model.image.channels: .*RGB \(3\).* got 2"):
        validate_data_config(DataConfig(), ModelConfig(image=ImageConfig(channels=2)))
    with pytest.raises(ConfigError, match=r"model.text.vocab_size: .*>= 262"):
        validate_data_config(DataConfig(), ModelConfig(text=TextConfig(vocab_size=100)))
    validate_data_config(DataConfig(pixel_mean=[0.1, 0.2, 0.3], pixel_std=[1, 1, 1]), image_model)
