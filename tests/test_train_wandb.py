"""W&B through the engine: an offline run directory holds the metrics the loop logged, and a resumed run continues
the same W&B run id."""

from __future__ import annotations

import json

import pytest
from test_tracking import offline_runs, wandb_records
from test_train_engine import metrics, run, tiny_config

from pretrain.tracking import RUN_ID_FILE


def history(offline_run) -> dict:
    """(run ids, {step: logged values}) of one offline run directory."""
    ids, rows = set(), {}
    for record in wandb_records(next(offline_run.glob("run-*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            ids.add(record.run.run_id)
        elif kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            rows[record.history.step.num] = {k: v for k, v in row.items() if not k.startswith("_")}
    return ids, rows


@pytest.mark.slow
def test_offline_run_holds_the_metrics_and_a_resumed_run_keeps_its_id(tmp_path, monkeypatch):
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-home"))
    config = tiny_config(tmp_path, wandb={"mode": "online"}, train={"max_steps": 3})  # no key: falls back offline
    run(config)
    run_dir = tmp_path / "run"
    run_id = (run_dir / RUN_ID_FILE).read_text().strip()
    (first,) = offline_runs(run_dir)
    ids, rows = history(first)
    assert ids == {run_id}
    logged = metrics(run_dir)
    assert sorted(rows) == [1, 2, 3]
    for step, row in rows.items():
        assert row["loss"] == logged[step]["loss"] and row["loss/text"] == logged[step]["loss/text"]
        assert {"lr", "grad_norm", "samples_per_s", "data_wait_frac", "step_time_s", "tflops"} <= set(row)

    config = tiny_config(tmp_path, wandb={"mode": "offline"}, train={"max_steps": 5})
    run(config)
    second = [p for p in offline_runs(run_dir) if p != first]
    assert len(second) == 1
    ids, rows = history(second[0])
    assert ids == {run_id} and sorted(rows) == [4, 5]
    assert sorted(metrics(run_dir)) == [1, 2, 3, 4, 5]
