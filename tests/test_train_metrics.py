"""FLOPs for MFU: counted on the eager forward, also when ``train.compile`` compiled the model (the counting mode
keeps dynamo from compiling a no-grad graph just for it)."""

from __future__ import annotations

import torch
from torch._dynamo.testing import CompileCounter

from pretrain.train.metrics import count_flops


class TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = torch.nn.Linear(16, 32), torch.nn.Linear(32, 8)

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def test_count_flops_of_a_compiled_model_counts_eagerly_without_compiling():
    model, x = TwoLayers(), torch.randn(4, 16)
    expected = 3.0 * 2 * 4 * (16 * 32 + 32 * 8)  # forward matmuls, backward as twice the forward
    assert count_flops(model, (x,)) == expected
    compiled = CompileCounter()
    model.compile(backend=compiled)
    assert count_flops(model, (x,)) == expected
    assert compiled.frame_count == 0
