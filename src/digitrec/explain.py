"""Saliency maps: which pixels of the 28x28 input pushed the model towards (or away from) its answer."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import nn


@lru_cache(maxsize=4)
def _occluders(patch: int, stride: int) -> torch.Tensor:
    """(K, 1, 28, 28) masks, each 0 on one patch x patch square and 1 elsewhere; the squares tile the image."""
    corners = [(y, x) for y in range(0, 28 - patch + 1, stride) for x in range(0, 28 - patch + 1, stride)]
    masks = torch.ones(len(corners), 1, 28, 28)
    for k, (y, x) in enumerate(corners):
        masks[k, 0, y : y + patch, x : x + patch] = 0
    return masks


@torch.no_grad()
def occlusion_saliency(
    model: nn.Module, image: torch.Tensor | np.ndarray, target: int, patch: int = 4, stride: int = 2
) -> np.ndarray:
    """How much hiding each pixel lowers the probability of `target`, as a (28, 28) map in [-1, 1].

    Every patch x patch square is blacked out in turn (169 images for the defaults, one batch) and the drop in
    the target's probability is spread over the pixels it hid. Positive pixels supported the answer, negative
    ones argued against it. Occlusion needs only forward passes and gives smooth maps that read at a glance,
    where per-pixel gradients of a small CNN look like noise.
    """
    device = next(model.parameters()).device
    x = torch.as_tensor(image, dtype=torch.float32).reshape(1, 1, 28, 28).to(device)
    masks = _occluders(patch, stride).to(device)
    probabilities = torch.softmax(model(torch.cat([x, x * masks])).float(), dim=1)[:, target]
    drops = (probabilities[0] - probabilities[1:]).view(-1, 1, 1, 1)
    hidden = 1 - masks
    heat = (drops * hidden).sum(dim=0) / hidden.sum(dim=0).clamp(min=1)
    scale = heat.abs().max()
    if scale > 0:
        heat = heat / scale
    return heat.reshape(28, 28).cpu().numpy().astype(np.float32)
