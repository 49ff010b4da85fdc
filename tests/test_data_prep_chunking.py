"""``shard --text-chunk-bytes``: long texts become samples cut between words or characters, never inside one, and
spread over the shards; other samples stay whole."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
from test_data_prep_folder import write_files
from test_data_prep_media import image_bytes, write_manifest
from test_data_prep_shard import read_tars

from data_prep.__main__ import main
from data_prep.chunking import chunk_key, split_text
from data_prep.manifest import ManifestRow, ShardOptions
from data_prep.schema import KEY_RE


def test_a_long_text_is_cut_after_words_into_pieces_of_at_most_the_limit():
    words = " ".join(f"word{i}" for i in range(40)).encode()
    pieces = split_text(words, 32)
    assert b"".join(pieces) == words
    assert len(pieces) > 1 and all(len(p) <= 32 and p.endswith(b" ") for p in pieces[:-1])


def test_text_without_spaces_is_cut_between_characters():
    text = "ünïcødé😀".encode() * 9
    pieces = split_text(text, 17)
    assert len(pieces) > 1 and b"".join(pieces) == text
    assert all(len(p) <= 17 and p.decode("utf-8") for p in pieces)


@pytest.mark.parametrize("row", [
    {"text": "x " * 100, "image": "a.png"},
    {"text": "x " * 100, "label": 1},
    {"text": "x " * 10, "meta": {"m": 1}},
], ids=["caption", "labelled", "short"])
def test_captions_labelled_and_short_texts_stay_whole(row):
    assert ManifestRow(row, Path("."), ShardOptions().prep).text_pieces(32) is None


def test_pieces_keep_the_metadata():
    row = ManifestRow({"key": "k", "text": "x " * 100, "meta": {"m": 1}}, Path("."), ShardOptions().prep)
    pieces = row.text_pieces(32)
    assert len(pieces) == 7 and all(p.row["meta"] == {"m": 1} and set(p.row) == {"text", "meta"} for p in pieces)
    assert "".join(p.row["text"] for p in pieces) == "x " * 100


def test_piece_keys_stay_valid_and_distinct_for_the_longest_keys():
    key = "k" * 64
    keys = [chunk_key(key, i) for i in (0, 1, 10, 12345)]
    assert len(set(keys)) == 4 and all(KEY_RE.match(k) for k in keys)
    assert chunk_key("doc", 3) == "doc-3"


def test_shard_writes_long_texts_in_pieces(tmp_path: Path, capsys):
    (tmp_path / "a.png").write_bytes(image_bytes())
    long = " ".join(f"w{i:04d}" for i in range(1000))  # 5999 bytes
    manifest = write_manifest(tmp_path / "m.jsonl", [
        {"key": "long", "text": long, "meta": {"source": "x"}},
        {"key": "short", "text": "brief"},
        {"key": "caption", "text": long, "image": "a.png"},
        {"key": "bad", "image": "missing.png"},
    ])
    out = tmp_path / "out"
    assert main(["shard", "--manifest", str(manifest), "--out", str(out), "--workers", "1",
                 "--text-chunk-bytes", "2048", "--max-reject-fraction", "0.3", "--min-shards", "1"]) == 0
    summary = capsys.readouterr().out
    assert "wrote 5 samples from 3 inputs (long texts in pieces) in 1 shard " in summary
    assert "rejected 1 of 4 (25.0%)" in summary  # inputs, not pieces
    samples = read_tars(out)
    assert sorted(samples) == ["caption", "long-0", "long-1", "long-2", "short"]
    assert "".join(samples[f"long-{i}"]["txt"].decode() for i in range(3)) == long
    assert all(len(samples[f"long-{i}"]["txt"]) <= 2048 for i in range(3))
    assert samples["caption"]["txt"] == long.encode() and samples["long-1"]["json"] == b'{"source": "x"}'
    index = json.loads((out / "index.json").read_text())
    assert (index["samples"], index["rejected"], index["info"]["inputs"], index["info"]["text_chunk_bytes"]) == (
        5, 1, 4, 2048)
    assert main(["validate", str(out), "--workers", "1"]) == 0


def test_a_chunk_size_below_a_few_characters_is_refused(tmp_path: Path, capsys):
    manifest = write_manifest(tmp_path / "m.jsonl", [{"text": "x"}])
    with pytest.raises(SystemExit) as exit_:
        main(["shard", "--manifest", str(manifest), "--out", str(tmp_path / "o"), "--text-chunk-bytes", "8"])
    assert exit_.value.code == 2 and "must be 0 (off) or at least 16, got 8" in capsys.readouterr().err


def test_pieces_spread_over_the_shards_and_a_key_they_take_is_rejected(tmp_path: Path, capsys):
    book = " ".join(f"w{i:04d}" for i in range(64))  # 383 bytes: 8 pieces of at most 48
    rows = [{"key": "book", "text": book}, {"key": "book-3", "text": "a line keyed like a piece"}]
    rows += [{"key": f"s{i}", "text": f"short {i}"} for i in range(40)]
    out = tmp_path / "out"
    assert main(["shard", "--manifest", str(write_manifest(tmp_path / "m.jsonl", rows)), "--out", str(out),
                 "--workers", "1", "--text-chunk-bytes", "48", "--max-samples-per-shard", "6", "--min-shards", "1",
                 "--max-reject-fraction", "0.1"]) == 0
    assert "wrote 48 samples from 41 inputs (long texts in pieces) in 8 shards" in capsys.readouterr().out
    shards_of = {}
    for shard in out.glob("shard-*.tar"):
        with tarfile.open(shard) as tar:
            shards_of.update((name.split(".")[0], shard.name) for name in tar.getnames())
    assert len({shards_of[f"book-{i}"] for i in range(8)}) >= 4  # consecutive, they would fill two shards
    rejected = json.loads((out / "rejected.jsonl").read_text())
    assert (rejected["origin"], rejected["key"], rejected["reason"]) == (
        "m.jsonl:2", "book-3", "duplicate key 'book-3'; keys must be unique")


def test_long_texts_of_a_folder_are_read_and_cut_before_the_shuffle(tmp_path: Path, capsys):
    long = " ".join(f"w{i:04d}" for i in range(100)).encode()
    root = write_files(tmp_path / "raw", {"a.txt": long, "a.json": b'{"src": "a"}', "b.txt": b"\xff" + long,
                                          "c.txt": b"short"})
    out = tmp_path / "out"
    assert main(["shard", "--input-dir", str(root), "--out", str(out), "--workers", "1", "--text-chunk-bytes", "256",
                 "--max-reject-fraction", "0.5"]) == 0
    samples = read_tars(out)
    assert sorted(samples) == ["a-0", "a-1", "a-2", "c"]
    assert b"".join(samples[f"a-{i}"]["txt"] for i in range(3)) == long
    assert all(samples[f"a-{i}"]["json"] == b'{"src": "a"}' for i in range(3))
    rejected = json.loads((out / "rejected.jsonl").read_text())
    assert (rejected["origin"], rejected["field"]) == ("b", "text") and "not UTF-8" in rejected["reason"]
