"""The one shard contract (pretrain.shard_format) and the whole-or-nothing writes (pretrain.atomic)."""

from __future__ import annotations

import json

import pytest

from pretrain.atomic import replaced_atomically, temporary_path, write_text_atomically
from pretrain.shard_format import (
    INDEX_FILE,
    INDEX_FORMAT,
    MODALITY_FIELDS,
    IndexFileError,
    load_index,
    who_writes,
    why_stopped,
    writing_marker,
)


def test_an_index_is_read_with_or_without_its_format_and_refused_naming_the_file(tmp_path):
    assert load_index(tmp_path) is None
    hand_written = {"shards": [{"name": "a.tar", "samples": 3}]}
    (tmp_path / INDEX_FILE).write_text(json.dumps(hand_written))
    assert load_index(tmp_path) == hand_written
    (tmp_path / INDEX_FILE).write_text(json.dumps({"format": INDEX_FORMAT, **hand_written}))
    assert load_index(tmp_path)["shards"] == hand_written["shards"]
    for bad, detail in (("{not json", "Expecting"), ("[]", "not a JSON object"),
                        (json.dumps({"format": "other/2", "shards": []}), "'format' is 'other/2'"),
                        (json.dumps({"shards": [{"name": "a.tar", "samples": "3"}]}), "'shards' must be"),
                        (json.dumps({"shards": [{"name": "a.tar", "samples": -1}]}), "'shards' must be")):
        (tmp_path / INDEX_FILE).write_text(bad)
        with pytest.raises(IndexFileError, match=f"{tmp_path / INDEX_FILE}: not a valid shard index.*{detail}"):
            load_index(tmp_path)


def test_the_writing_marker_says_who_writes_the_directory(tmp_path):
    assert who_writes(tmp_path) is None
    (tmp_path / ".writing").write_text(writing_marker("python -m data_prep shard --out x"))
    assert who_writes(tmp_path).endswith("): python -m data_prep shard --out x")


def test_a_stopped_marker_says_why_and_is_no_run_still_going(tmp_path):
    assert why_stopped(tmp_path) is None
    (tmp_path / ".writing").write_text(writing_marker("python -m data_prep shard --out x"))
    assert why_stopped(tmp_path) is None  # being written, or cut off
    (tmp_path / ".writing").write_text(writing_marker("python -m data_prep shard --out x", stopped="too many"))
    assert why_stopped(tmp_path) == "data_prep stopped it: too many, and run the same command with --overwrite"
    assert who_writes(tmp_path) is None


def test_every_input_modality_has_fields():
    assert list(MODALITY_FIELDS) == ["text", "image", "audio", "video", "series"]
    assert MODALITY_FIELDS["image"] == ("png", "jpg", "jpeg")


def test_a_failed_write_leaves_the_old_content_and_no_temporary(tmp_path):
    path = tmp_path / "latest"
    write_text_atomically(path, "old")
    with pytest.raises(RuntimeError):
        with replaced_atomically(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert path.read_text() == "old" and not temporary_path(path).exists()
    temporary_path(path).mkdir()  # what a killed directory write leaves
    (temporary_path(path) / "part").write_text("x")
    write_text_atomically(path, "new")
    assert path.read_text() == "new" and not temporary_path(path).exists()


def test_a_directory_replaces_an_empty_one(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    with replaced_atomically(out) as tmp:
        tmp.mkdir()
        (tmp / "weights").write_text("w")
    assert (out / "weights").read_text() == "w"
