"""The seeded shuffle of ``shard``: one order whatever the memory buffer, the arrival order or the number of sorted
runs spilled to disk; duplicates found across runs; nothing left behind."""

from __future__ import annotations

import json
from pathlib import Path

from test_data_prep_media import good_media, write_manifest
from test_data_prep_shard import folder_bytes

from data_prep.__main__ import main
from data_prep.shuffle import SPILL_PREFIX, KeyedShuffle

ITEMS = [(f"k{i}", {"n": i, "text": "x" * (i % 7)}) for i in range(300)]


def shuffled(items: list[tuple[str, dict]], folder: Path, buffer_bytes: int, seed: int = 0,
             max_open_runs: int = 128) -> tuple[list[list[int]], int]:
    """The item numbers of each key group in the shuffle's order, and how many sorted runs were on disk as it was
    read."""
    with KeyedShuffle(seed, folder, buffer_bytes, max_open_runs) as shuffle:
        for key, item in items:
            shuffle.add(key, item)
        assert len(shuffle) == len(items)
        groups = iter(shuffle)
        first = next(groups)
        runs = sum(1 for _ in folder.glob(f"{SPILL_PREFIX}*/run-*"))
        out = [[item["n"] for item in group] for group in [first, *groups]]
    assert not list(folder.glob(f"{SPILL_PREFIX}*")), "the temporary runs are removed"
    return out, runs


def test_the_order_depends_on_the_seed_and_keys_only(tmp_path: Path):
    in_memory, runs = shuffled(ITEMS, tmp_path, buffer_bytes=10**9)
    assert runs == 0 and all(len(group) == 1 for group in in_memory)
    assert sorted(n for n, in in_memory) == list(range(300)) and [n for n, in in_memory] != list(range(300))
    spilled, runs = shuffled(ITEMS, tmp_path, buffer_bytes=2_000)  # about 8 items a run
    assert runs > 30
    assert spilled == in_memory
    in_rounds, runs = shuffled(ITEMS, tmp_path, buffer_bytes=2_000, max_open_runs=3)  # merged 3 at a time
    assert in_rounds == in_memory
    assert shuffled(ITEMS[::-1], tmp_path, buffer_bytes=2_000)[0] == in_memory
    assert shuffled(ITEMS, tmp_path, buffer_bytes=10**9, seed=1)[0] != in_memory


def test_a_repeated_key_makes_one_group_in_arrival_order_across_runs(tmp_path: Path):
    items = [*ITEMS, ("k5", {"n": 300}), ("k299", {"n": 301}), ("k5", {"n": 302})]
    for buffer_bytes in (10**9, 1_000):
        groups, _ = shuffled(items, tmp_path, buffer_bytes)
        assert [group for group in groups if len(group) > 1] in ([[5, 300, 302], [299, 301]],
                                                                 [[299, 301], [5, 300, 302]])
        assert len(groups) == 300


def test_a_manifest_beyond_the_buffer_gives_the_same_shards(tmp_path: Path, capsys):
    rows = good_media(tmp_path / "media")
    rows += [{"key": f"t{i}", "text": f"line {i} " * (i % 5)} for i in range(40)] + [{"key": "t3", "text": "again"}]
    manifest = write_manifest(tmp_path / "m.jsonl", rows)
    args = ["shard", "--manifest", str(manifest), "--workers", "1", "--max-samples-per-shard", "7",
            "--min-shards", "1", "--max-reject-fraction", "0.1"]
    assert main([*args, "--out", str(tmp_path / "memory")]) == 0
    assert main([*args, "--out", str(tmp_path / "spilled"), "--shuffle-buffer-mb", "0.001"]) == 0
    assert folder_bytes(tmp_path / "memory") == folder_bytes(tmp_path / "spilled")
    rejected = [json.loads(line) for line in (tmp_path / "spilled" / "rejected.jsonl").read_text().splitlines()]
    assert [(r["origin"], r["key"], r["field"]) for r in rejected] == [("m.jsonl:49", "t3", "key")]
    assert "wrote 48 samples in 7 shards" in capsys.readouterr().out

    stale = tmp_path / "spilled" / f"{SPILL_PREFIX}killed"  # what a killed run leaves
    stale.mkdir()
    (stale / "run-000000").write_bytes(b"partial")
    assert main([*args, "--out", str(tmp_path / "spilled"), "--overwrite"]) == 0
    assert not stale.exists()
    assert folder_bytes(tmp_path / "memory") == folder_bytes(tmp_path / "spilled")
