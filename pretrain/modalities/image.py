"""Images (``png``/``jpg``): converted to the model's channels, resized and centre-cropped to its size, shifted at
random in training (``data.image_shift``), cut into square patches with 2-D Fourier positions."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image as PILImage

from ..config import ImageConfig
from .base import Rngs, Rows
from .patched import PixelModality
from .transforms import shift, to_pixels


def decode_image(data: bytes) -> PILImage.Image:
    """PNG/JPEG -> a PIL image, fully loaded so truncated files fail here and not later."""
    image = PILImage.open(io.BytesIO(data))
    image.load()
    return image


class Image(PixelModality):
    name = "image"
    shape_keys = ("d_model", "image.channels", "image.patch_size", "image.fourier_bands")

    def decode(self, field: str, data: bytes) -> PILImage.Image:
        return decode_image(data)

    def prepare(self, image: PILImage.Image, builder, rng: np.random.Generator) -> np.ndarray:
        cfg = builder.model.image
        builder.note("image", f"{len(image.getbands())}-channel {image.height}x{image.width}",
                     f"{cfg.channels}-channel {cfg.size[0]}x{cfg.size[1]}", "model.image")
        return shift(to_pixels(image, cfg.size, cfg.channels), builder.image_shift, rng)

    def stack(self, rows: Rows, rngs: Rngs, batch: dict, builder) -> None:
        cfg = builder.model.image
        pixels = self.pixels(rows, (*cfg.size, cfg.channels), builder)
        batch["inputs"]["image"] = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))
        self.mask_patches(batch, self.whole(rows, builder.model), rngs, builder)

    def raw_shape(self, cfg: ImageConfig) -> tuple:
        return (None, cfg.channels, *cfg.size)

    @staticmethod
    def channels_first(x: torch.Tensor) -> torch.Tensor:
        return x  # [B, C, H, W]


IMAGE = Image()
