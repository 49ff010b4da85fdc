"""``pretrain export``: real 2-process DeepSpeed runs are exported, and the exported model is the one that trained (it
gives the validation loss the run logged at its last step), in fp32 master precision, under every ZeRO stage."""

from __future__ import annotations

import itertools
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_data_shards import text_sample, write_shards
from test_train_engine import FP32_ACCUMULATION, ROOT, metrics, run, tiny_config

from pretrain import load_pretrained
from pretrain.checkpoint import UNIVERSAL, find_tag, model_states, read_latest
from pretrain.config import ModelConfig, TextConfig, load_config, model_config_to_dict
from pretrain.data import ValidationPass
from pretrain.export import ExportError, export_checkpoint
from pretrain.train.objective import modality_losses, target_counts, weighted_total

STEPS = 3


def trained(tmp_path: Path, **sections) -> Path:
    """The run directory of a 2-process run of ``STEPS`` steps that evaluates and checkpoints at its last step."""
    sections["train"] = {"max_steps": STEPS, "eval_every_steps": STEPS, **sections.get("train", {})}
    run(tiny_config(tmp_path, **sections))
    return tmp_path / "run"


@torch.no_grad()
def val_loss(model: torch.nn.Module, run_dir: Path, world_size: int = 2) -> float:
    """The run's validation loss recomputed in this process: every rank's validation batches, as the run's evaluation
    reads them, through ``model``; each modality's loss over all its targets, weighted and summed."""
    cfg = load_config(str(run_dir / "config.yaml"))
    sums: dict = {}
    for rank in range(world_size):
        batches = ValidationPass(cfg.data, cfg.model, rank, world_size)
        for batch in itertools.islice(batches, cfg.train.eval_batches or None):
            losses, counts = modality_losses(model, batch), target_counts(batch)
            for name, loss in losses.items():
                total, count = sums.get(name, (0.0, 0.0))
                sums[name] = (total + float(loss) * float(counts[name]), count + float(counts[name]))
    means = {name: total / count for name, (total, count) in sums.items() if count}
    return float(weighted_total(means, cfg.train.loss_weights))


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory) -> Path:
    return trained(tmp_path_factory.mktemp("zero2"))


def saved_module(run_dir: Path) -> dict:
    """The module weights DeepSpeed saved in the run's latest checkpoint (bf16 in a bf16 run)."""
    tag_dir = read_latest(run_dir / "checkpoints")
    return torch.load(model_states(tag_dir), map_location="cpu", weights_only=False)["module"]


def export_cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m pretrain export`` under umask 022, as a login shell has it."""
    return subprocess.run([sys.executable, "-m", "pretrain", "export", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, umask=0o022)


@pytest.mark.slow
def test_export_of_a_zero2_run_is_the_trained_model(zero2_run, tmp_path):
    done = export_cli(str(zero2_run), "--out", str(tmp_path / "model"))
    assert done.returncode == 0, done.stderr[-3000:]
    tag_dir = read_latest(zero2_run / "checkpoints")
    assert done.stdout == f"exported step {STEPS} ({tag_dir}) to {tmp_path / 'model'}\n"  # DeepSpeed's prints on stderr
    model = load_pretrained(tmp_path / "model")
    # fp32 ZeRO-2: the module DeepSpeed saved holds the master weights themselves
    module = saved_module(zero2_run)
    exported = model.state_dict()
    assert set(exported) == set(module)
    assert all(torch.equal(exported[name], module[name]) for name in module)
    assert val_loss(model, zero2_run) == pytest.approx(metrics(zero2_run)[STEPS]["val/loss"], rel=1e-5)
    with safe_open(str(tmp_path / "model" / "model.safetensors"), "pt") as weights:
        assert weights.metadata() == {"checkpoint": str(tag_dir.resolve()), "step": str(STEPS)}
    # readable by the group and others, as the umask allows (safetensors alone writes 0600)
    assert {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "model").iterdir()} == {
        "model.safetensors": 0o644, "config.yaml": 0o644}
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o755


@pytest.mark.slow
def test_run_checkpoint_and_tag_directories_name_the_same_checkpoint(zero2_run):
    tag_dir = read_latest(zero2_run / "checkpoints")
    assert find_tag(zero2_run) == find_tag(zero2_run / "checkpoints") == find_tag(tag_dir) == tag_dir
    assert find_tag(zero2_run / "config.yaml") is None and find_tag(zero2_run.parent) is None


@pytest.mark.slow
def test_export_refuses_what_it_cannot_use_and_writes_nothing(zero2_run, tmp_path):
    with pytest.raises(ExportError, match=f"{zero2_run.parent} is not a checkpoint tag directory"):
        export_checkpoint(zero2_run.parent, tmp_path / "a")
    with pytest.raises(ExportError, match="--hf: model: only a text-only MLM model converts to transformers"):
        export_checkpoint(zero2_run, tmp_path / "b", tmp_path / "b-hf")
    occupied = tmp_path / "c"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match=f"{occupied} exists and is not an empty directory"):
        export_checkpoint(zero2_run, occupied)
    with pytest.raises(ExportError, match="name the same directory"):
        export_checkpoint(zero2_run, tmp_path / "d", tmp_path / "d")
    tag_dir = read_latest(zero2_run / "checkpoints")
    universal = shutil.copytree(tag_dir, tmp_path / (tag_dir.name + UNIVERSAL))
    with pytest.raises(ExportError, match=f"export the tag it was converted from, {tmp_path / tag_dir.name}"):
        export_checkpoint(universal, tmp_path / "e")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", universal.name]
    assert (occupied / "notes.txt").read_text() == "keep me"
    done = export_cli(str(tmp_path / "missing"), "--out", str(tmp_path / "f"))
    assert done.returncode == 2 and done.stderr == (f"error: {tmp_path / 'missing'} does not exist; give a run "
                                                    f"directory, its checkpoints/ or one of its tags\n")


@pytest.mark.slow
def test_text_zero3_run_exports_to_transformers_with_the_same_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    write_shards(tmp_path / "shards" / "train", [24] * 4, text_sample)
    write_shards(tmp_path / "shards" / "val", [8] * 2, text_sample, first=10)
    model_cfg = ModelConfig(d_model=32, num_latents=8, d_latents=48, num_self_attends_per_block=2,
                            num_self_attention_heads=4, num_cross_attention_heads=4, qk_channels=32, v_channels=48,
                            text=TextConfig(max_length=32))
    run_dir = trained(tmp_path, model=model_config_to_dict(model_cfg), deepspeed={"zero_stage": 3})
    export_checkpoint(run_dir, tmp_path / "ours", tmp_path / "hf")
    ours = load_pretrained(tmp_path / "ours")
    assert val_loss(ours, run_dir) == pytest.approx(metrics(run_dir)[STEPS]["val/loss"], rel=1e-5)
    theirs = transformers.PerceiverForMaskedLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, 262, (2, 32), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 32, dtype=torch.long)
    mask[1, 20:] = 0
    with torch.no_grad():
        torch.testing.assert_close(theirs(inputs=ids, attention_mask=mask).logits,
                                   ours.text_logits(ids, mask.bool()), atol=1e-5, rtol=0)
    assert all(torch.equal(a, b) for a, b in zip(load_pretrained(tmp_path / "hf").state_dict().values(),
                                                  ours.state_dict().values()))


BF16_ENGINES = {"zero0": {"zero_stage": 0}, "zero2": {"zero_stage": 2}, "zero1_fp32_accumulation": FP32_ACCUMULATION}


@pytest.mark.slow
@pytest.mark.parametrize("engine", sorted(BF16_ENGINES))
def test_bf16_run_exports_the_fp32_master_weights(tmp_path, engine):
    """The export holds the optimizer's fp32 copies (ZeRO-0: named through the optimizer's groups; ZeRO-1 with fp32
    accumulation: BF16_Optimizer's flat slices, which DeepSpeed's own gathering refuses, joined over both ranks),
    which round to the bf16 weights the model computed with, and carry more than those."""
    run_dir = trained(tmp_path, train={"precision": "bf16"}, deepspeed=BF16_ENGINES[engine])
    export_checkpoint(run_dir, tmp_path / "model")
    exported = load_pretrained(tmp_path / "model").state_dict()
    module = saved_module(run_dir)
    assert {w.dtype for w in exported.values()} == {torch.float32}
    assert {w.dtype for w in module.values()} == {torch.bfloat16}
    assert all(torch.equal(exported[name].to(torch.bfloat16), module[name]) for name in module)
    assert any(not torch.equal(w.to(torch.bfloat16).float(), w) for w in exported.values())
