"""Bytes of one webdataset key -> a native array or image. Every failure is a :class:`DecodeError` naming the key, so
the batch builder can skip the sample and count it by reason instead of crashing the run."""

from __future__ import annotations

from ..modalities import REGISTRY
from ..shard_format import FIELD_MODALITY


class DecodeError(ValueError):
    """Undecodable media; ``key`` is the webdataset key (``png``, ``flac``, ...) that failed."""

    def __init__(self, key: str, reason: object):
        super().__init__(f".{key}: {reason}")
        self.key = key


def decode(key: str, data: bytes) -> object:
    """Decode ``data`` stored under ``key``, turning any library's failure into a :class:`DecodeError`."""
    try:
        return REGISTRY[FIELD_MODALITY[key]].decode(key, data)
    except Exception as exc:  # PIL, soundfile, numpy and codecs raise many types; all mean "undecodable"
        raise DecodeError(key, exc) from exc
