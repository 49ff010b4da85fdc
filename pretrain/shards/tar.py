"""A streaming reader of tar members, faster than ``tarfile`` on webdataset shards.

``tarfile`` builds header objects for every member (webdataset's TarWriter adds a pax header to every file unless its
``mtime`` is an int, as data_prep's is), which alone caps a data worker's members per second. Shards need
only (name, bytes) of regular files in order, so this parses the 512-byte headers directly: ustar names with prefix,
pax ``path``/``size`` records, GNU long names, base-256 sizes, checksums. Damage raises :class:`TarError`, and so
does an archive that ends without its end-of-archive block (a file cut at a member boundary, which tarfile passes
quietly: its last sample may lack files). Reading stops at that block: what follows (the writer's padding) is the
caller's to consume (``pretrain.shards.read``). Decompression happens before (``pretrain.shards.opener``).
"""

from __future__ import annotations

import re
import struct
import tarfile
from typing import BinaryIO, Dict, Iterator, Tuple

BLOCK = 512
_ZERO = bytes(BLOCK)
_REGULAR = (b"0", b"\0", b"7")
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata files, skipped as webdataset does


class TarError(ValueError):
    """The archive is damaged at this point; ``member`` names the file being read, when its header was intact;
    ``at_end``: the data stopped there (a cut file, or a command that ended early)."""

    def __init__(self, message: str, member: str = "", at_end: bool = False):
        super().__init__(f"{message} in {member!r}" if member else message)
        self.member, self.at_end = member, at_end


def _read(stream: BinaryIO, size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise TarError(f"unexpected end of data (wanted {size} bytes, got {len(data)})", at_end=True)
    return data


def _number(field: bytes) -> int:
    if field[0] & 0x80:  # base-256 (GNU) for large values
        return tarfile.nti(field)
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise TarError(f"invalid header (number field {field!r})") from None


def _check(header: bytes) -> None:
    stored = _number(header[148:156])
    unsigned = sum(header) - sum(header[148:156]) + 256
    if stored != unsigned and stored != sum(struct.unpack("148b8x356b", header)) + 256:
        raise TarError("invalid header (bad checksum)")


def _pax_records(data: bytes) -> Dict[str, str]:
    records, pos = {}, 0
    try:
        while pos < len(data) and data[pos:pos + 1] != b"\0":
            space = data.index(b" ", pos)
            length = int(data[pos:space])
            key, _, value = data[space + 1:pos + length - 1].partition(b"=")
            records[key.decode("utf-8")] = value.decode("utf-8", "surrogateescape")
            pos += length
    except ValueError as exc:
        raise TarError(f"invalid pax header ({exc})") from None
    return records


def _name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    if header[257:263] == b"ustar\0" and header[345] != 0:  # POSIX prefix field (GNU tars use it otherwise)
        name = header[345:500].split(b"\0", 1)[0] + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def tar_members(stream: BinaryIO) -> Iterator[Tuple[str, bytes]]:
    """(name, content) of every regular file of the tar in ``stream``, in archive order, up to the end-of-archive
    block."""
    override: Dict[str, str] = {}
    last = ""
    while True:
        header = stream.read(BLOCK)
        if header == _ZERO:
            return
        if not header:
            raise TarError(f"the archive ends without its end-of-archive block: the file was cut after {last!r}"
                           if last else "no data", at_end=True)
        if len(header) < BLOCK:
            raise TarError("unexpected end of data (partial header)", at_end=True)
        _check(header)
        kind = header[156:157]
        size = int(override["size"]) if "size" in override and kind in _REGULAR else _number(header[124:136])
        try:
            data = _read(stream, size)
            _read(stream, -size % BLOCK)
        except TarError as exc:
            raise TarError(str(exc), override.get("path") or _name(header), exc.at_end) from None
        if kind == b"x":
            override = _pax_records(data)
        elif kind == b"L":
            override = {"path": data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")}
        elif kind in (b"g", b"K"):
            continue
        else:
            name = last = override.get("path") or _name(header)
            override = {}
            if kind in _REGULAR and not _META.match(name):
                yield name, data
