"""Each config section validates itself; an enumeration is a ``Literal`` field whose bad value is reported in the
same words whether the dataclass was built in code, loaded from YAML or given as an override."""

from __future__ import annotations

import typing

import pytest

from pretrain.config import (
    ATTENTION_BACKENDS,
    COMPILE_MODES,
    PRECISIONS,
    WANDB_MODES,
    Config,
    ConfigError,
    DataConfig,
    DeepSpeedConfig,
    ModelConfig,
    TrainConfig,
    WandbConfig,
    load_config,
    model_config_from_dict,
)

PRECISION = r"train\.precision: must be one of \('auto', 'fp32', 'bf16', 'autocast'\), got 'fp16'"
BAD_ENUMERATIONS = [
    ("train.precision", "fp16", PRECISION),
    ("train.compile", "fast", r"train\.compile: must be one of \('none', .*\), got 'fast'$"),
    ("wandb.mode", "loud", r"wandb\.mode: must be one of \('online', 'offline', 'disabled'\), got 'loud'$"),
    ("deepspeed.zero_stage", "4", r"deepspeed\.zero_stage: must be 0, 1, 2 or 3, got 4$"),
    ("model.attention_backend", "xformers", r"model\.attention_backend: must be one of \('auto', .*\), got "
                                            r"'xformers'$"),
    ("model.cross_attention_shape_for_attention", "k", r"model\.cross_attention_shape_for_attention: must be 'q' or "
                                                       r"'kv', got 'k'$"),
]


def yaml_setting(path, key: str, value: str):
    section, name = key.split(".")
    path.write_text(f"{section}:\n  {name}: {value}\n")
    return str(path)


@pytest.mark.parametrize("key,value,message", BAD_ENUMERATIONS, ids=[key for key, _, _ in BAD_ENUMERATIONS])
def test_a_bad_enumeration_keeps_its_message_through_load_config(tmp_path, key, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[f"{key}={value}"])
    with pytest.raises(ConfigError, match=message):
        load_config(yaml_setting(tmp_path / "config.yaml", key, value))


def test_only_the_value_that_wins_is_judged_and_converted_as_before(tmp_path):
    path = yaml_setting(tmp_path / "config.yaml", "train.precision", "fp16")
    assert load_config(path, ["train.precision=bf16"]).train.precision == "bf16"
    stage = load_config(yaml_setting(tmp_path / "stage.yaml", "deepspeed.zero_stage", "'3'")).deepspeed.zero_stage
    assert stage == 3 and type(stage) is int


def test_a_saved_model_config_keeps_the_message():
    with pytest.raises(ConfigError, match=r"^model\.attention_backend: must be one of"):
        model_config_from_dict({"attention_backend": "xformers"})


def test_the_tuples_are_the_literal_types_values():
    hints = {**typing.get_type_hints(ModelConfig), **typing.get_type_hints(TrainConfig)}
    assert typing.get_args(hints["attention_backend"]) == ATTENTION_BACKENDS
    assert (typing.get_args(hints["precision"]), typing.get_args(hints["compile"])) == (PRECISIONS, COMPILE_MODES)
    assert typing.get_args(typing.get_type_hints(WandbConfig)["mode"]) == WANDB_MODES


def test_sections_built_in_code_validate_themselves():
    with pytest.raises(ConfigError, match=PRECISION):
        TrainConfig(precision="fp16").validate(ModelConfig(), batch_size=32, world_size=1, zero_stage=2)
    with pytest.raises(ConfigError, match=r"train\.compile: 'default' cannot run with deepspeed\.zero_stage=3"):
        TrainConfig(compile="default").validate(ModelConfig(), batch_size=32, world_size=1, zero_stage=3)
    with pytest.raises(ConfigError, match=r"deepspeed\.zero_stage: must be 0, 1, 2 or 3, got 5"):
        DeepSpeedConfig(zero_stage=5).validate()
    with pytest.raises(ConfigError, match=r"wandb\.mode: must be one of"):
        WandbConfig(mode="on").validate()


def test_a_run_that_evaluates_needs_validation_shards():
    cfg = Config(data=DataConfig(train_shards=["/d/train"]), train=TrainConfig(eval_every_steps=5))
    with pytest.raises(ConfigError, match=r"data\.val_shards: train\.eval_every_steps is set but there are no "):
        cfg.validate(world_size=1)
    cfg.data.val_shards = ["/d/val"]
    assert cfg.validate(world_size=1) is cfg
