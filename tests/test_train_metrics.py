"""FLOPs for MFU: counted on the eager forward, also when ``train.compile`` compiled the model (no graph is compiled
for the count, and the model still compiles afterwards), and on the Perceiver as the training loop counts it."""

from __future__ import annotations

import torch
from torch._dynamo.testing import CompileCounter

from conftest import tiny_config
from pretrain.model import PerceiverIO
from pretrain.perf import count_flops
from pretrain.train.metrics import SkipSummary


class TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = torch.nn.Linear(16, 32), torch.nn.Linear(32, 8)

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def test_count_flops_of_a_compiled_model_counts_eagerly_and_leaves_it_compiling():
    model, x = TwoLayers(), torch.randn(4, 16)
    expected = 3.0 * 2 * 4 * (16 * 32 + 32 * 8)  # forward matmuls, backward as twice the forward
    assert count_flops(model, (x,)) == expected
    compiled = CompileCounter()
    model.compile(backend=compiled)
    assert count_flops(model, (x,)) == expected
    assert compiled.frame_count == 0
    model(x)  # counting left the code compilable: training after the count runs compiled
    assert compiled.frame_count == 1


def test_count_flops_of_the_perceiver_equals_three_forwards():
    """The loop counts the model's FLOPs once per run, on every device. Under no_grad, the latents expanded over the
    batch made the counter's module tracker raise."""
    from torch.utils.flop_counter import FlopCounterMode

    model = PerceiverIO(tiny_config())
    inputs, outputs = {"text": torch.randint(0, 20, (2, 12))}, {"text": None}
    forward = FlopCounterMode(display=False)
    with forward:
        model(inputs, outputs)
    assert forward.get_total_flops() > 0
    assert count_flops(model, (inputs, outputs)) == 3.0 * forward.get_total_flops()


def test_skips_are_summed_up_once_per_log_window():
    summary = SkipSummary()
    assert summary.line({"unused_samples": 40}, 25) is None  # passed over by design: not a skip
    assert summary.line({"skipped/undecodable:png": 3, "unused_samples": 41}, 50) == (
        "data: 3 samples skipped by step 50 since the last line (undecodable:png 3); 3 in all")
    assert summary.line({"skipped/undecodable:png": 3, "unused_samples": 60}, 75) is None
    assert summary.line({"skipped/corrupt_tar": 1, "skipped/undecodable:png": 5}, 100) == (
        "data: 3 samples skipped by step 100 since the last line (corrupt_tar 1, undecodable:png 2); 6 in all")
