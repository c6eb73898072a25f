"""The `robust` augmentation: batched tensor ops that make MNIST look like preprocessed real photos, plus negatives.

Every op works on the whole batch (N, 1, 28, 28) at once with per-sample random strengths:

    (negatives   with `TrainConfig.negatives` > 0 the loop first appends non-digits to the batch, made by
                 `make_negatives()` below; they go through the same ops, and their loss pulls their prediction
                 to the uniform distribution: outlier exposure, Hendrycks et al. 2019)
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

NEGATIVE_BANK_SEED = 1234
# Outlier exposure's lambda (Hendrycks et al. use 0.5): the non-digits' loss is added times this.
OUTLIER_WEIGHT = 0.5
# Of the negatives, this share are two digits side by side (whole or cut badly); the rest come from the bank.
PAIR_SHARE = 0.5

# Training negatives never come from the generators eval-real and calibrate use (realworld.generate, whose
# numpy generators are seeded from (set index, seed)): letters come from other fonts (DejaVu, where eval-real
# uses STIX and Computer Modern) and from the pen skeletons below, which hold no letter of
# realworld.LETTER_STROKES; scribbles are random walks, loops, zigzags and Catmull-Rom splines through random
# points (eval-real's are cubic Beziers); digit pairs come from the MNIST *train* digits of the batch
# (eval-real's numbers use MNIST test digits and pen skeletons). The bank has its own seed. Only the pen
# renderer (realworld.draw_strokes) and the list of non-digit characters are shared.
_TRAIN_LETTER_STROKES: dict[str, list[list[tuple[float, float]]]] = {
    "C": [[(0.85, 0.15), (0.5, 0.0), (0.15, 0.2), (0.1, 0.6), (0.3, 0.95), (0.6, 1.0), (0.9, 0.85)]],
    "P": [[(0.2, 1.0), (0.2, 0.0), (0.7, 0.05), (0.85, 0.25), (0.7, 0.45), (0.2, 0.5)]],
    "U": [[(0.15, 0.0), (0.15, 0.7), (0.35, 1.0), (0.65, 1.0), (0.85, 0.7), (0.85, 0.0)]],
    "V": [[(0.05, 0.0), (0.5, 1.0), (0.95, 0.0)]],
    "h": [[(0.2, 0.0), (0.2, 1.0)], [(0.2, 0.6), (0.5, 0.4), (0.8, 0.6), (0.8, 1.0)]],
    "m": [
        [(0.05, 1.0), (0.05, 0.35), (0.3, 0.3), (0.5, 0.5), (0.5, 1.0)],
        [(0.5, 0.5), (0.75, 0.3), (0.95, 0.5), (0.95, 1.0)],
    ],
    "n": [[(0.2, 1.0), (0.2, 0.3)], [(0.2, 0.5), (0.5, 0.3), (0.8, 0.5), (0.8, 1.0)]],
    "u": [[(0.15, 0.3), (0.15, 0.85), (0.5, 1.0), (0.85, 0.8)], [(0.85, 0.3), (0.85, 1.0)]],
    "e": [
        [
            (0.15, 0.6),
            (0.85, 0.6),
            (0.8, 0.35),
            (0.5, 0.25),
            (0.2, 0.4),
            (0.15, 0.75),
            (0.45, 1.0),
            (0.85, 0.9),
        ]
    ],
    "k": [[(0.2, 0.0), (0.2, 1.0)], [(0.8, 0.3), (0.2, 0.7)], [(0.4, 0.55), (0.85, 1.0)]],
    "+": [[(0.5, 0.05), (0.5, 0.95)], [(0.05, 0.5), (0.95, 0.5)]],
    "=": [[(0.1, 0.35), (0.9, 0.35)], [(0.1, 0.7), (0.9, 0.7)]],
    "box": [[(0.1, 0.1), (0.9, 0.1), (0.9, 0.9), (0.1, 0.9), (0.1, 0.1)]],
    "triangle": [[(0.5, 0.0), (1.0, 1.0), (0.0, 1.0), (0.5, 0.0)]],
    "arrow": [[(0.0, 0.5), (1.0, 0.5)], [(0.6, 0.15), (1.0, 0.5), (0.6, 0.85)]],
    "star": [[(0.05, 0.1), (0.95, 0.9)], [(0.95, 0.1), (0.05, 0.9)], [(0.5, 0.0), (0.5, 1.0)]],
    "tangle": [[(0.1, 0.0), (0.1, 1.0), (0.9, 1.0)], [(0.1, 0.5), (0.6, 0.5)], [(0.9, 0.0), (0.4, 0.0)]],
}


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


def _smooth_scribble(rng: np.random.Generator) -> list[list[tuple[float, float]]]:
    """One long pen path that turns smoothly (its heading drifts), loops or zigzags: doodles, crossings-out."""
    kind = rng.integers(3)
    if kind == 0:  # a drifting curve: heading changes a little at every step, so it curls and crosses itself
        point, heading, turn = rng.uniform(0.3, 0.7, 2), rng.uniform(0, 2 * np.pi), rng.normal(0, 0.4)
        path = []
        for _ in range(rng.integers(60, 110)):  # long enough to cross itself: no single digit does that
            path.append((float(point[0]), float(point[1])))
            turn = 0.8 * turn + rng.normal(0, 0.25)
            heading += turn
            point = np.clip(point + 0.05 * np.array([np.cos(heading), np.sin(heading)]), 0, 1)
        return [path]
    if kind == 1:  # a row of loops, as when a pen tests itself
        loops, t = rng.integers(3, 7), np.linspace(0, 1, 80)
        x = 0.1 + 0.8 * t + 0.12 * np.cos(2 * np.pi * loops * t)
        y = 0.5 + rng.uniform(0.2, 0.45) * np.sin(2 * np.pi * loops * t)
        return [list(zip(x.tolist(), y.tolist()))]
    turns = rng.integers(4, 9)  # a zigzag hatch over something
    xs = np.linspace(0.05, 0.95, turns) + rng.normal(0, 0.03, turns)
    ys = np.where(np.arange(turns) % 2 == 0, 0.05, 0.95) + rng.normal(0, 0.05, turns)
    return [list(zip(xs.clip(0, 1).tolist(), ys.clip(0, 1).tolist()))]


def _tangle(rng: np.random.Generator) -> list[list[tuple[float, float]]]:
    """Two to five smooth scribbles and ellipse arcs on top of each other: a crossed-out mess."""
    strokes: list[list[tuple[float, float]]] = []
    for _ in range(rng.integers(2, 6)):
        if rng.random() < 0.5:
            strokes += _smooth_scribble(rng)
        else:
            cx, cy, rx, ry = *rng.uniform(0.25, 0.75, 2), *rng.uniform(0.15, 0.5, 2)
            start = rng.uniform(0, 2 * np.pi)
            t = np.linspace(start, start + rng.uniform(1.0, 2 * np.pi), 30)
            strokes.append(list(zip((cx + rx * np.cos(t)).tolist(), (cy + ry * np.sin(t)).tolist())))
    return strokes


def _curves(rng: np.random.Generator) -> list[list[tuple[float, float]]]:
    """Two to four smooth curves, each a Catmull-Rom spline through three to five random points."""
    strokes = []
    for _ in range(rng.integers(2, 5)):
        points = rng.uniform(0, 1, size=(int(rng.integers(3, 6)), 2))
        padded = np.concatenate([points[:1], points, points[-1:]])
        t = np.linspace(0, 1, 8)[:, None]
        path = []
        for p0, p1, p2, p3 in zip(padded[:-3], padded[1:-2], padded[2:-1], padded[3:]):
            segment = 0.5 * (
                2 * p1
                + (p2 - p0) * t
                + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2
                + (3 * p1 - p0 - 3 * p2 + p3) * t**3
            )
            path += [(float(x), float(y)) for x, y in segment.clip(0, 1)]
        strokes.append(path)
    return strokes


def _dust(rng: np.random.Generator, side: int = 64) -> np.ndarray:
    """A few specks and short dashes scattered on a page: what a blank, dirty photo thresholds to."""
    mask = np.zeros((side, side), dtype=bool)
    yy, xx = np.mgrid[0:side, 0:side]
    for _ in range(rng.integers(2, 9)):
        cy, cx = rng.uniform(0, side, 2)
        ry, rx = rng.uniform(0.8, 3.5, 2)
        mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    return mask


@lru_cache(maxsize=1)
def negative_bank(size: int = 6000) -> torch.Tensor:
    """(size, 1, 28, 28) non-digits as preprocess() would output them, seeded; built once per process (a few s).

    Font letters (DejaVu), pen letters and signs (_TRAIN_LETTER_STROKES), random pen walks with sharp turns,
    smooth scribbles, tangles of them, crossing spline curves, scattered dust and noise blobs, each through
    preprocess's to_mnist().
    """
    from scipy import ndimage

    from .preprocess import select_digit, to_mnist
    from .realworld import FONT_LETTERS_TRAIN, NON_DIGIT_CHARS, draw_strokes, draw_text

    rng = np.random.default_rng(NEGATIVE_BANK_SEED)
    images = []
    for font in FONT_LETTERS_TRAIN:
        for char in NON_DIGIT_CHARS:
            images.append(to_mnist(draw_text(char, font, rng, 64) > 0.5))
    while len(images) < size:
        kind = rng.random()
        if kind < 0.2:
            strokes = list(_TRAIN_LETTER_STROKES.values())[rng.integers(len(_TRAIN_LETTER_STROKES))]
            mask = draw_strokes(strokes, rng, 64) > 0.5
        elif kind < 0.35:
            mask = draw_strokes(_walk(rng), rng, 64) > 0.5
        elif kind < 0.45:
            mask = draw_strokes(_smooth_scribble(rng), rng, 64) > 0.5
        elif kind < 0.55:
            mask = draw_strokes(_tangle(rng), rng, 64) > 0.5
        elif kind < 0.85:
            mask = draw_strokes(_curves(rng), rng, 64) > 0.5
        elif kind < 0.9:
            mask = _dust(rng)
        else:
            side = int(rng.integers(24, 96))
            field = ndimage.gaussian_filter(rng.random((side, side)), rng.uniform(0.5, 4))
            mask = select_digit(field > np.quantile(field, rng.uniform(0.4, 0.9)))
        images.append(to_mnist(mask))
    return torch.from_numpy(np.stack(images)[:, None])


def digit_pairs(x: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """`n` images of two of the batch's digits side by side, as a bad segmentation would hand them over.

    Each pair is written with a random gap (negative: touching or overlapping a little); the image is either the
    whole pair or one digit plus 30-65% of its neighbour (a cut in the wrong place; all of a narrow 1), scaled into the 20 px
    box and centred, as preprocess() makes it. Drawn from `generator` only, so runs stay reproducible.
    """
    g, device = generator, x.device
    first = torch.randint(len(x), (n,), generator=g, device=g.device).tolist()
    second = torch.randint(len(x), (n,), generator=g, device=g.device).tolist()
    draws = torch.rand(n, 4, generator=g, device=g.device).tolist()
    out = torch.zeros(n, 1, 28, 28, dtype=x.dtype, device=device)
    for k in range(n):
        a, b = x[first[k], 0], x[second[k], 0]
        cols_a, cols_b = torch.nonzero(a.amax(0) > 0.1).flatten(), torch.nonzero(b.amax(0) > 0.1).flatten()
        if len(cols_a) == 0 or len(cols_b) == 0:
            continue
        a = a[:, int(cols_a[0]) : int(cols_a[-1]) + 1]
        b = b[:, int(cols_b[0]) : int(cols_b[-1]) + 1]
        # -4 (overlapping) to +3 pixels, but never more than a third of the narrower digit, and a 1 keeps a
        # gap: two 1s on top of each other would be a (thick) 1, and a 1 is no negative.
        narrow = min(a.shape[1], b.shape[1])
        gap = max(int(round(-4 + 7 * draws[k][0])), -(narrow // 3) if narrow >= 8 else 1)
        start_b = max(0, a.shape[1] + gap)
        width = max(a.shape[1], start_b + b.shape[1])
        line = torch.zeros(28, width, dtype=x.dtype, device=device)
        line[:, : a.shape[1]] = a
        line[:, start_b : start_b + b.shape[1]] = torch.maximum(line[:, start_b : start_b + b.shape[1]], b)
        if draws[k][1] < 0.5:  # one whole digit and part of its neighbour
            # at least a third of the 20 px box of the neighbour, all of it if it is narrower (a 1)
            share = 0.3 + 0.35 * draws[k][2]
            if draws[k][3] < 0.5:
                keep = min(b.shape[1], max(7, int(round(share * b.shape[1]))))
                line = line[:, : max(a.shape[1], start_b + keep)]
            else:
                keep = min(a.shape[1], max(7, int(round(share * a.shape[1]))))
                line = line[:, min(start_b, a.shape[1] - keep) :]
        rows = torch.nonzero(line.amax(1) > 0.1).flatten()
        line = line[int(rows[0]) : int(rows[-1]) + 1]
        h, w = line.shape
        scale = 20 / max(h, w)
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        glyph = F.interpolate(line[None, None], size=size, mode="area")[0, 0]
        top, left = (28 - size[0]) // 2, (28 - size[1]) // 2
        out[k, 0, top : top + size[0], left : left + size[1]] = glyph
    peak = out.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-3)
    return (out / peak).clamp(0, 1)


@lru_cache(maxsize=2)
def _negative_bank_on(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The bank where the batch is (on a GPU: copied once, not 19 MB every step)."""
    return negative_bank().to(device=device, dtype=dtype)


def make_negatives(x: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """`n` non-digits (n, 1, 28, 28) for outlier exposure: PAIR_SHARE digit pairs from batch `x`, the rest the bank."""
    pairs = int(round(PAIR_SHARE * n))
    bank = _negative_bank_on(x.device, x.dtype)
    picks = torch.randint(len(bank), (n - pairs,), generator=generator, device=generator.device)
    return torch.cat([digit_pairs(x, pairs, generator), bank[picks.to(x.device)]])


def outlier_loss(logits: torch.Tensor) -> torch.Tensor:
    """Outlier exposure's loss: cross-entropy from the uniform distribution, mean over the non-digits."""
    return -F.log_softmax(logits.float(), dim=1).mean()


def _uniform(
    n: int, low: float, high: float, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    return (torch.rand(n, generator=generator, device=generator.device) * (high - low) + low).to(device)


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def elastic(x: torch.Tensor, generator: torch.Generator, max_px: float = 1.6) -> torch.Tensor:
    """Displace pixels by a smooth random field (augment.elastic_field)."""
    from .augment import elastic_field

    identity = F.affine_grid(
        torch.eye(2, 3, device=x.device).expand(len(x), 2, 3), list(x.shape), align_corners=False
    )
    return F.grid_sample(
        x,
        identity + elastic_field(x, generator, max_px),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
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
