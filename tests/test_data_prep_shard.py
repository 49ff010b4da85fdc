"""``python -m data_prep shard``: real manifests, real media and real tar shards in tmp_path."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from test_data_prep_media import (
    HAS_AV,
    audio_bytes,
    garbage,
    good_media,
    image_bytes,
    mp4_bytes,
    write_manifest,
)

from data_prep.__main__ import main
from data_prep.manifest import parse_row
from data_prep.stats import stats as stats_of
from pretrain.data import DataError, expand_spec
from pretrain.shard_format import Rejected

ROOT = Path(__file__).resolve().parents[1]


def read_tars(directory: Path) -> dict[str, dict[str, bytes]]:
    """Every sample of every shard, read with webdataset itself (what the training stream uses)."""
    import webdataset as wds

    shards = sorted(str(p) for p in directory.glob("shard-*.tar"))
    return {s["__key__"]: {k: v for k, v in s.items() if not k.startswith("__")}
            for s in wds.WebDataset(shards, shardshuffle=False)}


def folder_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    """8 good rows of every modality."""
    return write_manifest(tmp_path / "manifest.jsonl", good_media(tmp_path / "media"))


@pytest.fixture
def bad_manifest(tmp_path: Path) -> Path:
    """The 8 good rows plus 9 bad ones, one of each kind of damage."""
    rows = good_media(tmp_path / "media")
    (tmp_path / "media" / "garbage.png").write_bytes(garbage())
    (tmp_path / "media" / "garbage.flac").write_bytes(b"fLaC" + garbage())
    np.save(tmp_path / "media" / "float.npy", np.zeros((2, 4, 4, 3), np.float32))
    rows += [
        {"key": "missing", "image": "media/nope.png"},
        {"key": "bad_png", "image": "media/garbage.png"},
        {"key": "bad_flac", "audio": "media/garbage.flac", "text": "x"},
        {"key": "unknown", "text": "x", "colour": "red"},
        '{"text": "not closed"',
        {"key": "png_cap", "text": "the key again"},
        {"key": "bad_label", "text": "x", "label": "3"},
        {"key": "bad_video", "video": "media/float.npy"},
        '{"text": "\\ud800 is half a character"}',
    ]
    return write_manifest(tmp_path / "bad.jsonl", rows)


def test_shard_writes_every_modality_readable_by_webdataset(manifest: Path, tmp_path: Path, capsys):
    out = tmp_path / "out"
    assert main(["shard", "--manifest", str(manifest), "--out", str(out), "--workers", "1",
                 "--max-samples-per-shard", "3", "--audio-rate", "8000", "--min-shards", "1"]) == 0
    assert "wrote 8 samples in 3 shards" in capsys.readouterr().out
    samples = read_tars(out)
    assert len(samples) == 8
    assert samples["png_cap"] == {"png": (manifest.parent / "media/a.png").read_bytes(),
                                  "txt": b"a photo of noise", "cls": b"3"}
    assert sorted(f for s in samples.values() for f in s) == sorted(
        ["png", "txt", "cls", "jpg", "json", "png", "cls", "flac", "txt", "flac", "npy", "txt", "txt", "cls", "json"])
    rates = {sf.info(io.BytesIO(s["flac"])).samplerate for s in samples.values() if "flac" in s}
    assert rates == {8000}
    index = json.loads((out / "index.json").read_text())
    assert [s["samples"] for s in index["shards"]] == [3, 3, 2]
    assert [s["bytes"] for s in index["shards"]] == [(out / s["name"]).stat().st_size for s in index["shards"]]
    for shard in index["shards"]:  # plain ustar headers: a pax header would add 1 KiB to every member
        with tarfile.open(out / shard["name"]) as tar:
            assert [m.pax_headers for m in tar.getmembers()] == [{}] * len(tar.getmembers())
    assert index["modalities"] == {"audio": 2, "image": 3, "label": 3, "meta": 2, "text": 4, "video": 1}
    assert index["samples"] == 8 and index["rejected"] == 0
    assert (out / "rejected.jsonl").read_text() == ""


def test_bad_rows_are_rejected_with_reasons_and_the_exit_code_follows_the_limit(bad_manifest: Path, tmp_path: Path,
                                                                               capsys):
    out = tmp_path / "out"
    args = ["shard", "--manifest", str(bad_manifest), "--out", str(out), "--workers", "1"]
    assert main(args) == 1
    printed = capsys.readouterr()
    assert f"rejected 52.9% of 17 inputs, more than --max-reject-fraction 0.01; fix the inputs listed in {out}/" \
           "rejected.jsonl or raise the limit; the output was left unfinished" in printed.err
    assert not (out / "index.json").exists() and (out / ".writing").exists()  # over the limit: not finished
    assert printed.out.splitlines()[1:] == [  # the most frequent fields first, each with its first reason
        "  2 for line, e.g. not valid JSON (Expecting ',' delimiter: line 2 column 1 (char 22))",
        f"  2 for image, e.g. file not found: {bad_manifest.parent / 'media/nope.png'} (paths are relative to the "
        "manifest's folder)",
        "  1 for colour, e.g. unknown field 'colour'; allowed: key, text, image, audio, video, series, label, meta "
        "(--rename maps a field onto one of them; --other-fields meta or ignore takes the rest)"]
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    reasons = {(r["key"], r["field"]): r["reason"] for r in rejected}
    assert len(rejected) == 9
    assert "file not found" in reasons["missing", "image"]
    assert "cannot decode image" in reasons["bad_png", "image"]
    assert "cannot decode audio" in reasons["bad_flac", "audio"]
    assert "uint8" in reasons["bad_video", "video"]
    assert "duplicate key" in reasons["png_cap", "key"]
    assert "unknown field 'colour'" in reasons[None, "colour"]
    assert "must be int, got str" in reasons[None, "label"]
    assert {r["origin"]: r["reason"][:20] for r in rejected if r["field"] == "line"} == {
        "bad.jsonl:13": "not valid JSON (Expe", "bad.jsonl:17": "holds a lone surroga"}

    assert main([*args, "--max-reject-fraction", "0.6", "--overwrite"]) == 0
    assert not (out / ".writing").exists()
    index = json.loads((out / "index.json").read_text())
    assert (index["samples"], index["rejected"]) == (8, 9)
    assert {seen["field"]: seen["count"] for seen in index["info"]["rejections"]} == {
        "line": 2, "image": 2, "colour": 1, "label": 1, "audio": 1, "video": 1, "key": 1}
    assert "  rejected: 2 for line, 2 for image, 1 for colour, " in stats_of(out)
    written = read_tars(out)
    assert len(written) == 8 and not {"missing", "bad_png", "bad_flac", "bad_video", "bad_label"} & set(written)
    assert written["png_cap"]["txt"] == b"a photo of noise"  # the first of the duplicate keys is kept


def test_same_seed_same_bytes_whatever_the_worker_count(manifest: Path, tmp_path: Path):
    args = ["shard", "--manifest", str(manifest), "--max-samples-per-shard", "3", "--seed", "5"]
    assert main([*args, "--out", str(tmp_path / "one"), "--workers", "1"]) == 0
    assert main([*args, "--out", str(tmp_path / "two"), "--workers", "2"]) == 0
    assert folder_bytes(tmp_path / "one") == folder_bytes(tmp_path / "two")
    assert main([*args[:-1], "6", "--out", str(tmp_path / "other"), "--workers", "1"]) == 0
    assert folder_bytes(tmp_path / "other") != folder_bytes(tmp_path / "one")
    assert read_tars(tmp_path / "other") == read_tars(tmp_path / "one")  # the same samples, in another order


def test_a_non_empty_output_is_refused_unless_overwrite(manifest: Path, tmp_path: Path, capsys):
    out = tmp_path / "out"
    assert main(["shard", "--manifest", str(manifest), "--out", str(out), "--workers", "1",
                 "--max-samples-per-shard", "1"]) == 0
    before = folder_bytes(out)
    assert main(["shard", "--manifest", str(manifest), "--out", str(out), "--workers", "1"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert folder_bytes(out) == before
    (out / "notes.txt").write_text("mine")
    assert main(["shard", "--manifest", str(manifest), "--out", str(out), "--workers", "1", "--overwrite",
                 "--min-shards", "1"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "notes.txt", "rejected.jsonl", "shard-000000.tar"]


def test_max_shard_mb_closes_shards_by_size(manifest: Path, tmp_path: Path):
    out = tmp_path / "out"
    assert main(["shard", "--manifest", str(manifest), "--out", str(out), "--workers", "1",
                 "--max-shard-mb", "0.0002", "--min-shards", "1"]) == 0
    shards = json.loads((out / "index.json").read_text())["shards"]
    assert 1 < len(shards) < 8
    assert all(sum(s["modality_bytes"].values()) >= 200 for s in shards[:-1])


def test_an_empty_or_absent_manifest_is_an_error(tmp_path: Path, capsys):
    assert main(["shard", "--manifest", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["shard", "--manifest", str(write_manifest(tmp_path / "empty.jsonl", [])),
                 "--out", str(tmp_path / "o"), "--workers", "1"]) == 1
    assert "no sample was written: no input came to it" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [".writing", "rejected.jsonl"]  # left unfinished


@pytest.mark.skipif(not HAS_AV, reason="PyAV not installed (scripts/install_demo_sources.sh installs it)")
def test_mp4_video_is_checked_and_stored(tmp_path: Path):
    (tmp_path / "clip.mp4").write_bytes(mp4_bytes())
    (tmp_path / "cut.mp4").write_bytes(mp4_bytes()[:300])
    manifest = write_manifest(tmp_path / "m.jsonl", [{"key": "ok", "video": "clip.mp4"},
                                                     {"key": "cut", "video": "cut.mp4"}])
    assert main(["shard", "--manifest", str(manifest), "--out", str(tmp_path / "o"), "--workers", "1",
                 "--max-reject-fraction", "0.5"]) == 0
    assert read_tars(tmp_path / "o") == {"ok": {"mp4": (tmp_path / "clip.mp4").read_bytes()}}
    assert "cannot decode mp4" in (tmp_path / "o" / "rejected.jsonl").read_text()


def test_the_module_and_its_exit_code_from_a_shell(tmp_path: Path):
    (tmp_path / "x.png").write_bytes(image_bytes())
    (tmp_path / "y.flac").write_bytes(audio_bytes())
    manifest = write_manifest(tmp_path / "m.jsonl", [{"image": "x.png"}, {"audio": "y.flac"}, {"image": "z.png"}])
    run = subprocess.run([sys.executable, "-m", "data_prep", "shard", "--manifest", str(manifest),
                          "--out", str(tmp_path / "o"), "--workers", "2"], capture_output=True, text=True)
    assert run.returncode == 1, run.stderr
    assert "rejected 1 of 3 (33.3%)" in run.stdout


def corpus_lines(count: int = 4) -> list[dict]:
    """Lines as an existing text corpus has them (a datasets export): its own names and fields beside the text."""
    return [{"id": f"doc-{i}", "content": f"document {i}", "url": f"https://example.org/{i}", "timestamp": i}
            for i in range(count)]


def test_an_existing_corpus_maps_onto_the_schema(tmp_path: Path, capsys):
    rows = corpus_lines() + [{"id": "both", "content": "x", "text": "y"},
                             {"id": "clash", "content": "x", "url": "u", "meta": {"url": "v"}}]
    manifest = write_manifest(tmp_path / "corpus.jsonl.gz", rows)
    strict = tmp_path / "strict"
    assert main(["shard", "--manifest", str(manifest), "--out", str(strict), "--workers", "1"]) == 1
    reasons = {r["origin"]: r["reason"] for r in map(json.loads, (strict / "rejected.jsonl").read_text().splitlines())}
    assert len(reasons) == 6 and "--rename maps a field onto one of them" in reasons["corpus.jsonl.gz:1"]

    mapped = ["--manifest", str(manifest), "--rename", "content=text", "--rename", "id=key", "--workers", "1",
              "--max-reject-fraction", "0.5"]
    assert main(["shard", *mapped, "--other-fields", "meta", "--out", str(tmp_path / "meta")]) == 0
    samples = read_tars(tmp_path / "meta")
    assert sorted(samples) == [f"doc-{i}" for i in range(4)]
    assert samples["doc-2"] == {"txt": b"document 2", "json": b'{"timestamp": 2, "url": "https://example.org/2"}'}
    rejected = {r["key"] if r["key"] else r["origin"]: (r["field"], r["reason"])
                for r in map(json.loads, (tmp_path / "meta" / "rejected.jsonl").read_text().splitlines())}
    assert rejected == {"corpus.jsonl.gz:5": ("text", "has both 'content' (renamed to 'text') and 'text'"),
                        "corpus.jsonl.gz:6": ("meta", "'url' is both a field of the line and a key of its meta")}
    info = json.loads((tmp_path / "meta" / "index.json").read_text())["info"]
    assert (info["rename"], info["other_fields"]) == ({"content": "text", "id": "key"}, "meta")

    assert main(["shard", *mapped, "--other-fields", "ignore", "--out", str(tmp_path / "ignore")]) == 0
    assert read_tars(tmp_path / "ignore")["doc-2"] == {"txt": b"document 2"}
    assert "rejected 1 of 6" in capsys.readouterr().out  # the clash with meta is no clash when the rest is ignored


def test_a_cut_off_gz_manifest_fails_naming_the_line(tmp_path: Path, capsys):
    whole = write_manifest(tmp_path / "whole.jsonl.gz", [{"text": "x" * 5000, "key": f"k{i}"} for i in range(50)])
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(whole.read_bytes()[:-200])
    assert main(["shard", "--manifest", str(cut), "--out", str(tmp_path / "out"), "--workers", "1"]) == 1
    assert f"error: {cut}: unreadable after line" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, message", [
    (["--rename", "content=body"], "give SOURCE=FIELD with FIELD one of key, text"),
    (["--rename", "=text"], "give SOURCE=FIELD"),
    (["--rename", "text=text"], "give SOURCE=FIELD"),
    (["--input-dir", ".", "--rename", "content=text"], "--rename and --other-fields apply to --manifest lines"),
    (["--input-dir", ".", "--other-fields", "meta"], "--rename and --other-fields apply to --manifest lines"),
])
def test_manifest_mapping_options_are_checked(tmp_path: Path, capsys, args, message):
    source = [] if "--input-dir" in args else ["--manifest", str(write_manifest(tmp_path / "m.jsonl", [{"text": "x"}]))]
    try:
        code = main(["shard", *source, *args, "--out", str(tmp_path / "o")])
    except SystemExit as e:  # argparse's own refusal
        code = e.code
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_several_manifests_write_one_directory_each(tmp_path: Path, capsys):
    """A corpus of many files in one command: one shard directory per file under --out, each byte-identical to the
    file sharded alone, whether the files are sharded side by side (--workers 2) or one by one; the folder is one
    training dataset; a file cut off fails alone."""
    rows = [{"text": f"line {i}"} for i in range(6)]
    manifests = [write_manifest(tmp_path / "a.jsonl", rows[:2]), write_manifest(tmp_path / "b.json.gz", rows[2:5]),
                 write_manifest(tmp_path / "c.json", rows[5:])]
    out = tmp_path / "corpus"
    assert main(["shard", "--manifest", *map(str, manifests), "--out", str(out), "--workers", "2"]) == 0
    summary = dict(line.split(": wrote ") for line in capsys.readouterr().out.splitlines())  # as each file ends
    assert {Path(d).name: wrote[:9] for d, wrote in summary.items()} == {
        "a": "2 samples", "b": "3 samples", "c": "1 samples"}
    assert main(["shard", "--manifest", *map(str, manifests), "--out", str(tmp_path / "one-by-one"),
                 "--workers", "1"]) == 0
    assert all(folder_bytes(out / name) == folder_bytes(tmp_path / "one-by-one" / name) for name in "abc")
    assert main(["shard", "--manifest", str(manifests[1]), "--out", str(tmp_path / "b-alone"), "--workers", "1"]) == 0
    assert folder_bytes(out / "b") == folder_bytes(tmp_path / "b-alone")
    assert sum(shard.samples for shard in expand_spec(str(out), "data.train_shards[0]")) == 6

    whole = write_manifest(tmp_path / "d.jsonl.gz", [{"text": "x" * 5000} for _ in range(50)])
    (tmp_path / "cut.jsonl.gz").write_bytes(whole.read_bytes()[:-200])
    for workers in ("1", "2"):
        capsys.readouterr()
        partly = tmp_path / f"partly-{workers}"
        assert main(["shard", "--manifest", str(tmp_path / "cut.jsonl.gz"), str(manifests[0]), "--out", str(partly),
                     "--workers", workers]) == 1
        assert "cut.jsonl.gz: unreadable after line" in capsys.readouterr().err
        assert sorted(p.name for p in partly.iterdir()) == ["a"]


def test_several_manifests_are_checked_before_any_is_written(tmp_path: Path, capsys):
    a = write_manifest(tmp_path / "a.jsonl", [{"text": "x"}])
    (tmp_path / "sub").mkdir()
    twin = write_manifest(tmp_path / "sub" / "a.json.gz", [{"text": "y"}])
    b = write_manifest(tmp_path / "b.jsonl", [{"text": "z"}])
    out = tmp_path / "out"
    assert main(["shard", "--manifest", str(a), str(twin), "--out", str(out)]) == 2
    assert f"--manifest: two files would both write {out / 'a'}" in capsys.readouterr().err
    (out / "b").mkdir(parents=True)
    (out / "b" / "old.txt").write_text("mine")
    assert main(["shard", "--manifest", str(a), str(b), "--out", str(out), "--workers", "1"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert not (out / "a").exists()


def test_resume_keeps_the_outputs_completed_with_the_same_options_and_writes_the_rest(tmp_path: Path, capsys):
    """A run over many files killed midway: --resume keeps the files done, rewrites the one cut off and does the
    rest; an output written otherwise is refused."""
    manifests = [write_manifest(tmp_path / f"{name}.jsonl", [{"text": f"{name} {i}"} for i in range(5)])
                 for name in "abc"]
    out = tmp_path / "corpus"
    args = ["shard", "--manifest", *map(str, manifests), "--out", str(out), "--workers", "1",
            "--max-samples-per-shard", "2"]
    assert main(args) == 0
    whole = {name: folder_bytes(out / name) for name in "abc"}
    (out / "b" / "index.json").unlink()  # killed while writing b: shards, no index; c not started
    (out / "b" / "shard-000001.tar").write_bytes(b"cut")
    (out / "b" / ".shuffle-x").mkdir()
    (out / "b" / "notes.txt").write_text("not ours: kept, and no reason to refuse the directory")
    shutil.rmtree(out / "c")
    kept = (out / "a" / "shard-000000.tar").stat().st_mtime_ns
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0
    assert f"{out / 'a'}: kept, completed earlier from a.jsonl with these options" in capsys.readouterr().out
    (out / "b" / "notes.txt").unlink()
    assert {name: folder_bytes(out / name) for name in "abc"} == whole
    assert (out / "a" / "shard-000000.tar").stat().st_mtime_ns == kept and not (out / "b" / ".shuffle-x").exists()

    assert main([*args, "--resume", "--seed", "1"]) == 2
    assert f"{out / 'a'} was written with seed 0, not 1; pass --overwrite" in capsys.readouterr().err
    write_manifest(manifests[2], [{"text": f"c {i}"} for i in range(6)])  # the file changed since
    assert main([*args, "--resume"]) == 2
    assert f"{out / 'c'} was written with manifest_bytes 80, not 96" in capsys.readouterr().err
    assert main([*args, "--resume", "--overwrite"]) == 2
    assert "pick one" in capsys.readouterr().err
    assert {name: folder_bytes(out / name) for name in "ab"} == {name: whole[name] for name in "ab"}


@pytest.mark.slow
def test_a_shard_run_killed_while_writing_is_refused_by_the_trainer_until_resumed(tmp_path: Path, capsys):
    """A real ``shard`` process killed once its shards begin leaves its output marked as being written and without
    an index: training on it is refused, naming the command (its tars would have passed for the whole corpus),
    ``validate`` reports it, and the same command with --resume finishes it."""
    source = write_manifest(tmp_path / "big.jsonl", [{"text": f"sample {i} " + "x" * 200} for i in range(40_000)])
    out = tmp_path / "shards"
    args = ["shard", "--manifest", str(source), "--out", str(out), "--workers", "1", "--max-samples-per-shard", "50"]
    proc = subprocess.Popen([sys.executable, "-m", "data_prep", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    deadline = time.monotonic() + 120
    while not (out / "shard-000002.tar").exists():  # two shards complete, the run far from its end
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    marker = json.loads((out / ".writing").read_text())
    assert not (out / "index.json").exists() and f"shard --manifest {source}" in marker["command"]
    with pytest.raises(DataError, match=r"data.train_shards\[0\]: '.*shards' is a data_prep shard output without its "
                                        r"index.json: the run that writes it was cut off or is still going; started "
                                        r".* \(pid \d+\): .*shard --manifest .* Finish it \(the same command with "
                                        r"--resume\), or remove the directory"):
        expand_spec(str(out), "data.train_shards[0]")
    assert main(["validate", str(out)]) == 1
    assert "index.json: not found: the shard run that writes this directory was cut off" in capsys.readouterr().out
    assert main([*args, "--resume"]) == 0
    assert not (out / ".writing").exists()
    assert sum(shard.samples for shard in expand_spec(str(out), "k")) == 40_000


@pytest.mark.parametrize("line", [b'{"text": "\\ud800"}', b'{"text": "\xed\xa0\x80"}',
                                  '{"text": "\ud800"}'.encode("utf-16-le", "surrogatepass")],
                         ids=["escape", "utf-8 bytes", "utf-16"])
def test_a_lone_surrogate_is_rejected_however_it_is_written(line: bytes):
    with pytest.raises(Rejected, match="lone surrogate"):
        parse_row(line)


def test_escapes_and_text_near_the_surrogates_are_kept():
    assert parse_row('{"text": "caf\\u00e9 \ud55c\ud7a3"}'.encode()) == {"text": "café 한\ud7a3"}


def test_a_small_output_is_spread_over_min_shards(manifest: Path, tmp_path: Path):
    """Training needs a shard per reader (processes x data.num_workers): 8 samples go into 8 shards by default (16 at
    least where there are 16 samples), into 4 of 2 with --min-shards 4; --max-samples-per-shard still caps them."""
    def counts(out: Path, *args: str) -> list:
        assert main(["shard", "--manifest", str(manifest), "--out", str(out), "--workers", "1", *args]) == 0
        return [s["samples"] for s in json.loads((out / "index.json").read_text())["shards"]]

    assert counts(tmp_path / "default") == [1] * 8
    assert counts(tmp_path / "four", "--min-shards", "4") == [2] * 4
    assert counts(tmp_path / "capped", "--min-shards", "2", "--max-samples-per-shard", "3") == [3, 3, 2]
