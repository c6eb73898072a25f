"""Occlusion saliency on a hand-worked model: the drop of each hidden patch, shared by the pixels it hid."""

from __future__ import annotations

import numpy as np
import pytest

from digitrec.explain import occlusion_saliency


def _top_left_model(images: np.ndarray) -> np.ndarray:
    """Digit 7's logit is 10 x the top-left pixel; every other logit is 0."""
    logits = np.zeros((len(images), 10), dtype=np.float32)
    logits[:, 7] = 10 * images[:, 0, 0, 0]
    return logits


def test_each_pixel_gets_the_mean_drop_of_the_patches_that_hid_it():
    image = np.zeros((28, 28), dtype=np.float32)
    image[0, 0] = 1.0
    heat = occlusion_saliency(_top_left_model, image, target=7, patch=4, stride=2)
    # Only the 4x4 patch at the corner hides the top-left pixel. A pixel inside it that k patches hide gets
    # the corner patch's drop over k: 1 at (0, 0), 1/2 at (1, 3) (patches at x 0 and 2), 1/4 at (2, 2).
    assert heat[0, 0] == pytest.approx(1.0)
    assert heat[1, 3] == pytest.approx(0.5) and heat[3, 1] == pytest.approx(0.5)
    assert heat[2, 2] == pytest.approx(0.25) and heat[3, 3] == pytest.approx(0.25)
    assert (heat[4:] == 0).all() and (heat[:, 4:] == 0).all()
    # for another digit hiding the pixel raises its probability: the map says it argued against that one
    assert occlusion_saliency(_top_left_model, image, target=2)[0, 0] == pytest.approx(-1.0)


def test_the_patches_reach_the_last_row_and_column():
    image = np.zeros((28, 28), dtype=np.float32)
    image[27, 27] = 1.0

    def bottom_right_model(images: np.ndarray) -> np.ndarray:
        return _top_left_model(images[:, :, ::-1, ::-1])

    heat = occlusion_saliency(bottom_right_model, image, target=7, patch=4, stride=2)
    assert heat[27, 27] == pytest.approx(1.0) and heat[25, 25] == pytest.approx(0.25)


@pytest.mark.parametrize(("patch", "stride"), [(3, 2), (5, 2), (4, 2), (4, 3), (6, 4), (28, 1)])
def test_the_patches_hide_every_pixel_whatever_the_stride(patch, stride):
    """With (28 - patch) % stride != 0 (patch 3 or 5, stride 2) the last row and column of pixels were never
    hidden, so their saliency was always 0."""
    from digitrec.explain import _occluders

    hidden = (1 - _occluders(patch, stride)).sum(axis=0)[0]
    assert (hidden > 0).all()
    image = np.zeros((28, 28), dtype=np.float32)
    image[27, 27] = 1.0

    def bottom_right_model(images: np.ndarray) -> np.ndarray:
        return _top_left_model(images[:, :, ::-1, ::-1])

    assert occlusion_saliency(bottom_right_model, image, target=7, patch=patch, stride=stride)[27, 27] > 0
