"""Text: UTF-8 bytes (``txt``) in the paper's vocabulary, cropped or padded to ``model.text.max_length``, hidden in
T5-style spans and predicted by the tied embedding; or token ids of another vocabulary given to the model directly.

Text: byte or token ids with learned input positions, learned decoder queries, logits tied to the input embedding.

Parameter roles equal transformers' ``PerceiverForMaskedLM`` (text preprocessor, decoder position encodings, embedding
decoder bias), so a text-only model converts 1:1.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import vocab
from ..config import ModelConfig, TextConfig
from ..shard_format import Rejected
from .base import Builder, IGNORE_INDEX, Modality, Rngs, Rows, add_decode, check_tensor, element_mask, sequences
from .masking import text_positions
from .transforms import crop_or_pad


class TextAdapter(nn.Module):
    name = "text"

    def __init__(self, cfg: TextConfig, d_model: int):
        super().__init__()
        self.max_length = cfg.max_length
        self.embeddings = nn.Embedding(cfg.vocab_size, d_model)
        self.position_embeddings = nn.Embedding(cfg.max_length, d_model)
        self.query_positions = nn.Embedding(cfg.max_length, d_model)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def num_positions(self, ids: Optional[torch.Tensor]) -> int:
        """Every position of the given text, or of ``max_length`` when decoding without text input."""
        return self.max_length if ids is None else ids.shape[1]

    def embed(self, ids: torch.Tensor, mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        check_tensor(ids, "text", (None, None), floating=False)
        if ids.shape[1] > self.max_length:
            raise ValueError(f"text: length {ids.shape[1]} exceeds model.text.max_length={self.max_length}")
        positions = torch.arange(ids.shape[1], device=ids.device)
        features = self.embeddings(ids) + self.position_embeddings(positions)
        return features, element_mask(mask, "text", ids.shape[0], ids.shape[1])

    def queries(self, positions: torch.Tensor) -> torch.Tensor:
        return self.query_positions(positions)

    def head(self, decoded: torch.Tensor) -> torch.Tensor:
        """Logits over the vocabulary: the input embedding transposed plus a bias."""
        return F.linear(decoded, self.embeddings.weight, self.bias)


class Text(Modality):
    name = "text"
    shape_keys = ("d_model", "text.vocab_size", "text.max_length")
    source_suffixes = (".txt",)
    manifest_inline = True

    def decode(self, field: str, data: bytes) -> np.ndarray:
        """UTF-8 text -> its bytes as uint8 (the stream's ids are bytes + ``vocab.NUM_SPECIAL``); invalid UTF-8 and
        empty text are errors, since they are broken samples rather than text."""
        data.decode("utf-8")
        if not data:
            raise ValueError("empty text")
        return np.frombuffer(data, dtype=np.uint8)

    def prepare(self, value: np.ndarray, builder: Builder, rng: np.random.Generator) -> tuple:
        return crop_or_pad(value, builder.model.text.max_length, builder.random_crop, rng)

    def positions(self, model: ModelConfig) -> int:
        return model.text.max_length

    def stack(self, rows: Rows, rngs: Rngs, batch: dict, builder: Builder) -> None:
        length = builder.model.text.max_length
        raw, lengths = sequences(rows, self.name, (length,), np.int64)
        ids = np.where(np.arange(length) < lengths[:, None], raw + vocab.NUM_SPECIAL, vocab.PAD_ID)
        batch["inputs"]["text_mask"] = torch.from_numpy(ids != vocab.PAD_ID)
        slots = builder.slots[self.name]
        if slots:
            masking = builder.data.masking
            where, used = text_positions(lengths, masking.text, masking.text_mean_span, slots, rngs,
                                         self._captions_hidden(rows, rngs, masking.caption_whole))
            original = np.take_along_axis(ids, where, axis=1)
            batch["targets"]["text"] = torch.from_numpy(np.where(used, original, IGNORE_INDEX))
            ids[np.nonzero(used)[0], where[used]] = vocab.MASK_ID  # padding slots point at 0: leave them out
            add_decode(batch, self.name, where, used)
        batch["inputs"]["text"] = torch.from_numpy(ids)

    @staticmethod
    def _captions_hidden(rows: Rows, rngs: Rngs, caption_whole: float) -> Optional[np.ndarray]:
        """Rows whose text goes with another modality and is hidden whole (``data.masking.caption_whole`` of them):
        the decoder then reads the text from the other modality alone. No random number is drawn when it is 0."""
        if not caption_whole:
            return None
        paired = [row is not None and "text" in row and len(row) - ("label" in row) > 1 for row in rows]
        return np.array([with_other and rngs[b].random() < caption_whole for b, with_other in enumerate(paired)],
                        dtype=bool)

    def store(self, data: bytes, source: str, options: Mapping[str, Any]) -> Tuple[str, bytes]:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise Rejected("text", f"{source} is not UTF-8 text ({e})") from None
        return "txt", data

    def check(self, field: str, data: bytes) -> None:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise Rejected(field, f"text is not UTF-8 ({e})") from None

    def adapter(self, model: ModelConfig) -> nn.Module:
        return TextAdapter(model.text, model.d_model)

    def loss(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return cross_entropy_sum(pred, target)


def cross_entropy_sum(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over the targets (-100 on padding slots and absent rows)."""
    target = target.reshape(-1)
    return F.cross_entropy(logits.float().reshape(target.shape[0], -1), target, ignore_index=IGNORE_INDEX,
                           reduction="sum")


TEXT = Text()
