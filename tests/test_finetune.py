"""Fine-tuning: ``model.init_from`` from each kind of source, ``train.freeze``, ``optim.pretrained_lr_scale``, a
classification objective with accuracy, resume of a fine-tuning run, and the errors before training. A real
2-process pretraining run (no label head) is the source; fine-tuning runs add a label head and classify images."""

from __future__ import annotations

import dataclasses
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_cli import cli
from test_data_shards import multimodal_model
from test_train_engine import logs, losses, metrics, run, tiny_config

from pretrain import load_pretrained, save_pretrained
from pretrain.checkpoint import MODEL_STATES, peek_client_state, read_latest
from pretrain.config import ConfigError, TextConfig, load_config, model_config_to_dict
from pretrain.data import IGNORE_INDEX
from pretrain.export import export_checkpoint
from pretrain.init_from import match, plan_start, read_source
from pretrain.modalities.label import accuracy_metrics, label_counts
from pretrain.model import PerceiverIO
from pretrain.model.pretrained import save_hf_pretrained
from pretrain.train.schedule import GroupKind, apply_optim_config, build_optimizer, build_scheduler, parameter_groups
from pretrain.trainable import Pretrained, frozen_names

CLASSIFY = {"image": "input", "label": "target"}
NEW_HEAD = ["adapters.label.query", "adapters.label.classifier.weight", "adapters.label.classifier.bias",
            "modality_embeddings.label"]
TEXT = ["adapters.text.bias", "adapters.text.embeddings.weight", "adapters.text.position_embeddings.weight",
        "adapters.text.query_positions.weight", "modality_embeddings.text"]


def pretraining_model():
    """The tiny multimodal model without a label head: pretraining is self-supervised."""
    return dataclasses.replace(multimodal_model(), num_classes=0)


def classifier_model(**changes):
    """The fine-tuning model: the pretrained one without text, with a 5-class label head."""
    return dataclasses.replace(multimodal_model(), text=None, **changes)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A pretraining run of 3 steps (2 processes) and its export, side by side."""
    tmp_path = tmp_path_factory.mktemp("pretrained")
    run(tiny_config(tmp_path, model=model_config_to_dict(pretraining_model()), train={"max_steps": 3}))
    export_checkpoint(tmp_path / "run", tmp_path / "exported")
    return tmp_path


def finetune_config(tmp_path: Path, init_from: str, **sections) -> Path:
    sections.setdefault("model", model_config_to_dict(classifier_model(init_from=init_from)))
    sections.setdefault("data", {"objective": CLASSIFY})
    sections.setdefault("train", {"max_steps": 6, "eval_every_steps": 3})
    return tiny_config(tmp_path, **sections)


def summary(tmp_path: Path) -> str:
    return next(line for line in logs(tmp_path).splitlines() if "INFO pretrain: model.init_from" in line)


@pytest.mark.slow
def test_each_source_kind_gives_the_source_weights_and_a_new_head(source, tmp_path):
    """Our export, the run directory, its checkpoint tag and a transformers directory: every tensor loaded is the
    source's exactly, the label head is new and shaped by this model."""
    exported = load_pretrained(source / "exported").state_dict()
    tag_dir = read_latest(source / "run" / "checkpoints")
    hf_model = PerceiverIO(dataclasses.replace(pretraining_model(), image=None, audio=None, video=None,
                                               decoder_num_heads=8, decoder_qk_channels=256, d_model=32,
                                               num_cross_attention_heads=2))
    save_hf_pretrained(hf_model, tmp_path / "hf")
    text_classifier = dataclasses.replace(hf_model.config, num_classes=7)
    hf_new = NEW_HEAD[:3] + ["modality_embeddings.label", "modality_embeddings.text"]  # a text-only MLM has none
    for path, target, expected, new in ((source / "exported", classifier_model(), exported, NEW_HEAD),
                                        (source / "run", classifier_model(), exported, NEW_HEAD),
                                        (tag_dir, classifier_model(), exported, NEW_HEAD),
                                        (tmp_path / "hf", text_classifier, hf_model.state_dict(), hf_new)):
        model = PerceiverIO(target)
        plan = match(read_source(str(path)), model)
        plan.apply(model, [])
        state = model.state_dict()
        assert plan.pretrained.loaded and plan.pretrained.loaded == [name for name in state if name not in new], path
        assert all(torch.equal(state[name], expected[name]) for name in plan.pretrained.loaded), path
        assert model.adapters.label.classifier.weight.shape == (target.num_classes, target.d_model)
        assert f"model.init_from {path} (" in plan.summary and f"newly initialised: {', '.join(new)};" in plan.summary
    run_model = load_pretrained(source / "run")  # a run directory loads too: its latest checkpoint's fp32 weights
    assert not run_model.training and all(torch.equal(t, exported[n]) for n, t in run_model.state_dict().items())


@pytest.mark.slow
def test_continued_pretraining_takes_every_tensor(source):
    """The same model and objective on new data: everything loads, nothing is new or left over."""
    model = PerceiverIO(pretraining_model())
    plan = match(read_source(str(source / "exported")), model)
    assert plan.pretrained.loaded == list(model.state_dict())
    assert plan.summary.endswith("newly initialised: none; ignored from the source: none")


@pytest.mark.slow
def test_frozen_linear_probe_trains_the_head_alone_and_reports_accuracy(source, tmp_path):
    """train.freeze: [pretrained] on 2 processes: the log names what was loaded, new and ignored; after 6 steps the
    pretrained tensors are bit-identical to the source's, the optimizer holds state for the head alone, the export
    of the fine-tuned run carries both, and evaluation reports top-1 accuracy."""
    config = finetune_config(tmp_path, str(source / "exported"), train={"max_steps": 6, "eval_every_steps": 3,
                                                                      "freeze": ["pretrained"]})
    run(config)
    line = summary(tmp_path)
    assert f"newly initialised: {', '.join(NEW_HEAD)}; ignored from the source: {', '.join(TEXT)}" in line
    source_weights = load_pretrained(source / "exported").state_dict()
    export_checkpoint(tmp_path / "run", tmp_path / "tuned")
    tuned = load_pretrained(tmp_path / "tuned").state_dict()
    loaded = [name for name in tuned if name not in NEW_HEAD]
    assert f"loaded {len(loaded)} tensors" in line and "train.freeze ['pretrained']: " in logs(tmp_path)
    assert all(torch.equal(tuned[name], source_weights[name]) for name in loaded)
    torch.manual_seed(0)  # the run's seed: the head as it started
    head = PerceiverIO(classifier_model()).adapters.label
    assert not torch.equal(tuned["adapters.label.classifier.weight"], head.classifier.weight)  # it trained
    tag_dir = read_latest(tmp_path / "run" / "checkpoints")
    partitions = [torch.load(f, weights_only=False)["optimizer_state_dict"]
                  for f in sorted(tag_dir.glob("zero_pp_rank_*_optim_states.pt"))]
    held = sum(t.numel() for p in partitions for t in p["single_partition_of_fp32_groups"])
    trainable = sum(tuned[name].numel() for name in NEW_HEAD)
    assert trainable <= held <= trainable + sum(sum(p["group_paddings"]) for p in partitions)
    got = metrics(tmp_path / "run")
    assert set(got[1]) >= {"loss", "loss/label"} and not any(k.startswith(("loss/image", "loss/text")) for k in got[1])
    assert 0.0 <= got[6]["val/accuracy"] <= 1.0
    train_log = (tmp_path / "run" / "train.log").read_text()  # every line the console had
    assert line in train_log and "INFO pretrain: step 6/6 | loss " in train_log and "val top-1 " in train_log
    assert f"checkpoint {tmp_path / 'run' / 'checkpoints' / 'step_00000006'} saved in " in train_log
    per_class = {k: v for k, v in got[6].items() if k.startswith("val/accuracy/")}
    assert per_class and all(0.0 <= v <= 1.0 for v in per_class.values())
    assert "val top-1 " in logs(tmp_path)


@pytest.mark.slow
def test_resumed_finetuning_continues_its_checkpoint_not_init_from(source, tmp_path):
    """A fine-tuning run checkpointed at step 3 and resumed (its init_from gone by then: it is not read again)
    gives the losses of an uninterrupted run; optim.pretrained_lr_scale holds across the resume."""
    common = dict(checkpoint={"every_steps": 3}, optim={"lr": 3e-3, "warmup_steps": 2, "pretrained_lr_scale": 0.1})
    reference = finetune_config(tmp_path / "reference", str(source / "exported"), **common)
    run(reference)
    moved = tmp_path / "init"
    shutil.copytree(source / "exported", moved)
    config = finetune_config(tmp_path / "resumed", str(moved), train={"max_steps": 3, "eval_every_steps": 3}, **common)
    run(config)
    shutil.rmtree(moved)
    config = finetune_config(tmp_path / "resumed", str(moved), train={"max_steps": 6, "eval_every_steps": 3}, **common)
    run(config)
    text = logs(tmp_path / "resumed")
    assert f"model.init_from {moved}: not loaded, the run resumes from" in text
    assert losses(tmp_path / "resumed" / "run") == losses(tmp_path / "reference" / "run")
    accuracy = [metrics(tmp_path / name / "run")[6]["val/accuracy"] for name in ("resumed", "reference")]
    assert accuracy[0] == accuracy[1]


def test_pretrained_parameters_learn_at_the_scaled_rate_across_a_resume():
    model = PerceiverIO(classifier_model())
    pretrained = [name for name, _ in model.named_parameters() if name not in NEW_HEAD]
    optim = load_config(overrides=["optim.lr=1e-3", "optim.pretrained_lr_scale=0.1"]).optim
    groups = parameter_groups(model, pretrained)
    assert [kind for kind, _ in groups] == [GroupKind(True, True), GroupKind(False, True), GroupKind(True, False),
                                            GroupKind(False, False)]
    optimizer = build_optimizer(model, optim, pretrained)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-4, 1e-4, 1e-3, 1e-3])
    scheduler = build_scheduler(optimizer, optim, 10)
    wanted = dataclasses.replace(optim, pretrained_lr_scale=0.5)
    changed = apply_optim_config(optimizer, scheduler, wanted, [kind for kind, _ in groups])
    assert scheduler.base_lrs == pytest.approx([5e-4, 5e-4, 1e-3, 1e-3]) and len(changed) == 2


def test_freeze_names_modules_aliases_and_pretrained():
    model = PerceiverIO(classifier_model())
    names = [name for name, _ in model.named_parameters()]
    assert frozen_names(model, ["latents"], []) == ["encoder.latents"]
    assert frozen_names(model, ["decoder"], []) == [n for n in names if n.startswith("decoder.")]
    assert frozen_names(model, ["pretrained"], ["encoder.latents", "decoder.cross_attention.out.bias"]) == [
        "encoder.latents", "decoder.cross_attention.out.bias"]
    with pytest.raises(ConfigError, match=r"train.freeze: 'encoder.latent' names no parameter of this model; give "
                                          r"'pretrained', 'latents' or a module path: adapters.audio, .*, decoder"):
        frozen_names(model, ["encoder.latent"], [])
    with pytest.raises(ConfigError, match="'pretrained' names the tensors model.init_from loaded"):
        frozen_names(model, ["pretrained"], [])
    with pytest.raises(ConfigError, match="freezes every parameter"):
        frozen_names(model, ["encoder", "decoder", "adapters", "modality_embeddings"], [])


def test_accuracy_of_a_hand_built_batch():
    logits = torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 1.0], [0.0, 0.0, 5.0], [4.0, 1.0, 0.0], [0.0, 9.0, 0.0]])
    targets = torch.tensor([0, 2, 2, 1, IGNORE_INDEX])  # right, wrong (said 1), right, wrong (said 0), no label
    counts = label_counts(logits, targets)
    assert counts.tolist() == [[1, 0, 1], [1, 1, 2]]
    assert accuracy_metrics(counts + label_counts(logits[:1], targets[:1]), ["shirt", "T-shirt/top", "bag"]) == {
        "accuracy": 3 / 5, "accuracy/shirt": 1.0, "accuracy/T-shirt_top": 0.0, "accuracy/bag": 0.5}
    assert accuracy_metrics(label_counts(logits[4:], targets[4:])) == {}


def truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def int_weights(path: Path) -> None:
    model = load_pretrained(path)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["encoder.latents"] = state["encoder.latents"].to(torch.int32)
    save_file(state, str(path / "model.safetensors"))


def other_architecture(path: Path) -> None:
    save_file({"conv1.weight": torch.zeros(4, 3, 3, 3), "fc.bias": torch.zeros(4)}, str(path / "model.safetensors"))


def hf_of_another_class(path: Path) -> None:
    (path / "model.safetensors").unlink()
    (path / "config.yaml").unlink()
    (path / "config.json").write_text(json.dumps({"model_type": "perceiver",
                                                  "architectures": ["PerceiverForImageClassificationLearned"]}))


BAD_SOURCES = {
    "missing": (None, r"{path} does not exist; give an export directory \(python -m pretrain export RUN --out DIR\)"),
    "empty": (lambda path: [p.unlink() for p in path.iterdir()], r"{path} is an empty directory; give an export"),
    "a file": (lambda path: None, r"{path}/model.safetensors is a file; give an export directory"),
    "truncated": (lambda path: truncated(path / "model.safetensors"),
                  r"{path}/model.safetensors is not a readable safetensors file .*a copy cut off"),
    "wrong dtype": (int_weights, r"{path}/model.safetensors: 1 tensors are not floating point \(encoder.latents "
                                 r"\(torch.int32\)\): it does not hold a model's weights"),
    "another architecture": (other_architecture, r"{path}: its weights do not fit the model of config.yaml: .*conv1"),
    "transformers class": (hf_of_another_class, r"{path}/config.json: a transformers "
                                                r"PerceiverForImageClassificationLearned directory; only "
                                                r"PerceiverForMaskedLM directories"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(BAD_SOURCES))
def test_a_source_that_holds_no_usable_model_is_refused_naming_it(source, tmp_path, case):
    make, message = BAD_SOURCES[case]
    path = tmp_path / "model"
    if make is not None:
        shutil.copytree(source / "exported", path)
        make(path)
    given = path / "model.safetensors" if case == "a file" else path
    with pytest.raises(ConfigError, match="model.init_from: " + message.format(path=path)):
        read_source(str(given))


@pytest.mark.slow
def test_a_source_of_another_shape_is_refused_before_training_naming_tensor_shapes_and_key(source, tmp_path):
    """Through the CLI: exit 2 before any process starts, the tensor, both shapes and the differing key named."""
    model = model_config_to_dict(classifier_model(d_latents=48, init_from=str(source / "exported")))
    done = cli("train", "--config", str(finetune_config(tmp_path, "", model=model)))
    assert done.returncode == 2, done.stderr
    assert (f"error: model.init_from: {source / 'exported'} (model directory) does not fit this model: "
            f"encoder.latents is [8, 32] there, [8, 48] here") in done.stderr
    assert "The keys that differ: model.d_latents: 32 there, 48 here" in done.stderr
    assert f"see {source / 'exported' / 'config.yaml'}" in done.stderr
    assert not (tmp_path / "run").exists()
    deeper = model_config_to_dict(classifier_model(num_self_attends_per_block=2, init_from=str(source / "exported")))
    with pytest.raises(ConfigError, match=r"encoder.self_attends.1.q_norm.weight is missing there.*model."
                                          r"num_self_attends_per_block: 1 there, 2 here"):
        plan_start(load_config(str(finetune_config(tmp_path, "", model=deeper))), PerceiverIO(
            classifier_model(num_self_attends_per_block=2)), None, None)


def test_a_resume_with_another_freeze_is_refused(tmp_path):
    """A run keeps its frozen parameters: its optimizer holds state for the others only."""
    tag = tmp_path / "run" / "checkpoints" / "step_00000003"
    tag.mkdir(parents=True)
    config = load_config(overrides=["train.freeze=[decoder]"])
    saved = {"train": {"freeze": ["latents"]}}
    torch.save({"config": saved, "shared": {}, "world_size": 2, "module": {}}, tag / MODEL_STATES)
    with pytest.raises(ConfigError, match=r"train.freeze: \['decoder'\], but .*step_00000003 was trained with "
                                          r"\['latents'\]: a run keeps its frozen parameters"):
        plan_start(config, PerceiverIO(classifier_model()), tag, peek_client_state(tag))


def test_a_classifier_of_another_class_count_gets_a_new_classifier(tmp_path):
    """num_classes may differ from the source's: the classifier starts anew, the label query is kept."""
    source_model = PerceiverIO(classifier_model(num_classes=5))
    save_pretrained(source_model, tmp_path / "five")
    plan = match(read_source(str(tmp_path / "five")), PerceiverIO(classifier_model(num_classes=10)))
    assert "adapters.label.query" in plan.pretrained.loaded
    assert "newly initialised: adapters.label.classifier.weight, adapters.label.classifier.bias;" in plan.summary


def test_a_pretrained_model_record_survives_in_the_checkpoint_state():
    record = Pretrained("exported/demo", ["encoder.latents"])
    assert Pretrained.of_checkpoint({"shared": {"pretrained": record.state_dict()}}) == record
    assert Pretrained.of_checkpoint({"shared": {}}) == Pretrained()


def test_an_export_directory_does_not_carry_init_from(tmp_path):
    model = PerceiverIO(dataclasses.replace(classifier_model(), init_from="somewhere/else", text=TextConfig()))
    save_pretrained(model, tmp_path / "m")
    assert load_pretrained(tmp_path / "m").config.init_from == ""


def test_a_truncated_safetensors_header_is_named(tmp_path):
    """Even a file cut inside its header (the first 8 bytes say how long it is)."""
    path = tmp_path / "model"
    save_pretrained(PerceiverIO(classifier_model()), path)
    (path / "model.safetensors").write_bytes(struct.pack("<Q", 10_000) + b"{")
    with pytest.raises(ConfigError, match="is not a readable safetensors file"):
        read_source(str(path))
