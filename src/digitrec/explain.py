"""Saliency maps: which pixels of the 28x28 input pushed the model towards (or away from) its answer."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def integrated_gradients(
    model: nn.Module, image: torch.Tensor | np.ndarray, target: int, steps: int = 16
) -> np.ndarray:
    """Integrated gradients of the `target` logit from a black image to `image`, as a (28, 28) map in [-1, 1].

    Positive pixels raised the target's score, negative ones lowered it. A black baseline is the natural
    "no ink" reference for MNIST, so the map lights up the strokes that mattered. All `steps` interpolated
    images go through the model as one batch, so this costs about one small forward and backward pass.
    """
    device = next(model.parameters()).device
    x = torch.as_tensor(image, dtype=torch.float32).reshape(1, 1, 28, 28).to(device)
    alphas = (torch.arange(1, steps + 1, dtype=torch.float32, device=device) / steps).view(-1, 1, 1, 1)
    path = (alphas * x).requires_grad_(True)
    with torch.enable_grad():
        logits = model(path)
        (grads,) = torch.autograd.grad(logits[:, target].sum(), path)
    attribution = (x * grads.mean(dim=0, keepdim=True)).reshape(28, 28)
    scale = attribution.abs().max()
    if scale > 0:
        attribution = attribution / scale
    return attribution.detach().cpu().numpy().astype(np.float32)
