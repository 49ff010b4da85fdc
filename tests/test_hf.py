"""Parity with transformers' PerceiverForMaskedLM: conversion both ways, parameter counts, directories on disk."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")
from transformers import PerceiverConfig, PerceiverForMaskedLM  # noqa: E402

from conftest import multimodal_config, tiny_config  # noqa: E402
from pretrain import load_pretrained, save_pretrained  # noqa: E402
from pretrain.config import ConfigError, ModelConfig, TextConfig  # noqa: E402
from pretrain.model import PerceiverIO  # noqa: E402
from pretrain.model.hf import (  # noqa: E402
    config_from_hf, config_to_hf, hf_to_state_dict, split_projections, state_dict_to_hf)
from pretrain.model.pretrained import save_hf_pretrained  # noqa: E402

VOCAB, MAX_POS, B, S = 30, 16, 3, 10
BASE = dict(d_model=32, num_latents=8, d_latents=48, num_self_attends_per_block=2, vocab_size=VOCAB,
            max_position_embeddings=MAX_POS, initializer_range=0.2)
CASES = {
    "plain-kv-1head": dict(num_self_attention_heads=1, num_cross_attention_heads=1),
    "blocks2-wide2-q-4heads": dict(num_blocks=2, num_self_attention_heads=4, num_cross_attention_heads=4,
                                   self_attention_widening_factor=2, cross_attention_widening_factor=2,
                                   cross_attention_shape_for_attention="q"),
    "qk64-v48-8heads": dict(qk_channels=64, v_channels=48, num_self_attention_heads=8, num_cross_attention_heads=8),
    "v48-q-8x4heads-wide": dict(v_channels=48, cross_attention_shape_for_attention="q", num_self_attention_heads=8,
                                num_cross_attention_heads=4, self_attention_widening_factor=2),
    "qk16-no-query-residual": dict(qk_channels=16, v_channels=48, num_self_attention_heads=8,
                                   num_cross_attention_heads=1, use_query_residual=False, num_blocks=2),
}


def perturb(module: torch.nn.Module) -> None:
    """Make biases and LayerNorm scales non-trivial, so a swapped parameter shows in the logits."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def text_batch():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    return ids, mask


def hf_logits(hf_model, ids, mask):
    with torch.no_grad():
        return hf_model(inputs=ids, attention_mask=mask).logits


def our_logits(model, ids, mask):
    with torch.no_grad():
        return model.text_logits(ids, mask)


def num_params(module):
    return sum(p.numel() for p in module.parameters())


def make_hf(**kwargs) -> PerceiverForMaskedLM:
    torch.manual_seed(0)
    hf_model = PerceiverForMaskedLM(PerceiverConfig(**BASE, **kwargs)).eval()
    perturb(hf_model)
    return hf_model


def our_text_config(**kwargs) -> ModelConfig:
    """Our config equal to PerceiverConfig(**BASE, **kwargs) (the decoder defaults already match transformers)."""
    values = {k: v for k, v in BASE.items() if k not in ("vocab_size", "max_position_embeddings", "initializer_range")}
    values.update(kwargs)
    return ModelConfig(**values, init_std=0.2, text=TextConfig(vocab_size=VOCAB, max_length=MAX_POS))


@pytest.mark.parametrize("case", list(CASES))
def test_hf_to_ours_same_logits(case):
    hf_model = make_hf(**CASES[case])
    model = PerceiverIO(config_from_hf(hf_model.config.to_dict())).eval()
    model.load_state_dict(hf_to_state_dict(hf_model.state_dict()), strict=True)
    assert num_params(model) == num_params(hf_model)
    ids, mask = text_batch()
    theirs, ours = hf_logits(hf_model, ids, mask), our_logits(model, ids, mask)
    assert theirs.shape == (B, MAX_POS, VOCAB) and ours.shape == (B, S, VOCAB)
    assert theirs.abs().max() > 1.0  # large enough for 1e-5 to mean something
    torch.testing.assert_close(ours, theirs[:, :S], atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", list(CASES))
def test_ours_to_hf_same_logits(case):
    kwargs = CASES[case]
    model = PerceiverIO(our_text_config(**kwargs)).eval()
    perturb(model)
    hf_config = config_to_hf(model.config)
    hf_model = PerceiverForMaskedLM(PerceiverConfig(**hf_config)).eval()
    hf_model.load_state_dict(state_dict_to_hf(model.state_dict()), strict=True)
    assert num_params(model) == num_params(hf_model)
    ids, mask = text_batch()
    torch.testing.assert_close(our_logits(model, ids, mask), hf_logits(hf_model, ids, mask)[:, :S], atol=1e-5, rtol=0)


def test_padding_matters_in_parity_check():
    """The masked comparison above tests masking only if padding changes the logits."""
    hf_model = make_hf(**CASES["plain-kv-1head"])
    ids, mask = text_batch()
    assert not torch.allclose(hf_logits(hf_model, ids, mask)[1], hf_logits(hf_model, ids, None)[1], atol=1e-3)


PAPER_201M = dict(d_model=768, num_latents=256, d_latents=1280, num_self_attends_per_block=26,
                  num_self_attention_heads=8, num_cross_attention_heads=8, qk_channels=256, v_channels=1280)


def test_paper_language_perceiver_has_201m_parameters():
    with torch.device("meta"):
        ours = PerceiverIO(ModelConfig(**PAPER_201M, text=TextConfig(vocab_size=262, max_length=2048)))
        theirs = PerceiverForMaskedLM(PerceiverConfig(**PAPER_201M, vocab_size=262, max_position_embeddings=2048))
    assert next(ours.parameters()).is_meta and next(theirs.parameters()).is_meta
    assert num_params(ours) == 201_108_230
    assert num_params(theirs) == 201_108_230
    converted = config_from_hf(theirs.config.to_dict())
    assert converted.qk_channels == 256 and converted.v_channels == 1280 and converted.text.vocab_size == 262


def test_save_hf_pretrained_loads_in_transformers(tmp_path):
    model = PerceiverIO(our_text_config(**CASES["qk64-v48-8heads"])).eval()
    perturb(model)
    save_hf_pretrained(model, tmp_path)
    hf_model, info = PerceiverForMaskedLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ids, mask = text_batch()
    torch.testing.assert_close(hf_logits(hf_model.eval(), ids, mask)[:, :S], our_logits(model, ids, mask),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_transformers_directory_loads_here(tmp_path, weights):
    hf_model = make_hf(**CASES["blocks2-wide2-q-4heads"])
    if weights == "safetensors":
        hf_model.save_pretrained(tmp_path)
    else:
        hf_model.config.to_json_file(tmp_path / "config.json")
        torch.save(hf_model.state_dict(), tmp_path / "pytorch_model.bin")
    model = load_pretrained(tmp_path)
    assert not model.training
    ids, mask = text_batch()
    torch.testing.assert_close(our_logits(model, ids, mask), hf_logits(hf_model, ids, mask)[:, :S], atol=1e-5, rtol=0)


@pytest.mark.parametrize("multimodal", [False, True])
def test_our_format_round_trip(tmp_path, multimodal):
    from conftest import multimodal_inputs

    cfg = multimodal_config() if multimodal else tiny_config(num_blocks=2)
    model = PerceiverIO(cfg).eval()
    perturb(model)
    save_pretrained(model, tmp_path / "m")
    # a directory written before the query/key/value projections were fused (separate tensors) loads too
    save_pretrained(model, tmp_path / "separate")
    separate = split_projections(model.state_dict())
    assert any(name.endswith("self_attends.0.value.weight") for name in separate)
    save_file({k: v.clone() for k, v in separate.items()}, str(tmp_path / "separate" / "model.safetensors"))
    inputs = multimodal_inputs(2, 5) if multimodal else {"text": torch.randint(0, 20, (2, 5))}
    outputs = {name: None for name in model.config.output_modalities}
    for directory in ("m", "separate"):
        loaded = load_pretrained(tmp_path / directory)
        assert loaded.config == model.config
        with torch.no_grad():
            expected, got = model(inputs, outputs), loaded(inputs, outputs)
        assert set(got) == set(outputs)
        for name in outputs:
            assert torch.equal(got[name], expected[name]), (directory, name)


@pytest.mark.parametrize("cfg", [multimodal_config(num_classes=0), tiny_config(num_classes=3)], ids=["multimodal", "classes"])
def test_non_text_mlm_model_does_not_convert(tmp_path, cfg):
    with pytest.raises(ConfigError, match=r"only a text-only MLM model converts"):
        config_to_hf(cfg)
    with pytest.raises(ConfigError):
        save_hf_pretrained(PerceiverIO(cfg), tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("key", ["decoder_num_heads", "decoder_qk_channels"])
def test_decoder_transformers_cannot_express(key):
    cfg = our_text_config(**{key: 4})
    with pytest.raises(ConfigError, match=rf"model\.{key}: PerceiverForMaskedLM fixes it"):
        config_to_hf(cfg)


def test_self_attention_values_transformers_cannot_express():
    """qk_channels set, v_channels unset and qk != d_latents: transformers' self-attention would give qk_channels
    outputs and fail to add them to d_latents latents. Conversion must refuse it (or give a loadable model)."""
    model = PerceiverIO(our_text_config(qk_channels=64, num_self_attention_heads=8, num_cross_attention_heads=8))
    with pytest.raises(ConfigError, match=r"v_channels"):
        config_to_hf(model.config)


def test_hidden_act_other_than_gelu_is_refused():
    with pytest.raises(ConfigError, match=r"hidden_act"):
        config_from_hf({**BASE, "hidden_act": "relu"})


def test_load_pretrained_empty_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_pretrained(tmp_path)


def test_load_pretrained_other_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match=r"model_type is 'bert', not 'perceiver'"):
        load_pretrained(tmp_path)


def test_transformers_sequence_classification_loads_our_text_encoder_with_only_its_decoder_new(tmp_path):
    """The transformers route to fine-tuning: ``PerceiverForSequenceClassification.from_pretrained(dir,
    num_labels=K)`` on our export. From the encoder export (``--hf-encoder``) nothing is left unused and exactly the
    classification decoder is new; from the MLM export the MLM decoder is left over (transformers' "unexpected",
    expected for another head). Either way its encoder computes our latents."""
    model = PerceiverIO(our_text_config()).eval()
    perturb(model)
    save_hf_pretrained(model, tmp_path / "encoder", encoder_only=True)
    save_hf_pretrained(model, tmp_path / "mlm")
    ids, mask = text_batch()
    for directory, unused in (("encoder", []), ("mlm", ["embedding_decoder.bias", "perceiver.decoder."])):
        theirs, info = transformers.PerceiverForSequenceClassification.from_pretrained(
            tmp_path / directory, num_labels=3, output_loading_info=True)
        decoder = sorted(name for name, _ in theirs.named_parameters() if name.startswith("perceiver.decoder."))
        assert decoder and sorted(info["missing_keys"]) == decoder
        assert sorted({next(p for p in unused if k.startswith(p)) for k in info["unexpected_keys"]}) == sorted(unused)
        assert not info["mismatched_keys"]
        with torch.no_grad():
            latents = theirs.eval().perceiver(inputs=ids, attention_mask=mask).last_hidden_state
            torch.testing.assert_close(latents, model.encode({"text": ids, "text_mask": mask.bool()}), atol=1e-5,
                                       rtol=0)
