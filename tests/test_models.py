"""Every registered architecture (timm-style: one test over the whole registry)."""

from __future__ import annotations

import pytest
import torch

from digitrec.errors import DigitrecError
from digitrec.models import MODELS, count_parameters, create_model


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_forward_backward_shapes(arch):
    torch.manual_seed(0)
    model = create_model(arch)
    x = torch.rand(4, 1, 28, 28, requires_grad=True)
    logits = model(x)
    assert logits.shape == (4, 10)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    assert model(x[:1]).shape == (1, 10)


def test_normalization_travels_with_the_model():
    model = create_model("lenet", (0.5, 0.5))
    assert model.state_dict()["0.mean"].item() == 0.5


def test_seed_parameter_counts():
    # seed 002 LeNet: conv 1*10*25+10, conv 10*20*25+20, fc 320*50+50, 50*10+10
    assert count_parameters(create_model("lenet")) == 260 + 5020 + 16050 + 510
    assert count_parameters(create_model("fast_cnn")) == 215_690


def test_unknown_arch():
    with pytest.raises(DigitrecError, match="digitrec models"):
        create_model("resnet9000")


def test_flatten_keeps_channels_last_gradients_and_matches_nn_flatten():
    from digitrec.models import Flatten

    x = torch.randn(3, 4, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    y = torch.relu(x)
    weights = torch.randn(3, 100)
    (Flatten()(y) * weights).sum().backward()
    ours = x.grad.clone()
    assert x.grad.is_contiguous(memory_format=torch.channels_last)
    x.grad = None
    (torch.nn.Flatten()(torch.relu(x)) * weights).sum().backward()
    assert torch.equal(ours, x.grad)
    assert torch.equal(Flatten()(y), torch.nn.Flatten()(y))


def test_accuracy_as_reported_averages_batches_like_seed_001():
    from digitrec.evaluate import accuracy_as_reported

    correct = torch.tensor(
        [1.0] * 6 + [0.0] * 2 + [1.0]
    )  # batches of 4: 100%, 50%, and a last one of 1 image
    assert accuracy_as_reported(correct) == pytest.approx(7 / 9)
    assert accuracy_as_reported(correct, "batch_mean:4") == pytest.approx((1 + 0.5 + 1) / 3)
