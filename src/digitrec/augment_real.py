"""The `robust` augmentation: batched tensor ops that make MNIST look like preprocessed real photos, plus negatives.

Every op works on the whole batch (N, 1, 28, 28) at once with per-sample random strengths:

    negatives    a share of the batch is replaced by non-digits (letters, random pen walks, noise blobs)
                 preprocessed like real input. Their labels stay the batch's random digits, so cross-entropy
                 pushes their prediction towards uniform (outlier exposure, with no change to the loop):
                 that is what lets a confidence threshold reject letters and noise.
    affine       rotation, scale, shear, shift: photos are never upright and segmentation boxes wobble
    elastic      a smooth random displacement field: other people's handwriting
    thickness    fractional dilation or erosion (max-pool / min-pool): pens, markers, pencils
    rebinarize   threshold an upsampled copy and area-average it back: exactly what preprocess() does
    blur, gamma  defocus and ink-darkness profiles that survive preprocessing
    noise        sensor noise and dust specks the denoiser missed
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

NEGATIVE_FRACTION = 0.1
NEGATIVE_BANK_SEED = 1234


def _walk(rng: np.random.Generator) -> list[list[tuple[float, float]]]:
    """Two or three random pen walks with sharp turns: shapes no digit has."""
    strokes = []
    for _ in range(rng.integers(2, 4)):
        point, heading, stroke = rng.uniform(0.2, 0.8, 2), rng.uniform(0, 2 * np.pi), []
        for _ in range(rng.integers(4, 9)):
            stroke.append((float(point[0]), float(point[1])))
            heading += rng.normal(0, 1.6)
            point = np.clip(point + 0.25 * np.array([np.cos(heading), np.sin(heading)]), 0, 1)
        strokes.append(stroke)
    return strokes


@lru_cache(maxsize=1)
def negative_bank(size: int = 2400) -> torch.Tensor:
    """(size, 1, 28, 28) non-digits as preprocess() would output them, seeded; built once per process (~2 s)."""
    from scipy import ndimage

    from .preprocess import select_digit, to_mnist
    from .realworld import FONT_LETTERS_TRAIN, NON_DIGIT_CHARS, draw_strokes, draw_text

    rng = np.random.default_rng(NEGATIVE_BANK_SEED)
    images = []
    for font in FONT_LETTERS_TRAIN:
        for char in NON_DIGIT_CHARS:
            images.append(to_mnist(draw_text(char, font, rng, 64) > 0.5))
    while len(images) < size:
        if rng.random() < 0.5:
            mask = draw_strokes(_walk(rng), rng, 64) > 0.5
        else:
            side = int(rng.integers(24, 96))
            field = ndimage.gaussian_filter(rng.random((side, side)), rng.uniform(0.5, 4))
            mask = select_digit(field > np.quantile(field, rng.uniform(0.4, 0.9)))
        images.append(to_mnist(mask))
    return torch.from_numpy(np.stack(images)[:, None])


def _uniform(
    n: int, low: float, high: float, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    return (torch.rand(n, generator=generator, device=generator.device) * (high - low) + low).to(device)


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def elastic(x: torch.Tensor, generator: torch.Generator, max_px: float = 1.6) -> torch.Tensor:
    """Displace pixels by a smooth random field: a 5x5 grid of random vectors, upsampled bicubically."""
    n, _, h, w = x.shape
    strength = _per_sample(_uniform(n, 0, max_px, generator, x.device)) * (2 / h)
    coarse = torch.randn(n, 2, 5, 5, generator=generator, device=generator.device).to(x.device)
    field = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True) * strength
    identity = F.affine_grid(
        torch.eye(2, 3, device=x.device).expand(n, 2, 3), list(x.shape), align_corners=False
    )
    return F.grid_sample(
        x, identity + field.permute(0, 2, 3, 1), mode="bilinear", padding_mode="zeros", align_corners=False
    )


def thickness(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blend towards a 3x3 dilation (t > 0) or erosion (t < 0) by |t|: strokes change width fractionally."""
    t = _per_sample(_uniform(len(x), -0.8, 1.0, generator, x.device))
    dilated = F.max_pool2d(x, 3, stride=1, padding=1)
    eroded = -F.max_pool2d(-x, 3, stride=1, padding=1)
    return torch.where(t > 0, x + t * (dilated - x), x - t * (eroded - x))


def rebinarize(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Threshold a 2x upsampled copy at a random level and area-average it back: preprocess()'s edge profile."""
    level = _per_sample(_uniform(len(x), 0.3, 0.6, generator, x.device))
    big = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    return F.avg_pool2d((big > level).to(x.dtype), 2)


def blur(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    kernel = torch.tensor([1.0, 2.0, 1.0], device=x.device, dtype=x.dtype)
    kernel = (kernel[:, None] * kernel[None, :] / 16).view(1, 1, 3, 3)
    amount = _per_sample(_uniform(len(x), 0, 1, generator, x.device))
    return x + amount * (F.conv2d(x, kernel, padding=1) - x)


def chance(n: int, p: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return _per_sample(torch.rand(n, generator=generator, device=generator.device).to(device) < p)


def robust_augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Augment a float batch (N, 1, 28, 28) in [0, 1]; same shape out. Deterministic given the generator."""
    from .augment import random_affine

    n, device = len(x), x.device
    bank = negative_bank().to(device=device, dtype=x.dtype)
    picks = torch.randint(len(bank), (n,), generator=generator, device=generator.device).to(device)
    x = torch.where(chance(n, NEGATIVE_FRACTION, generator, device), bank[picks], x)
    x = random_affine(x, generator, degrees=12, scale=(0.85, 1.08), translate_px=1.5, shear_degrees=10)
    x = elastic(x, generator)
    x = thickness(x, generator)
    x = torch.where(chance(n, 0.5, generator, device), rebinarize(x, generator), x)
    x = torch.where(chance(n, 0.3, generator, device), blur(x, generator), x)
    gamma = _per_sample(torch.exp(_uniform(n, -0.4, 0.4, generator, device)))
    x = x.clamp(0, 1) ** gamma
    noise = torch.randn(x.shape, generator=generator, device=generator.device).to(device)
    x = x + chance(n, 0.3, generator, device) * _per_sample(_uniform(n, 0, 0.06, generator, device)) * noise
    specks = torch.rand(x.shape, generator=generator, device=generator.device).to(device) < 0.003
    x = torch.where(chance(n, 0.15, generator, device) & specks, torch.ones_like(x), x)
    # preprocess() always scales the brightest stroke to 1.0; do the same so inputs look alike.
    peak = x.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-3)
    return (x / peak).clamp(0, 1)
