"""Model directories: ours (``model.safetensors`` + ``config.yaml``) and transformers' ``PerceiverForMaskedLM``
(``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``). One call loads either, ready to use."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Union

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from ..config import model_config_from_dict, model_config_to_dict
from . import hf
from .perceiver import PerceiverIO

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
HF_CONFIG = "config.json"
HF_BIN = "pytorch_model.bin"


def save_pretrained(model: PerceiverIO, path: Union[str, Path], metadata: Optional[Dict[str, str]] = None) -> Path:
    """Write ``model`` to our directory format (``metadata``: strings kept in the weights file's header, such as the
    checkpoint an export came from); returns the directory."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path / WEIGHTS), metadata=metadata)
    OmegaConf.save(OmegaConf.create({"model": model_config_to_dict(model.config)}), path / CONFIG)
    return path


def save_hf_pretrained(model: PerceiverIO, path: Union[str, Path], metadata: Optional[Dict[str, str]] = None) -> Path:
    """Write a text MLM ``model`` as a transformers ``PerceiverForMaskedLM`` directory (``metadata`` as above)."""
    path = Path(path)
    hf_config = hf.config_to_hf(model.config)
    state = hf.state_dict_to_hf({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()})
    path.mkdir(parents=True, exist_ok=True)
    (path / HF_CONFIG).write_text(json.dumps(hf_config, indent=2))
    save_file(state, str(path / WEIGHTS), metadata={**(metadata or {}), "format": "pt"})
    return path


def _load_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    if (path / WEIGHTS).exists():
        return load_file(str(path / WEIGHTS))
    if (path / HF_BIN).exists():
        return torch.load(path / HF_BIN, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{path}: a transformers directory needs {WEIGHTS} or {HF_BIN}")


def load_pretrained(path: Union[str, Path], map_location: Union[str, torch.device] = "cpu") -> PerceiverIO:
    """Load our model directory or a transformers ``PerceiverForMaskedLM`` directory; returns the model in eval mode."""
    path = Path(path)
    if (path / CONFIG).exists():
        cfg = model_config_from_dict(OmegaConf.to_container(OmegaConf.load(path / CONFIG))["model"])
        state = hf.fuse_projections(load_file(str(path / WEIGHTS)))  # also directories from before the fusion
    elif (path / HF_CONFIG).exists():
        hf_config = json.loads((path / HF_CONFIG).read_text())
        if hf_config.get("model_type") != "perceiver":
            raise ValueError(f"{path / HF_CONFIG}: model_type is {hf_config.get('model_type')!r}, not 'perceiver'")
        cfg = hf.config_from_hf(hf_config)
        state = hf.hf_to_state_dict(_load_hf_weights(path))
    else:
        raise FileNotFoundError(
            f"{path}: not a model directory; expected {CONFIG} + {WEIGHTS} (ours) or {HF_CONFIG} (transformers)"
        )
    model = PerceiverIO(cfg)
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval()
