"""Long texts as several samples: a byte-level model reads ``model.text.max_length`` bytes of a sample (a random
window of a longer one), so a document of many times that length would mostly go unseen. ``shard
--text-chunk-bytes N`` writes it as samples ``key-0``, ``key-1``, ... of at most N bytes instead, shuffled like any
other sample: the pieces of a book spread over every shard rather than filling the batches of one stretch.

Only samples whose content is text alone are split (their metadata is copied to each piece); a caption or a labelled
text stays whole. A piece ends after the last space or newline of its second half, else at a character boundary.
"""

from __future__ import annotations

from data_prep.schema import MAX_KEY, hashed_key

MIN_CHUNK_BYTES = 16  # longer than any UTF-8 character, so a piece always holds one


def _cut(text: bytes, start: int, size: int) -> int:
    end = start + size
    if end >= len(text):
        return len(text)
    space = max(text.rfind(b" ", start + size // 2, end), text.rfind(b"\n", start + size // 2, end))
    if space >= 0:
        return space + 1
    while text[end] & 0xC0 == 0x80:  # a UTF-8 continuation byte: the character starts earlier
        end -= 1
    return end


def chunk_key(key: str, index: int) -> str:
    """``key-<index>``, shortened with a hash of ``key`` where that would be too long."""
    suffix = f"-{index}"
    base = key if len(key) + len(suffix) <= MAX_KEY else hashed_key(key, key, MAX_KEY - len(suffix))
    return base + suffix


def split_text(text: bytes, size: int) -> list[bytes]:
    """UTF-8 ``text`` as consecutive pieces of at most ``size`` bytes, each valid UTF-8 (``size`` >= 16)."""
    pieces, start = [], 0
    while start < len(text):
        end = _cut(text, start, size)
        pieces.append(text[start:end])
        start = end
    return pieces
