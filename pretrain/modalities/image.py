"""Images (``png``/``jpg``; ``data_prep`` keeps PNG and JPEG files as they are and stores other formats as PNG):
converted to the model's channels, resized and centre-cropped to its size, shifted at random in training
(``data.image_shift``), cut into square patches with 2-D Fourier positions."""

from __future__ import annotations

import io
from typing import Any, Mapping, Tuple

import numpy as np
import torch
from PIL import Image as PILImage

from ..config import ImageConfig
from ..shard_format import Rejected
from .base import Builder, Rngs, Rows
from .patched import PixelModality
from .transforms import shift, to_pixels

IMAGE_FORMATS = {"PNG": "png", "JPEG": "jpg"}  # stored as they are; anything else PIL reads becomes PNG
PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I;16"}  # other modes are converted to RGB first


def open_image(data: bytes, field: str = "image") -> PILImage.Image:
    """The fully decoded image (``load()`` reads every pixel, so truncated files fail here, not in training)."""
    try:
        image = PILImage.open(io.BytesIO(data))
        image.load()
    except Exception as e:  # PIL raises many types for bad bytes (OSError, SyntaxError, ValueError, bomb errors)
        raise Rejected(field, f"cannot decode image ({type(e).__name__}: {e})") from None
    return image


def image_field(data: bytes, field: str = "image") -> tuple[str, bytes]:
    """``(extension, bytes)`` to store: PNG and JPEG bytes unchanged after a decode check, other formats as PNG."""
    image = open_image(data, field)
    if image.format in IMAGE_FORMATS:
        return IMAGE_FORMATS[image.format], data
    try:
        return "png", encode_png(image if image.mode in PNG_MODES else image.convert("RGB"))
    except (OSError, ValueError) as e:
        raise Rejected(field, f"cannot store a {image.format} image of mode {image.mode} as PNG ({e})") from None


def encode_png(image: PILImage.Image | np.ndarray) -> bytes:
    """PNG bytes of a PIL image or a uint8 array (H, W) or (H, W, C); PNG is lossless and byte-for-byte reproducible."""
    if isinstance(image, np.ndarray):
        image = PILImage.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def check_image(data: bytes, ext: str) -> None:
    found = open_image(data, ext).format
    if IMAGE_FORMATS.get(found) != ("jpg" if ext == "jpeg" else ext):  # .jpeg: written by other tools, read too
        raise Rejected(ext, f"a .{ext} member holds {found} data")


class Image(PixelModality):
    name = "image"
    shape_keys = ("d_model", "image.channels", "image.patch_size", "image.fourier_bands")
    source_suffixes = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

    def decode(self, field: str, data: bytes) -> PILImage.Image:
        return open_image(data, field)

    def prepare(self, image: PILImage.Image, builder: Builder, rng: np.random.Generator) -> np.ndarray:
        cfg = builder.model.image
        builder.note("image", f"{len(image.getbands())}-channel {image.height}x{image.width}",
                     f"{cfg.channels}-channel {cfg.size[0]}x{cfg.size[1]}", "model.image")
        return shift(to_pixels(image, cfg.size, cfg.channels), builder.image_shift, rng)

    def stack(self, rows: Rows, rngs: Rngs, batch: dict, builder: Builder) -> None:
        cfg = builder.model.image
        pixels = self.pixels(rows, (*cfg.size, cfg.channels), builder)
        batch["inputs"]["image"] = torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2)))
        self.mask_patches(batch, self.whole(rows, builder.model), rngs, builder)

    def store(self, data: bytes, source: str, options: Mapping[str, Any]) -> Tuple[str, bytes]:
        return image_field(data)

    def check(self, field: str, data: bytes) -> None:
        check_image(data, field)

    def raw_shape(self, cfg: ImageConfig) -> tuple:
        return (None, cfg.channels, *cfg.size)

    @staticmethod
    def channels_first(x: torch.Tensor) -> torch.Tensor:
        return x  # [B, C, H, W]


IMAGE = Image()
