"""Long texts as several samples: a byte-level model reads ``model.text.max_length`` bytes of a sample (a random
window of a longer one), so a document of many times that length would mostly go unseen. ``shard
--text-chunk-bytes N`` writes it as consecutive samples of at most N bytes instead.

Only samples whose content is text alone are split (their metadata is copied to each piece); a caption or a labelled
text stays whole. A piece ends after the last space or newline of its second half, else at a character boundary.
"""

from __future__ import annotations

from data_prep.schema import MAX_KEY, Sample, hashed_key

MIN_CHUNK_BYTES = 16  # longer than any UTF-8 character, so a piece always holds one
_SPLITTABLE = {"__key__", "txt", "json"}


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


def text_chunks(sample: Sample, chunk_bytes: int) -> list[Sample]:
    """``sample`` as consecutive pieces when its text alone is longer than ``chunk_bytes`` (0: never), else as is."""
    text = sample.get("txt")
    if not chunk_bytes or not isinstance(text, bytes) or len(text) <= chunk_bytes or set(sample) - _SPLITTABLE:
        return [sample]
    pieces, start = [], 0
    while start < len(text):
        end = _cut(text, start, chunk_bytes)
        pieces.append(text[start:end])
        start = end
    return [{**sample, "__key__": chunk_key(str(sample["__key__"]), i), "txt": piece} for i, piece in enumerate(pieces)]
