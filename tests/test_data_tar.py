"""The fast tar reader gives what webdataset's tarfile-based reader gives, and fails where it fails (and where a
file was cut at a member boundary, which tarfile passes)."""

from __future__ import annotations

import io
import tarfile

import pytest
import webdataset as wds
from webdataset.tariterators import tar_file_iterator

from pretrain.shards.opener import ShardStream
from pretrain.shards.tar import TarError, tar_members


def _reference(data: bytes) -> list:
    return [(m["fname"], m["data"]) for m in tar_file_iterator(io.BytesIO(data))]


def _ours(data: bytes) -> list:
    return list(tar_members(ShardStream(io.BytesIO(data))))


def _tar(fmt: int, compress: str = "") -> bytes:
    """Long, nested and non-ASCII names, a directory, a symlink, an empty file, a metadata file."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=f"w:{compress}", format=fmt) as tar:
        entries = [("a" * 120 + ".txt", b"long name"), ("dir/" + "b" * 90 + "/c.png", b"\x89PNG" * 300),
                   ("ünï.json", b"{}"), ("empty.cls", b""), ("__meta__", b"skip me")]
        for name, data in entries:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1.5
            tar.addfile(info, io.BytesIO(data))
        directory = tarfile.TarInfo("somedir")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)
        link = tarfile.TarInfo("link.txt")
        link.type, link.linkname = tarfile.SYMTYPE, "empty.cls"
        tar.addfile(link)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_members_match_tarfile(fmt):
    if fmt == tarfile.USTAR_FORMAT:
        with pytest.raises(ValueError):  # ustar cannot hold these names: nothing to compare
            _tar(fmt)
        return
    data = _tar(fmt)
    assert _ours(data) == _reference(data) and len(_ours(data)) == 4


def test_gzipped_shards_whatever_their_name_and_webdataset_writer_output():
    assert _ours(_tar(tarfile.PAX_FORMAT, "gz")) == _reference(_tar(tarfile.PAX_FORMAT))
    buffer = io.BytesIO()
    with wds.TarWriter(buffer) as writer:
        for i in range(5):
            writer.write({"__key__": f"k{i}", "txt": "x" * (i * 300), "cls": str(i)})
    assert _ours(buffer.getvalue()) == _reference(buffer.getvalue())


@pytest.mark.parametrize("cut", [700, 1024 + 100, 1536 + 3])
def test_damage_raises_like_tarfile(cut):
    data = _tar(tarfile.PAX_FORMAT)
    with pytest.raises(tarfile.ReadError):
        _reference(data[:cut])
    with pytest.raises(TarError):
        _ours(data[:cut])
    garbage = data[:1024] + b"\x07" * 512 + data[1536:]  # the first file's own header, after its pax header
    with pytest.raises(TarError, match="invalid header"):
        _ours(garbage)
    with pytest.raises(TarError, match="pax"):
        _ours(data[:512] + b"\x07" * 512 + data[1024:])


def test_a_file_cut_at_a_member_boundary_is_damage():
    """tarfile ends quietly where a file was cut between members; the last sample may lack files, so it is not."""
    data = _tar(tarfile.PAX_FORMAT)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        second = tar.getmembers()[1]
    cut = data[:second.offset]  # ends after the first member's data, before the second one's headers
    assert len(_reference(cut)) == 1
    with pytest.raises(TarError, match="ends without its end-of-archive block: the file was cut after 'a+.txt'") as e:
        _ours(cut)
    assert e.value.at_end
    with pytest.raises(TarError, match="no data"):
        _ours(b"")
