"""What writing, validation and stats share beyond the shard format itself (``pretrain.shard_format``, which defines
the rejections): sample keys, member names."""

from __future__ import annotations

import hashlib
import re

# No dots (webdataset splits a member name at the first one) and short enough for a USTAR member name.
MAX_KEY = 64
KEY_RE = re.compile(rf"^[A-Za-z0-9_-]{{1,{MAX_KEY}}}$")
KEY_RULE = f"1-{MAX_KEY} letters, digits, '_' or '-' (a '.' would split the sample in two)"

_HASH_DIGITS = 8
Sample = dict[str, "bytes | str"]  # "__key__" -> key, field -> encoded bytes


def hashed_key(prefix: str, hashed: str, room: int = MAX_KEY) -> str:
    """``prefix``'s start and a short hash of ``hashed``, in ``room`` characters: a key that stays unique where the
    readable one would be too long or shared."""
    digest = hashlib.sha1(hashed.encode()).hexdigest()[:_HASH_DIGITS]
    return f"{prefix[:room - _HASH_DIGITS - 1]}-{digest}"


def split_member(name: str) -> tuple[str, str]:
    """``"dir/key.a.b"`` -> ``("dir/key", "a.b")``, the way webdataset groups tar members into samples."""
    head, _, tail = name.rpartition("/")
    base, _, ext = tail.partition(".")
    return (f"{head}/{base}" if head else base), ext

