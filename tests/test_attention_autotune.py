"""Attention autotuning: it picks the fastest measured candidate, remembers it per shape bucket, leaves the random
stream alone, stays out of FLOP counting and compiled code, and survives activation checkpointing."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from conftest import multimodal_config, multimodal_inputs
from pretrain.model import PerceiverIO
from pretrain.perf import attention, autotune, optimize
from pretrain.perf.attention import attend
from pretrain.perf.autotune import KernelTuner, shape_bucket
from test_attention import TOLERANCE, padding_mask, qkv, reference, rel_err


@pytest.fixture
def tuner(monkeypatch) -> KernelTuner:
    """A fresh cache for each test, so that decisions of earlier tests do not leak in."""
    fresh = KernelTuner()
    monkeypatch.setattr(attention, "TUNER", fresh)
    return fresh


def test_shape_bucket_rounds_up_to_a_power_of_two():
    assert [shape_bucket(n) for n in (1, 2, 3, 200, 256, 257)] == [1, 2, 4, 256, 256, 512]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dqk,dv", [(32, 32), (32, 160)])
def test_autotune_matches_float64_and_keeps_the_fastest_measured(tuner, caplog, dtype, dqk, dv):
    q, k, v = qkv(dqk=dqk, dv=dv, dtype=dtype, requires_grad=True)
    with caplog.at_level(logging.INFO, logger="pretrain.perf.autotune"):
        out = attend(q, k, v, padding_mask(), backend="autotune")
    assert rel_err(out, reference(q, k, v, padding_mask())) < TOLERANCE[dtype]
    (key, choice), = tuner.choices.items()
    timings = tuner.timings[key]
    expected = {"sdpa", "math"} | ({"sdpa_unpadded"} if dqk != dv else set())
    assert set(timings) == expected and all(t > 0 for t in timings.values())
    assert choice == min(timings, key=timings.get)
    assert f"-> {choice}" in caplog.text and "attention B=3 Q=5 K=9 H=2" in caplog.text and "fwd+bwd" in caplog.text


def test_decisions_are_remembered_per_shape_bucket(tuner):
    calls = []
    run = lambda name, x: calls.append(name) or x * 2  # noqa: E731
    x = torch.ones(3)
    first = tuner.choose(("k", 8), ["a", "b"], run, (x,), lambda: "test")
    count = len(calls)
    assert count == 2 * (1 + autotune.TIMED_RUNS)  # each candidate: one warm-up, then the timed runs
    assert tuner.choose(("k", 8), ["a", "b"], run, (x,), lambda: "test") == first and len(calls) == count
    # attend: 200 and 256 queries share a bucket, 300 does not
    tuner.choices.clear()
    for nq in (200, 256, 300):
        attend(*qkv(nq=nq, dqk=8, dv=16), backend="autotune")
    assert sorted(key[3] for key in tuner.choices) == [256, 512]


def test_a_failing_candidate_is_skipped_and_reported(tuner, caplog):
    def run(name, x):
        if name == "broken":
            raise RuntimeError("No available kernel.\nlong details")
        return x + 1

    with caplog.at_level(logging.INFO, logger="pretrain.perf.autotune"):
        assert tuner.choose("key", ["broken", "works"], run, (torch.ones(2),), lambda: "op") == "works"
    assert "failed: {'broken': 'RuntimeError: No available kernel.'}" in caplog.text
    assert tuner.choose("all", ["broken"] * 2, run, (torch.ones(2),), lambda: "op") == "broken"
    assert "all" not in tuner.choices  # nothing measured: not remembered, the real call reports the error


@pytest.mark.parametrize("requires_grad", [False, True])
def test_tuning_leaves_the_random_stream_as_it_was(tuner, requires_grad):
    """A tuned call draws the same dropout mask as a call naming the chosen backend: the trial runs' draws are undone."""
    q, k, v = qkv(nq=16, nk=33, dqk=8, dv=24, requires_grad=requires_grad)
    torch.manual_seed(7)
    tuned = attend(q, k, v, padding_mask(nk=33), dropout_p=0.3, backend="autotune")
    after_tuned = torch.rand(4)
    (choice,) = tuner.choices.values()
    torch.manual_seed(7)
    direct = attend(q, k, v, padding_mask(nk=33), dropout_p=0.3, backend=choice)
    torch.testing.assert_close(tuned, direct, atol=0, rtol=0)
    torch.testing.assert_close(after_tuned, torch.rand(4), atol=0, rtol=0)


def test_nothing_is_timed_under_flop_counting_or_in_compiled_code_which_takes_eager_picks(tuner):
    q, k, v = qkv(dqk=8, dv=16)
    with FlopCounterMode(display=False) as counter:
        attend(q, k, v, backend="autotune")
    assert not tuner.choices
    direct = FlopCounterMode(display=False)
    with direct:
        attend(q, k, v, backend=attention.available_backends(q.device, q.dtype)[0])
    assert counter.get_total_flops() == direct.get_total_flops()  # only the real call was counted
    graphs = []

    def record(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm

    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: attend(q, k, v, backend="autotune"), backend=record, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), attend(q, k, v, backend="sdpa"))
    assert not tuner.choices and "scaled_dot_product_attention" in graphs[-1]  # untuned: the static first choice
    # a pick made eagerly before is what the compiled graph runs
    attend(q, k, v, backend="autotune")
    (key,) = tuner.choices
    tuner.choices[key] = "math"
    torch._dynamo.reset()
    compiled = torch.compile(lambda q, k, v: attend(q, k, v, backend="autotune"), backend=record, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), attend(q, k, v, backend="sdpa"))
    assert "scaled_dot_product_attention" not in graphs[-1] and "softmax" in graphs[-1]


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_a_model_tuned_inside_activation_checkpointing_trains_like_one_without(tuner, dropout):
    """The first forward tunes inside a checkpointed layer (whose saved-tensor hooks must not reach the trial
    passes); the plain model then reuses the decisions: same losses and gradients, dropout masks included."""
    config = dict(num_self_attends_per_block=2, attention_dropout=dropout)
    ckpt = optimize(PerceiverIO(multimodal_config(activation_checkpointing=True, **config)), "autotune").train()
    plain = optimize(PerceiverIO(multimodal_config(**config)), "autotune").train()
    plain.load_state_dict(ckpt.state_dict())
    inputs = multimodal_inputs(2, 7)
    losses = []
    for model in (ckpt, plain):
        torch.manual_seed(0)
        logits = model(inputs, {"text": None})["text"]
        loss = F.cross_entropy(logits.flatten(0, 1), torch.arange(logits.shape[0] * logits.shape[1]) % 5)
        loss.backward()
        losses.append(loss.detach())
    assert len(tuner.choices) >= 2  # the cross-attentions and the latent self-attention were tuned
    torch.testing.assert_close(losses[0], losses[1], atol=0, rtol=0)
    grads = dict(plain.named_parameters())
    for name, param in ckpt.named_parameters():
        torch.testing.assert_close(param.grad, grads[name].grad, atol=1e-7, rtol=1e-6, msg=name)


def test_deterministic_mode_takes_the_static_order(tuner):
    q, k, v = qkv(dqk=8, dv=16)
    torch.use_deterministic_algorithms(True)
    try:
        out = attend(q, k, v, backend="autotune")
    finally:
        torch.use_deterministic_algorithms(False)
    assert not tuner.choices
    torch.testing.assert_close(out, attend(q, k, v, backend=attention.available_backends(q.device, q.dtype)[0]))


def test_auto_tunes_only_on_cuda(tuner):
    attend(*qkv(dqk=8, dv=16), backend="auto")
    assert not tuner.choices  # CPU: the measured static order
