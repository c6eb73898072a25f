"""A photo of one line of handwritten digits -> boxes -> one MNIST-like 28x28 image per digit.

Reuses preprocess's stages (load, polarity, flatten, threshold, to_mnist) and adds the line logic:
connected components (SciPy), dropping specks and ruled lines, merging the parts of broken digits
(components stacked in x), and splitting touching digits at ink-profile minima, choosing how many
digits a wide blob holds by asking the classifier which split reads best (segmentation by recognition).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from .preprocess import MIN_WORK_SIDE, ink_mask, load_gray_sized, select_digit, to_mnist

READ_SIDE = 1024  # working size for a line: enough for 10+ digits of reasonable height
MERGE_OVERLAP = 0.5  # parts overlapping in x by half the narrower one's width belong to one digit
DIGIT_ASPECT = 0.62  # a typical handwritten digit is this wide for its height (slant included)
MAX_DIGITS_PER_BLOB = 8
SMALL_PART = 0.55  # shorter than this share of the line height: a part of a digit (a bar, a flag) or dust

Score = Callable[[np.ndarray], np.ndarray]  # (K, 28, 28) -> confidence of each, in (0, 1]


@dataclass
class Piece:
    """One digit of the line: its box (x, y, w, h) in the input's pixels and its 28x28 MNIST-like image."""

    box: tuple[int, int, int, int]
    image: np.ndarray


@dataclass
class _Blob:
    x0: int
    x1: int  # exclusive
    y0: int
    y1: int
    labels: list[int]

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0


def components(mask: np.ndarray) -> tuple[np.ndarray, list[_Blob], np.ndarray]:
    """Label 8-connected components; return (labels, one blob per component, areas indexed by label)."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    blobs = [
        _Blob(s[1].start, s[1].stop, s[0].start, s[0].stop, [i + 1])
        for i, s in enumerate(ndimage.find_objects(labels))
        if s is not None
    ]
    return labels, blobs, areas


def clean(blobs: list[_Blob], areas: np.ndarray) -> tuple[list[_Blob], float]:
    """Drop dust and ruled lines; return the digit-sized blobs and the line height they imply."""
    if not blobs:
        return [], 0.0
    largest = max(areas[b.labels[0]] for b in blobs)
    big = [b for b in blobs if areas[b.labels[0]] >= 0.25 * largest]
    line_height = float(np.median([b.height for b in big]))
    kept = []
    for b in blobs:
        flat = b.height < 0.3 * line_height
        if flat and b.width > 2 * line_height:
            continue  # a ruled line or the page's edge, not a digit
        if flat and areas[b.labels[0]] < 0.05 * largest:
            continue  # dust, a dot
        kept.append(b)
    return kept, line_height


def _union(a: _Blob, b: _Blob) -> _Blob:
    return _Blob(min(a.x0, b.x0), max(a.x1, b.x1), min(a.y0, b.y0), max(a.y1, b.y1), a.labels + b.labels)


def merge_broken(blobs: list[_Blob], areas: np.ndarray, line_height: float) -> list[_Blob]:
    """Put the parts of broken digits together: the detached bar of a 5, a 4 in two strokes, a skipping pen.

    Parts stacked in x (overlapping by half the narrower one's width) are one digit. Then a short part
    (under SMALL_PART of the line height) joins its nearest digit when it touches or nearly touches it
    in x; a short part far from everything is kept only if it has a digit's ink, else it is dust.
    """
    merged: list[_Blob] = []
    for b in sorted(blobs, key=lambda b: b.x0):
        if merged:
            last = merged[-1]
            overlap = min(last.x1, b.x1) - max(last.x0, b.x0)
            if overlap >= MERGE_OVERLAP * min(last.width, b.width):
                merged[-1] = _union(last, b)
                continue
        merged.append(b)
    big = [b for b in merged if b.height >= SMALL_PART * line_height]
    small = [b for b in merged if b.height < SMALL_PART * line_height]
    if not big:
        return merged
    typical_area = float(np.median([areas[b.labels].sum() for b in big]))
    for part in small:
        gaps = [max(0, b.x0 - part.x1, part.x0 - b.x1) for b in big]
        nearest = int(np.argmin(gaps))
        if gaps[nearest] <= 0.25 * line_height:
            big[nearest] = _union(big[nearest], part)
        elif areas[part.labels].sum() >= 0.25 * typical_area:
            big.append(part)
    return sorted(big, key=lambda b: b.x0)


def cut_columns(mask: np.ndarray, pieces: int) -> list[int]:
    """Where to cut a blob into `pieces`: the lowest ink column near each even split, cuts sorted."""
    width = mask.shape[1]
    profile = ndimage.uniform_filter1d(mask.sum(axis=0).astype(np.float32), 3)
    cuts = []
    for k in range(1, pieces):
        ideal = k * width / pieces
        lo, hi = int(max(1, ideal - 0.3 * width / pieces)), int(min(width - 1, ideal + 0.3 * width / pieces))
        if hi <= lo:
            cuts.append(int(ideal))
            continue
        window = profile[lo:hi] + 0.02 * profile.max() * np.abs(np.arange(lo, hi) - ideal) / (width / pieces)
        cuts.append(lo + int(np.argmin(window)))
    return sorted(set(cuts))


def split(mask: np.ndarray, pieces: int) -> list[tuple[int, np.ndarray]]:
    """Cut a blob's mask into pieces at profile minima; return (x offset, cleaned piece mask) for each non-empty one."""
    bounds = [0, *cut_columns(mask, pieces), mask.shape[1]]
    out = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        piece = select_digit(mask[:, a:b])  # slivers of the neighbour's strokes fall away
        if piece.any():
            out.append((a, piece))
    return out


def segment(image: Any, score: Score | None = None) -> list[Piece]:
    """Find the digits of one line, left to right. `score` (a classifier's confidences) picks how to split blobs."""
    gray, (width, height) = load_gray_sized(image, max_side=READ_SIDE, min_side=MIN_WORK_SIDE)
    back = np.array([width / gray.shape[1], height / gray.shape[0]])
    mask = ink_mask(gray)
    labels, blobs, areas = components(mask)
    blobs, line_height = clean(blobs, areas)
    pieces: list[Piece] = []
    for blob in merge_broken(blobs, areas, line_height):
        region = np.isin(labels[blob.y0 : blob.y1, blob.x0 : blob.x1], blob.labels)
        for x_offset, piece in _best_split(region, blob, score):
            rows, cols = np.flatnonzero(piece.any(1)), np.flatnonzero(piece.any(0))
            x, y = blob.x0 + x_offset + cols[0], blob.y0 + rows[0]
            w, h = cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1
            box = (
                round(x * back[0]),
                round(y * back[1]),
                max(1, round(w * back[0])),
                max(1, round(h * back[1])),
            )
            pieces.append(Piece(box, to_mnist(piece)))
    return pieces


def _best_split(region: np.ndarray, blob: _Blob, score: Score | None) -> list[tuple[int, np.ndarray]]:
    """One digit unless the blob is wide for its height; then try a few counts and keep the best-reading one."""
    estimate = blob.width / (DIGIT_ASPECT * blob.height)
    if score is None:  # no classifier to ask: split only clearly wide blobs, by their width
        return (
            [(0, region)]
            if estimate < 1.35
            else split(region, int(min(MAX_DIGITS_PER_BLOB, round(estimate))))
        )
    if estimate < 0.95:  # narrower than any two digits side by side, even a 1 touching a 1
        return [(0, region)]
    guess = int(min(MAX_DIGITS_PER_BLOB, max(2, round(estimate))))
    best, best_score = [(0, region)], -np.inf
    for pieces in sorted({1, guess - 1, guess, min(MAX_DIGITS_PER_BLOB, guess + 1)} - {0}):
        candidate = split(region, pieces) if pieces > 1 else [(0, region)]
        confidences = score(np.stack([to_mnist(p) for _, p in candidate]))
        # Sum of log confidences: each extra piece must pay for itself by reading clearly.
        total = float(np.log(np.clip(confidences, 1e-6, 1)).sum())
        if total > best_score:
            best, best_score = candidate, total
    return best
