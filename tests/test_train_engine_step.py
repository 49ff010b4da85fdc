"""What one bf16 training step of the engine dispatches (one process, gloo). On a GPU every operator is a kernel
launch and every scalar read a host sync, so per-parameter-tensor work there makes a small model's step host-bound:
DeepSpeed's bf16 overflow scan was 13 operators and a host read per gradient tensor (``bench/engine_bench.py``)."""

from __future__ import annotations

import itertools

import torch
from test_train_engine import tiny_config

from launch.env import detect_env
from pretrain.config import load_config
from pretrain.data import DataStream
from pretrain.model import PerceiverIO
from pretrain.train.distributed import process_group
from pretrain.train.engine import build_engine
from pretrain.train.batches import to_device
from pretrain.train.metrics import OperatorCount
from pretrain.train.objective import modality_losses, weighted_total


def test_bf16_zero_1_and_2_steps_scan_no_gradient_tensor_for_overflow(tmp_path, monkeypatch):
    """Both stages in one process group, one engine after the other."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    path = tiny_config(tmp_path, train={"precision": "bf16"}, data={"num_workers": 0})
    device = torch.device("cpu")
    counts, tensors = {}, 0
    with process_group(detect_env({}), device):
        for stage in (1, 2):
            cfg = load_config(str(path), [f"deepspeed.zero_stage={stage}"])
            engine = build_engine(cfg, PerceiverIO(cfg.model), 1, device, tmp_path)
            tensors = sum(1 for _ in engine.module.parameters())
            first, second, third = [to_device(batch, device, torch.bfloat16)
                                    for batch in itertools.islice(DataStream(cfg.data, cfg.model), 3)]

            def step(batch: dict) -> None:
                engine.backward(weighted_total(modality_losses(engine, batch), cfg.train.loss_weights))
                engine.step()

            step(first)
            step(second)
            with OperatorCount() as count:
                step(third)
            counts[stage] = count.counts
    for stage, count in counts.items():
        assert count["mm"] > 0, "nothing was counted"
        assert count["amax"] == count["amin"] == 0, stage  # the per-tensor overflow scan
        assert count["_local_scalar_dense"] < tensors / 4, (stage, count["_local_scalar_dense"], tensors)
