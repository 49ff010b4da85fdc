"""perceiver-pretrain: distributed multimodal Perceiver IO pretraining."""

__all__ = ["load_pretrained", "save_pretrained"]


def __getattr__(name: str):
    """``load_pretrained`` (model directories, transformers directories, runs and checkpoints) and ``save_pretrained``
    import torch on first use, not with the package: ``python -m pretrain train`` installs its signal handlers before
    that import (``pretrain.preemption``)."""
    if name == "load_pretrained":
        from .init_from import load_pretrained

        return load_pretrained
    if name in __all__:
        from .model import pretrained

        return getattr(pretrained, name)
    raise AttributeError(f"module 'pretrain' has no attribute {name!r}")
