"""``python -m data_prep shard --input-dir``: folders of real media files -> real tar shards in tmp_path."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from test_data_prep_media import audio_bytes, garbage, image_bytes, video_array
from test_data_prep_shard import folder_bytes, read_tars

from data_prep.__main__ import main
from data_prep.folder import sample_key
from data_prep.schema import KEY_RE


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
                 "--max-samples-per-shard", "3") == 0
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
        "README.md": b"# my data",
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
    assert "rejected 90.9% of the samples" in capsys.readouterr().err
    reasons = rejections(out)
    assert reasons == {
        "README": ("file", reasons["README"][1]),
        "pair": ("file", reasons["pair"][1]),
        "twice": ("image", "two image files, twice.jpg and twice.png; a sample has one of each"),
        "lonely": ("file", "only lonely.json: a sample needs one of text, image, audio, video, label"),
        "latin1": ("text", reasons["latin1"][1]),
        "badlabel": ("label", "badlabel.cls must hold one integer, got b'cat'"),
        "list": ("meta", "list.json must hold a JSON object, got list"),
        "broken": ("image", reasons["broken"][1]),
        "noise": ("audio", reasons["noise"][1]),
        "floats": ("video", reasons["floats"][1]),
    }
    assert reasons["README"][1].startswith("README.md is no supported file; the suffixes are .txt, .png")
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
