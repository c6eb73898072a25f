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
# Reading by recognition (with a classifier):
CUT_SPACING = 0.2  # candidate cuts in a component at least this many line heights apart (and from its ends)
CUT_MAX_INK = 0.35  # ... where the ink column is at most this share of the line height (two strokes crossing)
MAX_PARTS = 4  # a digit is made of at most this many parts (a 5 in three strokes, a cut 8)
MAX_DIGIT_WIDTH = 1.3  # no digit is wider than this many line heights
DIGIT_BONUS = 0.5  # added per digit: log confidences alone would always prefer fewer, larger pieces
SHORT_PENALTY = 3.0  # a "digit" much shorter than the line is a fragment (a bar, a flag)
WIDE_PENALTY = 3.0  # per unit of width/height over WIDE_ASPECT: two digits read as one
WIDE_ASPECT = 1.0
SKIP_PENALTY = 1.0  # leaving a short part out of every digit (dust, a stray mark) costs this much

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
    blobs = [_Blob(s[1].start, s[1].stop, s[0].start, s[0].stop, [i + 1])
             for i, s in enumerate(ndimage.find_objects(labels)) if s is not None]
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
    """Find the digits of one line, left to right. With `score` (a classifier's confidences) the line is
    read by recognition: cut into parts, then the grouping of parts into digits that reads best wins."""
    gray, (width, height) = load_gray_sized(image, max_side=READ_SIDE, min_side=MIN_WORK_SIDE)
    back = (width / gray.shape[1], height / gray.shape[0])
    labels, blobs, areas = components(ink_mask(gray))
    blobs, line_height = clean(blobs, areas)
    if score is not None:
        found = read_by_recognition(labels, blobs, line_height, score)
    else:
        found = []
        for blob in merge_broken(blobs, areas, line_height):
            region = np.isin(labels[blob.y0 : blob.y1, blob.x0 : blob.x1], blob.labels)
            found += [(blob.x0 + x, blob.y0, piece) for x, piece in _best_split(region, blob)]
    pieces = []
    for x0, y0, piece in found:
        rows, cols = np.flatnonzero(piece.any(1)), np.flatnonzero(piece.any(0))
        x, y = x0 + cols[0], y0 + rows[0]
        w, h = cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1
        box = (round(x * back[0]), round(y * back[1]), max(1, round(w * back[0])), max(1, round(h * back[1])))
        pieces.append(Piece(box, to_mnist(piece)))
    return pieces


def _best_split(region: np.ndarray, blob: _Blob) -> list[tuple[int, np.ndarray]]:
    """Without a classifier to ask: one digit, unless the blob is clearly wide for its height; then split by width."""
    estimate = blob.width / (DIGIT_ASPECT * blob.height)
    return [(0, region)] if estimate < 1.35 else split(region, int(min(MAX_DIGITS_PER_BLOB, round(estimate))))


# ------------------------------------------------------------------------------- reading by recognition


@dataclass
class _Part:
    """A vertical slice [x0, x1) of one component: the unit that digits are built from."""

    label: int
    x0: int
    x1: int
    y0: int
    y1: int


def cut_candidates(region: np.ndarray, line_height: float) -> list[int]:
    """Columns where a component may hold two touching digits: the lowest minima of its ink profile,
    at least CUT_SPACING line heights from each other and from the ends."""
    width = region.shape[1]
    spacing = max(2, int(CUT_SPACING * line_height))
    if width < 2 * spacing:
        return []
    profile = ndimage.uniform_filter1d(region.sum(axis=0).astype(np.float32), 3)
    inner = np.arange(spacing, width - spacing)
    is_minimum = (profile[inner] <= profile[inner - 1]) & (profile[inner] <= profile[inner + 1])
    cuts: list[int] = []
    for column in inner[is_minimum][np.argsort(profile[inner[is_minimum]], kind="stable")]:
        if profile[column] > CUT_MAX_INK * line_height:
            break  # more ink than two crossing strokes: not where digits touch
        if all(abs(column - c) >= spacing for c in cuts):
            cuts.append(int(column))
    return sorted(cuts)


def read_by_recognition(labels: np.ndarray, blobs: list[_Blob], line_height: float,
                        score: Score) -> list[tuple[int, int, np.ndarray]]:
    """Segmentation by recognition: cut the line into parts (components, and components cut where they
    may hold touching digits), score every run of up to MAX_PARTS neighbouring parts as one digit with
    the classifier (one batch), and keep the grouping with the best total (dynamic programming).
    A digit's score is its log confidence plus a prior on its shape: about a line high, not much wider.
    Returns (x, y, mask) for each digit, in the working image's pixels."""
    parts: list[_Part] = []
    for blob in blobs:
        label = blob.labels[0]
        region = labels[blob.y0 : blob.y1, blob.x0 : blob.x1] == label
        bounds = [0, *cut_candidates(region, line_height), blob.width]
        for a, b in zip(bounds[:-1], bounds[1:]):
            rows = np.flatnonzero(region[:, a:b].any(axis=1))
            parts.append(_Part(label, blob.x0 + a, blob.x0 + b, blob.y0 + rows[0], blob.y0 + rows[-1] + 1))
    if not parts:
        return []
    parts.sort(key=lambda p: (p.x0 + p.x1) / 2)
    candidates: list[tuple[int, int, int, int, np.ndarray]] = []  # (first part, end part, x, y, mask)
    for i in range(len(parts)):
        for j in range(i + 1, min(len(parts), i + MAX_PARTS) + 1):
            group = parts[i:j]
            x0, x1 = min(p.x0 for p in group), max(p.x1 for p in group)
            if j > i + 1 and x1 - x0 > MAX_DIGIT_WIDTH * line_height:
                break
            y0, y1 = min(p.y0 for p in group), max(p.y1 for p in group)
            mask = np.zeros((y1 - y0, x1 - x0), dtype=bool)
            for p in group:
                mask[:, p.x0 - x0 : p.x1 - x0] |= labels[y0:y1, p.x0 : p.x1] == p.label
            mask = select_digit(mask)  # slivers of a neighbour's stroke fall away
            rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
            mask = mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
            candidates.append((i, j, x0 + cols[0], y0 + rows[0], mask))
    confidences = score(np.stack([to_mnist(c[4]) for c in candidates]))
    best = np.full(len(parts) + 1, -np.inf)
    best[0] = 0.0
    choice: list[tuple[int, int | None] | None] = [None] * (len(parts) + 1)
    for k, (i, j, _, _, mask) in sorted(enumerate(candidates), key=lambda kc: kc[1][1]):
        if j == i + 1 and parts[i].y1 - parts[i].y0 < SMALL_PART * line_height and best[i] - SKIP_PENALTY > best[j]:
            best[j], choice[j] = best[i] - SKIP_PENALTY, (i, None)  # a short part on its own: dust, a stray mark
        height, width = mask.shape
        value = best[i] + float(np.log(max(confidences[k], 1e-6))) + DIGIT_BONUS
        value -= SHORT_PENALTY * max(0.0, SMALL_PART - height / line_height) / SMALL_PART
        value -= WIDE_PENALTY * max(0.0, width / height - WIDE_ASPECT)
        if value > best[j]:
            best[j], choice[j] = value, (i, k)
    found = []
    end = len(parts)
    while end > 0:
        start, skipped = choice[end]  # type: ignore[misc]
        if skipped is not None:
            found.append(candidates[skipped][2:])
        end = start
    return found[::-1]
