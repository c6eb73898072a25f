"""Test-time augmentation: average a model's probabilities over copies of the input moved by one pixel.

A recipe turns it on with `tta_views` (1 = off, 5 = the image and its four 1-pixel shifts, 9 = the 3x3 grid of
shifts). Evaluation (`evaluate.predict_logits`, so every reported test figure) and the Predictor (`predict`,
`read`, `serve`, on any backend) both use it, and both return the log of the mean probability, so a calibration
temperature means the same on either side. Single views are what the robustness curves (and `explore`, which
reads them), the saliency maps, `bench`'s speed figures and the model card's latency score. Nothing here
imports torch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import CheckpointError

SHIFTS: dict[int, tuple[tuple[int, int], ...]] = {
    1: ((0, 0),),
    5: ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)),
    9: tuple((dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)),
}


def views_in(meta: dict[str, Any], name: str = "the model") -> int:
    """The views a checkpoint's metadata asks for (its recipe's `tta_views`; 1 when it names none)."""
    config = meta.get("config", {})
    if not isinstance(config, dict):  # metadata anyone can edit: "config": [] was an AttributeError traceback
        raise CheckpointError(
            f"{name} records a config that is a {type(config).__name__}, not a table; it is damaged, so export or "
            "train it again."
        )
    views = config.get("tta_views", 1)
    try:
        known = int(views) in SHIFTS
    except (TypeError, ValueError):
        known = False
    if not known:
        raise CheckpointError(
            f"{name} asks for {views!r} test-time views; digitrec knows {', '.join(map(str, SHIFTS))}, "
            "so train it again with one of those."
        )
    return int(views)


def windows(views: int, height: int = 28, width: int = 28) -> list[tuple[slice, slice]]:
    """For an input padded by one pixel on each side, the (rows, columns) window that moves it by each shift."""
    return [(slice(1 - dy, 1 - dy + height), slice(1 - dx, 1 - dx + width)) for dy, dx in SHIFTS[views]]


def shifted_views(batch: np.ndarray, views: int) -> np.ndarray:
    """(N, 1, H, W) -> (views * N, 1, H, W), view-major: the batch moved by each shift, zeros moved in."""
    padded = np.pad(batch, ((0, 0), (0, 0), (1, 1), (1, 1)))
    height, width = batch.shape[-2:]
    return np.concatenate([padded[..., rows, cols] for rows, cols in windows(views, height, width)])


def mean_log_probabilities(logits: np.ndarray, views: int) -> np.ndarray:
    """Logits (views * N, 10) of view-major copies -> (N, 10) log of the mean softmax over the views.

    In NumPy for the backends that run without torch; models.log_mean_probabilities is the torch one."""
    z = logits.reshape(views, -1, logits.shape[-1]).astype(np.float64)
    log_probabilities = z - _logsumexp(z, axis=2)
    # log(mean(p)) as a logsumexp, like the torch twin: a probability that underflows in every view stays finite
    return (_logsumexp(log_probabilities, axis=0) - np.log(views))[0].astype(np.float32)


def _logsumexp(x: np.ndarray, axis: int) -> np.ndarray:
    """log(sum(exp(x))) along `axis` (kept, size 1), without overflow or underflow."""
    top = x.max(axis=axis, keepdims=True)
    return top + np.log(np.exp(x - top).sum(axis=axis, keepdims=True))
