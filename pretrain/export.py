"""Export: a training checkpoint -> a model directory to fine-tune from (ours, loaded by ``load_pretrained``) and, for
a text MLM model, a transformers ``PerceiverForMaskedLM`` directory.

The weights are the optimizer's fp32 master copies, not the bf16 copies a bf16 run computed with: under ZeRO 1-3
DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` gathers them from every rank's shard; ZeRO-0 keeps whole
weights in its model-states file, the module's when it trained in fp32, else the bf16 optimizer's ``fp32_groups``.
ZeRO-1 with bf16 weights and fp32 gradient accumulation runs DeepSpeed's ``BF16_Optimizer``, whose files
``get_fp32_state_dict_from_zero_checkpoint`` refuses: each rank holds a consecutive slice of every parameter group's
flat fp32 copy (padded at its end), joined here. Whole copies are named through the optimizer's parameter groups and
checked against the module's bf16 weights. Frozen parameters (``train.freeze``) have no optimizer copy: they are the
module's (in a bf16 run its bf16 weights, which are what the model computed with). The model config, the frozen
parameters and the optimizer's groups are the ones the checkpoint holds: an export needs nothing but the checkpoint.

Each directory is written under a temporary name beside its destination and renamed into place when complete: an
interrupted export leaves nothing under the name, and a destination that exists with files in it is refused before
any work, never overwritten.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from .atomic import replaced_atomically
from .checkpoint import NOT_A_CHECKPOINT, UNIVERSAL, find_tag, model_states, peek_client_state
from .config import ConfigError, model_config_from_dict
from .model import PerceiverIO, hf
from .model.pretrained import save_hf_pretrained, save_pretrained
from .train.schedule import parameter_groups
from .trainable import Pretrained, prepare


class ExportError(ValueError):
    """A checkpoint or destination an export cannot use; the message names it and the fix."""


@dataclass
class Exported:
    tag_dir: Path
    step: int
    directories: List[Path]


def _named_masters(tag_dir: Path, groups: List[List[Tuple[str, torch.nn.Parameter]]], module: Dict[str, torch.Tensor],
                   masters: List[List[torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """The optimizer's fp32 copies, group by group in the optimizer's parameter order, named and checked."""
    if [[tuple(p.shape) for _, p in named] for named in groups] != [[tuple(t.shape) for t in g] for g in masters]:
        raise ExportError(f"{tag_dir}: the optimizer's fp32 copies do not line up with the parameters of the model "
                          f"config saved with it")
    weights = {name: tensor for named, tensors in zip(groups, masters) for (name, _), tensor in zip(named, tensors)}
    if any(not torch.equal(weights[name].to(module[name].dtype), module[name]) for name in weights):
        raise ExportError(f"{tag_dir}: the optimizer's fp32 copies do not round to the module's weights; the "
                          f"checkpoint is inconsistent, export another one")
    return weights


def _split_flat_groups(tag_dir: Path, groups: List[List[Tuple[str, torch.nn.Parameter]]], partitions: List[Dict]
                       ) -> List[List[torch.Tensor]]:
    """``BF16_Optimizer``'s per-rank slices (in rank order) -> each group's parameters, shaped as the model's."""
    from deepspeed.checkpoint.constants import GROUP_PADDINGS, SINGLE_PARTITION_OF_FP32_GROUPS

    masters = []
    for index, named in enumerate(groups):
        flat = torch.cat([rank[SINGLE_PARTITION_OF_FP32_GROUPS][index] for rank in partitions])
        numels = [p.numel() for _, p in named]
        total = sum(numels)
        if flat.numel() - sum(rank[GROUP_PADDINGS][index] for rank in partitions) != total:
            raise ExportError(f"{tag_dir}: parameter group {index} of the optimizer holds {flat.numel()} values "
                              f"with padding, the model config saved with it {total}")
        masters.append([t.view_as(p) for t, (_, p) in zip(flat[:total].split(numels), named)])
    return masters


def _optimizer_files(tag_dir: Path) -> List[Path]:
    """The per-rank optimizer files of ZeRO 1-3 (``bf16_`` prefixed in bf16 runs), in rank order."""
    files = tag_dir.glob("*zero_pp_rank_*_optim_states.pt")
    return sorted(files, key=lambda f: int(f.name.split("zero_pp_rank_")[1].split("_")[0]))


def master_weights(tag_dir: Path, model: PerceiverIO, groups: List[List[Tuple[str, torch.nn.Parameter]]]
                   ) -> Dict[str, torch.Tensor]:
    """The fp32 state dict a checkpoint tag holds for ``model`` (the model of its config, its optimizer's parameter
    ``groups``; see the module docstring). Frozen parameters have no master copy: theirs are the module's."""
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT, ZERO_STAGE

    def optimizer_state(path: Path) -> Dict:  # mapped: tensors are read where used
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False)[OPTIMIZER_STATE_DICT]

    files = _optimizer_files(tag_dir)
    first = optimizer_state(files[0]) if files else None  # rank 0's file says which layout
    states = torch.load(model_states(tag_dir), map_location="cpu", mmap=True, weights_only=False)
    module = states["module"]
    if first is not None and ZERO_STAGE in first:  # ZeRO 1-3, fp32 or bf16
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        weights = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        # ZeRO-1 leaves frozen parameters out; the module holds them whole (ZeRO-3 partitions them: its own files do)
        shapes = {name: t.shape for name, t in model.state_dict().items()}
        weights.update({name: t.float() for name, t in module.items() if name not in weights
                        and name in shapes and t.shape == shapes[name]})
        return weights
    weights = dict(module)
    if first is not None:  # BF16_Optimizer
        masters = _split_flat_groups(tag_dir, groups, [first, *map(optimizer_state, files[1:])])
    elif "fp32_groups" in (states.get("optimizer") or {}):  # ZeRO-0 with bf16
        masters = states["optimizer"]["fp32_groups"]
    else:
        return weights
    weights.update(_named_masters(tag_dir, groups, module, masters))
    return weights


def checkpoint_model(tag_dir: Path, saved: Dict) -> PerceiverIO:
    """The model a checkpoint tag holds (the model of its config, with the frozen parameters and optimizer groups of
    its run) carrying its fp32 master weights; ``saved``: the tag's client state (``peek_client_state``)."""
    model = PerceiverIO(model_config_from_dict(saved["config"]["model"]))
    pretrained = Pretrained.of_checkpoint(saved)
    prepare(model, saved["config"]["train"].get("freeze", []), pretrained)
    groups = [named for _, named in parameter_groups(model, pretrained.loaded)]
    try:
        model.load_state_dict(master_weights(tag_dir, model, groups), strict=True)
    except RuntimeError as exc:
        raise ExportError(f"{tag_dir}: its weights do not fit the model config saved with it: {exc}") from None
    return model.requires_grad_(True)


def _refuse_occupied(destinations: Dict[str, Path]) -> None:
    """``destinations``: flag -> directory."""
    if len({d.resolve() for d in destinations.values()}) < len(destinations):
        raise ExportError(f"{' and '.join(destinations)} name the same directory: give each its own")
    for destination in destinations.values():
        if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
            raise ExportError(f"{destination} exists and is not an empty directory: give another destination, or "
                              f"remove it first")


def export_checkpoint(checkpoint: Path, out: Path, hf_out: Optional[Path] = None,
                      hf_encoder_out: Optional[Path] = None) -> Exported:
    """Write the model of ``checkpoint`` (a run directory, a checkpoint directory or a tag directory; see
    ``find_tag``) to ``out`` in our format and, when given, to ``hf_out`` in transformers' (``PerceiverForMaskedLM``)
    and to ``hf_encoder_out`` as the encoder alone, for transformers' other text heads."""
    if not Path(checkpoint).exists():
        raise ExportError(f"{checkpoint} does not exist; give a run directory, its checkpoints/ or one of its tags")
    tag_dir = find_tag(Path(checkpoint))
    if tag_dir is None:
        raise ExportError(f"{checkpoint} {NOT_A_CHECKPOINT}")
    if tag_dir.name.endswith(UNIVERSAL):
        raise ExportError(f"{tag_dir} is a universal conversion made at a resume: export the tag it was converted "
                          f"from, {tag_dir.with_name(tag_dir.name[: -len(UNIVERSAL)])}")
    transformers = {flag: (Path(path), encoder_only) for flag, path, encoder_only in
                    (("--hf", hf_out, False), ("--hf-encoder", hf_encoder_out, True)) if path is not None}
    _refuse_occupied({"--out": Path(out), **{flag: path for flag, (path, _) in transformers.items()}})
    saved = peek_client_state(tag_dir)
    for flag, (_, encoder_only) in transformers.items():
        try:
            hf.config_to_hf(model_config_from_dict(saved["config"]["model"]), encoder_only)
        except ConfigError as exc:
            raise ExportError(f"{flag}: {exc}") from None
    model = checkpoint_model(tag_dir, saved)
    step = int(saved["shared"]["progress"]["step"])
    metadata = {"checkpoint": str(tag_dir.resolve()), "step": str(step)}
    with replaced_atomically(Path(out)) as tmp:  # an empty directory there was checked above
        save_pretrained(model, tmp, metadata)
    for path, encoder_only in transformers.values():
        with replaced_atomically(path) as tmp:
            save_hf_pretrained(model, tmp, metadata, encoder_only)
    return Exported(tag_dir, step, [Path(out), *(path for path, _ in transformers.values())])
