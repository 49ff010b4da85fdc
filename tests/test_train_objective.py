"""The training objective: per-modality losses as the data contract defines them, finite on a batch that hides
nothing, and computed without a host-device synchronisation (on a GPU one would stall every step)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from conftest import NUM_CLASSES, TEXT_VOCAB, multimodal_config, multimodal_inputs
from pretrain.data import IGNORE_INDEX
from pretrain.modalities import REGISTRY
from pretrain.model import PerceiverIO
from pretrain.train.metrics import OperatorCount
from pretrain.train.objective import modality_losses, over_present, target_counts

B = 2
SYNCS = {"_local_scalar_dense", "is_nonzero", "item", "nonzero"}  # a value read back on the host


def batch(text_targets: torch.Tensor) -> dict:
    """Text decoded at 3 positions, image at 2 patches (the second slot of row 1 padding), the label of row 0."""
    inputs, image_positions = multimodal_inputs(B, 7), torch.tensor([[0, 3], [1, 0]])
    return {
        "inputs": inputs,
        "decode": {"text": torch.tensor([[0, 2, 4], [1, 3, 5]]), "image": image_positions,
                   "label": torch.zeros(B, 1, dtype=torch.long)},
        "decode_mask": {"text": text_targets != IGNORE_INDEX, "image": torch.tensor([[True, True], [True, False]]),
                        "label": torch.tensor([[True], [False]])},
        "targets": {"text": text_targets, "label": torch.tensor([3, IGNORE_INDEX]),
                    "image": REGISTRY["image"].patches_at(multimodal_config().image, inputs["image"],
                                                         image_positions)},
    }


def losses_of(model: PerceiverIO, data: dict) -> dict:
    return modality_losses(model, data)


def test_text_and_label_losses_are_the_mean_over_kept_targets():
    torch.manual_seed(0)
    model = PerceiverIO(multimodal_config())
    targets = torch.tensor([[5, IGNORE_INDEX, 7], [1, 2, IGNORE_INDEX]])
    data = batch(targets)
    losses = losses_of(model, data)
    out = model(data["inputs"], data["decode"])
    expected = F.cross_entropy(out["text"].reshape(-1, TEXT_VOCAB), targets.reshape(-1), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(losses["text"], expected)
    torch.testing.assert_close(losses["label"], F.cross_entropy(out["label"][:1].reshape(1, NUM_CLASSES), torch.tensor([3])))
    assert set(losses) == {"text", "image", "label"}


def test_a_batch_without_text_targets_gives_zero_loss_and_zero_gradients():
    torch.manual_seed(0)
    model = PerceiverIO(multimodal_config())
    losses = losses_of(model, batch(torch.full((B, 3), IGNORE_INDEX)))
    assert losses["text"].item() == 0.0
    losses["text"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_a_modality_without_targets_is_left_out_not_logged_as_zero():
    """Means over a window: the audio had no targets in it, the text in half of its steps, the image in all (its
    share not kept); the total is the sum of share x loss over the parts."""
    means = {"loss": 1.5, "loss/text": 0.5, "present/text": 0.5, "loss/audio": 0.0, "present/audio": 0.0,
             "loss/image": 1.0, "present/image": 1.0}
    out = over_present(means, "loss/")
    assert out == {"loss": 1.5, "loss/text": 1.0, "loss_share/text": 0.5, "loss/image": 1.0}
    assert out["loss"] == out["loss/text"] * out["loss_share/text"] + out["loss/image"]
    assert target_counts(batch(torch.full((B, 3), IGNORE_INDEX)))["text"].item() == 0


def test_the_losses_read_nothing_back_on_the_host():
    torch.manual_seed(0)
    model = PerceiverIO(multimodal_config())
    for targets in (torch.tensor([[5, IGNORE_INDEX, 7], [1, 2, 3]]), torch.full((B, 3), IGNORE_INDEX)):
        with OperatorCount() as count:
            total = sum(losses_of(model, batch(targets)).values())
            total.backward()
        assert {name: count.counts[name] for name in SYNCS if count.counts[name]} == {}
