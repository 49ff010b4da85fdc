"""Bad configs and bad forward inputs fail early with a ValueError naming the key or argument."""

from __future__ import annotations

import pytest
import torch

from conftest import IMAGE, TEXT_MAX, multimodal_config, multimodal_inputs, tiny_config
from pretrain.config import ConfigError, ImageConfig, ModelConfig, VideoConfig, model_config_from_dict, validate_model_config
from pretrain.model import PerceiverIO


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(num_self_attention_heads=5), r"model\.qk_channels: 48 is not divisible by model\.num_self_attention_heads=5"),
        (dict(num_self_attention_heads=0), r"model\.num_self_attention_heads: must be a positive integer"),
        (dict(num_cross_attention_heads=3), r"model\.qk_channels: 32 is not divisible by model\.num_cross_attention_heads=3"),
        (dict(qk_channels=60, v_channels=48, num_self_attention_heads=8),
         r"model\.qk_channels: 60 is not divisible by model\.num_self_attention_heads=8"),
        (dict(v_channels=64), r"model\.v_channels: .*must equal d_latents=48"),
        (dict(decoder_num_heads=3), r"model\.decoder_qk_channels: 16 is not divisible by model\.decoder_num_heads=3"),
        (dict(decoder_v_channels=17), r"model\.decoder_v_channels: 17 is not divisible by model\.decoder_num_heads=2"),
        (dict(decoder_use_query_residual=True, decoder_v_channels=16), r"model\.decoder_v_channels: .*d_model=32"),
        (dict(image=ImageConfig(size=[10, 8], patch_size=4)), r"model\.image\.size\[0\]: 10 is not divisible by patch_size"),
        (dict(image=ImageConfig(size=[8, 8, 8])), r"model\.image\.size: must be \[height, width\]"),
        (dict(video=VideoConfig(frames=3, tubelet=[2, 8, 8])), r"model\.video\.frames/size\[0\]: 3 is not divisible"),
        (dict(text=None), r"model: enable at least one input modality"),
        (dict(d_latents=0), r"model\.d_latents: must be a positive integer"),
        (dict(cross_attention_shape_for_attention="k"), r"model\.cross_attention_shape_for_attention: must be 'q' or 'kv'"),
        (dict(attention_dropout=1.0), r"model\.attention_dropout"),
        (dict(attention_backend="xformers"), r"model\.attention_backend: must be one of"),
        (dict(num_classes=-1), r"model\.num_classes"),
    ],
)
def test_validate_model_config_names_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate_model_config(tiny_config(**overrides))
    with pytest.raises(ConfigError, match=match):
        PerceiverIO(tiny_config(**overrides))


@pytest.mark.parametrize(
    "values,match",
    [
        ({"d_modle": 32}, r"d_modle"),
        ({"text": {"vocab": 3}}, r"text\.vocab"),
        ({"d_model": "big"}, r"'big'.*\n.*full_key: d_model"),
        ({"num_blocks": 1.5}, r"num_blocks"),
        ({"image": {"size": [10, 8], "patch_size": 4}}, r"model\.image\.size\[0\]"),
        ({"d_latents": 48, "num_self_attention_heads": 5}, r"num_self_attention_heads"),
    ],
)
def test_model_config_from_dict_names_the_key(values, match):
    with pytest.raises(ConfigError, match=match):
        model_config_from_dict(values)


def test_model_config_from_dict_accepts_good_values():
    cfg = model_config_from_dict({"d_model": 64, "image": {"size": [8, 8], "patch_size": 4}})
    assert isinstance(cfg, ModelConfig) and cfg.d_model == 64 and cfg.image.size == [8, 8]


@pytest.fixture(scope="module")
def model():
    return PerceiverIO(multimodal_config(num_classes=0)).eval()


B, S = 2, 5


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(text=torch.zeros(B, S)), r"text: expected a integer tensor of shape \[\*, \*\], got torch\.float32 \[2, 5\]"),
        (dict(text=torch.zeros(B, S, 1, dtype=torch.long)), r"text: expected .*\[\*, \*\]"),
        (dict(text=torch.zeros(B, TEXT_MAX + 1, dtype=torch.long)), r"text: length 13 exceeds model\.text\.max_length=12"),
        (dict(image=torch.zeros(B, 1, 8, 8)), r"image: expected a floating tensor of shape \[\*, 3, 8, 8\], got .* \[2, 1, 8, 8\]"),
        (dict(image=torch.zeros(B, 3, 8, 12)), r"image: .*\[\*, 3, 8, 8\]"),
        (dict(image=torch.zeros(B, 3, 8, 8, dtype=torch.long)), r"image: expected a floating tensor"),
        (dict(audio=torch.zeros(B, 63)), r"audio: expected a floating tensor of shape \[\*, 64\]"),
        (dict(video=torch.zeros(B, 3, 4, 8, 8)), r"video: expected .*\[\*, 4, 3, 8, 8\]"),
        (dict(array=torch.zeros(B, 6)), r"array: expected .*\[\*, 6, 5\]"),
        (dict(text_mask=torch.ones(B, S + 1, dtype=torch.bool)),
         r"text_mask: expected shape \[2\] \(sample present\) or \[2, 5\] \(per element\), got \[2, 6\]"),
        (dict(image_mask=torch.ones(B, 3, dtype=torch.bool)), r"image_mask: expected shape \[2\] .* or \[2, 4\]"),
        (dict(text_mask=torch.ones(B, S)), r"text_mask: expected a bool or 0/1 integer tensor, got torch\.float32"),
        (dict(imag=torch.zeros(B, 3, 8, 8)), r"inputs: unknown keys \['imag'\]"),
        (dict(label=torch.zeros(B, dtype=torch.long)), r"inputs: unknown keys \['label'\]"),
        (dict(image=torch.zeros(B + 1, 3, 8, 8)), r"inputs: every modality must have the same batch size.*'image': 3"),
    ],
)
def test_forward_errors_name_the_argument(model, change, match):
    inputs = {"text": torch.zeros(B, S, dtype=torch.long), "image": torch.zeros(B, *IMAGE["shape"]), **change}
    with pytest.raises(ValueError, match=match):
        model(inputs, {"text": None})


def test_no_modality_given(model):
    with pytest.raises(ValueError, match=r"inputs: no modality given"):
        model({}, {"text": None})


@pytest.mark.parametrize(
    "outputs,match",
    [
        ({"text": torch.zeros(B, 3)}, r"outputs\['text'\]: expected integer positions of shape \[2, P\], got torch\.float32"),
        ({"image": torch.zeros(3, dtype=torch.long)}, r"outputs\['image'\]: expected integer positions of shape \[2, P\]"),
        ({"audio": torch.zeros(B + 1, 2, dtype=torch.long)}, r"outputs\['audio'\]: .*\[2, P\], got .* \[3, 2\]"),
        ({"label": None}, r"outputs: unknown modality 'label'"),
        ({"speech": None}, r"outputs: unknown modality 'speech'"),
    ],
)
def test_bad_outputs_name_the_argument(model, outputs, match):
    with pytest.raises(ValueError, match=match):
        model(multimodal_inputs(B, S), outputs)


def test_text_logits_without_text():
    model = PerceiverIO(multimodal_config(text=None))
    with pytest.raises(ValueError, match=r"text_logits: this model has no text modality"):
        model.text_logits(torch.zeros(B, S, dtype=torch.long))


def test_cross_attention_names_a_query_batch_that_fits_neither_way():
    """Queries of batch 1 are shared by the batch of keys and values; any other mismatch is refused by name."""
    from pretrain.model.layers import PerceiverLayer

    layer = PerceiverLayer(16, 8, 8, 16, 2, 1)
    kv = torch.randn(4, 5, 8)
    assert layer(torch.randn(1, 3, 16), kv).shape == (4, 3, 16)
    with pytest.raises(ValueError, match=r"queries have batch 3 and kv batch 4.*batch 1 when every sample shares"):
        layer(torch.randn(3, 3, 16), kv)
