"""``validate`` finds each kind of damage in real shards (and exits 1); ``stats`` reports what the index holds."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from test_data_prep_media import garbage, good_media, write_manifest

from data_prep.__main__ import main


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid shard directory: 8 samples of every modality in shards of 3."""
    root = tmp_path_factory.mktemp("good")
    manifest = write_manifest(root / "m.jsonl", good_media(root / "media"))
    assert main(["shard", "--manifest", str(manifest), "--out", str(root / "shards"), "--workers", "1",
                 "--min-shards", "1", "--max-samples-per-shard", "3"]) == 0
    return root / "shards"


@pytest.fixture
def shards(good_dir: Path, tmp_path: Path) -> Path:
    """A fresh copy of the good directory, to damage."""
    return Path(shutil.copytree(good_dir, tmp_path / "shards"))


def members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


def find_member(directory: Path, ext: str) -> tuple[Path, str]:
    """The first shard with a member of this extension, and that sample's key."""
    for shard in sorted(directory.glob("shard-*.tar")):
        for member in members(shard):
            if member.name.endswith(f".{ext}"):
                return shard, member.name.split(".")[0]
    raise AssertionError(f"no .{ext} member")


def rewrite_tar(path: Path, change) -> None:
    """Rewrite a shard member by member: ``change(name, data)`` gives the new bytes, or None to drop the member."""
    with tarfile.open(path) as tar:
        old = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for member, data in old:
            new = change(member.name, data)
            if new is not None:
                member.size = len(new)
                tar.addfile(member, io.BytesIO(new))


def run_validate(directory: Path, capsys) -> tuple[int, list[str]]:
    code = main(["validate", str(directory), "--workers", "1"])
    return code, capsys.readouterr().out.splitlines()


def test_a_good_directory_passes(good_dir: Path, capsys):
    code, lines = run_validate(good_dir, capsys)
    assert code == 0
    assert lines[-1].endswith("checked 3 shards, 8 samples: no problems")


@pytest.mark.parametrize("ext, reason", [("png", ".png: cannot decode image"), ("flac", ".flac: cannot decode audio")])
def test_garbage_media_inside_a_tar(shards: Path, capsys, ext: str, reason: str):
    shard, key = find_member(shards, ext)
    rewrite_tar(shard, lambda name, data: garbage(len(data)) if name == f"{key}.{ext}" else data)
    code, lines = run_validate(shards, capsys)
    assert code == 1
    assert any(line.startswith(f"{shard.name}: key {key}: {reason}") for line in lines)
    assert {line.split(": ")[1] for line in lines if ": key " in line} == {f"key {key}"}


def test_a_tar_cut_inside_a_member(shards: Path, capsys):
    shard = shards / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:members(shard)[1].offset_data + 100])
    code, lines = run_validate(shards, capsys)
    assert code == 1
    assert any(line.startswith("shard-000001.tar: key ") and "truncated or corrupt tar" in line for line in lines)


def test_a_tar_cut_between_members(shards: Path, capsys):
    shard = shards / "shard-000002.tar"
    first = members(shard)[0]
    end = first.offset_data + -(-first.size // 512) * 512
    shard.write_bytes(shard.read_bytes()[:end])
    code, lines = run_validate(shards, capsys)
    assert code == 1
    assert any(line.startswith("shard-000002.tar: key ") and "without its end-of-archive block" in line
               for line in lines)
    # its one sample was being read where the file ends: it may lack files, so it is not counted
    assert "shard-000002.tar: index.json declares 2 samples, the tar has 0" in lines


def test_a_sample_missing_its_declared_field(shards: Path, capsys):
    shard, key = find_member(shards, "png")
    rewrite_tar(shard, lambda name, data: None if name == f"{key}.png" else data)
    code, lines = run_validate(shards, capsys)
    assert code == 1
    assert any(line.startswith(f"{shard.name}: key {key}: lacks .png") for line in lines)


def test_an_index_count_mismatch(shards: Path, capsys):
    index = json.loads((shards / "index.json").read_text())
    index["shards"][0]["samples"] += 1
    (shards / "index.json").write_text(json.dumps(index))
    code, lines = run_validate(shards, capsys)
    assert code == 1
    assert lines[:-1] == ["shard-000000.tar: index.json declares 4 samples, the tar has 3"]


def test_missing_and_unlisted_shards(shards: Path, capsys):
    (shards / "shard-000001.tar").rename(shards / "extra.tar")
    code, lines = run_validate(shards, capsys)
    assert code == 1
    assert "shard-000001.tar: listed in index.json but missing; rewrite the directory" in lines
    assert "extra.tar: not listed in index.json; write it anew with python -m data_prep index" in lines


def test_shards_without_an_index_are_counted_and_an_index_suggested(good_dir: Path, shards: Path, capsys):
    """Shards of other writers have no index: validate and stats read them, and say what an index would give."""
    (shards / "index.json").unlink()
    code, lines = run_validate(shards, capsys)
    assert code == 0
    assert lines == [f"note: {shards}: no index.json: counted by reading; `python -m data_prep index {shards}` writes "
                     "one, which makes the epoch length known to training",
                     f"{shards}: checked 3 shards, 8 samples: no problems"]
    assert main(["stats", str(shards), "--workers", "1"]) == 0
    counted = capsys.readouterr().out.splitlines()
    assert main(["stats", str(good_dir)]) == 0
    indexed = capsys.readouterr().out.splitlines()
    assert counted[0] == indexed[0].replace(str(good_dir), str(shards))  # shards, samples, bytes
    assert counted[2:-1] == indexed[3:]  # shard sizes, samples and bytes per modality (no "made with": no index)
    assert counted[-1].startswith("  no index.json: counted by reading every shard; `python -m data_prep index")


def test_a_shard_directory_cut_off_in_a_folder_of_them_is_reported(good_dir: Path, tmp_path: Path, capsys):
    """A run over many files killed midway leaves one output with shards and no index: validating the folder says
    so."""
    shutil.copytree(good_dir, tmp_path / "corpus" / "a")
    shutil.copytree(good_dir, tmp_path / "corpus" / "b")
    (tmp_path / "corpus" / "b" / "index.json").rename(tmp_path / "corpus" / "b" / ".writing")
    code, lines = run_validate(tmp_path / "corpus", capsys)
    assert code == 1
    assert any(line.startswith(f"{tmp_path / 'corpus' / 'b' / 'index.json'}: not found: the shard run that writes")
               for line in lines)
    assert lines[-1].endswith("checked 6 shards, 16 samples: 1 problem")


def test_stats_prints_counts_per_modality_and_sizes(good_dir: Path, capsys):
    assert main(["stats", str(good_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{good_dir}: 3 shards, 8 samples, ") and out[0].endswith("0 rejected")
    size = (good_dir.parent / "m.jsonl").stat().st_size
    assert out[1] == ("  made with: audio_rate 16000, command shard, inputs 8, manifest m.jsonl, manifest_bytes "
                      f"{size}, other_fields reject, seed 0, text_chunk_bytes 0")
    assert out[2].startswith("  shard size: min ")
    rows = {line.split()[0]: line.split()[1:3] for line in out[4:]}
    assert rows == {"audio": ["2", "25.0%"], "image": ["3", "37.5%"], "label": ["3", "37.5%"],
                    "meta": ["2", "25.0%"], "text": ["4", "50.0%"], "video": ["1", "12.5%"]}
