"""A run's start decided in one place (``pretrain.start.decide_start``): fresh, from ``model.init_from``, resumed on
the world size that saved it or on another one, from one read of the checkpoint; the model it builds is the one the
run trains."""

from __future__ import annotations

import pytest
import torch
from test_train_engine import run, tiny_config

from launch.env import TORCH_VARS, detect_env
from pretrain import save_pretrained
from pretrain.config import load_config
from pretrain.model import PerceiverIO
from pretrain.start import decide_start
from pretrain.train.distributed import process_group
from pretrain.train.run import build_run


def test_a_fresh_start_from_init_from_plans_the_pretrained_weights(tmp_path):
    cfg = load_config(str(tiny_config(tmp_path)))
    source = PerceiverIO(cfg.model)
    save_pretrained(source, tmp_path / "exported")
    fresh = decide_start(cfg, 2, "auto")
    assert (fresh.resume_from, fresh.saved, fresh.step, fresh.universal) == (None, None, 0, False)
    assert fresh.init.pretrained.loaded == []
    cfg.model.init_from = str(tmp_path / "exported")
    start = decide_start(cfg, 2, "auto")
    assert start.init.pretrained.loaded == list(source.state_dict())
    assert start.init.summary.startswith(f"model.init_from {tmp_path / 'exported'}")


def test_the_same_seed_builds_the_same_initial_model_on_every_rank(tmp_path):
    cfg = load_config(str(tiny_config(tmp_path)))
    first, second = (decide_start(cfg, 2, "auto").model.state_dict() for _ in range(2))
    assert all(torch.equal(first[name], second[name]) for name in first)


@pytest.mark.slow
def test_a_resume_reads_the_checkpoint_once_and_says_whether_the_world_size_changed(tmp_path):
    path = tiny_config(tmp_path, train={"max_steps": 2}, checkpoint={"every_steps": 2})
    run(path, nproc=2)
    same = decide_start(load_config(str(path), ["train.max_steps=4"]), 2, "auto")
    other = decide_start(load_config(str(path), ["train.max_steps=4", "data.batch_size=8"]), 1, "auto")  # same batch
    for start in (same, other):
        assert start.resume_from == tmp_path / "run" / "checkpoints" / "step_00000002"
        assert start.step == 2 and start.saved["world_size"] == 2
        assert start.data_state is not None and start.init.summary == ""
    assert (same.universal, other.universal) == (False, True)


@pytest.mark.slow
def test_the_run_trains_the_model_its_start_built(tmp_path, monkeypatch):
    for name in TORCH_VARS:
        monkeypatch.delenv(name, raising=False)
    cfg = load_config(str(tiny_config(tmp_path, data={"num_workers": 0})))
    start = decide_start(cfg, 1, "auto")
    with process_group(detect_env({}), torch.device("cpu")):
        built = build_run(cfg, detect_env({}), torch.device("cpu"), start)
        try:
            assert built.engine.module is start.model
        finally:
            built.tracker.finish()
