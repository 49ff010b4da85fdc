"""The Perceiver IO model: attention backends, layers, position features, modality adapters."""

from .attention import attend, available_backends
from .perceiver import PerceiverDecoder, PerceiverEncoder, PerceiverIO

__all__ = ["attend", "available_backends", "PerceiverIO", "PerceiverEncoder", "PerceiverDecoder"]
