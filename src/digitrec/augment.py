"""Batched augmentation on whole tensors: one affine_grid + grid_sample per batch, no per-sample Python."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def affine_grid(theta: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """F.affine_grid(theta, (N, C, h, w), align_corners=False) in broadcast arithmetic: the same sampling grid
    (N, h, w, 2), 2-8x faster on a CPU, where affine_grid runs a batched matmul of tiny matrices."""
    xs = (torch.arange(w, dtype=theta.dtype, device=theta.device) * 2 + 1) / w - 1  # pixel centres in [-1, 1]
    ys = (torch.arange(h, dtype=theta.dtype, device=theta.device) * 2 + 1) / h - 1
    # (N, 2, 3, 1, 1): each output coordinate is a row of theta applied to (x, y, 1)
    t = theta[:, :, :, None, None]
    grid = t[:, :, 0] * xs + t[:, :, 1] * ys[:, None] + t[:, :, 2]  # (N, 2, h, w)
    return grid.permute(0, 2, 3, 1).contiguous()


def random_affine_grid(
    x: torch.Tensor,
    generator: torch.Generator,
    degrees: float = 0.0,
    scale: tuple[float, float] = (1.0, 1.0),
    translate_px: float = 0.0,
    shear_degrees: float = 0.0,
) -> torch.Tensor:
    """The sampling grid (N, H, W, 2) that rotates, scales, shears and shifts each image of x by its own amounts."""
    n, _, h, w = x.shape

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(n, generator=generator, device=generator.device) * (high - low) + low

    angle = uniform(-degrees, degrees) * (math.pi / 180)
    shear = uniform(-shear_degrees, shear_degrees) * (math.pi / 180)
    zoom = uniform(*scale)
    tx = uniform(-translate_px, translate_px) * (2 / w)
    ty = uniform(-translate_px, translate_px) * (2 / h)
    cos, sin = torch.cos(angle), torch.sin(angle)
    # grid_sample maps output coordinates to input ones, so this is the inverse transform: divide by the zoom.
    theta = torch.stack(
        [
            torch.stack([cos / zoom, (-sin + torch.tan(shear) * cos) / zoom, tx], dim=1),
            torch.stack([sin / zoom, (cos + torch.tan(shear) * sin) / zoom, ty], dim=1),
        ],
        dim=1,
    ).to(x.dtype)
    return affine_grid(theta.to(x.device), h, w)


def elastic_field(x: torch.Tensor, generator: torch.Generator, max_px: float) -> torch.Tensor:
    """A smooth random displacement (N, H, W, 2) in grid units: a 5x5 grid of random vectors upsampled
    bicubically, each image's scaled so that its typical shift is up to `max_px` pixels (uniform per image)."""
    n, _, h, w = x.shape
    strength = (torch.rand(n, generator=generator, device=generator.device) * max_px).to(x.device) * (2 / h)
    coarse = torch.randn(n, 2, 5, 5, generator=generator, device=generator.device).to(x.device)
    field = (
        F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True) * strength[:, None, None, None]
    )
    return field.permute(0, 2, 3, 1)


def _sample(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_affine(
    x: torch.Tensor,
    generator: torch.Generator,
    degrees: float = 0.0,
    scale: tuple[float, float] = (1.0, 1.0),
    translate_px: float = 0.0,
    shear_degrees: float = 0.0,
) -> torch.Tensor:
    """Rotate, scale, shear and shift every image of a float batch (N, 1, H, W) by its own random amounts."""
    return _sample(x, random_affine_grid(x, generator, degrees, scale, translate_px, shear_degrees))


def _affine(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The grid of "affine": up to 10 degrees of rotation, 0.9-1.1 scale, 2 px shifts and 8 degrees of shear."""
    return random_affine_grid(x, generator, degrees=10, scale=(0.9, 1.1), translate_px=2, shear_degrees=8)


def augment_batch(x: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Apply the recipe's augmentation `kind` to a float batch in [0, 1]."""
    if kind == "none":
        return x
    if kind == "rotate10":  # torchvision's RandomRotation(10), as seed 003 uses
        return random_affine(x, generator, degrees=10)
    if kind == "affine":
        return _sample(x, _affine(x, generator))
    if kind == "affine-elastic":  # the same affine and a smooth warp (Simard et al., 2003), sampled once
        return _sample(x, _affine(x, generator) + elastic_field(x, generator, 1.2))
    if kind == "robust":
        from .augment_real import robust_augment

        return robust_augment(x, generator)
    raise ValueError(f"unknown augmentation {kind!r}")
