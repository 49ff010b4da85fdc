"""Shared fixtures; also makes ``pretrain`` importable without ``pip install -e .``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # as the trainer does: DeepSpeed's accelerator detection costs ~4 s per import
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pretrain.config import (  # noqa: E402
    ArrayConfig,
    AudioConfig,
    ImageConfig,
    ModelConfig,
    TextConfig,
    VideoConfig,
)

# Sizes of the tiny multimodal model below: patches per modality and values per patch.
TEXT_VOCAB, TEXT_MAX = 20, 12
IMAGE = dict(shape=(3, 8, 8), patches=4, values=48)
AUDIO = dict(shape=(64,), patches=4, values=16)
VIDEO = dict(shape=(4, 3, 8, 8), patches=8, values=96)
ARRAY = dict(shape=(6, 5), patches=6, values=5)
NUM_CLASSES = 5


def tiny_config(**overrides) -> ModelConfig:
    """A small text-only model; keyword arguments override any ModelConfig field."""
    values = dict(
        d_model=32,
        num_latents=8,
        d_latents=48,
        num_self_attends_per_block=2,
        num_self_attention_heads=4,
        num_cross_attention_heads=2,
        decoder_num_heads=2,
        decoder_qk_channels=16,
        attention_dropout=0.0,
        init_std=0.2,
        text=TextConfig(vocab_size=TEXT_VOCAB, max_length=TEXT_MAX),
    )
    values.update(overrides)
    return ModelConfig(**values)


def multimodal_config(**overrides) -> ModelConfig:
    """Every modality plus a classification head, all tiny."""
    values = dict(
        num_classes=NUM_CLASSES,
        image=ImageConfig(size=[8, 8], channels=3, patch_size=4, fourier_bands=2),
        audio=AudioConfig(num_samples=64, patch_size=16, fourier_bands=2),
        video=VideoConfig(frames=4, size=[8, 8], channels=3, tubelet=[2, 4, 4], fourier_bands=2),
        array=ArrayConfig(length=6, channels=5, fourier_bands=2),
    )
    values.update(overrides)
    return tiny_config(**values)


def multimodal_inputs(batch: int = 2, seq: int = 7, generator: torch.Generator | None = None) -> dict:
    """Random inputs for :func:`multimodal_config`, every modality present, no masks."""
    g = generator if generator is not None else torch.Generator().manual_seed(0)
    return {
        "text": torch.randint(0, TEXT_VOCAB, (batch, seq), generator=g),
        "image": torch.randn(batch, *IMAGE["shape"], generator=g),
        "audio": torch.randn(batch, *AUDIO["shape"], generator=g),
        "video": torch.randn(batch, *VIDEO["shape"], generator=g),
        "array": torch.randn(batch, *ARRAY["shape"], generator=g),
    }


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(items: list) -> None:
    """The local Slurm cluster's tests first: they are the longest file, so that under ``--dist loadfile``
    (scripts/test.sh) the other worker runs the rest meanwhile instead of the suite waiting for them at its end."""
    items.sort(key=lambda item: item.path.name != "test_slurm.py")
