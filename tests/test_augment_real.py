"""Outlier exposure for the robust recipe: training negatives, their loss, and how the loop mixes them in."""

from __future__ import annotations

import math

import pytest
import torch

from digitrec import augment_real
from digitrec.augment_real import (
    _TRAIN_LETTER_STROKES,
    digit_pairs,
    make_negatives,
    outlier_loss,
    robust_augment,
)
from digitrec.config import RECIPES, TrainConfig
from digitrec.realworld import LETTER_STROKES


def _digits(n: int = 16) -> torch.Tensor:
    """Upright bars and rings in MNIST's 20x20 box: stand-ins for a batch of 1s and 0s."""
    x = torch.zeros(n, 1, 28, 28)
    x[::2, :, 4:24, 12:16] = 1.0
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    ring = (((yy - 14) / 10) ** 2 + ((xx - 14) / 7) ** 2 - 1).abs() < 0.35
    x[1::2, 0][:, ring] = 1.0
    return x


@pytest.fixture
def small_bank(monkeypatch):
    bank = torch.rand(32, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(augment_real, "negative_bank", lambda: bank)
    return bank


def test_training_letters_are_not_the_ones_eval_real_draws():
    assert not set(_TRAIN_LETTER_STROKES) & set(LETTER_STROKES)


def test_digit_pairs_are_wide_ink_in_the_20px_box_and_seeded():
    x = _digits()
    a = digit_pairs(x, 40, torch.Generator().manual_seed(0))
    b = digit_pairs(x, 40, torch.Generator().manual_seed(0))
    assert a.shape == (40, 1, 28, 28) and torch.equal(a, b)
    assert a.min() >= 0 and torch.allclose(a.flatten(1).amax(1), torch.tensor(1.0))
    ink = a[:, 0] > 0.1

    def extent(flags: torch.Tensor) -> int:
        where = torch.nonzero(flags).flatten()
        return int(where[-1] - where[0] + 1)

    widths = torch.tensor([extent(r.any(0)) for r in ink])
    heights = torch.tensor([extent(r.any(1)) for r in ink])
    assert widths.max() <= 21 and heights.max() <= 21  # scaled into MNIST's 20 px box
    assert widths.min() >= 9  # never one bar on top of another: that would be a 1, not a negative
    assert (widths > heights).float().mean() > 0.2  # whole pairs of rings are wider than tall


def test_make_negatives_mixes_pairs_and_the_bank(small_bank):
    x = _digits()
    negatives = make_negatives(x, 10, torch.Generator().manual_seed(1))
    assert negatives.shape == (10, 1, 28, 28)
    bank_part = negatives[5:]
    assert all(any(torch.equal(n, b) for b in small_bank) for n in bank_part)


def test_outlier_loss_is_smallest_for_the_uniform_distribution():
    uniform = outlier_loss(torch.zeros(4, 10))
    assert uniform.item() == pytest.approx(math.log(10))
    peaked = torch.zeros(4, 10)
    peaked[:, 3] = 5.0
    assert outlier_loss(peaked) > uniform
    logits = peaked.clone().requires_grad_(True)
    outlier_loss(logits).backward()
    assert logits.grad[:, 3].min() > 0  # the gradient lowers the confident class


def test_robust_augment_leaves_the_batch_size_alone():
    x = _digits(8)
    assert robust_augment(x, torch.Generator().manual_seed(0)).shape == x.shape


def test_only_the_robust_recipe_trains_with_negatives():
    assert TrainConfig().negatives == 0.0
    assert {name for name, c in RECIPES.items() if c.negatives} == {"robust"}


def test_training_with_negatives_runs_and_is_reproducible(tiny_mnist, tmp_path, small_bank, monkeypatch):
    from digitrec.training import train

    scored = []  # how many non-digits reached the model, and so the outlier loss, at each step
    real_outlier_loss = augment_real.outlier_loss
    monkeypatch.setattr(  # where the training step looks it up
        "digitrec.training.outlier_loss",
        lambda logits: scored.append(len(logits)) or real_outlier_loss(logits),
    )
    config = RECIPES["fast"].override(
        epochs=0.25, augment="robust", negatives=0.25, val_size=0, amp=False, channels_last=False
    )
    runs = [
        train(config, tmp_path / name, data=tiny_mnist, progress=False, report=False, log=lambda s: None)
        for name in ("a", "b")
    ]
    from digitrec.checkpoint import load_tensors

    first, _ = load_tensors(runs[0].model_path)
    second, _ = load_tensors(runs[1].model_path)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert 0 < runs[0].metrics["test_accuracy"] <= 1
    # a quarter as many non-digits as the 320 digits of every step (the tiny set's quarter epoch is one step)
    assert scored and set(scored) == {80}


def test_thickness_blends_towards_a_3x3_dilation_or_erosion_by_its_draw():
    """t uniform in [-0.8, 1): t > 0 moves a share t of the way to the 3x3 dilation, t < 0 a share |t| to the
    erosion (scipy's grey morphology here); the draw is the generator's first n numbers."""
    from scipy import ndimage

    x = torch.rand(12, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    out = augment_real.thickness(x, torch.Generator().manual_seed(5))
    t = torch.rand(12, generator=torch.Generator().manual_seed(5)) * 1.8 - 0.8
    assert (t > 0).any() and (t < 0).any()
    for image, result, share in zip(x[:, 0].numpy(), out[:, 0], t.tolist(), strict=True):
        morph = ndimage.grey_dilation if share > 0 else ndimage.grey_erosion
        target = morph(image, size=(3, 3), mode="nearest")
        torch.testing.assert_close(result, torch.from_numpy(image + abs(share) * (target - image)))


def test_robust_augment_scales_each_images_brightest_stroke_to_one_as_preprocess_does():
    dim = _digits(8) * 0.7  # above the rebinarizing levels (0.3-0.6), so no stroke vanishes
    out = robust_augment(dim, torch.Generator().manual_seed(0))
    assert out.min() >= 0 and torch.allclose(out.flatten(1).amax(1), torch.ones(8))
