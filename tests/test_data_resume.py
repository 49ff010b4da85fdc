"""Exact resume: a stream restored from the state after batch k yields exactly batches k+1.. of an uninterrupted
stream -- 2 ranks, 2 DataLoader workers, across an epoch boundary, with skipped samples counted the same."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
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


def test_resume_under_another_layout_is_refused(tmp_path):
    write_shards(tmp_path, [8] * 4, multimodal_sample)
    stream = DataStream(data_config([str(tmp_path)]), multimodal_model())
    next(iter(stream))
    state = stream.state_dict()
    other = DataStream(data_config([str(tmp_path)], num_workers=1), multimodal_model())
    with pytest.raises(DataError, match=r"num_workers: 2 -> 1.*strict=False"):
        other.load_state_dict(state)
    other.load_state_dict(state, strict=False)
    assert (other.epoch, other.batches) == (0, 1)


@pytest.mark.parametrize("saved_world,batches,new_world,expected", [(2, 3, 1, 6), (1, 5, 2, 2), (2, 7, 1, 14), (1, 16, 3, 5)])
def test_resume_under_another_world_size_keeps_the_samples_seen(tmp_path, saved_world, batches, new_world, expected):
    """Two ranks that each took 3 batches of 2 saw 12 samples: one rank continues after its 6th batch; the position
    never passes the end of the epoch."""
    write_shards(tmp_path, [8] * 4, multimodal_sample)
    saved = DataStream(data_config([str(tmp_path)], batch_size=2, num_workers=1), multimodal_model(), 0, saved_world)
    state = dict(saved.state_dict(), batches=batches)
    resumed = DataStream(data_config([str(tmp_path)], batch_size=2, num_workers=1), multimodal_model(), 0, new_world)
    resumed.load_state_dict(state, strict=False)
    assert len(resumed) == 16 // new_world
    assert (resumed.epoch, resumed.batches) == (0, expected)
    remaining = len(resumed) - expected or len(resumed)  # a finished epoch goes on with the next one
    assert len(list(resumed)) == remaining


def test_order_depends_on_the_seed(tmp_path):
    write_shards(tmp_path, [8] * 4, multimodal_sample)
    keys = [[k for b in DataStream(data_config([str(tmp_path)], seed=s), multimodal_model()) for k in b["keys"]]
            for s in (0, 0, 1)]
    assert keys[0] == keys[1] != keys[2]
    assert np.unique(keys[0]).size > 1
