"""``python -m pretrain train``: each bad config exits non-zero before any training, naming the key; the console
script and ``--print-config`` work."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml
from test_data_shards import multimodal_model
from test_train_engine import ROOT, tiny_config

from pretrain.__main__ import main
from pretrain.checkpoint import MODEL_STATES
from pretrain.config import ModelConfig, TextConfig, model_config_from_dict, model_config_to_dict
from pretrain.model import PerceiverIO


def cli(*args: str, script: str = "") -> subprocess.CompletedProcess:
    command = [script] if script else [sys.executable, "-m", "pretrain"]
    return subprocess.run([*command, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


BAD = [
    (["model.nope=1"], "model.nope"),
    (["data.num_workers=5"], "data.num_workers: a global batch of 4 samples leaves some of the 1 processes x 5"),
    (["data.batch_size=200", "train.eval_every_steps=0"], "data.train_shards: an epoch of 96 samples is less than"),
    (["train.max_steps=many"], "train.max_steps"),
    (["train.global_batch_size=6"], "train.global_batch_size"),
    (["model.num_self_attention_heads=5"], "model.num_self_attention_heads"),
    (["data.train_shards=['/nonexistent/shard-{000..003}.tar']"], "data.train_shards[0]"),
    (["data.val_shards=[/nonexistent/val]"], "data.val_shards[0]"),
    (["deepspeed.zero_stage=4"], "deepspeed.zero_stage"),
    (["train.compile=fast"], "train.compile"),
    (["train.compile=default", "deepspeed.zero_stage=3"], "train.compile"),
    (["deepspeed.fp32_grad_accumulation=true", "deepspeed.zero_stage=0"], "deepspeed.fp32_grad_accumulation"),
    (["train.collective_timeout_minutes=0"], "train.collective_timeout_minutes"),
    (["wandb.finish_timeout_s=-1"], "wandb.finish_timeout_s"),
    (["run.profile_steps=-1"], "run.profile_steps"),
    (["--resume", "/nonexistent/checkpoints/step_00000010"], "--resume"),
    (["model.init_from=/nonexistent/exported"], "model.init_from: /nonexistent/exported does not exist"),
    (["train.freeze=[pretrained]"], "train.freeze: 'pretrained' names the tensors model.init_from loaded"),
    (["optim.pretrained_lr_scale=0"], "optim.pretrained_lr_scale"),
    (["data.objective.label=input"], "data.objective.label: must be one of ('target',)"),
]


@pytest.mark.parametrize("args,key", BAD, ids=[key for _, key in BAD])
def test_bad_config_exits_before_training_naming_the_key(tmp_path, args, key, capsys):
    """In this process (the command's own ``main``; a process per case would spend its time importing torch)."""
    config = tiny_config(tmp_path)
    assert main(["train", "--config", str(config), *args]) == 2
    assert key in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing started


def test_resume_none_refuses_a_run_dir_with_checkpoints(tmp_path):
    config = tiny_config(tmp_path)
    checkpoints = tmp_path / "run" / "checkpoints"
    (checkpoints / "step_00000003").mkdir(parents=True)
    (checkpoints / "latest").write_text("step_00000003")
    done = cli("train", "--config", str(config), "--resume", "none")
    assert done.returncode == 2 and "--resume none" in done.stderr and "step_00000003" in done.stderr


@pytest.mark.parametrize("change, named", [
    ({"d_latents": 64}, "27 of another shape (encoder.latents (8, 64) in it, (8, 32) in the model"),
    ({"num_self_attends_per_block": 2}, "12 weights the model does not have (encoder.self_attends.1.q_norm.weight"),
])
def test_resume_refuses_a_checkpoint_of_another_model(tmp_path, change, named):
    """Before any process starts: a checkpoint whose weights' names or shapes differ from the model of the config
    (another model config, or an older layout of the model) exits 2, naming the weights."""
    config = tiny_config(tmp_path)
    model_config = model_config_to_dict(multimodal_model())
    with torch.device("meta"):
        other = PerceiverIO(model_config_from_dict({**model_config, **change}))
    tag = tmp_path / "run" / "checkpoints" / "step_00000003"
    tag.mkdir(parents=True)
    torch.save({"module": other.state_dict()}, tag / MODEL_STATES)
    (tag.parent / "latest").write_text(tag.name)
    done = cli("train", "--config", str(config))
    assert done.returncode == 2, done.stderr
    assert f"--resume: {tag} does not fit the model of this config" in done.stderr and named in done.stderr
    assert "another run.dir" in done.stderr


def test_print_config_shows_the_resolved_config_with_overrides(tmp_path):
    config = tiny_config(tmp_path)
    done = cli("train", "--config", str(config), "train.max_steps=77", "--print-config", script="perceiver-pretrain")
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)
    assert resolved["train"]["max_steps"] == 77 and resolved["optim"]["betas"] == [0.9, 0.999]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_list_key_takes_one_value_as_a_one_element_list(tmp_path):
    """``data.train_shards=shards/train``, the form every user types first, is ``[shards/train]`` (a brace pattern
    stays whole); ``key=`` is the empty list; a value the list's elements cannot hold names the key and the forms."""
    config = str(tiny_config(tmp_path))
    train = str(tmp_path / "shards" / "train")
    pattern = str(tmp_path / "shards" / "val" / "shard-{000010..000011}.tar")
    done = cli("train", "--config", config, f"data.train_shards={train}", f"data.val_shards={pattern}",
               "data.weights=1.5", "data.require=", "--print-config")
    assert done.returncode == 0, done.stderr
    data = yaml.safe_load(done.stdout)["data"]
    assert (data["train_shards"], data["val_shards"], data["weights"], data["require"]) == ([train], [pattern], [1.5],
                                                                                             [])
    done = cli("train", "--config", config, "data.weights=heavy")
    assert done.returncode == 2
    assert ("error: data.weights: 'heavy' is not of type float; give one value as data.weights=a or several as "
            "data.weights=[a,b]") in done.stderr
    done = cli("train", "--config", config, f"data.train_shards={train}", "train.max_steps=1")
    assert done.returncode == 0, done.stderr  # and it trains, without DeepSpeed's noise we can configure
    assert "Setting accelerator to CPU" not in done.stderr and "all_gather_into_tensor" not in done.stderr


@pytest.mark.slow
def test_a_run_already_at_its_last_step_says_so_and_trains_nothing(tmp_path):
    config = str(tiny_config(tmp_path, train={"max_steps": 1}))
    assert cli("train", "--config", config).returncode == 0
    done = cli("train", "--config", config)
    assert done.returncode == 0, done.stderr
    tag = tmp_path / "run" / "checkpoints" / "step_00000001"
    assert done.stderr.strip() == (f"run already at train.max_steps=1 ({tag}): nothing to train (raise "
                                   f"train.max_steps to continue)")


@pytest.mark.slow
def test_a_text_model_that_will_not_export_to_transformers_says_so_at_its_start(tmp_path):
    """Its decoder is fixed in PerceiverForMaskedLM: --print-config and the run's start name every setting that blocks
    the export (the check export makes), before days of training, not after."""
    model = model_config_to_dict(ModelConfig(d_model=32, num_latents=8, d_latents=32, num_self_attends_per_block=1,
                                             num_self_attention_heads=2, num_cross_attention_heads=2,
                                             decoder_num_heads=2, decoder_qk_channels=16,
                                             text=TextConfig(max_length=32)))
    config = str(tiny_config(tmp_path, model=model, train={"max_steps": 1}))
    blockers = ("model.decoder_num_heads: PerceiverForMaskedLM fixes it to 8, got 2; "
                "model.decoder_qk_channels: PerceiverForMaskedLM fixes it to 256, got 16")
    done = cli("train", "--config", config, "--print-config")
    assert done.returncode == 0 and done.stdout.endswith(f"# pretrain export --hf will refuse this model: {blockers}\n")
    done = cli("train", "--config", config)
    assert done.returncode == 0, done.stderr
    assert f"WARNING pretrain: pretrain export --hf will refuse this model: {blockers}" in done.stderr
    done = cli("export", str(tmp_path / "run"), "--out", str(tmp_path / "m"), "--hf", str(tmp_path / "hf"))
    assert done.returncode == 2 and f"error: --hf: {blockers}" in done.stderr
    assert "refuse" not in cli("train", "--config", "configs/mlm_bytes_201m.yaml", "--print-config").stdout


def test_an_empty_value_empties_a_string_key(tmp_path):
    """``model.init_from=`` (train from scratch with a fine-tuning config) is the empty string, not YAML's null."""
    done = cli("train", "--config", str(tiny_config(tmp_path)), "model.init_from=/x", "model.init_from=",
               "--print-config")
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(done.stdout)["model"]["init_from"] == ""


@pytest.mark.parametrize("name", ["demo", "finetune_demo", "mlm_bytes_201m", "multimodal_base"])
def test_shipped_configs_are_valid(name):
    done = cli("train", "--config", f"configs/{name}.yaml", "--print-config")
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_shards_with_more_classes_than_the_model_are_refused_before_training(tmp_path):
    """Shards from ``data_prep shard --label-from-folder`` list their classes: a model with fewer would skip every
    sample whose label it cannot take, so the run is refused at once, naming the key and the value that fits."""
    config = tiny_config(tmp_path, train={"max_steps": 1})
    index_path = tmp_path / "shards" / "train" / "index.json"
    index = json.loads(index_path.read_text())
    index_path.write_text(json.dumps({**index, "info": {"classes": [f"c{i}" for i in range(7)]}}))
    done = cli("train", "--config", str(config))
    assert done.returncode == 2
    assert ("error: model.num_classes: 5, but data.train_shards[0] has 7 classes (c0, c1, c2, c3, c4, ... in its "
            "index.json); set model.num_classes=7") in done.stderr
    assert not (tmp_path / "run").exists()
    done = cli("train", "--config", str(config), "model.num_classes=7")
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_under_torchrun_a_mistake_is_printed_once_and_is_the_root_cause(tmp_path):
    """Two ranks under torchrun (the README's command) both find the mistake before training: rank 0 prints it, and
    torchrun's own summary, printed last, names it as the root cause. torchrun exits 1 for any failed rank."""
    config = tiny_config(tmp_path, data={"batch_size": 64}, train={"eval_every_steps": 2})  # 2 x 64 > 96 samples
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "pretrain", "train", "--config", str(config)], cwd=ROOT, capture_output=True,
                          text=True, timeout=240)
    line = ("error: data.train_shards: an epoch of 96 samples is less than one global batch of 128 (data.batch_size "
            "64 x processes x accumulation steps); lower data.batch_size or train.global_batch_size, or raise "
            "data.epoch_samples")
    assert done.returncode == 1
    printed = [row for row in done.stderr.splitlines() if row.startswith("error: ")]
    assert printed == [line], done.stderr[-3000:]
    root_cause = done.stderr.split("Root Cause (first observed failure):", 1)[1]
    assert "rank      : 0 (local_rank: 0)" in root_cause and f"traceback : {line}" in root_cause
    assert done.stderr.count("Traceback (most recent call last)") == 1  # torchrun's own (ChildFailedError), no rank's
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_warmup_longer_than_the_run_is_warned_and_no_bar_goes_into_a_log(tmp_path):
    """stderr is a pipe here, as it is a file under Slurm: the progress bar, which redraws every step, stays off."""
    config = tiny_config(tmp_path, train={"max_steps": 2}, optim={"warmup_steps": 8, "lr": 1e-3})
    done = cli("train", "--config", str(config), "run.progress_bar=true")
    assert done.returncode == 0, done.stderr[-3000:]
    assert ("optim.warmup_steps 8 > train.max_steps 2: the learning rate never reaches optim.lr 0.001 (it ends the run "
            "at 25% of it); lower optim.warmup_steps") in done.stderr
    assert "it/s]" not in done.stderr and "s/it]" not in done.stderr and "\r" not in done.stderr
