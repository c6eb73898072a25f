"""Saliency maps: which pixels of the 28x28 input pushed the model towards (or away from) its answer."""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np

from .backends import softmax

Forward = Callable[[np.ndarray], np.ndarray]  # float32 (N, 1, 28, 28) in [0, 1] -> logits (N, 10)


@lru_cache(maxsize=4)
def _occluders(patch: int, stride: int) -> np.ndarray:
    """(K, 1, 28, 28) masks, each 0 on one patch x patch square and 1 elsewhere; the squares cover the image
    (every `stride` pixels, and the last row and column of squares flush with the far edges)."""
    starts = sorted({*range(0, 28 - patch + 1, stride), 28 - patch})  # stride need not divide 28 - patch
    corners = [(y, x) for y in starts for x in starts]
    masks = np.ones((len(corners), 1, 28, 28), dtype=np.float32)
    for k, (y, x) in enumerate(corners):
        masks[k, 0, y : y + patch, x : x + patch] = 0
    return masks


def occlusion_saliency(
    forward: Forward, image: np.ndarray, target: int, patch: int = 4, stride: int = 2
) -> np.ndarray:
    """How much hiding each pixel lowers the probability of `target`, as a (28, 28) map in [-1, 1].

    Every patch x patch square is blacked out in turn (169 images for the defaults, one batch), and each pixel
    gets the mean drop in the target's probability over the squares that hid it. Positive pixels supported the answer, negative
    ones argued against it. Occlusion needs only forward passes, so it works on every backend (PyTorch, ONNX
    Runtime, NumPy), and gives smooth maps that read at a glance, where per-pixel gradients of a small CNN look
    like noise.
    """
    x = np.asarray(image, dtype=np.float32).reshape(1, 1, 28, 28)
    masks = _occluders(patch, stride)
    probabilities = softmax(np.asarray(forward(np.concatenate([x, x * masks])), dtype=np.float64))[:, target]
    drops = (probabilities[0] - probabilities[1:]).reshape(-1, 1, 1, 1)
    hidden = 1 - masks
    heat = (drops * hidden).sum(axis=0) / np.maximum(hidden.sum(axis=0), 1)
    scale = np.abs(heat).max()
    if scale > 0:
        heat = heat / scale
    return heat.reshape(28, 28).astype(np.float32)
