"""Which parameters a run trains, and which came from ``model.init_from``.

``train.freeze`` names parameters that do not train: they get no gradient and, as the optimizer is built over the
trainable parameters only, no optimizer state (no fp32 master copy, no moments). :class:`Pretrained` records the
names ``model.init_from`` loaded; it is saved in every checkpoint, because a resumed run does not read
``model.init_from`` again, yet its frozen parameters (``pretrained``) and its optimizer groups
(``optim.pretrained_lr_scale``) depend on them, and so does an export naming the optimizer's copies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Collection, Dict, List, Mapping, Sequence

import torch

from .config import ConfigError

PRETRAINED = "pretrained"  # every tensor model.init_from loaded
ALIASES = {"latents": "encoder.latents"}


def _modules(names: Sequence[str]) -> List[str]:
    """The module paths a user would name: ``encoder.<part>``, ``adapters.<modality>``, ``decoder``, ..."""
    return sorted({".".join(n.split(".")[:2]) if n.startswith(("encoder.", "adapters.")) else n.split(".")[0]
                   for n in names})


def frozen_names(model: torch.nn.Module, freeze: Sequence[str], pretrained: Collection[str]) -> List[str]:
    """The parameters ``freeze`` (``train.freeze``) names, in the model's order: ``pretrained`` (those of
    ``pretrained``, the names ``model.init_from`` loaded), ``latents``, or module paths (a name and everything under
    it). A name that matches nothing, or freezing every parameter, is a ConfigError."""
    params = [name for name, _ in model.named_parameters()]
    frozen = set()
    for name in freeze:
        if name == PRETRAINED:
            if not pretrained:
                raise ConfigError(f"train.freeze: {PRETRAINED!r} names the tensors model.init_from loaded, and this "
                                  f"run loaded none; set model.init_from, or name modules: "
                                  f"{', '.join(_modules(params))}")
            frozen.update(n for n in params if n in pretrained)
            continue
        path = ALIASES.get(name, name)
        matched = [n for n in params if n == path or n.startswith(path + ".")]
        if not matched:
            raise ConfigError(f"train.freeze: {name!r} names no parameter of this model; give {PRETRAINED!r}, "
                              f"{', '.join(repr(a) for a in ALIASES)} or a module path: {', '.join(_modules(params))}")
        frozen.update(matched)
    if params and frozen == set(params):
        raise ConfigError(f"train.freeze: {list(freeze)} freezes every parameter: nothing would train")
    return [n for n in params if n in frozen]


def freeze(model: torch.nn.Module, names: Collection[str]) -> None:
    """No gradient for the parameters ``names``; call before the optimizer is built."""
    for name, param in model.named_parameters():
        if name in names:
            param.requires_grad_(False)


@dataclass
class Pretrained:
    """The tensors ``model.init_from`` gave a run (by name) and where from; empty for a run from scratch."""

    source: str = ""
    loaded: List[str] = field(default_factory=list)

    def state_dict(self) -> Dict[str, Any]:
        return {"source": self.source, "loaded": list(self.loaded)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.source, self.loaded = state["source"], list(state["loaded"])

    @classmethod
    def of_checkpoint(cls, client_state: Mapping[str, Any]) -> "Pretrained":
        """The record a checkpoint's client state holds (none in checkpoints from before fine-tuning existed)."""
        record = cls()
        if "pretrained" in client_state["shared"]:
            record.load_state_dict(client_state["shared"]["pretrained"])
        return record


def prepare(model: torch.nn.Module, freeze_names: Sequence[str], pretrained: Pretrained) -> List[str]:
    """Freeze what ``freeze_names`` (``train.freeze``) names in ``model``; returns the frozen names."""
    frozen = frozen_names(model, freeze_names, pretrained.loaded)
    freeze(model, frozen)
    return frozen
