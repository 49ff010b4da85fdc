"""The Perceiver paper's byte vocabulary: 6 special ids, then the 256 UTF-8 byte values (262 ids in all).

Shared by the data pipeline (encoding) and the model (its size); identical to transformers' ``PerceiverTokenizer``.
"""

from __future__ import annotations

from typing import Sequence

PAD_ID, BOS_ID, EOS_ID, MASK_ID, CLS_ID, SEP_ID = range(6)
NUM_SPECIAL = 6
VOCAB_SIZE = NUM_SPECIAL + 256


def encode_utf8(text: str) -> list[int]:
    """UTF-8 bytes of ``text`` as vocabulary ids (no special ids added)."""
    return [b + NUM_SPECIAL for b in text.encode("utf-8")]


def decode_utf8(ids: Sequence[int]) -> str:
    """Inverse of :func:`encode_utf8`; special ids are dropped, invalid byte runs replaced."""
    return bytes(i - NUM_SPECIAL for i in ids if NUM_SPECIAL <= i < VOCAB_SIZE).decode("utf-8", errors="replace")
