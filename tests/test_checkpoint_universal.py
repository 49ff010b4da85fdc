"""Another world size on resume: a 2-process ZeRO-2 checkpoint (and a ZeRO-1 bf16 one accumulating in fp32)
continues with 1 process through a DeepSpeed universal checkpoint (converted once, announced in the log), on the
global batches the 2 processes would have had: in fp32 with the losses of their continuation."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from test_train_engine import FP32_ACCUMULATION, logs, losses, run, tiny_config

from pretrain.checkpoint import MODEL_STATES, read_latest

ENGINES = {
    "zero2": {},
    # DeepSpeed's BF16_Optimizer: flat fp32 slices per rank, which the universal conversion must re-split
    "zero1_fp32_accumulation": {"train": {"precision": "bf16"}, "deepspeed": FP32_ACCUMULATION},
}


@pytest.mark.slow
@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_two_process_checkpoint_resumes_with_one_process(tmp_path, engine):
    extra = ENGINES[engine]
    sections = dict(extra, train={"max_steps": 12, "global_batch_size": 8, **extra.get("train", {})},
                    checkpoint={"every_steps": 8}, optim={"lr": 1e-2, "warmup_steps": 1},
                    model={"attention_dropout": 0.0})  # dropout masks are drawn per rank and micro-batch
    config = tiny_config(tmp_path / "one", **sections)
    config.write_text(config.read_text().replace("max_steps: 12", "max_steps: 8"))
    run(config, nproc=2)
    two = tiny_config(tmp_path / "two", **sections)
    shutil.copytree(tmp_path / "one" / "run", tmp_path / "two" / "run")
    run(two, nproc=2)  # the same checkpoint continued by 2 processes, for comparison

    config = tiny_config(tmp_path / "one", **sections)
    run(config, nproc=1)
    checkpoints = tmp_path / "one" / "run" / "checkpoints"
    text = logs(tmp_path / "one")
    assert "was saved by 2 processes, resuming with 1: loading it as a DeepSpeed universal checkpoint" in text
    assert (checkpoints / "step_00000008_universal" / "zero").is_dir()
    assert read_latest(checkpoints).name == "step_00000012"
    assert "data: resuming on 1 processes x 1 workers, micro-batches of 4 (saved: 2 x 1, 4)" in text
    data = torch.load(checkpoints / "step_00000012" / MODEL_STATES, weights_only=False)["per_rank"][0]["data"]
    assert (data["epoch"], data["steps"]) == (0, 12)  # 96 samples, 12 global batches of 8: the epoch's end
    one_process, two_process = losses(tmp_path / "one" / "run"), losses(tmp_path / "two" / "run")
    if engine == "zero2":  # fp32: the same samples and masks, the same sums: the 2-process losses
        for step in range(9, 13):
            assert one_process[step]["loss"] == pytest.approx(two_process[step]["loss"], rel=1e-5), step
    learned = one_process[1]["loss"] - two_process[9]["loss"]  # what a restart from scratch would lose again
    assert learned > 1.0
    after = range(9, 13)
    assert all(math.isfinite(one_process[step]["loss"]) for step in after)
    # The two runs see different samples after the world size changes, and single steps of a tiny batch are noisy:
    # compare the mean over the continued steps, and that no step falls back towards the untrained loss.
    mean_one = sum(one_process[step]["loss"] for step in after) / len(after)
    mean_two = sum(two_process[step]["loss"] for step in after) / len(after)
    assert abs(mean_one - mean_two) < 0.2 * learned, (mean_one, mean_two, learned)
    assert max(one_process[step]["loss"] for step in after) < one_process[1]["loss"] - 0.5 * learned
