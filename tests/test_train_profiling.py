"""``run.profile_steps``: a real 2-process run profiles the steps after its warm-up; each rank writes its summary,
its operator tables and a Chrome trace, rank 0 logs the summary line with the run's step numbers, and a run that
ends inside the window writes what it profiled."""

from __future__ import annotations

import gzip
import json

import pytest
from test_train_engine import logs, losses, run, tiny_config


@pytest.mark.slow
@pytest.mark.parametrize("max_steps, profiled", [(6, "3-4"), (3, "3-3")], ids=["window", "run-ends-inside"])
def test_profile_steps_write_each_ranks_tables_and_trace(tmp_path, max_steps, profiled):
    run(tiny_config(tmp_path, train={"max_steps": max_steps}, run={"profile_steps": 2, "profile_after_steps": 2}))
    directory = tmp_path / "run" / "profile"
    assert sorted(p.name for p in directory.iterdir()) == [
        "rank0.trace.json.gz", "rank0.txt", "rank1.trace.json.gz", "rank1.txt"]
    for rank in (0, 1):
        text = (directory / f"rank{rank}.txt").read_text()
        assert text.startswith("wall ") and " ms/step (profiled)" in text
        assert "Self CPU time total" in text and "aten::" in text  # the host's operator table
        trace = json.loads(gzip.decompress((directory / f"rank{rank}.trace.json.gz").read_bytes()))
        names = {event.get("name") for event in trace["traceEvents"]}
        assert "aten::addmm" in names and "Optimizer.step#AdamW.step" in names  # a whole step: forward to update
    assert f"profile of steps {profiled} (rank 0): wall " in logs(tmp_path)
    assert sorted(losses(tmp_path / "run")) == list(range(1, max_steps + 1))


@pytest.mark.slow
def test_profile_off_writes_nothing(tmp_path):
    run(tiny_config(tmp_path, train={"max_steps": 2}), nproc=1)
    assert not (tmp_path / "run" / "profile").exists()
    assert "profile of steps" not in logs(tmp_path)
