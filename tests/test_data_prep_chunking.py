"""``shard --text-chunk-bytes``: long texts become consecutive samples, cut between words or characters, never
inside one; other samples stay whole."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_data_prep_media import image_bytes, write_manifest
from test_data_prep_shard import read_tars

from data_prep.__main__ import main
from data_prep.chunking import chunk_key, text_chunks
from data_prep.schema import KEY_RE


def test_a_long_text_is_cut_after_words_into_pieces_of_at_most_the_limit():
    words = " ".join(f"word{i}" for i in range(40)).encode()
    pieces = text_chunks({"__key__": "doc", "txt": words, "json": b'{"src": 1}'}, 32)
    assert [p["__key__"] for p in pieces] == [f"doc-{i}" for i in range(len(pieces))]
    assert b"".join(p["txt"] for p in pieces) == words
    assert all(len(p["txt"]) <= 32 and p["txt"].endswith(b" ") for p in pieces[:-1])
    assert all(p["json"] == b'{"src": 1}' for p in pieces)


def test_text_without_spaces_is_cut_between_characters():
    text = "ünïcødé😀".encode() * 9
    pieces = [p["txt"] for p in text_chunks({"__key__": "k", "txt": text}, 17)]
    assert len(pieces) > 1 and b"".join(pieces) == text
    assert all(len(p) <= 17 and p.decode("utf-8") for p in pieces)


@pytest.mark.parametrize("sample", [
    {"__key__": "caption", "txt": b"x " * 100, "png": b"..."},
    {"__key__": "labelled", "txt": b"x " * 100, "cls": b"1"},
    {"__key__": "short", "txt": b"x " * 10},
])
def test_captions_labelled_and_short_texts_stay_whole(sample):
    assert text_chunks(sample, 32) == [sample]


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
                 "--text-chunk-bytes", "2048", "--max-reject-fraction", "0.3"]) == 0
    summary = capsys.readouterr().out
    assert "wrote 5 samples from 3 inputs (long texts in pieces) in 1 shards" in summary
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
