"""Exact resume: a stream restored from the state after batch k yields exactly batches k+1.. of an uninterrupted
stream -- 2 ranks, 2 DataLoader workers, across an epoch boundary, with skipped samples counted the same."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
from test_data_shards import assert_batches_equal, data_config, multimodal_model, multimodal_sample, write_shards

from pretrain.data import DataError, DataStream


def _damaged_sample(shard: int, i: int) -> dict:
    """Every shard has an undecodable PNG (counted when batching) and a sample without text (counted when reading,
    so also while a resumed worker replays its stream: those must not count twice)."""
    sample = multimodal_sample(shard, i)
    if i == 3:
        sample["png"] = b"\x89PNG\r\n\x1a\n" + bytes(range(64))
    if i == 4:
        sample.pop("txt")
    return sample


def _run(stream: DataStream, batches: int) -> tuple[list, list]:
    """``batches`` batches over as many epochs as needed, with the state after each."""
    out, states = [], []
    while len(out) < batches:
        for batch in itertools.islice(stream, batches - len(out)):
            out.append(batch)
            states.append(copy.deepcopy(stream.state_dict()))
    return out, states


@pytest.mark.slow
@pytest.mark.parametrize("rank", [0, 1])
def test_resume_yields_exactly_the_remaining_batches(tmp_path, rank):
    write_shards(tmp_path, [12, 8, 14, 10, 7, 11], _damaged_sample)
    cfg = data_config([str(tmp_path)], batch_size=3, require=["txt"], epoch_samples=56)
    reference = DataStream(cfg, multimodal_model(), rank=rank, world_size=2)
    per_epoch = len(reference)
    total = 2 * per_epoch + 2
    expected, states = _run(reference, total)
    assert per_epoch == 9 and any(not b["valid"].all() for b in expected)
    for k in (3, per_epoch, per_epoch + 4):  # mid-epoch (odd, so worker 1 comes first), epoch end, next epoch
        resumed = DataStream(cfg, multimodal_model(), rank=rank, world_size=2)
        resumed.load_state_dict(copy.deepcopy(states[k - 1]))
        got, _ = _run(resumed, total - k)
        assert_batches_equal(got, expected[k:])
        assert resumed.skipped() == reference.skipped()
        assert {"undecodable:png", "missing_key:txt"} <= set(reference.skipped())
        assert resumed.state_dict() == reference.state_dict()


def _rows_by_key(batches: list) -> dict:
    """Each sample's row (text ids, decoded positions and targets) by key: what a global batch holds, however split."""
    return {key: (b["inputs"]["text"][i], b["decode"]["text"][i], b["targets"]["text"][i])
            for b in batches for i, key in enumerate(b["keys"])}


def _global_batches(cfg, world_size: int, steps: int, state: dict = None) -> list:
    """The first ``steps`` global batches (from ``state`` on) of ``world_size`` ranks, as rows by key."""
    streams = [DataStream(cfg, multimodal_model(), rank, world_size, 8) for rank in range(world_size)]
    for stream in streams:
        if state is not None:
            stream.load_state_dict(copy.deepcopy(state))
    per_rank = [_run(stream, steps * stream.accumulation)[0] for stream in streams]
    return [_rows_by_key([b for rank in per_rank for b in rank[t * len(rank) // steps:(t + 1) * len(rank) // steps]])
            for t in range(steps)]


def _same(got: list, want: list) -> None:
    assert [sorted(g) for g in got] == [sorted(w) for w in want]
    for g, w in zip(got, want):
        assert all(all(torch.equal(x, y) for x, y in zip(g[k], w[k])) for k in w)


def test_any_shape_reads_the_same_global_batches_and_resumes_into_another(tmp_path):
    """A global batch of 8 from 4 streams: 2 ranks x 2 workers x micro-batches of 4, 1 rank x 1 worker x 2
    accumulated micro-batches of 4, 1 rank x 2 workers x one of 8 read the same samples with the same masks at every
    step, across an epoch; a state saved by one resumes on another with the batches the first would have had."""
    write_shards(tmp_path, [8] * 4, multimodal_sample)
    shapes = [(2, dict(batch_size=4, num_workers=2)), (1, dict(batch_size=4, num_workers=1)),
              (1, dict(batch_size=8, num_workers=2))]
    runs = [_global_batches(data_config([str(tmp_path)], **shape), world, 6) for world, shape in shapes]
    for other in runs[1:]:
        _same(other, runs[0])
    saved = DataStream(data_config([str(tmp_path)], batch_size=4, num_workers=2), multimodal_model(), 0, 2, 8)
    _run(saved, 3)
    assert (saved.epoch, saved.steps) == (0, 3)
    resumed = _global_batches(data_config([str(tmp_path)], batch_size=4, num_workers=1), 1, 3, saved.state_dict())
    _same(resumed, runs[0][3:])


def test_resume_under_another_order_is_refused(tmp_path):
    write_shards(tmp_path, [8] * 4, multimodal_sample)
    stream = DataStream(data_config([str(tmp_path)]), multimodal_model())
    next(iter(stream))
    other = DataStream(data_config([str(tmp_path)], seed=1), multimodal_model())
    with pytest.raises(DataError, match=r"data.new_order: .*\(seed: 0 -> 1\).*set data.new_order=true"):
        other.load_state_dict(stream.state_dict())


def test_order_depends_on_the_seed(tmp_path):
    write_shards(tmp_path, [8] * 4, multimodal_sample)
    keys = [[k for b in DataStream(data_config([str(tmp_path)], seed=s), multimodal_model()) for k in b["keys"]]
            for s in (0, 0, 1)]
    assert keys[0] == keys[1] != keys[2]
    assert np.unique(keys[0]).size > 1


def test_another_order_goes_on_with_new_order_from_the_same_samples(tmp_path):
    """data.new_order: a resume under another global batch continues at the same number of samples into the epoch."""
    write_shards(tmp_path, [8] * 4, multimodal_sample)
    stream = DataStream(data_config([str(tmp_path)], batch_size=4), multimodal_model(), 0, 1, 8)
    _run(stream, 6)  # 3 steps of 2 micro-batches
    other = DataStream(data_config([str(tmp_path)], batch_size=4, new_order=True), multimodal_model(), 0, 1, 4)
    other.load_state_dict(stream.state_dict())
    assert (other.epoch, other.steps) == (0, 6)  # 3 steps of 8 samples: 6 of 4
