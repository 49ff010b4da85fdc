"""Raw samples -> one batch of the contract in ``pretrain/data/__init__.py``: decode, transform, mask, stack.

One builder call makes one batch from exactly ``batch_size`` raw samples. A sample whose media fail to decode keeps its
row, empty (``valid`` False, every mask False, label -100): the row count never depends on decoding, which is what lets
a resumed worker fast-forward by counting raw samples without decoding them. ``None`` in place of a sample is such an
empty row too, with the key ``""`` (the padding of a validation pass's last batch).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from .. import vocab
from ..config import MASKED, DataConfig, ModelConfig, data_roles
from ..patches import patches_at
from ..shard_format import LABEL_FIELD, MODALITY_FIELDS
from .decode import decode
from .masking import hide, num_predicted, patch_positions, text_positions
from .reader import Sample, SkipCounter
from .transforms import crop_or_pad, resample, shift, to_pixels, video_frames

IGNORE_INDEX = -100
Rngs = Sequence[Optional[np.random.Generator]]  # one per batch row (None: a row that holds nothing)


class BatchBuilder:
    """Knows the model's shapes, what the run reads (``data.objective``) and the masking ratios; turns a list of raw
    samples into tensors. ``training``: the random crops and shifts of ``data`` apply (validation: none)."""

    def __init__(self, model: ModelConfig, data: DataConfig, training: bool):
        self.model, self.data = model, data
        self.random_crop = training and data.random_crop
        self.image_shift = data.image_shift if training else 0
        roles = data_roles(data, model)
        self.modalities = [m for m in roles if m in MODALITY_FIELDS]
        self.labels = "label" in roles
        self.decoders = {"text": self._text, "image": self._image, "audio": self._audio, "video": self._video}
        self.stackers = {"text": self._stack_text, "image": self._stack_image, "audio": self._stack_audio,
                         "video": self._stack_video}
        self.slots = {m: num_predicted(getattr(data.masking, m), self._size(m)) if roles[m] == MASKED else 0
                      for m in self.modalities}
        self._noted: set = set()  # what the transforms did to data of another shape, each said once
        self._new_notes: List[str] = []

    def _note(self, name: str, found: str, wanted: str, key: str) -> None:
        note = f"{name}: {found} in the data -> {wanted} ({key})"
        if found != wanted and note not in self._noted:
            self._noted.add(note)
            self._new_notes.append(note)

    def drain_notes(self) -> List[str]:
        """The conversions first met since the last drain (the stream says each once)."""
        notes, self._new_notes = self._new_notes, []
        return notes

    def _size(self, name: str) -> int:
        return self.model.text.max_length if name == "text" else getattr(self.model, name).num_patches

    def __call__(self, samples: List[Optional[Sample]], rngs: Sequence[Optional[np.random.Generator]],
                 counter: SkipCounter) -> Dict[str, object]:
        """``rngs[i]`` makes every random choice of sample ``i`` (crop, masks), so that a sample is cropped and masked
        alike whichever batch it falls in; ``None`` for a padding row."""
        rows = [None if sample is None else self._decode_row(sample, rng, counter)
                for sample, rng in zip(samples, rngs)]
        batch: Dict[str, object] = {"inputs": {}, "decode": {}, "decode_mask": {}, "targets": {}}
        for name in self.modalities:
            self.stackers[name](rows, rngs, batch)
        if self.labels:
            labels = torch.tensor([IGNORE_INDEX if row is None else row.get("label", IGNORE_INDEX) for row in rows])
            batch["targets"]["label"] = labels
            batch["decode"]["label"] = torch.zeros(len(rows), 1, dtype=torch.long)
            batch["decode_mask"]["label"] = labels[:, None] != IGNORE_INDEX
        batch["keys"] = ["" if sample is None else str(sample["__key__"]) for sample in samples]
        batch["valid"] = torch.tensor([row is not None for row in rows])
        return batch

    # --- one sample ------------------------------------------------------------------------------------------------

    def _decode_row(self, sample: Sample, rng: np.random.Generator, counter: SkipCounter) -> Optional[dict]:
        """Every modality of one sample in its fixed shape, or None (counted) when any of its media is undecodable."""
        row = {}
        key = ""
        try:
            for name in self.modalities:
                key = next((k for k in MODALITY_FIELDS[name] if k in sample), "")
                if key:
                    row[name] = self.decoders[name](decode(key, sample[key]), rng)
            key = LABEL_FIELD
            if self.labels and key in sample:
                row["label"] = self._label(decode(key, sample[key]))
        except Exception as exc:  # noqa: BLE001 -- odd media content makes PIL/numpy/torch raise anything
            counter.skip(f"undecodable:{key}", sample["__url__"], exc, sample["__key__"])
            return None
        return row

    def _text(self, data: np.ndarray, rng: np.random.Generator) -> tuple:
        return crop_or_pad(data, self.model.text.max_length, self.random_crop, rng)

    def _image(self, image: Image.Image, rng: np.random.Generator) -> np.ndarray:
        cfg = self.model.image
        self._note("image", f"{len(image.getbands())}-channel {image.height}x{image.width}",
                   f"{cfg.channels}-channel {cfg.size[0]}x{cfg.size[1]}", "model.image")
        return shift(to_pixels(image, cfg.size, cfg.channels), self.image_shift, rng)

    def _audio(self, decoded: tuple, rng: np.random.Generator) -> tuple:
        self._note("audio", f"{decoded[1]} Hz", f"{self.data.audio_sample_rate} Hz", "data.audio_sample_rate")
        wave = resample(decoded[0], decoded[1], self.data.audio_sample_rate)
        return crop_or_pad(wave, self.model.audio.num_samples, self.random_crop, rng)

    def _video(self, video: np.ndarray, _rng: np.random.Generator) -> np.ndarray:
        cfg = self.model.video
        frames, height, width, channels = video.shape
        self._note("video", f"{frames} frames, {channels}-channel {height}x{width}",
                   f"{cfg.frames} frames, {cfg.channels}-channel {cfg.size[0]}x{cfg.size[1]}", "model.video")
        return video_frames(video, cfg.frames, cfg.size, cfg.channels)

    def _label(self, label: int) -> int:
        if not 0 <= label < self.model.num_classes:
            raise ValueError(f"label {label} outside [0, model.num_classes={self.model.num_classes})")
        return label

    # --- one modality, whole batch ---------------------------------------------------------------------------------

    def _present(self, rows: List[Optional[dict]], name: str) -> np.ndarray:
        return np.array([row is not None and name in row for row in rows])

    def _sequences(self, rows: List[Optional[dict]], name: str, length: int, dtype: type) -> tuple:
        """Stacked cropped/padded 1-D values [B, length] and their valid lengths [B] (0 where the row lacks them)."""
        values = np.zeros((len(rows), length), dtype=dtype)
        lengths = np.zeros(len(rows), dtype=np.int64)
        for b in np.flatnonzero(self._present(rows, name)):
            values[b], lengths[b] = rows[b][name]
        return values, lengths

    def _stack_text(self, rows: List[Optional[dict]], rngs: Rngs, batch: dict) -> None:
        length = self.model.text.max_length
        raw, lengths = self._sequences(rows, "text", length, np.int64)
        ids = np.where(np.arange(length) < lengths[:, None], raw + vocab.NUM_SPECIAL, vocab.PAD_ID)
        batch["inputs"]["text_mask"] = torch.from_numpy(ids != vocab.PAD_ID)
        slots = self.slots["text"]
        if slots:
            masking = self.data.masking
            where, used = text_positions(lengths, masking.text, masking.text_mean_span, slots, rngs,
                                         self._captions_hidden(rows, rngs))
            original = np.take_along_axis(ids, where, axis=1)
            batch["targets"]["text"] = torch.from_numpy(np.where(used, original, IGNORE_INDEX))
            ids[np.nonzero(used)[0], where[used]] = vocab.MASK_ID  # padding slots point at 0: leave them out
            self._add_decode(batch, "text", where, used)
        batch["inputs"]["text"] = torch.from_numpy(ids)

    def _stack_image(self, rows: List[Optional[dict]], rngs: Rngs, batch: dict) -> None:
        cfg = self.model.image
        pixels = self._pixels(rows, "image", (*cfg.size, cfg.channels))
        batch["inputs"]["image"] = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))
        self._mask_patches(batch, "image", self._whole(rows, "image"), rngs)

    def _captions_hidden(self, rows: List[Optional[dict]], rngs: Rngs) -> Optional[np.ndarray]:
        """Rows whose text goes with another modality and is hidden whole (``data.masking.caption_whole`` of them):
        the decoder then reads the text from the other modality alone. No random number is drawn when it is 0."""
        if not self.data.masking.caption_whole:
            return None
        paired = [row is not None and "text" in row and len(row) - ("label" in row) > 1 for row in rows]
        return np.array([with_other and rngs[b].random() < self.data.masking.caption_whole
                         for b, with_other in enumerate(paired)], dtype=bool)

    def _stack_audio(self, rows: List[Optional[dict]], rngs: Rngs, batch: dict) -> None:
        cfg = self.model.audio
        wave, lengths = self._sequences(rows, "audio", cfg.num_samples, np.float32)
        batch["inputs"]["audio"] = torch.from_numpy(wave)
        valid = np.arange(cfg.num_patches) * cfg.patch_size < lengths[:, None]
        self._mask_patches(batch, "audio", valid, rngs)

    def _stack_video(self, rows: List[Optional[dict]], rngs: Rngs, batch: dict) -> None:
        cfg = self.model.video
        pixels = self._pixels(rows, "video", (cfg.frames, *cfg.size, cfg.channels))
        batch["inputs"]["video"] = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 1, 4, 2, 3)))
        self._mask_patches(batch, "video", self._whole(rows, "video"), rngs)

    def _pixels(self, rows: List[Optional[dict]], name: str, shape: tuple) -> np.ndarray:
        """Stacked uint8 pixels -> float32 normalised ((x/255 - mean)/std), zeros where the row lacks them."""
        present = self._present(rows, name)
        raw = np.zeros((len(rows), *shape), dtype=np.uint8)
        for b in np.flatnonzero(present):
            raw[b] = rows[b][name]
        mean = np.asarray(self.data.pixel_mean, dtype=np.float32)
        std = np.asarray(self.data.pixel_std, dtype=np.float32)
        pixels = (raw.astype(np.float32) * np.float32(1 / 255) - mean) / std
        pixels[~present] = 0.0
        return pixels

    def _whole(self, rows: List[Optional[dict]], name: str) -> np.ndarray:
        """Patch validity [B, patches] of a modality that is either wholly present in a row or absent."""
        return np.repeat(self._present(rows, name)[:, None], getattr(self.model, name).num_patches, axis=1)

    def _mask_patches(self, batch: dict, name: str, valid: np.ndarray, rngs: Rngs) -> None:
        """The key mask of modality ``name``; with patches to predict, their positions and original values."""
        slots = self.slots[name]
        visible = valid
        if slots:
            where, used = patch_positions(valid, getattr(self.data.masking, name), slots, rngs)
            visible = hide(valid, where, used)
            self._add_decode(batch, name, where, used)
            inputs = batch["inputs"][name]
            targets = patches_at(name, getattr(self.model, name), inputs, batch["decode"][name])
            if self.data.masking.normalized_patches:
                targets = (targets - targets.mean(-1, keepdim=True)) / (targets.var(-1, keepdim=True) + 1e-6).sqrt()
            batch["targets"][name] = targets
        batch["inputs"][f"{name}_mask"] = torch.from_numpy(visible)

    @staticmethod
    def _add_decode(batch: dict, name: str, where: np.ndarray, used: np.ndarray) -> None:
        batch["decode"][name], batch["decode_mask"][name] = torch.from_numpy(where), torch.from_numpy(used)
