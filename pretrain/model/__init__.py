"""The Perceiver IO model: attention, layers, position features, modality adapters. Plain torch throughout; the
faster kernels are installed onto a built model by ``pretrain.perf.optimize``."""

from .attention import attend
from .perceiver import PerceiverDecoder, PerceiverEncoder, PerceiverIO

__all__ = ["attend", "PerceiverIO", "PerceiverEncoder", "PerceiverDecoder"]
