"""The shape of a run is not part of its result (issue 26, as far as it goes): how a step's global batch is split into
accumulation micro-batches changes neither the samples' masks nor the losses."""

from __future__ import annotations

import pytest
from test_train_engine import losses, run, tiny_config


@pytest.mark.slow
def test_accumulation_splits_of_one_global_batch_give_the_same_losses(tmp_path):
    """One process and one data-loader worker, a global batch of 8 as 1 x 8, 2 x 4 and 4 x 2 micro-batches: each sample
    is cropped and masked alike in any batch (its random choices come from its place in the stream), and each
    modality's loss is divided by its targets in the whole step. The multimodal samples hold texts of several lengths
    and not every modality, so micro-batches hold different numbers of targets: a mean of their own means (what a
    loss per micro-batch gives) would weigh a target by the micro-batch it falls in. Without dropout: its masks are
    drawn per micro-batch (seeded by rank, step and micro-step), not per sample."""
    found = {}
    for micro in (8, 4, 2):
        directory = tmp_path / f"micro{micro}"
        run(tiny_config(directory, data={"batch_size": micro}, train={"global_batch_size": 8},
                        model={"attention_dropout": 0.0}), nproc=1)
        found[micro] = losses(directory / "run")
    assert sorted(found[8]) == [1, 2, 3, 4, 5, 6]
    for micro in (4, 2):
        for step, want in found[8].items():
            assert set(found[micro][step]) == set(want), step
            for name, value in want.items():
                assert found[micro][step][name] == pytest.approx(value, rel=1e-5, abs=1e-7), (micro, step, name)
