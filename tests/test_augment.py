"""Batched augmentation: identity at zero strength, shifts move the ink, every image gets its own draw."""

from __future__ import annotations

import torch

from digitrec.augment import affine_grid, augment_batch, elastic_field, random_affine


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
    for kind in ("affine", "affine-elastic"):
        a = augment_batch(x, kind, torch.Generator().manual_seed(3))
        b = augment_batch(x, kind, torch.Generator().manual_seed(3))
        assert torch.equal(a, b)


def test_elastic_field_is_smooth_bounded_and_drawn_per_image():
    x = _blob()
    assert torch.equal(elastic_field(x, torch.Generator().manual_seed(0), 0.0), torch.zeros(8, 28, 28, 2))
    field = elastic_field(x, torch.Generator().manual_seed(0), 1.2) * 14  # grid units -> pixels
    assert field.shape == (8, 28, 28, 2)
    largest = field.abs().amax(dim=(1, 2, 3))
    assert 0.3 < largest.max() < 6  # a few pixels at most
    assert largest.std() > 0.1  # each image its own strength
    # neighbours move nearly together (a warp, not noise): a step between two pixels is half the largest
    # shift at most; white noise of the same size gives steps larger than the shift itself
    assert ((field[:, 1:] - field[:, :-1]).abs().amax(dim=(1, 2, 3)) < largest / 2).all()


def test_affine_elastic_warps_the_ink_without_losing_it():
    x = _blob()
    affine = augment_batch(x, "affine", torch.Generator().manual_seed(2))
    warped = augment_batch(x, "affine-elastic", torch.Generator().manual_seed(2))
    assert not torch.allclose(affine, warped, atol=1e-3)  # the same affine draws, then the warp on top
    assert torch.allclose(warped.sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3)), rtol=0.25)


def test_affine_grid_matches_torch():
    theta = torch.randn(5, 2, 3, generator=torch.Generator().manual_seed(0))
    expected = torch.nn.functional.affine_grid(theta, [5, 1, 28, 20], align_corners=False)
    torch.testing.assert_close(affine_grid(theta, 28, 20), expected, rtol=0, atol=1e-5)


def test_scale_above_one_magnifies_the_ink_about_the_centre():
    x = _blob()  # 8x8 ink square in the middle: twice the size is 4x the ink, half the size a quarter
    for factor in (2.0, 0.5):
        y = random_affine(x, torch.Generator().manual_seed(0), scale=(factor, factor))
        ratio = y.sum(dim=(1, 2, 3)) / x.sum(dim=(1, 2, 3))
        assert torch.allclose(ratio, torch.full((8,), factor**2), rtol=0.1), factor
        assert torch.allclose(center_of_mass(y), center_of_mass(x), atol=0.05)


def test_translation_reaches_its_full_range_in_pixels():
    x = _blob().repeat(8, 1, 1, 1)  # 64 images: their shifts, uniform in [-3, 3] px, come near both ends
    shift = center_of_mass(
        random_affine(x, torch.Generator().manual_seed(0), translate_px=3)
    ) - center_of_mass(x)
    assert shift.abs().max() <= 3.01
    assert (shift.amax(0) > 2.5).all() and (shift.amin(0) < -2.5).all()


def _bar_angles(x: torch.Tensor) -> torch.Tensor:
    """Each image's principal axis in degrees, from the second moments of its ink."""
    ys, xs = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    mass = x.sum(dim=(1, 2, 3))
    cy, cx = (x[:, 0] * ys).sum((1, 2)) / mass, (x[:, 0] * xs).sum((1, 2)) / mass
    dy, dx = ys - cy[:, None, None], xs - cx[:, None, None]
    mu20, mu02, mu11 = ((x[:, 0] * d).sum((1, 2)) / mass for d in (dx * dx, dy * dy, dx * dy))
    return torch.rad2deg(0.5 * torch.atan2(2 * mu11, mu20 - mu02))


def test_rotate10_turns_each_image_by_up_to_10_degrees():
    """seed 003's RandomRotation(10): a horizontal bar comes out tilted by up to 10 degrees either way."""
    x = torch.zeros(64, 1, 28, 28)
    x[:, :, 13:15, 4:24] = 1.0
    angles = _bar_angles(augment_batch(x, "rotate10", torch.Generator().manual_seed(0))).abs()
    assert angles.max() <= 10.3 and angles.max() > 8.5
