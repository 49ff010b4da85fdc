"""Model directories: ours (``model.safetensors`` + ``config.yaml``) and transformers' ``PerceiverForMaskedLM``
(``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``). One call loads either, ready to use."""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from ..config import ModelConfig, model_config_from_dict, model_config_to_dict
from . import hf
from .perceiver import PerceiverIO

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
HF_CONFIG = "config.json"
HF_BIN = "pytorch_model.bin"
HF_MLM = "PerceiverForMaskedLM"


def save_pretrained(model: PerceiverIO, path: Union[str, Path], metadata: Optional[Dict[str, str]] = None) -> Path:
    """Write ``model`` to our directory format (``metadata``: strings kept in the weights file's header, such as the
    checkpoint an export came from); returns the directory."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    _save_weights(state, path / WEIGHTS, metadata)
    # A model directory is self-contained: the weights a run started from are in these, not to be loaded again.
    config = model_config_to_dict(replace(model.config, init_from=""))
    OmegaConf.save(OmegaConf.create({"model": config}), path / CONFIG)
    return path


def save_hf_pretrained(model: PerceiverIO, path: Union[str, Path], metadata: Optional[Dict[str, str]] = None,
                       encoder_only: bool = False) -> Path:
    """Write a text MLM ``model`` as a transformers ``PerceiverForMaskedLM`` directory (``metadata`` as above).
    ``encoder_only``: the encoder of a text model alone (latents, embeddings, encoder), which transformers' text
    heads (``PerceiverForSequenceClassification``, ...) load with nothing left over and only their decoder new."""
    path = Path(path)
    hf_config = hf.config_to_hf(model.config, encoder_only)
    state = hf.state_dict_to_hf({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
                                encoder_only)
    path.mkdir(parents=True, exist_ok=True)
    (path / HF_CONFIG).write_text(json.dumps(hf_config, indent=2))
    _save_weights(state, path / WEIGHTS, {**(metadata or {}), "format": "pt"})
    return path


def _save_weights(state: Dict[str, torch.Tensor], path: Path, metadata: Optional[Dict[str, str]]) -> None:
    """``save_file``, with the permissions of any file this process makes: safetensors writes its files 0600."""
    save_file(state, str(path), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def state_mismatch(have: Mapping[str, Sequence[int]], want: Mapping[str, Sequence[int]]) -> str:
    """How weights named and shaped ``have`` differ from those a model wants (``want``), at most three of each kind
    named; empty when they match. Shapes given as ``(0,)`` (ZeRO-3's partitioned weights) match any."""
    missing = [name for name in want if name not in have]
    unknown = [name for name in have if name not in want]
    shapes = [f"{name} {tuple(have[name])} in it, {tuple(want[name])} in the model" for name in want
              if name in have and tuple(have[name]) not in (tuple(want[name]), (0,))]

    def some(names: List[str]) -> str:
        return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")

    problems = [f"{len(missing)} weights missing from it ({some(missing)})" if missing else "",
                f"{len(unknown)} weights the model does not have ({some(unknown)})" if unknown else "",
                f"{len(shapes)} of another shape ({some(shapes)})" if shapes else ""]
    return "; ".join(p for p in problems if p)


def read_safetensors(path: Path) -> Dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, floating point, or an error naming the file and what is wrong with it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        weights = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 -- safetensors' own error type (and OSError) for a file it cannot parse
        raise ValueError(f"{path} is not a readable safetensors file ({exc}): a copy cut off, or another kind of "
                         f"file; write or copy it again") from None
    return check_floating(weights, path)


def check_floating(weights: Dict[str, torch.Tensor], path: Path) -> Dict[str, torch.Tensor]:
    """Model weights are floating point: an integer or bool tensor means the file holds something else."""
    odd = [f"{name} ({t.dtype})" for name, t in weights.items() if not t.is_floating_point()]
    if odd:
        raise ValueError(f"{path}: {len(odd)} tensors are not floating point ({', '.join(odd[:3])}"
                         f"{', ...' if len(odd) > 3 else ''}): it does not hold a model's weights")
    return weights


def _load_hf_weights(path: Path) -> Dict[str, torch.Tensor]:
    if (path / WEIGHTS).exists():
        return read_safetensors(path / WEIGHTS)
    if (path / HF_BIN).exists():  # a pickle: only tensors are unpickled (weights_only), never code
        try:
            return check_floating(torch.load(path / HF_BIN, map_location="cpu", weights_only=True), path / HF_BIN)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
            raise ValueError(f"{path / HF_BIN} cannot be read as plain tensors ({str(exc).splitlines()[0]})") from None
    raise FileNotFoundError(f"{path}: a transformers directory needs {WEIGHTS} or {HF_BIN}")


def read_model_dir(path: Union[str, Path]) -> Tuple[ModelConfig, Dict[str, torch.Tensor], Path]:
    """The config, the weights (our names, as stored: fp32 or bf16) and the config file of our model directory or of
    a transformers ``PerceiverForMaskedLM`` one, the weights checked against the config's model."""
    path = Path(path)
    if (path / CONFIG).exists():
        config_file = path / CONFIG
        cfg = model_config_from_dict(OmegaConf.to_container(OmegaConf.load(config_file))["model"])
        weights = hf.fuse_projections(read_safetensors(path / WEIGHTS))  # also directories from before the fusion
    elif (path / HF_CONFIG).exists():
        config_file = path / HF_CONFIG
        hf_config = json.loads(config_file.read_text())
        if hf_config.get("model_type") != "perceiver":
            raise ValueError(f"{config_file}: model_type is {hf_config.get('model_type')!r}, not 'perceiver'")
        classes = hf_config.get("architectures") or [HF_MLM]
        if HF_MLM not in classes:
            raise ValueError(f"{config_file}: a transformers {', '.join(classes)} directory; only {HF_MLM} "
                             f"directories (text masked language models) convert to this model")
        cfg = hf.config_from_hf(hf_config)
        try:
            weights = hf.hf_to_state_dict(_load_hf_weights(path))
        except KeyError as exc:
            raise ValueError(f"{path}: {exc.args[0]}: its weights are not a {HF_MLM}'s") from None
    else:
        raise FileNotFoundError(
            f"{path}: not a model directory; expected {CONFIG} + {WEIGHTS} (ours) or {HF_CONFIG} (transformers)"
        )
    with torch.device("meta"):  # names and shapes only
        want = {name: t.shape for name, t in PerceiverIO(cfg).state_dict().items()}
    mismatch = state_mismatch({name: t.shape for name, t in weights.items()}, want)
    if mismatch:
        raise ValueError(f"{path}: its weights do not fit the model of {config_file.name}: {mismatch}")
    return cfg, weights, config_file


def load_pretrained(path: Union[str, Path], map_location: Union[str, torch.device] = "cpu") -> PerceiverIO:
    """Load our model directory or a transformers ``PerceiverForMaskedLM`` directory; returns the model in eval mode."""
    cfg, weights, _ = read_model_dir(path)
    model = PerceiverIO(cfg)
    model.load_state_dict(weights, strict=True)
    return model.to(map_location).eval()
