"""Two touching digits read as one: the pair classifier that `read` consults when it chooses its cuts.

Digits that overlap deeply ("18" written with the 1 through the 8's loop) leave no cut that separates them,
and the digit classifier reads the whole blob as one confident digit (a 6). A second, small classifier
looks at the same 28x28 piece and says which two digits it holds, or that it holds no pair (class 100:
one digit, a digit with part of its neighbour, part of a digit). segment.split_and_read scores a
piece as one digit d by log p(d) + log p_pair(no pair), and as the pair ab by log p_pair(ab); its dynamic
programming then picks the reading of the whole line.

The classifier is trained on pairs made from MNIST's *training* digits, drawn the way `read` sees a blob
(`digitrec train-pairs`; bundled as pretrained/pairs.safetensors) and runs on NumPy (backends.NumpyBackend),
so `read` gives the same answer on every backend without importing torch.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CheckpointError, DigitrecError

NO_PAIR = 100  # the class of everything that is not two whole digits
CLASSES = 101
WIDTH, HIDDEN = 24, 256
# The pair network for backends.NumpyBackend (its layer notation): four 3x3 convs, two pools, a small head.
PAIR_LAYERS: tuple[tuple[Any, ...], ...] = (
    ("conv", 0, 1, 1, True),
    ("bn", 1),
    ("relu",),
    ("conv", 3, 1, 1, True),
    ("pool",),
    ("bn", 5),
    ("relu",),
    ("conv", 7, 1, 1, True),
    ("bn", 8),
    ("relu",),
    ("conv", 10, 1, 1, True),
    ("pool",),
    ("bn", 12),
    ("relu",),
    ("flatten",),
    ("linear", 16),
    ("bn", 17),
    ("relu",),
    ("linear", 19),
)
# pairs drawn per worker task; each chunk has its own seed, so the set does not depend on workers
CHUNK = 5000
PairScorer = Callable[[np.ndarray], np.ndarray]  # (N, 28, 28) pieces -> (N, 101) log probabilities


def pair_cnn():
    """The pair classifier as a torch module, input normalization first (identity: the pieces are 0-1 ink)."""
    from torch import nn

    from .models import Flatten, Normalize

    w = WIDTH
    return nn.Sequential(
        Normalize(0.0, 1.0),
        nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1),
            nn.BatchNorm2d(w),
            nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1),
            nn.MaxPool2d(2),
            nn.BatchNorm2d(w),
            nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, padding=1),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1),
            nn.MaxPool2d(2),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(),
            Flatten(),
            nn.Dropout(0.3),
            nn.Linear(2 * w * 49, HIDDEN),
            nn.BatchNorm1d(HIDDEN),
            nn.ReLU(),
            nn.Linear(HIDDEN, CLASSES),
        ),
    )


# ------------------------------------------------------------------------------------------ training data


def digits_line(
    glyphs: list[np.ndarray], height: int, gap: float, rng: np.random.Generator
) -> tuple[np.ndarray, list[int]]:
    """Glyphs (ink 0-1) side by side, each starting `gap` x `height` pixels after the last one ends (negative:
    they overlap), each at a random height in a line 1.3 times the tallest glyph: the line and each glyph's
    left column."""
    line_height = int(max(g.shape[0] for g in glyphs) * 1.3) + 2
    lefts = [0]
    for g in glyphs[:-1]:
        lefts.append(max(0, int(lefts[-1] + g.shape[1] + gap * height)))
    line = np.zeros((line_height, max(x + g.shape[1] for x, g in zip(lefts, glyphs))), np.float32)
    for x, g in zip(lefts, glyphs):
        y = int(rng.uniform(0, line_height - g.shape[0]))
        region = line[y : y + g.shape[0], x : x + g.shape[1]]
        np.maximum(region, g, out=region)
    return line, lefts


def one_blob(mask: np.ndarray) -> bool:
    """Does the ink make one blob (specks under a tenth of the largest aside)? Digits that stand apart make
    several blobs, and `read` separates those without the pair classifier. Blobs are 4-connected here, where
    `read` joins pixels that touch at a corner too (8-connected): two digits that meet only at a corner are left
    out of the training pairs, though `read` sees them as one blob and may ask about them."""
    from scipy import ndimage

    blobs, n = ndimage.label(mask)
    if n == 0:
        return False
    sizes = np.asarray(ndimage.sum(mask, blobs, range(1, n + 1)))
    return bool((sizes > 0.1 * sizes.max()).sum() == 1)


def _chunk(task: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """`count` pieces of chunk `index`, drawn from MNIST's training digits with the seed [seed, index].

    Classes: 10a + b for two whole touching digits a, b (70% of draws, kept only when they make one blob);
    NO_PAIR for three whole touching digits (5%, one blob too), one digit (8%), one digit plus 20-65% of its
    touching neighbour on either side (12%), and a digit cut somewhere across (5%). Each is thresholded at a
    random level and made 28x28 by to_mnist(), as `read` makes its pieces.
    """
    from scipy import ndimage

    from .data import load_mnist
    from .preprocess import select_digit, to_mnist
    from .realworld import crop_ink, mnist_glyph

    count, seed, index = task
    rng = np.random.default_rng([seed, index])
    mnist = load_mnist(download=False)
    images, labels = mnist.train_images.numpy(), mnist.train_labels.numpy()

    def glyph(i: int, height: int) -> np.ndarray:
        g = crop_ink(mnist_glyph(images[i], height))
        if rng.random() < 0.3:  # pens differ in width
            g = ndimage.grey_dilation(g, size=3) if rng.random() < 0.5 else ndimage.grey_erosion(g, size=2)
        return g

    xs: list[np.ndarray] = []
    ys: list[int] = []
    while len(xs) < count:
        i, j = (int(k) for k in rng.integers(len(images), size=2))
        height = int(rng.integers(40, 100))
        kind = rng.random()
        level = rng.uniform(0.35, 0.65)
        if kind < 0.7:  # two whole digits, touching or overlapping
            gap = rng.uniform(-0.15, 0.0)
            mask = digits_line([glyph(i, height), glyph(j, height)], height, gap, rng)[0] > level
            if not one_blob(mask):
                continue
            xs.append(to_mnist(mask))
            ys.append(10 * int(labels[i]) + int(labels[j]))
            continue
        if kind < 0.75:  # three whole digits in one blob: no pair, though a pair reads it better than a digit
            k, gap = int(rng.integers(len(images))), rng.uniform(-0.15, 0.0)
            mask = digits_line([glyph(m, height) for m in (i, j, k)], height, gap, rng)[0] > level
            if not one_blob(mask):
                continue
        elif kind < 0.83:  # one digit
            mask = select_digit(glyph(i, height) > level)
        elif kind < 0.95:  # one digit and part of its neighbour, as a cut in the wrong place leaves it
            gap = rng.uniform(-0.15, 0.05)
            a, b = glyph(i, height), glyph(j, height)
            line, (_, x_b) = digits_line([a, b], height, gap, rng)
            width_a, width_b = a.shape[1], b.shape[1]
            share = rng.uniform(0.2, 0.65)
            if rng.random() < 0.5:
                line = line[:, : max(width_a, x_b + int(share * width_b))]
            else:
                line = line[:, min(x_b, int(width_a * (1 - share))) :]
            mask = select_digit(line > level)
        else:  # part of one digit
            whole = glyph(i, height) > level
            column = int(rng.uniform(0.3, 0.7) * whole.shape[1])
            mask = select_digit(whole[:, :column] if rng.random() < 0.5 else whole[:, column:])
        if mask.any():
            xs.append(to_mnist(mask))
            ys.append(NO_PAIR)
    return (np.stack(xs) * 255).round().astype(np.uint8), np.array(ys, np.int64)


def make_pairs(count: int, seed: int = 0, workers: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """`count` training pieces (uint8 (N, 28, 28), labels (N,)), the same for the same (count, seed)."""
    tasks = [(min(CHUNK, count - start), seed, k) for k, start in enumerate(range(0, count, CHUNK))]
    if workers > 1 and len(tasks) > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = list(pool.map(_chunk, tasks))
    else:
        parts = [_chunk(task) for task in tasks]
    return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])


# ----------------------------------------------------------------------------------------------- training


def train_pairs(
    out: str | Path,
    count: int = 150_000,
    epochs: int = 8,
    seed: int = 0,
    batch_size: int = 256,
    lr: float = 3e-3,
    log: Callable[[str], None] = print,
) -> Path:
    """Draw `count` pieces, train the pair classifier on 95% of them and write `out` (float16 weights + metadata).

    AdamW (weight decay 0.05), one-cycle to `lr`, label smoothing 0.05, and each batch rotated, scaled, sheared
    and shifted a little (augment.random_affine). Each epoch prints the held-out 5%'s accuracy, on pairs and on
    the rest. Returns the path written.
    """
    import torch
    import torch.nn.functional as F

    from .augment import random_affine
    from .checkpoint import save_tensors
    from .data import as_input
    from .evaluate import fraction_correct

    # the held-out 5% aside, the rest must fill one batch, or there is no step to train (and one-cycle refuses 0)
    if count - count // 20 < batch_size:
        least = next(n for n in range(batch_size, 2 * batch_size) if n - n // 20 >= batch_size)
        raise DigitrecError(
            f"--count {count} leaves {count - count // 20} training pieces beside the held-out 5%, fewer than one "
            f"batch of {batch_size}; use --count {least} or more."
        )
    start = time.perf_counter()
    images, labels = make_pairs(count, seed)
    log(
        f"drew {len(images):,} pieces ({(labels < NO_PAIR).mean():.0%} pairs) in {time.perf_counter() - start:.0f} s"
    )
    torch.manual_seed(seed)
    x = as_input(torch.from_numpy(images))
    y = torch.from_numpy(labels)
    held = len(x) // 20
    x_val, y_val, x, y = x[:held], y[:held], x[held:], y[held:]
    model = pair_cnn()
    steps_per_epoch = len(x) // batch_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, lr, total_steps=epochs * steps_per_epoch, pct_start=0.15
    )
    generator = torch.Generator().manual_seed(seed)
    metrics: dict[str, float] = {}
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        for step in range(steps_per_epoch):
            batch = order[step * batch_size : (step + 1) * batch_size]
            inputs = random_affine(
                x[batch], generator, degrees=8, scale=(0.9, 1.1), translate_px=1.5, shear_degrees=8
            )
            loss = F.cross_entropy(model(inputs), y[batch], label_smoothing=0.05)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        model.eval()
        with torch.no_grad():
            guess = torch.cat([model(x_val[i : i + 1000]) for i in range(0, len(x_val), 1000)]).argmax(1)
        pair = y_val < NO_PAIR
        metrics = {  # exact fractions, as training's accuracies (a float32 mean wrote 0.9915000200271606)
            "val_accuracy": fraction_correct(guess, y_val),
            "val_pair_accuracy": fraction_correct(guess[pair], y_val[pair]),
            "val_other_read_as_pair": (guess[~pair] < NO_PAIR).sum().item() / max(int((~pair).sum()), 1),
        }
        log(
            f"epoch {epoch + 1}/{epochs}  loss {loss.item():.3f}  held-out accuracy {metrics['val_accuracy']:.2%}  "
            f"pairs {metrics['val_pair_accuracy']:.2%}  others read as a pair {metrics['val_other_read_as_pair']:.2%}  "
            f"{time.perf_counter() - start:.0f} s"
        )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    meta = {
        "arch": "pair_cnn",
        "classes": CLASSES,
        "recipe": "pairs",
        "config": {
            "arch": "pair_cnn",
            "count": count,
            "epochs": epochs,
            "seed": seed,
            "batch_size": batch_size,
            "lr": lr,
        },
        "metrics": metrics | {"train_seconds": time.perf_counter() - start},
    }
    save_tensors(out, tensors, meta)
    log(f"wrote {out}")
    return out


# ------------------------------------------------------------------------------------------------ reading


def pretrained_pairs_path() -> Path:
    from .predict import pretrained_path

    return pretrained_path("pairs")


@lru_cache(maxsize=4)
def load_pair_scorer(path: str | Path | None = None) -> PairScorer | None:
    """The pair classifier at `path` (default: the bundled one) as (N, 28, 28) pieces -> (N, 101) log probabilities;
    None when the default file is missing (then `read` reads as it did without it)."""
    from .backends import NumpyBackend
    from .checkpoint import load_arrays, refuse_no_model_file, refuse_unusable_weights

    source = Path(path) if path is not None else pretrained_pairs_path()
    if not source.exists():
        if path is None:
            return None
        raise CheckpointError(f"pair classifier {source} does not exist; `digitrec train-pairs` writes one.")
    refuse_no_model_file(source, "the .safetensors file `digitrec train-pairs` wrote")  # /dev/zero, a pipe
    try:
        tensors, meta = load_arrays(source)
    except CheckpointError as exc:  # it named `digitrec train` and a run folder's model.safetensors
        if source.is_dir() or "is not a digitrec checkpoint" in str(exc):
            raise CheckpointError(
                f"{source} is not a pair classifier; pass the .safetensors file `digitrec train-pairs` wrote "
                "(runs/pairs/pairs.safetensors unless its --out said otherwise)."
            ) from None
        raise
    if meta.get("arch") != "pair_cnn":
        raise CheckpointError(f"{source} is not a pair classifier (`digitrec train-pairs` writes one).")
    refuse_unusable_weights(source, tensors)
    try:
        network = NumpyBackend(tensors, "pair_cnn", layers=PAIR_LAYERS)
    except (KeyError, ValueError):
        raise CheckpointError(
            f"{source} does not fit the pair classifier; it is damaged or from another version."
        ) from None

    def score(pieces: np.ndarray) -> np.ndarray:
        logits = network(np.asarray(pieces, np.float32)[:, None])
        logits = logits - logits.max(axis=1, keepdims=True)
        return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))

    return score
