"""Conversion between our text MLM Perceiver and transformers' ``PerceiverForMaskedLM``, both ways, as rename tables.

Needs no transformers at run time: configs are plain dicts (``config.json``) and weights plain state dicts, so a
``save_pretrained`` directory of transformers loads here and ours loads there.
"""

from __future__ import annotations

from typing import Mapping

import torch

from ..config import ConfigError, ModelConfig, TextConfig

# transformers' PerceiverForMaskedLM fixes its decoder to these values (modeling_perceiver.py).
HF_DECODER = {
    "decoder_num_heads": 8,
    "decoder_qk_channels": 256,
    "decoder_widening_factor": 1,
    "decoder_use_query_residual": False,
}
# PerceiverConfig key -> ModelConfig key, for the keys that mean the same.
SHARED_CONFIG_KEYS = (
    "d_model",
    "num_latents",
    "d_latents",
    "num_blocks",
    "num_self_attends_per_block",
    "num_self_attention_heads",
    "num_cross_attention_heads",
    "qk_channels",
    "v_channels",
    "cross_attention_shape_for_attention",
    "self_attention_widening_factor",
    "cross_attention_widening_factor",
    "use_query_residual",
)
RENAMED_CONFIG_KEYS = {"attention_probs_dropout_prob": "attention_dropout", "initializer_range": "init_std"}

# transformers parameter-name prefix -> ours. Layer prefixes (ending in a layer) continue with LAYER_NAMES.
PREFIXES = {
    "perceiver.embeddings.latents": "encoder.latents",
    "perceiver.input_preprocessor.embeddings.": "adapters.text.embeddings.",
    "perceiver.input_preprocessor.position_embeddings.": "adapters.text.position_embeddings.",
    "perceiver.decoder.output_position_encodings.position_embeddings": "adapters.text.query_positions.weight",
    "embedding_decoder.bias": "adapters.text.bias",
    "perceiver.encoder.cross_attention.": "encoder.cross_attention.",
    "perceiver.encoder.self_attends.": "encoder.self_attends.",
    "perceiver.decoder.decoding_cross_attention.": "decoder.cross_attention.",
}
LAYER_NAMES = {
    "attention.self.layernorm1.": "q_norm.",
    "attention.self.layernorm2.": "kv_norm.",
    "attention.self.query.": "query.",
    "attention.self.key.": "key.",
    "attention.self.value.": "value.",
    "attention.output.dense.": "out.",
    "layernorm.": "mlp_norm.",
    "mlp.dense1.": "mlp.dense1.",
    "mlp.dense2.": "mlp.dense2.",
}


# Our fused projections -> the separate transformers projections they stack (rows in this order). A latent
# self-attention projects queries, keys and values from one input, a cross-attention keys and values.
FUSED = {"query_key_value.": ("query.", "key.", "value."), "key_value.": ("key.", "value.")}


def fuse_projections(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Separate query/key/value tensors (our naming otherwise, as our directories had it before the projections were
    fused) -> our fused projections; a state dict without separate ones comes back unchanged."""
    out = dict(state)
    for name in [n for n in state if n.endswith((".key.weight", ".key.bias"))]:
        prefix, _, leaf = name.rpartition("key.")
        fused = "query_key_value." if "self_attends." in prefix else "key_value."
        out[prefix + fused + leaf] = torch.cat([out.pop(prefix + part + leaf) for part in FUSED[fused]])
    return out


def split_projections(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our fused projections -> separate query/key/value tensors; the widths come from the neighbouring layers (the
    output projection reads the values, a cross-attention's query projection has the key width)."""
    out = dict(state)
    for name in state:
        for fused, parts in FUSED.items():
            prefix, found, leaf = name.rpartition(fused)
            if not found or not prefix.endswith(".") or leaf not in ("weight", "bias"):
                continue
            rows, v = state[name].shape[0], state[prefix + "out.weight"].shape[1]
            widths = [(rows - v) // 2] * 2 + [v] if len(parts) == 3 else [rows - v, v]
            out.update(zip((prefix + part + leaf for part in parts), out.pop(name).split(widths)))
    return out


def _rename(name: str, prefixes: Mapping[str, str], layer_names: Mapping[str, str]) -> str:
    """Apply the prefix table, then (for attention layers) the layer table; both directions use this."""
    for old, new in prefixes.items():
        if not name.startswith(old):
            continue
        rest = name[len(old):]
        if old.endswith("self_attends."):
            index, _, rest = rest.partition(".")
            new = f"{new}{index}."
        elif not old.endswith("attention."):
            return new + rest
        for old_leaf, new_leaf in layer_names.items():
            if rest.startswith(old_leaf):
                return new + new_leaf + rest[len(old_leaf):]
    raise KeyError(name)


def _invert(table: Mapping[str, str]) -> dict[str, str]:
    return {new: old for old, new in table.items()}


def hf_to_state_dict(hf_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers ``PerceiverForMaskedLM`` state dict -> ours (the tied LM weight is the input embedding)."""
    out = {}
    for name, value in hf_state.items():
        if name == "embedding_decoder.weight":
            continue
        try:
            out[_rename(name, PREFIXES, LAYER_NAMES)] = value
        except KeyError:
            raise KeyError(f"transformers parameter {name!r} has no counterpart in our text MLM model") from None
    return fuse_projections(out)


# Ours -> the part of a transformers Perceiver every text head shares: latents, text embeddings, encoder.
ENCODER = ("encoder.", "adapters.text.embeddings.", "adapters.text.position_embeddings.")


def state_dict_to_hf(state: Mapping[str, torch.Tensor], encoder_only: bool = False) -> dict[str, torch.Tensor]:
    """Our text MLM state dict -> transformers ``PerceiverForMaskedLM``; ``encoder_only``: of a text model (any
    head), the weights of the encoder alone, which every transformers Perceiver text model shares."""
    prefixes, layer_names = _invert(PREFIXES), _invert(LAYER_NAMES)
    if encoder_only:
        state = {name: value for name, value in state.items() if name.startswith(ENCODER)}
    out = {}
    for name, value in split_projections(state).items():
        try:
            out[_rename(name, prefixes, layer_names)] = value
        except KeyError:
            raise KeyError(
                f"parameter {name!r} has no transformers counterpart: only a text-only MLM model "
                f"(no other modality, num_classes=0) converts to PerceiverForMaskedLM"
            ) from None
    return out


def config_from_hf(hf: Mapping) -> ModelConfig:
    """A transformers ``PerceiverConfig`` (as a dict, e.g. ``config.json``) -> our ModelConfig."""
    if hf.get("hidden_act", "gelu") != "gelu":
        raise ConfigError(f"hidden_act: only 'gelu' is supported, got {hf['hidden_act']!r}")
    values = {key: hf[key] for key in SHARED_CONFIG_KEYS if key in hf}
    values.update({ours: hf[theirs] for theirs, ours in RENAMED_CONFIG_KEYS.items() if theirs in hf})
    cfg = ModelConfig(**values, **HF_DECODER)
    cfg.text = TextConfig(vocab_size=hf.get("vocab_size", 262), max_length=hf.get("max_position_embeddings", 2048))
    return cfg.validate()


def export_blockers(cfg: ModelConfig, encoder_only: bool = False) -> list[str]:
    """Every setting of ``cfg`` that transformers' ``PerceiverForMaskedLM`` cannot express (``encoder_only``: that
    the encoder of a transformers Perceiver text model cannot), one ``model.<key>: why`` line each."""
    if cfg.input_modalities != ["text"] or (cfg.num_classes and not encoder_only):
        return [f"model: only a text-only MLM model converts to transformers (inputs {cfg.input_modalities}, "
                f"num_classes={cfg.num_classes})"]
    blockers = [f"model.{key}: PerceiverForMaskedLM fixes it to {value}, got {getattr(cfg, key)}"
                for key, value in ({} if encoder_only else HF_DECODER).items() if getattr(cfg, key) != value]
    if cfg.v_channels is None and cfg.qk_channels not in (None, cfg.d_latents):
        blockers.append(f"model.v_channels: transformers' latent self-attention would output "
                        f"qk_channels={cfg.qk_channels} channels, not d_latents={cfg.d_latents}; set "
                        f"v_channels={cfg.d_latents} explicitly (this also sets the encoder cross-attention's v width)")
    if cfg.decoder_v_channels not in (None, cfg.d_model) and not encoder_only:
        blockers.append(f"model.decoder_v_channels: PerceiverForMaskedLM fixes it to d_model={cfg.d_model}")
    return blockers


def export_refusal(cfg: ModelConfig) -> str:
    """For a text-only MLM model that ``pretrain export --hf`` would refuse, the line that says so and why, to show
    when its training starts rather than after it; empty otherwise (other models have no transformers class)."""
    blockers = export_blockers(cfg) if cfg.input_modalities == ["text"] and not cfg.num_classes else []
    return f"pretrain export --hf will refuse this model: {'; '.join(blockers)}" if blockers else ""


def config_to_hf(cfg: ModelConfig, encoder_only: bool = False) -> dict:
    """Our ModelConfig -> ``PerceiverConfig`` keyword arguments; refuses, naming every setting, what
    PerceiverForMaskedLM cannot express (``encoder_only``: what the encoder of a transformers Perceiver text model
    cannot)."""
    blockers = export_blockers(cfg, encoder_only)
    if blockers:
        raise ConfigError("; ".join(blockers))
    hf = {key: getattr(cfg, key) for key in SHARED_CONFIG_KEYS}
    hf.update({theirs: getattr(cfg, ours) for theirs, ours in RENAMED_CONFIG_KEYS.items()})
    hf.update(
        vocab_size=cfg.text.vocab_size,
        max_position_embeddings=cfg.text.max_length,
        hidden_act="gelu",
        model_type="perceiver",
        architectures=["PerceiverModel" if encoder_only else "PerceiverForMaskedLM"],
    )
    return hf
