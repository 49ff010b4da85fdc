"""The Perceiver paper's byte vocabulary: 6 special ids, then the 256 UTF-8 byte values (262 ids in all).

Shared by the data pipeline (encoding) and the model (its size); identical to transformers' ``PerceiverTokenizer``.
"""

from __future__ import annotations

PAD_ID, BOS_ID, EOS_ID, MASK_ID, CLS_ID, SEP_ID = range(6)
NUM_SPECIAL = 6
VOCAB_SIZE = NUM_SPECIAL + 256


def encode_utf8(text: str) -> list[int]:
    """UTF-8 bytes of ``text`` as vocabulary ids (no special ids added)."""
    return [b + NUM_SPECIAL for b in text.encode("utf-8")]
