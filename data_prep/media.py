"""The stored fields' checks: each modality's unit (``pretrain.modalities``) decodes its own in full, the metadata
(``json``) is checked here.

Media are trusted only after a full decode: a file that merely has the right name would crash or stall training later.
Every decoder failure becomes :class:`~pretrain.shard_format.Rejected`, so bad data is skipped and reported, never
fatal.
"""

from __future__ import annotations

import json

from pretrain.modalities import REGISTRY
from pretrain.shard_format import FIELD_MODALITY, META_FIELD, Rejected


def encode_json(meta: dict) -> bytes:
    """A ``json`` field with sorted keys, so equal metadata gives equal bytes."""
    return json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")


def check_json(data: bytes) -> None:
    try:
        json.loads(data)
    except ValueError as e:
        raise Rejected("json", f"metadata is not valid JSON ({e})") from None


def check_field(ext: str, data: bytes) -> None:
    """Decode one stored field by its extension; raises :class:`Rejected` naming the field and what is wrong."""
    if ext == META_FIELD:
        check_json(data)
    elif ext in FIELD_MODALITY:
        REGISTRY[FIELD_MODALITY[ext]].check(ext, data)
    else:
        raise Rejected(ext, f"unknown field '.{ext}'; the schema has {', '.join(FIELD_MODALITY)}")
