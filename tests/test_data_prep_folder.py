"""``python -m data_prep shard --input-dir``: folders of real media files -> real tar shards in tmp_path."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_data_prep_media import audio_bytes, garbage, image_bytes, video_array
from test_data_prep_shard import folder_bytes, read_tars

from data_prep.__main__ import main
from data_prep.folder import sample_key
from data_prep.schema import KEY_RE
from pretrain.shards import DataError, expand_spec


def write_files(root: Path, files: dict[str, bytes | np.ndarray]) -> Path:
    """``files`` (relative path -> bytes, or an array saved as .npy) under ``root``."""
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, np.ndarray):
            np.save(path, content)
        else:
            path.write_bytes(content)
    return root


def shard(*args: str) -> int:
    return main(["shard", "--workers", "1", *args])


def rejections(out: Path) -> dict[str, tuple[str, str]]:
    return {r["origin"]: (r["field"], r["reason"])
            for r in map(json.loads, (out / "rejected.jsonl").read_text().splitlines())}


def test_files_sharing_a_stem_become_one_sample_of_every_field(tmp_path: Path, capsys):
    png, jpg, flac = image_bytes(1), image_bytes(2, "JPEG"), audio_bytes(hz=220.0)
    root = write_files(tmp_path / "raw", {
        "photos/beach.png": png, "photos/beach.txt": b"sand and sea\n", "photos/beach.cls": b"4\n",
        "photos/night.v2.JPG": jpg, "photos/night.v2.json": b'{"camera": "x", "iso": 3200}',
        "photos/odd.bmp": image_bytes(3, "BMP"),
        "speech/hello.flac": flac, "speech/hello.txt": "héllo".encode(),
        "speech/tone.wav": audio_bytes(rate=11025, fmt="WAV"),
        "clips/spin.npy": video_array(4),
        "notes.txt": b"only text",
        ".DS_Store": b"\x00\x01", "photos/.beach.png.swp": b"x", ".git/config": b"[core]",
    })
    out = tmp_path / "shards"
    assert shard("--input-dir", str(root), "--out", str(out), "--audio-rate", "8000",
                 "--max-samples-per-shard", "3", "--min-shards", "1") == 0
    assert "wrote 7 samples in 3 shards" in capsys.readouterr().out
    samples = read_tars(out)
    assert samples["photos_beach"] == {"png": png, "txt": b"sand and sea\n", "cls": b"4"}
    assert samples["photos_night_v2"] == {"jpg": jpg, "json": b'{"camera": "x", "iso": 3200}'}
    assert list(samples["photos_odd"]) == ["png"]  # BMP is stored as PNG
    assert samples["speech_hello"]["txt"] == "héllo".encode() and list(samples["speech_tone"]) == ["flac"]
    assert np.array_equal(np.load(io.BytesIO(samples["clips_spin"]["npy"])), video_array(4))
    assert samples["notes"] == {"txt": b"only text"}
    assert len(samples) == 7  # the hidden files and folders made no sample and no rejection
    index = json.loads((out / "index.json").read_text())
    assert index["rejected"] == 0 and index["info"]["input_dir"] == "raw" and "classes" not in index["info"]
    assert main(["validate", str(out), "--workers", "1"]) == 0


def test_label_from_folder_numbers_the_sorted_class_folders(tmp_path: Path, capsys):
    root = write_files(tmp_path / "raw", {
        "dog/1.png": image_bytes(1), "dog/2.png": image_bytes(2), "cat/1.png": image_bytes(3),
        "cat/kitten/3.png": image_bytes(4), "bird/1.png": image_bytes(5), "bird/1.txt": b"a robin",
        "stray.png": image_bytes(6), "cat/9.png": image_bytes(7), "cat/9.cls": b"2",
    })
    out = tmp_path / "shards"
    assert shard("--input-dir", str(root), "--out", str(out), "--label-from-folder",
                 "--max-reject-fraction", "0.3") == 0
    labels = {key: sample["cls"] for key, sample in read_tars(out).items()}
    assert labels == {"bird_1": b"0", "cat_1": b"1", "cat_kitten_3": b"1", "dog_1": b"2", "dog_2": b"2"}
    assert json.loads((out / "index.json").read_text())["info"]["classes"] == ["bird", "cat", "dog"]
    reasons = rejections(out)
    assert set(reasons) == {"stray", "cat/9"}
    assert "not in a class folder" in reasons["stray"][1]
    assert reasons["cat/9"] == ("label", "cat/9.cls and --label-from-folder both give the label; keep one")
    capsys.readouterr()
    assert main(["stats", str(out)]) == 0
    assert "classes: 0 bird, 1 cat, 2 dog" in capsys.readouterr().out


def test_groups_that_make_no_good_sample_are_rejected_with_the_file_named(tmp_path: Path, capsys):
    root = write_files(tmp_path / "raw", {
        "ok.png": image_bytes(1),
        "README.md": b"# my data",  # documentation alone: passed over, not rejected
        "notes.png": image_bytes(7), "notes.md": b"# about the image",  # beside a sample's file: rejects it
        "pair.png": image_bytes(2), "pair.xmp": b"<x/>",
        "twice.png": image_bytes(3), "twice.jpg": image_bytes(4, "JPEG"),
        "lonely.json": b"{}",
        "latin1.txt": "café".encode("latin-1"),
        "badlabel.png": image_bytes(5), "badlabel.cls": b"cat",
        "list.png": image_bytes(6), "list.json": b"[1, 2]",
        "broken.png": garbage(),
        "noise.flac": b"fLaC" + garbage(),
        "floats.npy": np.zeros((2, 4, 4, 3), np.float32),
    })
    out = tmp_path / "shards"
    assert shard("--input-dir", str(root), "--out", str(out)) == 1
    assert "rejected 90.9% of 11 inputs, more than --max-reject-fraction 0.01" in capsys.readouterr().err
    reasons = rejections(out)
    assert reasons == {
        "notes": ("file", reasons["notes"][1]),
        "pair": ("file", reasons["pair"][1]),
        "twice": ("image", "two image files, twice.jpg and twice.png; a sample has one of each"),
        "lonely": ("file", "only lonely.json: a sample needs one of text, image, audio, video, series, label"),
        "latin1": ("text", reasons["latin1"][1]),
        "badlabel": ("label", "badlabel.cls must hold one integer, got b'cat'"),
        "list": ("meta", "list.json must hold a JSON object, got list"),
        "broken": ("image", reasons["broken"][1]),
        "noise": ("audio", reasons["noise"][1]),
        "floats": ("video", reasons["floats"][1]),
    }
    assert reasons["notes"][1].startswith("notes.md is no supported file; the suffixes are .txt, .png")
    assert reasons["pair"][1].startswith("pair.xmp is no supported file")
    assert reasons["latin1"][1].startswith("latin1.txt is not UTF-8 text")
    assert "cannot decode image" in reasons["broken"][1] and "cannot decode audio" in reasons["noise"][1]
    assert "uint8" in reasons["floats"][1]
    assert list(read_tars(out)) == ["ok"]


def test_keys_are_valid_and_unique_whatever_the_file_names(tmp_path: Path):
    stems = ["a/b", "a_b", "a.b", "x" * 70, "x" * 70 + "y", "über/straße", "plain-1"]
    root = write_files(tmp_path / "raw", {f"{stem}.txt": stem.encode() for stem in stems})
    assert shard("--input-dir", str(root), "--out", str(tmp_path / "out")) == 0
    keys = {sample["txt"].decode(): key for key, sample in read_tars(tmp_path / "out").items()}
    assert sorted(keys) == sorted(stems) and all(KEY_RE.match(key) for key in keys.values())
    assert (keys["plain-1"], keys["über/straße"], keys["a_b"]) == ("plain-1", "_ber_stra_e", "a_b")
    assert keys["a/b"].startswith("a_b-") and keys["a.b"].startswith("a_b-")  # the file named a_b keeps a_b
    assert sample_key("a/b") == "a_b" and KEY_RE.match(sample_key("x" * 70))  # shared, or too long: a hash


def test_same_seed_same_bytes_and_the_output_stays_outside_the_input(tmp_path: Path, capsys):
    root = write_files(tmp_path / "raw", {f"s{i}.txt": f"sample {i}".encode() for i in range(7)})
    args = ["--input-dir", str(root), "--max-samples-per-shard", "2", "--seed", "3"]
    assert shard(*args, "--out", str(tmp_path / "one")) == 0
    assert main(["shard", *args, "--out", str(tmp_path / "two"), "--workers", "2"]) == 0
    assert folder_bytes(tmp_path / "one") == folder_bytes(tmp_path / "two")

    capsys.readouterr()
    assert shard("--input-dir", str(root), "--out", str(root / "shards")) == 2
    assert "lies inside --input-dir" in capsys.readouterr().err
    assert not (root / "shards").exists()


def test_the_command_line_checks_its_source_options(tmp_path: Path):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "data_prep", "shard", *args, "--out", str(tmp_path / "o")],
                              capture_output=True, text=True)

    (tmp_path / "m.jsonl").write_text('{"text": "x"}\n')
    both = run("--manifest", str(tmp_path / "m.jsonl"), "--input-dir", str(tmp_path))
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
    neither = run()
    assert neither.returncode == 2 and "one of the arguments --manifest --input-dir is required" in neither.stderr
    labels = run("--manifest", str(tmp_path / "m.jsonl"), "--label-from-folder")
    assert labels.returncode == 2 and "--label-from-folder needs --input-dir" in labels.stderr
    absent = run("--input-dir", str(tmp_path / "absent"))
    assert absent.returncode == 2 and f"--input-dir {tmp_path / 'absent'}: no such directory" in absent.stderr
    assert not (tmp_path / "o").exists()


def test_files_that_are_not_data_are_passed_over_with_one_line(tmp_path: Path, capsys):
    root = write_files(tmp_path / "raw", {
        **{f"{shape}/{i}.png": image_bytes(i) for shape in ("circle", "square") for i in range(3)},
        "circle/README.md": b"# circles", "circle/.DS_Store": b"\x00", "circle/LICENSE": b"CC-BY",
        "square/Thumbs.db": b"\x00", "square/notes.pdf": b"%PDF", ".git/config": b"[core]",
        "docs/index.html": b"<html>",  # a folder of nothing but documentation is no class
    })
    out = tmp_path / "shards"
    assert shard("--input-dir", str(root), "--out", str(out), "--label-from-folder") == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[1] == (f"{root}/: passed over 7 files that are not data (.git/, circle/.DS_Store, circle/LICENSE, "
                          "...)")
    assert printed[0].endswith("rejected 0 of 6 (0.0%)") and (out / "rejected.jsonl").read_text() == ""
    info = json.loads((out / "index.json").read_text())["info"]
    assert info["passed_over"] == {"count": 7, "examples": [
        ".git/", "circle/.DS_Store", "circle/LICENSE", "circle/README.md", "docs/index.html", "square/Thumbs.db",
        "square/notes.pdf"]}
    assert info["classes"] == ["circle", "square"] and len(read_tars(out)) == 6
    assert main(["stats", str(out)]) == 0
    assert "  passed over 7 files that are not data (.git/, circle/.DS_Store, circle/LICENSE, ...)" in \
        capsys.readouterr().out


def test_a_file_of_an_unsupported_format_is_still_rejected(tmp_path: Path, capsys):
    root = write_files(tmp_path / "raw", {"a.png": image_bytes(1), "b.png": image_bytes(2), "x.heic": b"ftypheic"})
    out = tmp_path / "shards"
    assert shard("--input-dir", str(root), "--out", str(out), "--max-reject-fraction", "0.5") == 0
    assert "rejected 1 of 3 (33.3%)" in capsys.readouterr().out
    field, reason = rejections(out)["x"]
    assert field == "file" and reason.startswith("x.heic is no supported file; the suffixes are .txt, .png")


def test_too_many_rejections_leave_the_output_unfinished_until_rerun(tmp_path: Path, capsys):
    """2 bad images of 10 with the default limit (1%): the shards and rejected.jsonl stay for a look, but without
    index.json and with .writing saying why, so that nothing (validate, index, training) takes them for the data."""
    root = write_files(tmp_path / "raw", {**{f"ok{i}.png": image_bytes(i) for i in range(8)},
                                          "bad0.png": garbage(), "bad1.png": garbage()})
    out = tmp_path / "shards"
    args = ["--input-dir", str(root), "--out", str(out), "--min-shards", "1"]
    assert shard(*args) == 1
    reason = (f"rejected 20.0% of 10 inputs, more than --max-reject-fraction 0.01; fix the inputs listed in "
              f"{out / 'rejected.jsonl'} or raise the limit")
    assert capsys.readouterr().err == (f"error: {out}: {reason}; the output was left unfinished (no index.json: "
                                       "nothing takes it for finished data), the same command with --overwrite "
                                       "replaces it\n")
    assert sorted(p.name for p in out.iterdir()) == [".writing", "rejected.jsonl", "shard-000000.tar"]
    assert json.loads((out / ".writing").read_text())["stopped"] == reason
    stopped = f"data_prep stopped it: {reason}, and run the same command with --overwrite"
    assert main(["validate", str(out), "--workers", "1"]) == 1
    assert capsys.readouterr().out.splitlines() == [f"{out / 'index.json'}: not found: {stopped}",
                                                    f"{out}: checked 1 shard, 8 samples: 1 problem"]
    with pytest.raises(DataError, match="max-reject-fraction") as refused:
        expand_spec(str(out), "data.train_shards")
    assert str(refused.value) == (f"data.train_shards: {str(out)!r} is a data_prep shard output without its "
                                  f"index.json: {stopped}")
    assert main(["index", str(out)]) == 2 and stopped in capsys.readouterr().err
    assert not (out / "index.json").exists()

    assert shard(*args, "--overwrite", "--max-reject-fraction", "0.5") == 0
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "rejected.jsonl", "shard-000000.tar"]
    assert sum(s.samples for s in expand_spec(str(out), "data.train_shards")) == 8
