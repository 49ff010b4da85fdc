"""perceiver-pretrain: distributed multimodal Perceiver IO pretraining."""

from .model.pretrained import load_pretrained, save_pretrained

__all__ = ["load_pretrained", "save_pretrained"]
