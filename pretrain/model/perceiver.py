"""Perceiver IO: inputs -> one cross-attention into N latents -> a latent self-attention stack -> queries decode.

Reads top to bottom: ``PerceiverEncoder`` (latents, cross-attention, ``num_blocks`` repeats of a shared stack),
``PerceiverDecoder`` (one cross-attention from queries to latents) and ``PerceiverIO``, which joins the modality
adapters around them.

Batches are dicts. Inputs: ``{"text": ids [B, S], "text_mask": [B, S], "image": [B, C, H, W], "image_mask": [B] or
[B, patches], ...}``; a missing key means the modality is absent from the batch, a mask entry of False means absent from
that sample. Outputs to decode: ``{"text": positions [B, P] or None (every position), "label": None, ...}``.
"""

from __future__ import annotations

from typing import List, Mapping, Optional

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig, validate_model_config
from ..modalities import build_adapters
from .layers import PerceiverLayer


def _join(parts: List[torch.Tensor]) -> torch.Tensor:
    """Concatenation along the sequence; a single part as it is (a cat of one array would copy it, and its gradient)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class PerceiverEncoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cross_qk, cross_v = cfg.cross_attention_channels
        self_qk, self_v = cfg.self_attention_channels
        self.num_blocks = cfg.num_blocks
        self.activation_checkpointing = cfg.activation_checkpointing
        self.latents = nn.Parameter(torch.empty(cfg.num_latents, cfg.d_latents))
        self.cross_attention = PerceiverLayer(
            q_dim=cfg.d_latents,
            kv_dim=cfg.d_model,
            qk_channels=cross_qk,
            v_channels=cross_v,
            num_heads=cfg.num_cross_attention_heads,
            widening_factor=cfg.cross_attention_widening_factor,
            use_query_residual=cfg.use_query_residual,
            dropout=cfg.attention_dropout,
        )
        self.self_attends = nn.ModuleList(
            PerceiverLayer(
                q_dim=cfg.d_latents,
                kv_dim=None,
                qk_channels=self_qk,
                v_channels=self_v,
                num_heads=cfg.num_self_attention_heads,
                widening_factor=cfg.self_attention_widening_factor,
                dropout=cfg.attention_dropout,
                )
            for _ in range(cfg.num_self_attends_per_block)
        )

    def forward(self, inputs: torch.Tensor, key_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """inputs [B, M, d_model], key_mask [B, M] -> latents [B, N, d_latents]."""
        z = self.cross_attention(self.latents[None], inputs, key_mask)
        use_checkpoint = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for _ in range(self.num_blocks):
            for layer in self.self_attends:
                z = checkpoint(layer, z, use_reentrant=False) if use_checkpoint else layer(z)
        return z


class PerceiverDecoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        qk, v = cfg.decoder_attention_channels
        self.cross_attention = PerceiverLayer(
            q_dim=cfg.d_model,
            kv_dim=cfg.d_latents,
            qk_channels=qk,
            v_channels=v,
            num_heads=cfg.decoder_num_heads,
            widening_factor=cfg.decoder_widening_factor,
            use_query_residual=cfg.decoder_use_query_residual,
            dropout=cfg.attention_dropout,
        )

    def forward(self, queries: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """queries [B or 1, P, d_model] attend to latents [B, N, d_latents] -> [B, P, d_model]."""
        return self.cross_attention(queries, latents)


class PerceiverIO(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = validate_model_config(cfg)
        self.adapters = build_adapters(cfg)
        multimodal = len(cfg.output_modalities) > 1
        self.modality_embeddings = nn.ParameterDict(
            {name: nn.Parameter(torch.empty(cfg.d_model)) for name in cfg.output_modalities} if multimodal else {}
        )
        self.encoder = PerceiverEncoder(cfg)
        self.decoder = PerceiverDecoder(cfg)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """transformers' Perceiver initialisation: normal(0, init_std), biases 0, LayerNorm scales 1."""
        for module in self.modules():
            for name, param in module.named_parameters(recurse=False):
                if isinstance(module, nn.LayerNorm) and name == "weight":
                    nn.init.ones_(param)
                elif name == "bias":
                    nn.init.zeros_(param)
                else:
                    nn.init.normal_(param, std=self.config.init_std)

    def _modality(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return x + self.modality_embeddings[name] if name in self.modality_embeddings else x

    def encode(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Embed every modality present, concatenate into one input array with one key mask, cross-attend."""
        unknown = set(inputs) - {k for name in self.config.input_modalities for k in (name, f"{name}_mask")}
        if unknown:
            raise ValueError(
                f"inputs: unknown keys {sorted(unknown)}; this model takes {self.config.input_modalities} "
                f"(each with an optional '<name>_mask')"
            )
        present = [name for name in self.config.input_modalities if name in inputs]
        if not present:
            raise ValueError(f"inputs: no modality given; expected at least one of {self.config.input_modalities}")
        features, masks = [], []
        for name in present:
            x, mask = self.adapters[name].embed(inputs[name], inputs.get(f"{name}_mask"))
            features.append(self._modality(name, x))
            masks.append(mask)
        batch_sizes = {name: f.shape[0] for name, f in zip(present, features)}
        if len(set(batch_sizes.values())) > 1:
            raise ValueError(f"inputs: every modality must have the same batch size, got {batch_sizes}")
        key_mask = None
        if any(mask is not None for mask in masks):
            key_mask = _join(
                [torch.ones(f.shape[:2], dtype=torch.bool, device=f.device) if m is None else m
                 for f, m in zip(features, masks)]
            )
        return self.encoder(_join(features), key_mask)

    def decode(
        self,
        latents: torch.Tensor,
        outputs: Mapping[str, Optional[torch.Tensor]],
        inputs: Optional[Mapping[str, torch.Tensor]] = None,
    ) -> dict[str, torch.Tensor]:
        """One decoder cross-attention for the queries of every requested output, then each modality's head.

        Queries of every position (``None``) are the same for every sample: they are built for one row, which the
        decoder normalises and projects once for the batch when no output has given positions."""
        batch = latents.shape[0]
        queries, sizes = [], []
        for name, positions in outputs.items():
            if name not in self.adapters:
                raise ValueError(f"outputs: unknown modality {name!r}; this model decodes {self.config.output_modalities}")
            adapter = self.adapters[name]
            if positions is None:
                count = adapter.num_positions(None if inputs is None else inputs.get(name))
                positions = torch.arange(count, device=latents.device)[None]
            elif positions.dim() != 2 or positions.shape[0] != batch or positions.is_floating_point():
                raise ValueError(
                    f"outputs[{name!r}]: expected integer positions of shape [{batch}, P], "
                    f"got {positions.dtype} {list(positions.shape)}"
                )
            queries.append(self._modality(name, adapter.queries(positions)))
            sizes.append(positions.shape[1])
        if all(q.shape[0] == 1 for q in queries):
            query_array = _join(queries)
        else:
            query_array = _join([q.expand(batch, -1, -1) for q in queries])
        decoded = self.decoder(query_array, latents)
        parts = decoded.split(sizes, dim=1) if len(sizes) > 1 else [decoded]
        return {name: self.adapters[name].head(part) for name, part in zip(outputs, parts)}

    def forward(
        self, inputs: Mapping[str, torch.Tensor], outputs: Mapping[str, Optional[torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        return self.decode(self.encode(inputs), outputs, inputs)

    def text_logits(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[B, S] ids (and an optional [B, S] 1/0 or bool mask) -> [B, S, vocab] logits for every input position."""
        if "text" not in self.adapters:
            raise ValueError("text_logits: this model has no text modality (model.text is unset)")
        inputs = {"text": input_ids} if attention_mask is None else {"text": input_ids, "text_mask": attention_mask}
        return self(inputs, {"text": None})["text"]
