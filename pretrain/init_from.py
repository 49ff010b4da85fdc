"""``model.init_from``: a training run's first weights from a pretrained model (fine-tuning, continued pretraining).

A source is one of our model directories (``pretrain export``), a transformers ``PerceiverForMaskedLM`` directory, or
a run, checkpoint or tag directory (its fp32 master weights, read as ``pretrain export`` reads them). Its tensors
whose name and shape this run's model shares are loaded. This model's others start fresh: a modality or a head the
source lacks, and the classifier when ``model.num_classes`` differs. The source's others are ignored. Everything else
must match: an encoder or decoder tensor the two do not share, or one of another shape, is an error before any
training that names the tensor, both shapes and the model keys that differ.

Weights come from safetensors files or from ``torch.load(weights_only=True)``; a checkpoint is unpickled whole as
``--resume`` does, so name only checkpoints of your own runs (a model from elsewhere: its exported directory).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch

from .checkpoint import find_tag, peek_client_state
from .config import Config, ConfigError, ModelConfig, dotted, model_config_to_dict
from .model import pretrained
from .modalities import REGISTRY
from .model.pretrained import read_model_dir
from .trainable import Pretrained, frozen_names, prepare

log = logging.getLogger("pretrain")

FORMS = ("give an export directory (python -m pretrain export RUN --out DIR), a transformers PerceiverForMaskedLM "
         "directory, or a run, checkpoint or tag directory")
CORE = ("encoder.", "decoder.")  # what the pretraining taught: always taken, never started anew
HEADS = ("adapters.label.classifier.",)  # shaped by model.num_classes: started anew when that differs
# The model keys that shape the tensors under each prefix (the longest prefix of a name applies).
SHAPE_KEYS = {
    "encoder.latents": ("num_latents", "d_latents"),
    "encoder.cross_attention": ("d_model", "d_latents", "qk_channels", "v_channels",
                                "cross_attention_shape_for_attention", "cross_attention_widening_factor"),
    "encoder.self_attends": ("d_latents", "qk_channels", "v_channels", "self_attention_widening_factor",
                             "num_self_attends_per_block"),
    "decoder": ("d_model", "d_latents", "decoder_qk_channels", "decoder_v_channels", "decoder_widening_factor"),
    **{f"adapters.{name}": unit.shape_keys for name, unit in REGISTRY.items()},
    "modality_embeddings": ("d_model",),
}


@dataclass
class Source:
    """A pretrained model's config and weights (our names), and where they came from."""

    path: Path
    kind: str
    config: ModelConfig
    weights: Dict[str, torch.Tensor]
    config_file: str


def read_source(path_text: str) -> Source:
    """The model ``model.init_from`` names; a path that holds none is a ConfigError naming it and the forms."""
    path = Path(path_text)
    if not path.exists():
        raise ConfigError(f"model.init_from: {path} does not exist; {FORMS}")
    if not path.is_dir():
        raise ConfigError(f"model.init_from: {path} is a file; {FORMS}")
    if not any(path.iterdir()):
        raise ConfigError(f"model.init_from: {path} is an empty directory; {FORMS}")
    tag_dir = find_tag(path)
    try:
        if tag_dir is not None:
            from .export import checkpoint_model

            saved = peek_client_state(tag_dir)
            model = checkpoint_model(tag_dir, saved)
            step = saved["shared"]["progress"]["step"]
            return Source(path, f"checkpoint {tag_dir.name}, step {step}", model.config, model.state_dict(),
                          f"the config.yaml of the run that saved {tag_dir}")
        config, weights, config_file = read_model_dir(path)
    except (ValueError, OSError) as exc:  # ConfigError, ExportError, a file that cannot be read
        raise ConfigError(f"model.init_from: {exc}") from None
    kind = "transformers PerceiverForMaskedLM directory" if config_file.suffix == ".json" else "model directory"
    return Source(path, kind, config, weights, str(config_file))


def load_pretrained(path: Union[str, Path], map_location: Union[str, torch.device] = "cpu") -> torch.nn.Module:
    """``pretrain.load_pretrained``: our model directory, a transformers ``PerceiverForMaskedLM`` directory, or a run,
    checkpoint or tag directory (its fp32 master weights, as ``pretrain export`` writes them); in eval mode."""
    tag_dir = find_tag(Path(path))
    if tag_dir is None:
        return pretrained.load_pretrained(path, map_location)
    from .export import checkpoint_model

    return checkpoint_model(tag_dir, peek_client_state(tag_dir)).to(map_location).eval()


def _differing_keys(names: List[str], there: ModelConfig, here: ModelConfig) -> List[str]:
    """``model.<key>: <there> there, <here> here`` for the keys that shape ``names`` and differ."""
    a, b = dotted(model_config_to_dict(there)), dotted(model_config_to_dict(here))
    keys: List[str] = []
    for name in names:
        prefix = max((p for p in SHAPE_KEYS if name == p or name.startswith(p + ".")), key=len, default=None)
        keys += [k for k in SHAPE_KEYS.get(prefix, ()) if a.get(k) != b.get(k) and k not in keys]
    return [f"model.{k}: {a.get(k)} there, {b.get(k)} here" for k in keys]


@dataclass
class InitPlan:
    """What a run starts from: the tensors to load into its model (none when it resumes: its checkpoint has them),
    the record of which came from ``model.init_from``, and the summary line to log."""

    pretrained: Pretrained = field(default_factory=Pretrained)
    weights: Dict[str, torch.Tensor] = field(default_factory=dict)
    summary: str = ""

    def apply(self, model: torch.nn.Module, freeze_names: List[str]) -> List[str]:
        """Load the weights into ``model`` (built, not yet wrapped by an engine) and freeze what ``train.freeze``
        names; returns the frozen names."""
        if self.weights:
            model.load_state_dict(self.weights, strict=False)
            self.weights = {}  # the source's copy would stay in memory for the whole run (0.8 GB at 201M)
        return prepare(model, freeze_names, self.pretrained)


def match(source: Source, model: torch.nn.Module) -> InitPlan:
    """Which of ``source``'s tensors ``model`` takes; what must match and does not is a ConfigError."""
    want = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    have = {name: tuple(t.shape) for name, t in source.weights.items()}
    problems, bad = [], []
    for name, shape in want.items():
        if name in have and have[name] != shape and not name.startswith(HEADS):
            problems.append(f"{name} is {list(have[name])} there, {list(shape)} here")
            bad.append(name)
        elif name not in have and name.startswith(CORE):
            problems.append(f"{name} is missing there")
            bad.append(name)
    extra = [name for name in have if name not in want and name.startswith(CORE)]
    problems += [f"{name} is there, not in this model" for name in extra]
    if problems:
        keys = _differing_keys(bad + extra, source.config, model.config) or ["none of the model keys: the layouts "
                                                                             "differ"]
        raise ConfigError(
            f"model.init_from: {source.path} ({source.kind}) does not fit this model: {'; '.join(problems[:3])}"
            f"{'; ...' if len(problems) > 3 else ''} ({len(problems)} tensors in all). The keys that differ: "
            f"{'; '.join(keys)}. Set them as the source has them (see {source.config_file})")
    loaded = [name for name in want if have.get(name) == want[name]]
    new = [name for name in want if name not in loaded]
    ignored = [name for name in have if name not in want]
    count = sum(source.weights[name].numel() for name in loaded)
    summary = (f"model.init_from {source.path} ({source.kind}): loaded {len(loaded)} tensors ({count:,} parameters); "
               f"newly initialised: {', '.join(new) or 'none'}; "
               f"ignored from the source: {', '.join(ignored) or 'none'}")
    return InitPlan(Pretrained(str(source.path), loaded), {name: source.weights[name] for name in loaded}, summary)


def plan_start(cfg: Config, model: torch.nn.Module, resume_from: Optional[Path],
               saved: Optional[Dict[str, Any]]) -> InitPlan:
    """A run's first weights, checked before any training: at a first start those ``model.init_from`` names (if
    any); at a resume from ``resume_from`` (whose client state is ``saved``) none, as the checkpoint holds the run's
    weights and its :class:`Pretrained` record, and the run's ``train.freeze`` must be the checkpoint's. ``model``
    may be on the meta device (names and shapes)."""
    if resume_from is None or saved is None:
        plan = match(read_source(cfg.model.init_from), model) if cfg.model.init_from else InitPlan()
    else:
        before = list(saved["config"]["train"].get("freeze", []))
        if before != list(cfg.train.freeze):
            raise ConfigError(
                f"train.freeze: {list(cfg.train.freeze)}, but {resume_from} was trained with {before}: a run keeps its "
                f"frozen parameters (its optimizer holds state for the others only). Set it back, or start a new run "
                f"(another run.dir) with model.init_from={resume_from}")
        record = Pretrained.of_checkpoint(saved)
        summary = ""
        if cfg.model.init_from:
            summary = (f"model.init_from {cfg.model.init_from}: not loaded, the run resumes from {resume_from} (which "
                       f"holds {len(record.loaded)} tensors from {record.source or 'no pretrained model'})")
        plan = InitPlan(record, {}, summary)
    frozen_names(model, cfg.train.freeze, plan.pretrained.loaded)  # the names must exist: checked before any start
    return plan
