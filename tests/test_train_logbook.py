"""The log lines on their own (one process, a real gloo group, a real engine and stream): a line every
run.log_every_steps and at a save, none between; a note (a checkpoint's seconds) in the next line only; the
evaluation the loop runs at train.eval_every_steps in the same line; every line in metrics.jsonl."""

from __future__ import annotations

import json

import pytest
import torch
from test_train_engine import tiny_config

from launch.env import TORCH_VARS, detect_env
from pretrain.config import load_config
from pretrain.start import decide_start
from pretrain.tracking import METRICS_FILE
from pretrain.train.batches import StepBatches
from pretrain.train.distributed import process_group
from pretrain.train.evaluation import evaluate
from pretrain.train.logbook import Logbook
from pretrain.train.loop import train_step
from pretrain.train.run import build_run


@pytest.mark.slow
def test_lines_at_log_steps_and_saves_with_notes_and_evaluation(tmp_path, monkeypatch):
    for name in TORCH_VARS:
        monkeypatch.delenv(name, raising=False)
    path = tiny_config(tmp_path, data={"num_workers": 0}, run={"log_every_steps": 2},
                       train={"eval_every_steps": 3, "eval_batches": 1})
    cfg = load_config(str(path))
    device = torch.device("cpu")
    lines = {}
    with process_group(detect_env({}), device):
        run = build_run(cfg, detect_env({}), device, decide_start(cfg, 1, "auto"))
        logbook, step_batches = Logbook(run), StepBatches(run)
        try:
            for step, save in ((1, False), (2, False), (3, True)):
                train_step(run, logbook, step_batches)
                run.progress.step, run.progress.samples = step, step * logbook.step_samples
                if step == 1:
                    logbook.note(checkpoint_time_s=1.5)
                metrics = logbook.end_step(step, save)
                if step % cfg.train.eval_every_steps == 0:  # as Stopping decides it
                    metrics.update(evaluate(run))
                lines[step] = logbook.write(step, metrics)
        finally:
            run.tracker.finish()
    assert lines[1] == {}
    assert lines[2]["checkpoint_time_s"] == 1.5 and lines[2]["samples"] == 2 * logbook.step_samples
    assert {"loss", "lr", "samples_per_s", "step_time_s", "tflops"} <= set(lines[2]) and "val/loss" not in lines[2]
    assert "checkpoint_time_s" not in lines[3] and {"loss", "val/loss"} <= set(lines[3])  # a save logs; eval due
    assert logbook.flops > 0
    logged = [json.loads(line) for line in (tmp_path / "run" / METRICS_FILE).read_text().splitlines()]
    assert [line["step"] for line in logged] == [2, 3]
