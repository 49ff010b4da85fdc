"""PerceiverIO forward: output shapes per modality, masks, checkpointing, block sharing, patches, bf16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import ARRAY, AUDIO, IMAGE, NUM_CLASSES, TEXT_VOCAB, VIDEO, multimodal_config, multimodal_inputs, tiny_config
from pretrain.modalities.patched import blocks_to_patches
from pretrain.model import PerceiverIO
from pretrain.perf import optimize
from pretrain.train.metrics import OperatorCount

B, S = 2, 7
# modality -> (number of decodable positions, trailing output shape)
OUTPUTS = {
    "text": (S, (TEXT_VOCAB,)),
    "image": (IMAGE["patches"], (IMAGE["values"],)),
    "audio": (AUDIO["patches"], (AUDIO["values"],)),
    "video": (VIDEO["patches"], (VIDEO["values"],)),
    "array": (ARRAY["patches"], (ARRAY["values"],)),
}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return PerceiverIO(multimodal_config()).eval()


@pytest.fixture
def inputs():
    return multimodal_inputs(B, S)


def run(model, inputs, outputs):
    with torch.no_grad():
        return model(inputs, outputs)


def test_every_position_of_every_modality(model, inputs):
    out = run(model, inputs, {name: None for name in [*OUTPUTS, "label"]})
    for name, (count, tail) in OUTPUTS.items():
        assert out[name].shape == (B, count, *tail), name
        assert torch.isfinite(out[name]).all()
    assert out["label"].shape == (B, NUM_CLASSES)


@pytest.mark.parametrize("name", list(OUTPUTS))
def test_given_positions_match_full_decode(model, inputs, name):
    """Decoder queries are independent: decoding positions [B, P] gives the rows of the full decode."""
    count, tail = OUTPUTS[name]
    positions = torch.tensor([[count - 1, 0, 2], [1, 1, count - 2]])
    full = run(model, inputs, {name: None, "label": None})[name]
    some = run(model, inputs, {name: positions})[name]
    assert some.shape == (B, 3, *tail)
    expected = torch.stack([full[b, positions[b]] for b in range(B)])
    torch.testing.assert_close(some, expected, atol=1e-5, rtol=1e-5)


def test_label_only(model, inputs):
    out = run(model, inputs, {"label": None})
    assert list(out) == ["label"] and out["label"].shape == (B, NUM_CLASSES)
    assert not torch.allclose(out["label"][0], out["label"][1])


@pytest.mark.parametrize("present", [["text"], ["image", "audio"], ["video"], ["array", "text"]])
def test_subset_of_modalities(model, inputs, present):
    out = run(model, {k: inputs[k] for k in present}, {name: None for name in [*OUTPUTS, "label"]})
    assert out["image"].shape == (B, IMAGE["patches"], IMAGE["values"])
    assert all(torch.isfinite(v).all() for v in out.values())


def outputs_change(model, inputs, edit, sample) -> bool:
    """Whether editing the inputs (``edit`` mutates a copy) changes any output of ``sample``."""
    outputs = {name: None for name in [*OUTPUTS, "label"]}
    before = run(model, inputs, outputs)
    edited = {k: v.clone() for k, v in inputs.items()}
    edit(edited)
    after = run(model, edited, outputs)
    return any(not torch.allclose(before[k][sample], after[k][sample], atol=1e-6, rtol=0) for k in outputs)


def test_sample_lacking_a_modality_ignores_it(model, inputs):
    inputs["image_mask"] = torch.tensor([True, False])

    def edit(sample):
        return lambda x: x["image"][sample].add_(1.0)

    assert not outputs_change(model, inputs, edit(1), sample=1)
    assert outputs_change(model, inputs, edit(0), sample=0)
    assert not outputs_change(model, inputs, edit(0), sample=1)


def test_per_element_mask_ignores_masked_patches(model, inputs):
    mask = torch.ones(B, IMAGE["patches"], dtype=torch.bool)
    mask[0, 2] = False  # patch 2 of a 2x2 grid of 4x4 patches: rows 4:8, columns 0:4
    inputs["image_mask"] = mask

    def edit(rows, cols):
        return lambda x: x["image"][0, :, rows, cols].add_(1.0)

    assert not outputs_change(model, inputs, edit(slice(4, 8), slice(0, 4)), sample=0)
    assert outputs_change(model, inputs, edit(slice(0, 4), slice(4, 8)), sample=0)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.long])
def test_padded_text_positions_are_ignored(model, inputs, mask_dtype):
    mask = torch.ones(B, S, dtype=mask_dtype)
    mask[0, 5:] = 0
    inputs["text_mask"] = mask

    def edit(position):
        return lambda x: x["text"][0, position].fill_((int(x["text"][0, position]) + 1) % TEXT_VOCAB)

    assert not outputs_change(model, inputs, edit(5), sample=0)
    assert not outputs_change(model, inputs, edit(6), sample=0)
    assert outputs_change(model, inputs, edit(2), sample=0)
    assert not outputs_change(model, inputs, edit(2), sample=1)


def _all_masked(inputs):
    masked = dict(inputs)
    for name in ("text", "image", "audio", "video", "array"):
        masked[f"{name}_mask"] = torch.tensor([False, True])
    return masked


def test_sample_without_any_valid_input_is_finite(model, inputs):
    out = run(model, _all_masked(inputs), {name: None for name in [*OUTPUTS, "label"]})
    assert all(torch.isfinite(v).all() for v in out.values())
    text_only = PerceiverIO(tiny_config()).eval()
    with torch.no_grad():
        logits = text_only.text_logits(inputs["text"], torch.tensor([[0] * S, [1] * S]))
    assert torch.isfinite(logits).all()


def test_sample_without_any_valid_input_has_finite_gradients(inputs):
    model = PerceiverIO(multimodal_config()).train()
    out = model(_all_masked(inputs), {"text": None, "image": None, "label": None})
    (out["text"].square().mean() + out["image"].square().mean() + out["label"].square().mean()).backward()
    for name, param in model.named_parameters():
        assert param.grad is None or torch.isfinite(param.grad).all(), name


def _loss(model, inputs):
    inputs = dict(inputs, text_mask=torch.tensor([[1] * S, [1] * 4 + [0] * (S - 4)]))
    out = model(inputs, {"text": None, "image": None, "label": None})
    target = torch.randint(0, TEXT_VOCAB, (B, S), generator=torch.Generator().manual_seed(3))
    return (F.cross_entropy(out["text"].flatten(0, 1), target.flatten())
            + out["image"].square().mean() + F.cross_entropy(out["label"], torch.tensor([0, 3])))


def _saved_tensor_count(model, inputs) -> int:
    count = 0

    def pack(t):
        nonlocal count
        count += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _loss(model, inputs)
    return count


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_activation_checkpointing_gives_identical_loss_and_gradients(inputs, dropout):
    """With attention dropout too: the recomputed forward draws the same masks (checkpoint restores the RNG)."""
    plain = PerceiverIO(multimodal_config(num_self_attends_per_block=3, attention_dropout=dropout)).train()
    ckpt = PerceiverIO(multimodal_config(num_self_attends_per_block=3, attention_dropout=dropout,
                                         activation_checkpointing=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    losses = []
    for m in (plain, ckpt):
        torch.manual_seed(0)
        loss = _loss(m, inputs)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], atol=0, rtol=0)
    grads = dict(ckpt.named_parameters())
    for name, param in plain.named_parameters():
        torch.testing.assert_close(grads[name].grad, param.grad, atol=1e-7, rtol=1e-6, msg=name)
    # and it really checkpoints: fewer activations kept for backward
    assert _saved_tensor_count(ckpt, inputs) < _saved_tensor_count(plain, inputs)


def test_num_blocks_repeats_shared_weights(inputs):
    one = PerceiverIO(tiny_config(num_blocks=1))
    two = PerceiverIO(tiny_config(num_blocks=2))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(one) == count(two)
    # num_blocks=2 with layers (A, B) == one block of (A, B, A, B)
    unrolled = PerceiverIO(tiny_config(num_blocks=1, num_self_attends_per_block=4)).eval()
    state = two.state_dict()
    for i in (2, 3):
        for key, value in list(state.items()):
            prefix = f"encoder.self_attends.{i - 2}."
            if key.startswith(prefix):
                state[f"encoder.self_attends.{i}." + key[len(prefix):]] = value
    unrolled.load_state_dict(state)
    two.eval()
    one.load_state_dict(two.state_dict())
    one.eval()
    ids = inputs["text"]
    with torch.no_grad():
        torch.testing.assert_close(two.text_logits(ids), unrolled.text_logits(ids), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(two.text_logits(ids), one.text_logits(ids), atol=1e-4)


def test_text_logits(inputs):
    model = PerceiverIO(tiny_config()).eval()
    ids = inputs["text"]
    int_mask = torch.tensor([[1] * S, [1] * 3 + [0] * (S - 3)])
    with torch.no_grad():
        logits = model.text_logits(ids, int_mask)
        assert logits.shape == (B, S, TEXT_VOCAB)
        torch.testing.assert_close(logits, model.text_logits(ids, int_mask.bool()), atol=0, rtol=0)
        unmasked = model.text_logits(ids)
        torch.testing.assert_close(logits[0], unmasked[0], atol=1e-6, rtol=0)
        assert not torch.allclose(logits[1], unmasked[1], atol=1e-4)
        assert model.text_logits(ids[:, :3]).shape == (B, 3, TEXT_VOCAB)


def test_blocks_to_patches_2d_order():
    # x[0, c, h, w] = 100c + 10h + w; 2 channels, 4x4 image, 2x2 patches
    c, h, w = torch.meshgrid(torch.arange(2), torch.arange(4), torch.arange(4), indexing="ij")
    x = (100 * c + 10 * h + w)[None].float()
    patches = blocks_to_patches(x, [2, 2])
    assert patches.shape == (1, 4, 8)
    # patches row-major over the grid; inside a patch (row, column, channel)
    expected = [
        [0, 100, 1, 101, 10, 110, 11, 111],
        [2, 102, 3, 103, 12, 112, 13, 113],
        [20, 120, 21, 121, 30, 130, 31, 131],
        [22, 122, 23, 123, 32, 132, 33, 133],
    ]
    assert patches[0].tolist() == expected


def test_blocks_to_patches_1d_and_3d():
    assert blocks_to_patches(torch.arange(6.0)[None, None], [3]).tolist() == [[[0, 1, 2], [3, 4, 5]]]
    # [1, 1, T=2, H=2, W=2], tubelets (2, 1, 2): 2 patches (one per row), values ordered (t, w)
    x = torch.arange(8.0).reshape(1, 1, 2, 2, 2)  # value = 4t + 2h + w
    assert blocks_to_patches(x, [2, 1, 2]).tolist() == [[[0, 1, 4, 5], [2, 3, 6, 7]]]


def test_video_patches_use_time_channel_layout():
    """Video input is [B, T, C, H, W]: a tubelet's values must come from one clip region, all channels."""
    model = PerceiverIO(multimodal_config()).eval()
    video = torch.zeros(1, *VIDEO["shape"])
    video[0, 2:4, :, 4:8, 0:4] = 1.0  # frames 2-3, rows 4-7, cols 0-3: tubelet (1, 1, 0) -> index 4 + 2 = 6
    patches = model.adapters["video"].patchify(video)
    assert patches.shape == (1, VIDEO["patches"], VIDEO["values"])
    assert patches[0, 6].eq(1).all() and patches[0].sum() == VIDEO["values"]


def test_bf16_forward_on_cpu(inputs):
    model = PerceiverIO(multimodal_config()).to(torch.bfloat16).eval()
    bf16_inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}
    bf16_inputs["text_mask"] = torch.tensor([[1] * S, [1] * 2 + [0] * (S - 2)])
    out = run(model, bf16_inputs, {name: None for name in [*OUTPUTS, "label"]})
    for name, value in out.items():
        assert value.dtype == torch.bfloat16 and torch.isfinite(value).all(), name


@pytest.mark.parametrize("training", [False, True])
def test_compiles_to_one_graph(inputs, training):
    """torch.compile sees the whole optimized forward, attention dropout and the weight-cast hooks included (the CPU
    dropout kernel's ``random_`` would split the graph at every layer: compiled code takes the plain dropout path
    instead)."""
    model = optimize(PerceiverIO(multimodal_config(attention_dropout=0.1))).train(training)
    torch._dynamo.reset()
    try:
        explained = torch._dynamo.explain(model)(inputs, {name: None for name in OUTPUTS})
    finally:
        torch._dynamo.reset()
    assert explained.graph_break_count == 0, [str(reason.reason)[:200] for reason in explained.break_reasons]



@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_projections_of_one_input_are_one_matmul(cross):
    """Queries, keys and values of a self-attention (keys and values of a cross-attention) come from one matmul; then
    the output projection and the MLP's two: 4 projections in a self-attention's forward, 5 in a cross-attention's."""
    from pretrain.model.layers import PerceiverLayer

    layer = PerceiverLayer(32, 24 if cross else None, 16, 32, 4, 1)
    calls = []
    for module in layer.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda m, args, out: calls.append(out.shape[-1]))
    x, kv = torch.randn(2, 8, 32), torch.randn(2, 11, 24)
    out = layer(x, kv) if cross else layer(x)
    assert out.shape == x.shape
    assert calls == ([16, 16 + 32, 32, 32, 32] if cross else [16 + 16 + 32, 32, 32, 32])


def test_one_input_and_one_output_array_are_not_copied():
    """A text-only training step copies neither the input array nor the decoded array (a cat or a split of one part
    is a copy, and so is its gradient), and the queries every sample shares (the latents, the decoder's queries of
    every position) get their gradients without a batch-sized zero array (what a slice of them would cost)."""
    model = PerceiverIO(tiny_config(d_model=24)).train()
    ids = torch.randint(0, TEXT_VOCAB, (4, S))
    with OperatorCount() as count:
        model.text_logits(ids).sum().backward()
    array = (4, S, 24)  # the input array's shape, and the decoded array's
    assert count.written["native_layer_norm"].count(array) == 2  # the encoder's kv_norm, the decoder's mlp_norm
    assert array not in count.written["cat"] and "slice_backward" not in count.counts


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "activation-checkpointing"])
def test_autocast_casts_linear_weights_together_with_the_same_results(inputs, checkpointing):
    """Under autocast the forward casts every Linear's weight and bias in one multi-tensor copy (and their gradients
    back in one more) instead of one cast kernel each way per tensor: outputs and gradients stay bit-identical to
    autocast's own casts (``encode``/``decode`` called directly take those), and the parameters are back after."""
    torch.manual_seed(0)
    model = optimize(PerceiverIO(multimodal_config(activation_checkpointing=checkpointing))).train()
    params = dict(model.named_parameters())
    outputs = {"text": None, "image": None, "label": None}

    def step(together: bool):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        with OperatorCount() as count:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(inputs, outputs) if together else model.decode(model.encode(inputs), outputs, inputs)
                loss = sum(value.float().square().mean() for value in out.values())
            loss.backward()
        return out, {name: p.grad for name, p in model.named_parameters() if p.grad is not None}, count

    out, grads, count = step(True)
    ref_out, ref_grads, ref_count = step(False)
    for name in ref_out:
        assert torch.equal(out[name], ref_out[name]), name
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert torch.equal(grads[name], ref_grads[name]), name
    assert count.counts["_foreach_copy_"] == 2 and ref_count.counts["_foreach_copy_"] == 0
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert count.counts["_to_copy"] + 2 * len(linears) <= ref_count.counts["_to_copy"]
    assert dict(model.named_parameters()) == params  # the very same Parameter objects


def test_weights_cast_together_only_where_autocast_would_cast_them(inputs):
    """No autocast, or weights already in the autocast dtype: nothing is cast. A forward that fails midway leaves the
    parameters in place."""
    model = optimize(PerceiverIO(multimodal_config())).train()
    params = dict(model.named_parameters())
    with OperatorCount() as plain:
        model(inputs, {"text": None})
    with pytest.raises(ValueError, match="unknown keys"), torch.autocast("cpu", dtype=torch.bfloat16):
        model({**inputs, "smell": torch.zeros(2)}, {"text": None})
    assert dict(model.named_parameters()) == params
    model.to(torch.bfloat16)
    with OperatorCount() as bf16, torch.autocast("cpu", dtype=torch.bfloat16):
        model(inputs, {"text": None})
    assert plain.counts["_foreach_copy_"] == bf16.counts["_foreach_copy_"] == 0


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_optimize_keeps_the_function(inputs, training):
    """The performance layer changes kernels, not results: an optimized model gives the plain model's outputs and
    gradients (without dropout; with it the two draw their masks differently), and its parameters keep their names."""
    torch.manual_seed(0)
    plain = PerceiverIO(multimodal_config(attention_dropout=0.0)).train(training)
    fast = PerceiverIO(multimodal_config(attention_dropout=0.0)).train(training)
    fast.load_state_dict(plain.state_dict())
    optimize(fast, "math")
    assert [name for name, _ in fast.named_parameters()] == [name for name, _ in plain.named_parameters()]
    outputs = {name: None for name in [*OUTPUTS, "label"]}
    results = []
    for model in (plain, fast):
        out = model(inputs, outputs)
        sum(value.square().mean() for value in out.values()).backward()
        results.append((out, {name: p.grad for name, p in model.named_parameters() if p.grad is not None}))
    (out, grads), (fast_out, fast_grads) = results
    for name in out:
        torch.testing.assert_close(fast_out[name], out[name], atol=1e-5, rtol=1e-5, msg=name)
    assert grads.keys() == fast_grads.keys()
    for name in grads:
        torch.testing.assert_close(fast_grads[name], grads[name], atol=1e-5, rtol=1e-4, msg=name)
