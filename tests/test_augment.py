"""Batched augmentation: identity at zero strength, shifts move the ink, every image gets its own draw."""

from __future__ import annotations

import torch

from digitrec.augment import affine_grid, augment_batch, random_affine


def _blob() -> torch.Tensor:
    x = torch.zeros(8, 1, 28, 28)
    x[:, :, 10:18, 10:18] = 1.0
    return x


def center_of_mass(x: torch.Tensor) -> torch.Tensor:
    cols = torch.arange(28.0)
    mass = x.sum(dim=(1, 2, 3))
    return torch.stack(
        [(x.sum(dim=(1, 2)) * cols).sum(-1) / mass, (x.sum(dim=(1, 3)) * cols).sum(-1) / mass], 1
    )


def test_zero_strength_is_identity():
    x = _blob()
    assert torch.allclose(random_affine(x, torch.Generator().manual_seed(0)), x, atol=1e-5)
    assert augment_batch(x, "none", torch.Generator()) is x


def test_translation_moves_the_ink_and_differs_per_image():
    x = _blob()
    y = random_affine(x, torch.Generator().manual_seed(0), translate_px=3)
    shift = center_of_mass(y) - center_of_mass(x)
    assert shift.abs().max() > 0.5 and shift.abs().max() <= 3.01
    assert shift[:, 0].std() > 0.1


def test_rotation_keeps_the_ink():
    x = _blob()
    y = augment_batch(x, "rotate10", torch.Generator().manual_seed(1))
    assert not torch.allclose(x, y)
    assert torch.allclose(y.sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3)), rtol=0.1)


def test_same_generator_seed_same_output():
    x = _blob()
    a = augment_batch(x, "affine", torch.Generator().manual_seed(3))
    b = augment_batch(x, "affine", torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_affine_grid_matches_torch():
    theta = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(0))
    expected = torch.nn.functional.affine_grid(theta, [5, 1, 28, 20], align_corners=False)
    torch.testing.assert_close(affine_grid(theta, 28, 20), expected, rtol=0, atol=1e-5)
