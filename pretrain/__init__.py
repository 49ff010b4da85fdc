"""perceiver-pretrain: distributed multimodal Perceiver IO pretraining."""

__all__ = ["load_pretrained", "save_pretrained"]


def __getattr__(name: str):
    """``load_pretrained`` and ``save_pretrained`` import torch on first use, not with the package: ``python -m
    pretrain train`` installs its signal handlers before that import (``pretrain.preemption``)."""
    if name in __all__:
        from .model import pretrained

        return getattr(pretrained, name)
    raise AttributeError(f"module 'pretrain' has no attribute {name!r}")
