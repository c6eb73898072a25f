"""A photo of one line of handwritten digits -> boxes -> one MNIST-like 28x28 image per digit.

Reuses preprocess's stages (load, polarity, flatten, threshold, to_mnist) and adds the line logic:
faint digits next to clear ones kept as ink (line_ink), connected components (OpenCV), dropping specks,
ruled lines and dark parts at the photo's edge outside the line's rows (drop_edge_debris), cutting apart two
lines of writing whose digits touch (cut_two_line_parts), grouping the parts into lines (split_lines), merging
the parts of broken digits (components stacked in x), and splitting touching or overlapping digits by recognition:
candidate cuts sit at ink-profile minima and on a regular grid, each cut is a path from top to bottom that
crosses as little ink as it can (so it can lean with the writing and pass between overlapping digits) or a
straight line (down the stroke that two overlapping digits share), and dynamic programming picks the cuts
whose pieces the classifier reads most confidently (the classifier was trained to doubt digit pairs and
fragments, so a wrong cut reads badly). Given a pair classifier (pairs.py), a piece may also be read as two
digits that overlap too deeply for any cut.
A piece whose loops a bold pen or a blur filled in is thresholded again inside itself first (reopened).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import cv2
import numpy as np

from .errors import ImageError
from .pairs import NO_PAIR
from .preprocess import (
    MIN_SIDE,
    MIN_SMOOTH_SIGMA,
    MIN_WORK_SIDE,
    THIN_FROM,
    WEAK_FRACTION,
    drop_frames,
    ink_strength,
    load_gray_sized,
    parts,
    reopened,
    rewind,
    select_digit,
    smooth_sigma,
    stroke_width,
    thin_kept,
    threshold,
    to_mnist,
    window_of,
)

READ_SIDE = 1024  # working size for a line: enough for 10+ digits of reasonable height
READ_ZOOM_BELOW = 48  # digits shorter than this (px at READ_SIDE) on a shrunk photo are read again, closer,
READ_ZOOM_TO = 96  # from the photo loaded so that they stand this high
# Digits under this many times the light blur's sigma (preprocess.smooth_sigma, by the picture's size) are read
# from ink blurred for their size instead (a sigma of a SHARP_LINE-th of their height, at least MIN_SMOOTH_SIGMA)
SHARP_LINE = 20.0
MERGE_OVERLAP = 0.5  # parts overlapping in x by half the narrower one's width belong to one digit
DIGIT_ASPECT = 0.62  # a typical handwritten digit is this wide for its height (slant included)
MAX_DIGITS_PER_BLOB = 8
SMALL_PART = 0.55  # shorter than this share of the line height: a part of a digit (a bar, a flag) or dust
# merge_broken: a part shorter than this share of the line height that (nearly) touches a digit is a piece of it
# (the detached tail of a bold 2 and the loop of a broken 6 stood 0.57-0.59 of the line high; its digits about 1.0)
BROKEN_PART = 0.7
FAINT_CONTRAST = 0.15  # next to clear digits, a digit-sized stroke this much darker than its paper is ink too
FAINT_MIN_AREA = 0.03  # faint ink (x line height^2) that makes a faint part with clear ink worth a look
MAX_FAINT_HEIGHT = 1.5  # ... but not one taller than this share of the line height (a shadow's edge)
LINE_LIKE = 10  # a part this many times wider than tall is a drawn line, not digits (8 touching ones are ~5)
# Lines of digits one under another: the rows that digit-tall parts cover, the slant of the writing taken out,
# leave a gap of more than this share of the line height between lines (one line's digits overlap in rows)
LINE_GAP = 0.1
SMALL_LINE = 0.3  # a number written smaller than the others stands at least this share of the line height
# Lines written closer than LINE_GAP (rows overlapping): a group of rows taller than TALL_ROWS line heights holds
# more than one line: its parts of a whole digit's height (WHOLE_PART to TALL_PART line heights: not a digit's
# broken-off loop, nor a part joining two lines) whose level centres lie more than CENTRE_GAP line heights
# apart, sorted top to bottom, start a new line there. A single part that tall may be two lines' digits touching
# (cut_two_line_parts).
TALL_ROWS = 1.6
WHOLE_PART = 0.75
TALL_PART = 1.3
CENTRE_GAP = 0.6

Score = Callable[[np.ndarray], np.ndarray]  # (K, 28, 28) -> confidence of each, in (0, 1]
# (K, 28, 28) -> log probabilities (K, 101): the pairs 00-99, then pairs.NO_PAIR
PairScore = Callable[[np.ndarray], np.ndarray]


@dataclass
class Piece:
    """One digit of the line: its box (x, y, w, h) in the input's pixels and its 28x28 MNIST-like image.

    `reading` is (digit, confidence) when the pair classifier read this digit as half of an overlapping pair;
    None when the digit classifier is to read `image`.
    """

    box: tuple[int, int, int, int]
    image: np.ndarray
    reading: tuple[int, float] | None = None
    line: int = 0  # which line of the photo, from the top


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


def moving_average(values: np.ndarray, size: int) -> np.ndarray:
    """scipy.ndimage.uniform_filter1d(values, size) exactly (its reflected ends, its window for an even size)."""
    left = size // 2
    padded = np.pad(values.astype(np.float64), (left, size - 1 - left), mode="symmetric")
    sums = np.concatenate([[0.0], np.cumsum(padded)])
    return ((sums[size:] - sums[:-size]) / size).astype(np.float32)


def components(mask: np.ndarray) -> tuple[np.ndarray, list[_Blob], np.ndarray]:
    """Label 8-connected components; return (labels, one blob per component, areas indexed by label)."""
    labels, areas, boxes = parts(mask)
    blobs = [
        _Blob(cols.start, cols.stop, rows.start, rows.stop, [i + 1]) for i, (rows, cols) in enumerate(boxes)
    ]
    return labels, blobs, areas


def clean(blobs: list[_Blob], areas: np.ndarray) -> tuple[list[_Blob], float]:
    """Drop dust and ruled lines; return the digit-sized blobs and the line height they imply."""
    if not blobs:
        return [], 0.0
    # An underline or a ruled line can hold more ink than four digits: the line height comes from the other parts.
    shaped = [b for b in blobs if b.width <= LINE_LIKE * b.height]
    if not shaped:  # only drawn lines (a ruled line alone was cut into 67 "4"s, each as tall as the line)
        return [], 0.0
    largest = max(areas[b.labels[0]] for b in shaped)
    big = [b for b in shaped if areas[b.labels[0]] >= 0.25 * largest]
    line_height = float(np.median([b.height for b in big]))
    kept = []
    for b in blobs:
        flat = b.height < 0.3 * line_height
        if flat and b.width > 2 * line_height:
            continue  # a ruled line or the page's edge, not a digit
        if flat and areas[b.labels[0]] < 0.05 * largest and b.width < 0.25 * line_height:
            continue  # dust, a dot (a short dash may be the bar of a 5: merge_broken decides)
        kept.append(b)
    return kept, line_height


def drop_edge_debris(blobs: list[_Blob], shape: tuple[int, ...], line_height: float) -> list[_Blob]:
    """Drop parts that touch the picture's edge and lie mostly outside the rows of every line of writing: a
    shadow's corner, the edge of a table or of the next sheet, not a digit (a digit the frame cuts still stands in
    its line, the bottom line of several too).

    A line's rows are one line height around a line through the centres of its digit-tall parts inside the
    picture (_middle_line); the lines are those parts grouped by split_lines."""

    def at_edge(b: _Blob) -> bool:
        return b.x0 == 0 or b.y0 == 0 or b.x1 == shape[1] or b.y1 == shape[0]

    tall = [b for b in blobs if b.height >= SMALL_PART * line_height and not at_edge(b)]
    if not tall:
        return blobs
    middles = [_middle_line(line) for line in split_lines(tall, line_height)]

    def in_a_line(b: _Blob) -> bool:
        for slope, intercept in middles:
            middle = intercept + slope * (b.x0 + b.x1) / 2
            in_line = min(b.y1, middle + line_height / 2) - max(b.y0, middle - line_height / 2)
            if in_line >= 0.5 * b.height:
                return True
        return False

    return [b for b in blobs if not at_edge(b) or in_a_line(b)]


def _middle_line(parts: list[_Blob]) -> tuple[float, float]:
    """(slope, intercept) of a line through the centres of a line's parts, following a line that rises or falls
    (Theil-Sen: the median of the slopes between pairs, which one part out of line does not move)."""
    xs = np.array([(b.x0 + b.x1) / 2 for b in parts])
    ys = np.array([(b.y0 + b.y1) / 2 for b in parts])
    pairs = [(j, i) for i in range(len(parts)) for j in range(i) if xs[i] != xs[j]]
    slope = float(np.median([(ys[i] - ys[j]) / (xs[i] - xs[j]) for j, i in pairs])) if pairs else 0.0
    return slope, float(np.median(ys - slope * xs))


def split_lines(blobs: list[_Blob], line_height: float) -> list[list[_Blob]]:
    """The parts grouped into lines of writing, top to bottom; one group (all of them) for one line.

    The writing's slant is the median slope between digit-tall parts side by side (each with its nearest
    neighbour to the right among those level with it). With it taken out, the rows the digit-tall parts of one
    line cover overlap; a gap of more than LINE_GAP line heights in them starts a new line. Parts of a number
    written smaller (at least SMALL_LINE of the line height) that stand clear of every such line's rows make
    lines of their own the same way. Other shorter parts (the bar of a 5, a dot) join the line whose middle is
    nearest theirs, unless they stand clear of every line's rows: between lines, they belong to none."""
    tall = [b for b in blobs if b.height >= SMALL_PART * line_height]
    if len(tall) < 2:
        return [blobs]
    slope = _writing_slope(tall)

    def level_rows(parts: list[_Blob]) -> tuple[np.ndarray, np.ndarray]:
        """Each part's top and bottom row, as if the line were level."""
        xs = np.array([(b.x0 + b.x1) / 2 for b in parts])
        return np.array([b.y0 for b in parts]) - slope * xs, np.array([b.y1 for b in parts]) - slope * xs

    margin = LINE_GAP * line_height

    def clear_of(spans: list[tuple[float, float]], top: float, bottom: float) -> bool:
        """Whether the (level) rows top..bottom stand more than `margin` away from each span of rows."""
        return all(top - hi > margin or lo - bottom > margin for lo, hi in spans)

    tops, bottoms = level_rows(tall)
    indices = [
        part
        for group in _row_groups(tops, bottoms, margin)
        for part in _close_lines(group, tops, bottoms, tall, line_height)
    ]
    groups = [[tall[k] for k in g] for g in indices]
    covered = [(tops[g].min(), bottoms[g].max()) for g in indices]
    # A number written at half the others' height joined the nearest line as "short parts" and both read as a
    # jumble: its digits, clear of every line's rows, are a line (or lines) of their own.
    small = [b for b in blobs if SMALL_LINE * line_height <= b.height < SMALL_PART * line_height]
    if small:
        small_tops, small_bottoms = level_rows(small)
        apart = [k for k in range(len(small)) if clear_of(covered, small_tops[k], small_bottoms[k])]
        if apart:
            for g in _row_groups(small_tops[apart], small_bottoms[apart], margin):
                groups.append([small[apart[k]] for k in g])
    if len(groups) == 1:
        return [blobs]
    middles = [float(np.median(np.add(*level_rows(g)) / 2)) for g in groups]
    order = np.argsort(middles)
    lines: list[list[_Blob]] = [[] for _ in groups]
    rows = [(float(t.min()), float(u.max())) for t, u in map(level_rows, groups)]  # each line's, level
    for b in blobs:
        (top,), (bottom,) = level_rows([b])
        if clear_of(rows, top, bottom) and b.height < SMALL_LINE * line_height:
            # in no line's rows (an underline, a dash between lines, a slip of the pen): joined to the nearest
            # line, it was merged with the digit over or under it ("37" underlined read "32")
            continue
        level_y = (b.y0 + b.y1) / 2 - slope * (b.x0 + b.x1) / 2
        lines[int(np.argmin([abs(level_y - middles[i]) for i in order]))].append(b)
    return [line for line in lines if line]  # a group's parts may all lie nearer another's middle


def _close_lines(
    group: list[int], tops: np.ndarray, bottoms: np.ndarray, parts: list[_Blob], line_height: float
) -> list[list[int]]:
    """A group of rows (indices into `parts`, level `tops` and `bottoms`) split into the lines written closer
    than LINE_GAP that it holds: where it covers more than TALL_ROWS line heights, at each gap of more than
    CENTRE_GAP line heights between the sorted level centres of its parts of a whole digit's height. The others
    go to the line whose centres lie nearest theirs."""
    if bottoms[group].max() - tops[group].min() <= TALL_ROWS * line_height:
        return [group]
    centre = {k: (tops[k] + bottoms[k]) / 2 for k in group}
    whole = [k for k in group if WHOLE_PART * line_height <= parts[k].height <= TALL_PART * line_height]
    single = sorted(whole, key=centre.__getitem__)
    lines: list[list[int]] = [single[:1]] if single else []
    for previous, k in zip(single, single[1:]):
        if centre[k] - centre[previous] > CENTRE_GAP * line_height:
            lines.append([])
        lines[-1].append(k)
    if len(lines) < 2:
        return [group]
    middles = [float(np.median([centre[k] for k in line])) for line in lines]
    for k in group:
        if k not in whole:
            lines[int(np.argmin([abs(centre[k] - m) for m in middles]))].append(k)
    return lines


def cut_two_line_parts(
    blobs: list[_Blob], labels: np.ndarray, areas: np.ndarray, line_height: float
) -> tuple[list[_Blob], np.ndarray]:
    """Lines written so close that a digit of one touches a digit of the next: the part they make, at least
    TALL_ROWS line heights tall and holding two lines (_two_lines_in), is cut in two along the left-to-right path
    near its middle row that crosses the least ink (cut_path, across), so that split_lines finds each half in its
    own line. `labels` is relabelled in place (each lower half a new label); returns the parts and the ink of
    every label, the new ones at the end."""
    tall = [b for b in blobs if b.height >= TALL_ROWS * line_height and len(b.labels) == 1]
    if not tall:  # the common case: no part two lines tall, and no slope to measure
        return blobs, areas
    # the slope of the writing from the parts of one digit's height (a part across two lines is level with both)
    whole = [b for b in blobs if WHOLE_PART * line_height <= b.height <= TALL_PART * line_height]
    slope = _writing_slope(whole) if len(whole) > 1 else 0.0
    out: list[_Blob] = []
    cuts: list[tuple[int, int]] = []  # (label cut, ink it gave to its new label len(areas) + index)
    for blob in blobs:
        if blob in tall and _two_lines_in(blob, whole, line_height, slope):
            halves = _cut_across(labels, blob, (blob.y0 + blob.y1) / 2, line_height, len(areas) + len(cuts))
            if halves is not None:
                (above, below), moved = halves
                cuts.append((blob.labels[0], moved))
                out += [above, below]
                continue
        out.append(blob)
    grown = np.concatenate([areas, np.asarray([moved for _, moved in cuts], dtype=areas.dtype)])
    for label, moved in cuts:
        grown[label] -= moved
    return out, grown


def _two_lines_in(blob: _Blob, whole: list[_Blob], line_height: float, slope: float) -> bool:
    """Whether a tall part holds two lines' digits rather than one tall digit: parts of a whole digit's height
    (`whole`) stand level with its upper half and others with its lower half, their middles a third of a line
    height or more above and below its middle row, each taken along the writing's `slope` to the tall part's
    column (on a slanted line the neighbours of one tall digit stand higher on one side and lower on the other).
    A tall digit touching its neighbour is as wide as two lines' digits touching, so width does not tell them
    apart."""
    middle, column = (blob.y0 + blob.y1) / 2, (blob.x0 + blob.x1) / 2
    level = [(b.y0 + b.y1) / 2 - slope * ((b.x0 + b.x1) / 2 - column) for b in whole]
    inside = [c for c in level if blob.y0 <= c <= blob.y1]
    margin = line_height / 3
    return any(c <= middle - margin for c in inside) and any(c >= middle + margin for c in inside)


def _cut_across(
    labels: np.ndarray, blob: _Blob, row: float, line_height: float, new_label: int
) -> tuple[tuple[_Blob, _Blob], int] | None:
    """Cut one part's ink (`blob`, one label) along the left-to-right path near `row` that crosses the least ink:
    the ink under the path gets `new_label` in `labels`. Returns the two halves and the ink moved, or None when
    one half would hold less than a sliver of ink (MIN_PIECE_AREA line heights squared)."""
    window = labels[blob.y0 : blob.y1, blob.x0 : blob.x1]
    ink = window == blob.labels[0]
    reach = max(1, int(CUT_REACH * line_height))
    path = cut_path(ink.T, int(round(row)) - blob.y0, reach)  # the row of the cut in each column
    below = ink & (np.arange(ink.shape[0])[:, None] > path[None, :])
    above = ink & ~below
    sliver = MIN_PIECE_AREA * line_height**2
    if below.sum() < sliver or above.sum() < sliver:
        return None
    window[below] = new_label
    return (_box_of(above, blob, blob.labels[0]), _box_of(below, blob, new_label)), int(below.sum())


def _box_of(mask: np.ndarray, blob: _Blob, label: int) -> _Blob:
    """The blob of the ink `mask` (in `blob`'s box) that carries `label`."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    x0, x1, y0, y1 = (int(v) for v in (cols[0], cols[-1] + 1, rows[0], rows[-1] + 1))
    return _Blob(blob.x0 + x0, blob.x0 + x1, blob.y0 + y0, blob.y0 + y1, [label])


def _writing_slope(tall: list[_Blob]) -> float:
    """The median slope between digit-tall parts side by side: each with its nearest neighbour to the right
    among the parts level with it (overlapping it in rows by half the shorter one's height)."""
    xs = np.array([(b.x0 + b.x1) / 2 for b in tall])
    ys = np.array([(b.y0 + b.y1) / 2 for b in tall])
    slopes = []
    for i, b in enumerate(tall):
        level = [
            j
            for j, c in enumerate(tall)
            if xs[j] > xs[i] and min(b.y1, c.y1) - max(b.y0, c.y0) > 0.5 * min(b.height, c.height)
        ]
        if level:
            j = min(level, key=lambda j: xs[j])
            slopes.append((ys[j] - ys[i]) / (xs[j] - xs[i]))
    return float(np.median(slopes)) if slopes else 0.0


def _row_groups(tops: np.ndarray, bottoms: np.ndarray, gap: float) -> list[list[int]]:
    """Indices of parts whose rows overlap or nearly do, group by group from the top: a gap of more than `gap`
    between the rows covered so far and the next part's top starts a new group."""
    order = np.argsort(tops)
    groups, reach = [[int(order[0])]], bottoms[order[0]]  # reach: the lowest row the current group covers
    for k in order[1:]:
        if tops[k] - reach > gap:
            groups.append([int(k)])
            reach = bottoms[k]
        else:
            groups[-1].append(int(k))
            reach = max(reach, bottoms[k])
    return groups


def _union(a: _Blob, b: _Blob) -> _Blob:
    return _Blob(min(a.x0, b.x0), max(a.x1, b.x1), min(a.y0, b.y0), max(a.y1, b.y1), a.labels + b.labels)


def merge_broken(blobs: list[_Blob], areas: np.ndarray, line_height: float) -> list[_Blob]:
    """Put the parts of broken digits together: the detached bar of a 5, a 4 in two strokes, a skipping pen.

    Parts stacked in x (overlapping by half the narrower one's width) are one digit. Then a short part
    (under BROKEN_PART of the line height) joins its nearest digit when it touches or nearly touches it
    in x; a short part far from everything is kept only if it has a digit's ink, else it is dust. A joined
    part is not glued for good: split_and_read still cuts it off where it reads better apart.
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
    big = [b for b in merged if b.height >= BROKEN_PART * line_height]
    small = [b for b in merged if b.height < BROKEN_PART * line_height]
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
    profile = moving_average(mask.sum(axis=0), 3)
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


def line_ink(gray: np.ndarray, ink: np.ndarray | None = None) -> np.ndarray:
    """Ink mask of a line: preprocess's threshold, plus the digits that light or a dry pen left too faint for it.

    A lone picture needs INK_CONTRAST somewhere so that shadows and blank pages stay blank; in a line
    that holds clear digits, a fainter stroke (down to FAINT_CONTRAST) is a digit too when it is one:
    a connected stroke about as tall as the line's digits (_digit_sized). One that touches a clear digit
    (a faint 2 leaning on a dark 6) counts by what lies beyond a margin round the clear ink (faint_beyond).
    Outside the clear ink's rows, faint digits side by side are a faint line of their own (_faint_line).
    """
    ink = ink_strength(gray) if ink is None else ink
    clear = threshold(ink)
    mask = drop_frames(clear)  # a box drawn round the digits is no digit, nor is it faint ink (below)
    if not mask.any():
        return mask  # a blank page stays blank
    _, blobs, areas = components(mask)
    _, line_height = clean(blobs, areas)
    # The same hysteresis as preprocess's threshold, at the faint cut: strong pixels and the weaker ones they touch.
    labels, faint_areas, objects = parts(ink > FAINT_CONTRAST * WEAK_FRACTION)
    strong = ink > FAINT_CONTRAST
    seeded = np.zeros(len(objects) + 1, dtype=bool)
    seeded[labels[strong]] = True
    seeded[0] = False  # the paper
    touching = np.zeros_like(seeded)
    touching[labels[clear]] = True  # parts of clear digits keep the threshold's shape
    inked_rows = np.flatnonzero(mask.any(axis=1))
    band = slice(int(inked_rows[0]), int(inked_rows[-1]) + 1)
    loose = [int(label) for label in np.flatnonzero(seeded & ~touching)]
    digits = [label for label in loose if _digit_sized(objects[label - 1], gray.shape, band, line_height)]
    digits += _faint_line([label for label in loose if label not in digits], objects, gray.shape, line_height)
    out = mask | np.isin(labels, digits) if digits else mask.copy()  # faint_beyond reads `mask` as it was
    clear_areas = np.bincount(labels[clear], minlength=len(seeded))
    leaning = [
        label
        for label in np.flatnonzero(seeded & touching)
        if faint_areas[label] - clear_areas[label] >= FAINT_MIN_AREA * line_height**2
    ]
    margin = 2.0 * max(1.0, stroke_width(mask)) if leaning else 0.0  # most lines have none to search
    for label in leaning:
        box = objects[label - 1]
        for core_box, part in faint_beyond(labels[box] == label, clear[box], strong[box], margin, box):
            if _digit_sized(core_box, gray.shape, band, line_height):
                out[box] |= part
    return out


def faint_beyond(
    part: np.ndarray, clear: np.ndarray, strong: np.ndarray, margin: float, box: tuple[slice, ...]
) -> list[tuple[tuple[slice, slice], np.ndarray]]:
    """The faint digits of `part` (at `box` in the picture) that lean on its clear ink, each as the box of its
    core in the picture and its mask in `part`'s frame.

    A core is a connected run of faint-strong pixels farther than `margin` from the clear ink (a clear stroke's
    faint rim is thinner, so nothing of it is left); the digit is its core grown back by `margin` inside `part`,
    so that it keeps its shape up to the clear ink. The core's box says whether it is a digit: grown back, a
    speck of noise by a clear digit would reach down its rim to a digit's height.
    """
    far = part & ~clear & strong
    if far.any():
        far &= cv2.distanceTransform((~clear).astype(np.uint8), cv2.DIST_L2, 3) > margin
    if not far.any():
        return []
    grown = part & ~clear & (cv2.distanceTransform((~far).astype(np.uint8), cv2.DIST_L2, 3) <= margin)
    labels, _, objects = parts(grown)
    rows, cols = box
    out = []
    for k in range(len(objects)):
        digit = labels == k + 1
        core = digit & far
        core_rows, core_cols = np.flatnonzero(core.any(1)), np.flatnonzero(core.any(0))
        if len(core_rows):
            core_box = (
                slice(rows.start + int(core_rows[0]), rows.start + int(core_rows[-1]) + 1),
                slice(cols.start + int(core_cols[0]), cols.start + int(core_cols[-1]) + 1),
            )
            out.append((core_box, digit))
    return out


def _faint_line(
    labels: list[int], objects: list[tuple[slice, slice]], shape: tuple[int, ...], line_height: float
) -> list[int]:
    """The faint parts outside the clear ink's rows that make a line of writing of their own: digit-sized, each
    with another such part level with it (sharing half the shorter one's rows) and under a line height away.

    A second number written with a lighter hand, or whose thin strokes faded as a big photo was shrunk to the
    working size, was dropped whole beside a clear one. One faint digit-sized patch out there is more
    likely paper texture than a number; two side by side, level, are a line.
    """
    everywhere = slice(0, shape[0])  # the band test is the point here: these parts lie outside it
    boxes = {label: objects[label - 1] for label in labels}
    sized = [label for label, box in boxes.items() if _digit_sized(box, shape, everywhere, line_height)]

    def side_by_side(a: tuple[slice, slice], b: tuple[slice, slice]) -> bool:
        shared = min(a[0].stop, b[0].stop) - max(a[0].start, b[0].start)
        shorter = min(a[0].stop - a[0].start, b[0].stop - b[0].start)
        gap = max(a[1].start - b[1].stop, b[1].start - a[1].stop)
        return shared >= 0.5 * shorter and gap < line_height

    return [a for a in sized if any(b != a and side_by_side(boxes[a], boxes[b]) for b in sized)]


def _digit_sized(box: tuple[slice, ...], shape: tuple[int, ...], band: slice, line_height: float) -> bool:
    """Is a faint part a digit of the line: inside the picture, and as tall as a digit inside the line's rows?

    The edge of a shadow or of a vignette is faint and tall too, but runs into the border of the picture;
    paper texture or JPEG noise can gather into a faint patch, but rarely one standing in the line's band.
    """
    rows, cols = box
    height = rows.stop - rows.start
    in_band = min(rows.stop, band.stop) - max(rows.start, band.start)
    inside = rows.start > 0 and cols.start > 0 and rows.stop < shape[0] and cols.stop < shape[1]
    # A digit's height, at most half of it outside the band: a small digit sits on the baseline, below the band
    # its taller neighbours' clear ink spans.
    tall = SMALL_PART * line_height <= height <= MAX_FAINT_HEIGHT * line_height and in_band >= 0.5 * height
    return inside and tall


def segment(image: Any, score: Score | None = None, pairs: PairScore | None = None) -> list[Piece]:
    """Find the digits of one line, left to right. `score` (a classifier's confidences) picks how to split blobs;
    with `pairs` too, a blob piece may read as two overlapping digits."""
    gray, size = load_gray_sized(image, max_side=READ_SIDE, min_side=MIN_WORK_SIDE)
    return _segment(gray, size, score, pairs, image)


def _closer_line(
    image: Any, gray: np.ndarray, size: tuple[int, int], blobs: list[_Blob], line_height: float
) -> tuple[np.ndarray, tuple[int, int, float]] | None:
    """When the photo was shrunk to READ_SIDE and its digits (`blobs`) stand under READ_ZOOM_BELOW px there: the
    window around them (a line height of margin), cut from the photo loaded so that they stand READ_ZOOM_TO px,
    with where it lies in the photo (x, y of its corner, the photo's pixels per window pixel); else None."""
    if not blobs or line_height >= READ_ZOOM_BELOW or max(size) < 1.25 * max(gray.shape):
        return None
    side = min(max(size), round(max(gray.shape) * READ_ZOOM_TO / line_height))
    if side < 1.25 * max(gray.shape):
        return None
    margin = line_height
    rows = (min(b.y0 for b in blobs) - margin, max(b.y1 for b in blobs) + margin)
    cols = (min(b.x0 for b in blobs) - margin, max(b.x1 for b in blobs) + margin)
    cut = window_of(image, gray.shape, side, rows, cols)
    if cut is None:
        return None
    window, (y0, x0), large_shape = cut
    if min(window.shape[:2]) < MIN_SIDE:
        # too thin to load (a 20 x 20,000 strip's window was 3 px wide): the photo was refused for its size
        return None
    per_pixel = size[0] / large_shape[1]  # the photo's pixels per pixel of the large image and the window
    return window, (round(x0 * per_pixel), round(y0 * per_pixel), per_pixel)


def _placed(box: tuple[int, int, int, int], x0: int, y0: int, per_pixel: float) -> tuple[int, int, int, int]:
    """A box in a window's pixels -> the photo's, the window's corner at (x0, y0) there."""
    x, y, w, h = box
    return (
        x0 + round(x * per_pixel),
        y0 + round(y * per_pixel),
        max(1, round(w * per_pixel)),
        max(1, round(h * per_pixel)),
    )


def _segment(
    gray: np.ndarray,
    size: tuple[int, int],
    score: Score | None,
    pairs: PairScore | None,
    image: Any = None,
) -> list[Piece]:
    """segment() on a working image of a photo of `size`; with the photo itself (`image`), a line written small
    on it is read again from a closer look (_closer_line)."""
    width, height = size
    back = np.array([width / gray.shape[1], height / gray.shape[0]])
    ink = ink_strength(gray)
    labels, blobs, areas, line_height = _line_parts(gray, ink)
    if not labels.any() and image is not None and max(size) >= THIN_FROM * max(gray.shape) and rewind(image):
        # blank at the working size: a fine pen's strokes may have faded in the shrinking (preprocess.thin_kept)
        return _segment(thin_kept(image, gray.shape), size, score, pairs)
    closer = None if image is None else _closer_line(image, gray, size, blobs, line_height)
    if closer is not None:
        # a line written small on a big photo: read from a window around it, at more pixels
        window, (x0, y0, per_pixel) = closer
        near, near_size = load_gray_sized(window, max_side=READ_SIDE, min_side=MIN_WORK_SIDE)
        return [
            replace(piece, box=_placed(piece.box, x0, y0, per_pixel))
            for piece in _segment(near, near_size, score, pairs)
        ]
    sharp = max(MIN_SMOOTH_SIGMA, line_height / SHARP_LINE)
    if blobs and sharp < smooth_sigma(gray.shape):
        # the light blur, sized for the picture, would fill small digits' loops (a 4's triangle read as a 1):
        # the ink again, blurred for the digits' size
        ink = ink_strength(gray, sigma=sharp)
        labels, blobs, areas, line_height = _line_parts(gray, ink)
    pieces: list[Piece] = []
    blobs, areas = cut_two_line_parts(blobs, labels, areas, line_height)
    lines = split_lines(blobs, line_height)
    for number, line in enumerate(lines):
        own_height = line_height if len(lines) == 1 else _height_of(line, line_height)
        pieces += _read_line(line, labels, areas, ink, own_height, back, score, pairs, number)
    return pieces


def _line_parts(gray: np.ndarray, ink: np.ndarray) -> tuple[np.ndarray, list[_Blob], np.ndarray, float]:
    """(labels, the parts that may be digits, every part's area, the line height) of the ink of a working image."""
    mask = line_ink(gray, ink)
    labels, blobs, areas = components(mask)
    blobs, line_height = clean(blobs, areas)
    return labels, drop_edge_debris(blobs, mask.shape, line_height), areas, line_height


def _height_of(line: list[_Blob], line_height: float) -> float:
    """The height of the digits of one line of several: the photo's line height, but for a number written smaller
    than the others (none of its parts digit-tall for the photo) the median height of its parts that
    split_lines took for digits."""
    small = [b.height for b in line if b.height >= SMALL_LINE * line_height]
    if not small or any(b.height >= SMALL_PART * line_height for b in line):
        return line_height
    return float(np.median(small))


def _read_line(
    blobs: list[_Blob],
    labels: np.ndarray,
    areas: np.ndarray,
    ink: np.ndarray,
    line_height: float,
    back: np.ndarray,
    score: Score | None,
    pairs: PairScore | None,
    number: int,
) -> list[Piece]:
    """The digits of one line's parts, left to right, boxes in the photo's pixels (`back`: per working pixel)."""
    pieces: list[Piece] = []
    for blob in merge_broken(blobs, areas, line_height):
        _check_time()
        region = np.isin(labels[blob.y0 : blob.y1, blob.x0 : blob.x1], blob.labels)
        found: list[tuple[int, np.ndarray, tuple[int, float] | None]]
        if score is None:
            found = [(x, piece, None) for x, piece in _split_by_width(region, blob)]
        else:
            found = split_and_read(
                region,
                max(line_height, 0.5 * blob.height),
                score,
                ink[blob.y0 : blob.y1, blob.x0 : blob.x1],
                pairs,
            )
        for x_offset, piece, reading in found:
            rows, cols = np.flatnonzero(piece.any(1)), np.flatnonzero(piece.any(0))
            x, y = blob.x0 + x_offset + cols[0], blob.y0 + rows[0]
            w, h = cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1
            box = (
                round(x * back[0]),
                round(y * back[1]),
                max(1, round(w * back[0])),
                max(1, round(h * back[1])),
            )
            pieces.append(Piece(box, to_mnist(piece), reading, number))
    return pieces


def _split_by_width(region: np.ndarray, blob: _Blob) -> list[tuple[int, np.ndarray]]:
    """With no classifier to ask: one digit unless the blob is clearly wide for its height, then cut it into as
    many pieces as its width holds digits."""
    estimate = blob.width / (DIGIT_ASPECT * blob.height)
    if estimate < 1.35:
        return [(0, region)]
    return split(region, int(min(MAX_DIGITS_PER_BLOB, round(estimate))))


# ------------------------------------------------------------------------------ segmentation by recognition

CUT_GRID = 0.18  # candidate cuts every this share of the line height (plus every ink-profile minimum)
CUT_REACH = 0.3  # a cut path may wander this share of the line height left or right of its column
CUT_SIDEWAYS = 0.08  # cost of one pixel sideways, against 1 for each ink pixel crossed
CUT_STRAY = 0.5  # cost per row of being `reach` away from the cut's column (quadratic in the distance)
MAX_PIECE_WIDTH = 1.35  # no digit is wider than this share of the line height (a pair of them is)
MIN_PIECE_AREA = 0.02  # a piece with less ink than this share of the line height squared is a sliver
CUT_INK_COST = 0.4  # log-confidence a cut costs per stroke it crosses (digits rarely need it)
# Log-confidence each piece costs: a digit whose parts each read clearly (the stem and loop of a pen 6 as "10")
# stays whole unless it reads as that digit much worse than they do.
PIECE_COST = 1.0
# A piece the digit classifier reads as one digit with confidence p is rarely a pair: reading it as a pair
# costs this times -log(1 - p) (an 8 or a 0 that the pair classifier, unsure among many pairs, read as "86").
SINGLE_DOUBT = 0.5
SHORT_PIECE_COST = 2.0  # log-confidence a piece shorter than SMALL_PART costs where a wide blob needs one
CUT_DISTINCT = 0.04  # two cuts closer than this share of the line height (on average) cut the same pieces
PAIR_MIN_WIDTH = 0.45  # only a piece at least this share of the line height wide is asked if it is a pair


def cut_path(mask: np.ndarray, column: int, reach: int) -> np.ndarray:
    """The column, row by row, of the top-to-bottom path near `column` that crosses the least ink.

    Dynamic programming over rows: each row the path moves at most one pixel sideways (CUT_SIDEWAYS each),
    pays 1 per ink pixel and CUT_STRAY x (distance / reach)^2 for straying, and stays within `reach` of
    `column`. Pixels at or left of the path go left.
    """
    return cut_paths(mask, [column], reach)[0]


def cut_paths(mask: np.ndarray, columns: list[int], reach: int) -> list[np.ndarray]:
    """cut_path() for several columns at once: one pass over the rows for all of them (the same paths)."""
    height, width = mask.shape
    if not columns:
        return []
    offsets = np.arange(-reach, reach + 1)
    positions = np.asarray(columns)[:, None] + offsets[None, :]  # (paths, 2 * reach + 1) columns of the image
    inside = (positions >= 0) & (positions < width)
    # Ink costs 1 a pixel; straying from the column costs quadratically, so the path cuts here, not at the edge.
    # Beyond the image the cost is infinite: no path goes there.
    stray = CUT_STRAY * (offsets / reach) ** 2
    ink = mask[:, np.clip(positions, 0, width - 1)].astype(np.float32)  # (rows, paths, span)
    cost = np.where(inside, ink + stray, np.inf)
    moves = np.zeros(cost.shape, dtype=np.int8)
    padded = np.full((len(columns), cost.shape[2] + 2), np.inf)  # the best total so far, inf on both sides
    padded[:, 1:-1] = cost[0]
    for row in range(1, height):
        total, left, right = padded[:, 1:-1], padded[:, :-2] + CUT_SIDEWAYS, padded[:, 2:] + CUT_SIDEWAYS
        # From the left, from above or from the right; on a tie the first of those, as np.argmin would choose.
        move = np.where(total < left, 0, -1)
        best = np.minimum(left, total)
        moves[row] = np.where(right < best, 1, move)
        padded[:, 1:-1] = np.minimum(best, right) + cost[row]
    total = padded[:, 1:-1]
    paths = []
    for k in range(len(columns)):
        path = np.empty(height, dtype=np.int64)
        position = int(np.argmin(total[k]))
        for row in range(height - 1, -1, -1):
            path[row] = positions[k, position]
            position += int(moves[row, k, position])
        paths.append(path)
    return paths


def candidate_columns(mask: np.ndarray, line_height: float) -> list[int]:
    """Where a cut might go: every minimum of the smoothed ink profile and the lowest column of each grid cell."""
    width = mask.shape[1]
    profile = moving_average(mask.sum(axis=0), max(3, int(0.05 * line_height)))
    margin = max(2, int(0.1 * line_height))
    columns: set[int] = set()
    inner = np.arange(margin, width - margin)
    if len(inner) == 0:
        return []
    minima = inner[(profile[inner] <= profile[inner - 1]) & (profile[inner] <= profile[inner + 1])]
    columns.update(int(c) for c in minima)
    step = max(2, int(CUT_GRID * line_height))
    for start in range(margin, width - margin, step):
        cell = profile[start : min(width - margin, start + step)]
        if len(cell):
            columns.add(start + int(np.argmin(cell)))
    # Close neighbours cut the same way: keep the lower of any two within a twentieth of the line height.
    kept: list[int] = []
    for c in sorted(columns, key=lambda c: (profile[c], c)):
        if all(abs(c - k) > max(2, 0.05 * line_height) for k in kept):
            kept.append(c)
    return sorted(kept)


def _plausible_digit(piece: np.ndarray, line_height: float, min_height: float = SMALL_PART) -> bool:
    """Could this piece be one whole digit? Not wider than MAX_PIECE_WIDTH, nor shorter than `min_height`, of the line.

    A cut may leave a short fragment (the top half of a slanted 1, the tail of a 4) that the classifier
    reads confidently as some digit; digits of one line have about the same height, so such a piece is
    a part of its neighbour, not a digit of its own.
    """
    rows, cols = np.flatnonzero(piece.any(1)), np.flatnonzero(piece.any(0))
    if len(rows) == 0:
        return False
    height, width = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    return bool(width <= MAX_PIECE_WIDTH * line_height and height >= min_height * line_height)


def strokes_crossed(ink: np.ndarray, stroke: float) -> float:
    """How many stroke widths of ink a cut crosses, given the ink along it: each run counts one stroke at most.

    A cut that runs down a stroke for a while (two overlapping digits sharing it) splits one stroke,
    not as many as its length would make.
    """
    runs = np.flatnonzero(np.diff(np.concatenate([[0], ink.astype(np.int8), [0]])))
    lengths = runs[1::2] - runs[::2]
    return float(np.minimum(lengths, stroke).sum() / stroke)


# _best_reading's rounds a blob may take: ROUNDS_PER_LINE_HEIGHT per line height of its width, MIN_ROUNDS at
# least. Written digits took at most 26 on 106 lines of eval-real's sets, long lines of touching digits up to 164
# (which then read as well as what they read by then allows), a scribble's thousands, each slower.
ROUNDS_PER_LINE_HEIGHT = 40
MIN_ROUNDS = 64


# When the read under way must end (time.perf_counter()), and its limit in seconds: set by time_limit()
_DEADLINE: contextvars.ContextVar[tuple[float, float] | None] = contextvars.ContextVar(
    "deadline", default=None
)


@contextlib.contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Reads of numbers in this context (this thread) stop with an ImageError once they have taken `seconds`
    (None: no limit). The server reads under one: a read that has begun runs on a worker to its end, however
    long a photo makes it."""
    token = _DEADLINE.set(None if seconds is None else (time.perf_counter() + seconds, seconds))
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def _check_time() -> None:
    """Raise the ImageError of time_limit() when the read under way is past its deadline."""
    deadline = _DEADLINE.get()
    if deadline is not None and time.perf_counter() > deadline[0]:
        raise ImageError(
            f"reading this photo took over {deadline[1]:g} s, far longer than a photo of written numbers takes "
            "(is it a scribble, hatching or a page of small print?); crop it to the number and send it again."
        )


class _Rounds:
    """The rounds of _best_reading one blob has left."""

    def __init__(self, rounds: int) -> None:
        self.left = rounds

    def spend(self) -> bool:
        """Take one round; False when none was left (and time_limit's ImageError past its deadline)."""
        _check_time()
        self.left -= 1
        return self.left >= 0


def _distinct(
    pieces: dict[tuple[int, int], np.ndarray], left: dict[tuple[int, int], int] | None = None
) -> tuple[list[np.ndarray], list[int]]:
    """The distinct pieces, and each piece's row among them: different cuts can leave the same piece (two cuts
    through one gap in the ink), which is then read once. A piece's array holds the blob's columns from
    left[key] on (0 without `left`), all its rows."""
    # a digest of a piece's pixels from its first ink column to its last, and where those columns are in the
    # blob -> its row; the pixels themselves as keys held a blob-sized copy of every piece (0.9 GB more for a
    # 100 x 2,000 scribble)
    row_of: dict[tuple[int, int, bytes], int] = {}
    distinct: list[np.ndarray] = []
    rows = []
    for key, piece in pieces.items():
        columns = np.flatnonzero(piece.any(0))
        first, last = (int(columns[0]), int(columns[-1]) + 1) if len(columns) else (0, 0)
        digest = hashlib.blake2b(np.ascontiguousarray(piece[:, first:last]).tobytes()).digest()
        pixels = ((left or {}).get(key, 0) + first, last - first, digest)
        if pixels not in row_of:
            row_of[pixels] = len(distinct)
            distinct.append(piece)
        rows.append(row_of[pixels])
    return distinct, rows


def _best_reading(
    pieces: dict[tuple[int, int], np.ndarray],
    costs: dict[tuple[int, int], float],
    crossing: list[float],
    score: Score,
    pairs: PairScore | None = None,
    pair_of: dict[tuple[int, int], tuple[int, float]] | None = None,
    min_pair_width: float = 0.0,
    budget: _Rounds | None = None,
    left: dict[tuple[int, int], int] | None = None,
) -> list[tuple[int, int]] | None:
    """_best_chain of the pieces, each worth the classifier's log confidence in it less its cost, reading as few
    pieces as that needs.

    With `pairs`, a piece at least `min_pair_width` pixels wide is worth the better of two readings: one digit,
    log p(digit) + log p_pair(no pair), or the overlapping pair ab, log p_pair(ab) + SINGLE_DOUBT * log(1 - p(digit));
    `pair_of` collects the chosen pieces whose pair reading wins, as (10a + b, p_pair(ab)).

    Until it is read, a piece counts the most it can be worth: 0, as log probabilities are at most 0; a wide piece
    the digit classifier has read, the larger of log p(digit) and SINGLE_DOUBT * log(1 - p(digit)) until the pair
    classifier is asked. The chain is chosen; its pieces not read yet are read (all read, its wide pieces not asked
    yet are asked); and so on until each piece of the chain chosen counts what it is worth. It is then the best
    chain: every other chain counted at least what it is worth. Most pieces are never read: once a blob's digits
    read clearly (log confidences near 0), a chain of more pieces, each costing PIECE_COST, cannot win. (On 60 lines
    of real photos, `read` sent the digit and pair classifiers 288 and 244 glyphs, against 6,680 and 3,433 when
    every piece was read and every wide one asked.)

    Each round spends one of `budget`'s rounds; with none left, the chain is the best of the pieces read so far
    (a wide one not yet asked about pairs counting as one digit). `left`: see _distinct.
    """
    if not pieces:
        return None
    distinct, rows = _distinct(pieces, left)
    wide = [pairs is not None and np.ptp(np.flatnonzero(p.any(0))) + 1 >= min_pair_width for p in distinct]
    worth = [0.0] * len(distinct)  # what each piece counts: its value, or the most it can be worth
    glyphs: dict[int, np.ndarray] = {}  # row -> the 28x28 glyph of each piece read
    digit: dict[int, Any] = {}  # row -> log p(digit), a NumPy scalar of the classifier's float type
    doubt: dict[int, Any] = {}  # row -> SINGLE_DOUBT * log(1 - p(digit))
    asked: set[int] = set()
    read_as_pair: dict[int, tuple[int, float]] = {}  # row -> (10a + b, p_pair(ab)) where that reading wins
    while True:
        if budget is not None and not budget.spend():
            known = {
                key: (worth[row] if not wide[row] or row in asked else float(digit[row])) - costs[key]
                for key, row in zip(pieces, rows)
                if row in glyphs
            }
            chosen = _best_chain(known, crossing)
            in_chain = set(chosen or [])
            break
        chosen = _best_chain({key: worth[row] - costs[key] for key, row in zip(pieces, rows)}, crossing)
        in_chain = set(chosen or [])
        chain_rows = sorted({row for key, row in zip(pieces, rows) if key in in_chain})
        unread = [row for row in chain_rows if row not in glyphs]
        unasked = [row for row in chain_rows if wide[row] and row not in asked]
        if unread:
            glyphs |= {row: to_mnist(distinct[row]) for row in unread}
            log_p = np.log(np.clip(score(np.stack([glyphs[row] for row in unread])), 1e-6, 1.0))
            doubts = SINGLE_DOUBT * np.log(np.clip(1.0 - np.exp(log_p), 1e-6, 1.0))
            for row, d, b in zip(unread, log_p, doubts):
                digit[row], doubt[row] = d, b
                worth[row] = float(max(d, b) if wide[row] else d)
        elif unasked and pairs is not None:
            log_p = pairs(np.stack([glyphs[row] for row in unasked]))
            single = np.array([digit[row] for row in unasked]) + log_p[:, NO_PAIR]
            best = log_p[:, :NO_PAIR].argmax(axis=1)
            pair_log_p = log_p[np.arange(len(best)), best]
            pair = pair_log_p + np.array([doubt[row] for row in unasked])
            for row, ab, p, s, lp in zip(unasked, best, pair, single, pair_log_p):
                if p > s:
                    read_as_pair[row] = (int(ab), float(np.exp(lp)))
                worth[row] = float(max(s, p))
            asked.update(unasked)
        else:
            break
    if pair_of is not None:
        pair_of |= {
            key: read_as_pair[row]
            for key, row in zip(pieces, rows)
            if key in in_chain and row in read_as_pair
        }
    return chosen


def split_pair(piece: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A piece read as two overlapping digits -> its left and right halves, split at the column with half its
    ink to the left: they give the boxes `read` reports for the two digits."""
    columns = np.flatnonzero(piece.any(0))
    cumulative = piece[:, columns[0] : columns[-1] + 1].sum(axis=0).cumsum()
    middle = columns[0] + max(
        1, min(len(cumulative) - 1, int(np.searchsorted(cumulative, cumulative[-1] / 2)))
    )
    left, right = piece.copy(), piece.copy()
    left[:, middle:], right[:, :middle] = False, False
    return left, right


def _on_a_chain(pieces: Iterable[tuple[int, int]], count: int) -> set[tuple[int, int]]:
    """The pieces, keyed (first cut, last cut), that some chain of pieces from cut 0 to cut `count` - 1 goes
    through: the only ones _best_chain can choose, and whose values it can use (the others lead from a cut no chain
    from the start reaches, or to one from which no chain reaches the end)."""
    keys = sorted(pieces)  # a piece ending at cut i comes before every piece starting there
    reached = {0}  # the cuts a chain from the first cut ends at
    for i, j in keys:
        if i in reached:
            reached.add(j)
    reaching = {count - 1}  # the cuts from which a chain goes on to the last cut
    for i, j in reversed(keys):
        if j in reaching:
            reaching.add(i)
    return {(i, j) for i, j in keys if i in reached and j in reaching}


def _best_chain(value: dict[tuple[int, int], float], crossing: list[float]) -> list[tuple[int, int]] | None:
    """The pieces, left to right, from the first cut to the last whose values less PIECE_COST each and
    CUT_INK_COST per stroke each cut crosses sum highest (dynamic programming); None when no chain of pieces
    in `value` covers the blob. Pieces are keyed (first cut, last cut); crossing[j] is the strokes cut j goes
    through."""
    count = len(crossing)
    best = [-math.inf] * count
    best[0] = 0.0
    came_from = [0] * count
    # the pieces there are, by last cut and then first: each best[i] is final before a piece from cut i is seen,
    # and a tie goes to the lowest i, as looping over every pair of cuts did (that cost cuts² a round: 5 of a
    # scribble's 15 s)
    for (i, j), piece_value in sorted(value.items(), key=lambda item: (item[0][1], item[0][0])):
        total = best[i] + piece_value - PIECE_COST - CUT_INK_COST * crossing[j]
        if total > best[j]:
            best[j], came_from[j] = total, i
    if best[-1] == -math.inf:
        return None
    chosen, j = [], count - 1
    while j > 0:
        chosen.append((came_from[j], j))
        j = came_from[j]
    return chosen[::-1]


def split_by_recognition(
    mask: np.ndarray, line_height: float, score: Score, ink: np.ndarray | None = None
) -> list[tuple[int, np.ndarray]]:
    """split_and_read() without a pair classifier: (x offset, piece mask) for each digit, left to right."""
    return [(x, piece) for x, piece, _ in split_and_read(mask, line_height, score, ink)]


def split_and_read(
    mask: np.ndarray,
    line_height: float,
    score: Score,
    ink: np.ndarray | None = None,
    pairs: PairScore | None = None,
) -> list[tuple[int, np.ndarray, tuple[int, float] | None]]:
    """Cut a blob into the digits that read best: (x offset, piece mask, pair reading) for each, left to right.

    Cuts are least-ink paths (cut_path) and straight lines from candidate columns; a piece is the ink
    between two cuts; the chosen cuts maximize the sum of the log confidences of their pieces, less
    PIECE_COST for each piece and CUT_INK_COST for each stroke a cut goes through (strokes_crossed), by
    dynamic programming: each extra cut must pay for itself by reading more clearly, and cutting through
    strokes must pay more. A piece read as an overlapping pair is one piece: its two digits could not be cut.
    Only pieces that could be one digit compete (_plausible_digit): a blob too narrow for two digits stays
    whole, one too wide for a digit is always cut (if no cut gives only digit-tall pieces, shorter ones
    come in at SHORT_PIECE_COST each). With the blob's ink strength, a solid piece is read with its loops
    opened again (reopened).

    With `pairs`, each piece may also read as two digits too entangled to cut (_best_reading); such a piece
    comes back as its two halves (split_pair), each with its digit and the pair's probability as its reading.
    Pieces the digit classifier is to read have reading None.
    """
    height, width = mask.shape
    if width < 0.45 * line_height:
        return [(0, reopened(mask, ink), None)]
    reach = max(2, int(CUT_REACH * line_height))
    stroke = max(1.0, stroke_width(mask))
    rows = np.arange(height)
    paths = [np.full(height, -1, dtype=np.int64)]
    candidates = candidate_columns(mask, line_height)
    for column, least_ink in zip(candidates, cut_paths(mask, candidates, reach)):
        # The least-ink path, and a straight cut: where two digits overlap, their strokes merge and the
        # best cut runs down the shared stroke instead of round it.
        for path in (least_ink, np.full(height, column, dtype=np.int64)):
            if all(np.abs(path - other).mean() > max(1.5, CUT_DISTINCT * line_height) for other in paths[1:]):
                paths.append(path)
    paths.append(np.full(height, width - 1, dtype=np.int64))
    order = np.argsort([p.mean() for p in paths[1:-1]]) + 1
    paths = [paths[0], *(paths[i] for i in order), paths[-1]]
    crossing = [0.0] + [strokes_crossed(mask[rows, p], stroke) for p in paths[1:-1]] + [0.0]
    columns = np.arange(width)[None, :]
    too_wide = MAX_PIECE_WIDTH * line_height
    whole = (0, len(paths) - 1)
    pieces: dict[tuple[int, int], np.ndarray] = {}
    short: dict[tuple[int, int], np.ndarray] = {}  # narrow enough for a digit, but short: a fallback only
    # Each piece holds the blob's columns between its cuts' outermost points, from left[key] on: a blob-wide copy
    # of each made a scribble's 3,700 pieces take 400 MB, and every step over them cost the blob's width.
    left: dict[tuple[int, int], int] = {}
    if width <= too_wide:  # the blob uncut is a candidate only if one digit can be that wide
        pieces[whole], left[whole] = mask, 0
    # the ink right of each cut, once for the many pieces it bounds
    ink_right_of = [mask & (columns > path[:, None]) for path in paths]
    for i in range(len(paths) - 1):
        _check_time()
        for j in range(i + 1, len(paths)):
            if (i, j) == whole:
                continue
            if paths[j].min() - paths[i].max() > too_wide:
                break
            start, end = int(paths[i].min()) + 1, int(paths[j].max()) + 1  # the columns it can hold ink in
            # the ink between the two cuts
            piece = ink_right_of[i][:, start:end] & ~ink_right_of[j][:, start:end]
            if piece.sum() < MIN_PIECE_AREA * line_height**2:
                continue
            piece = select_digit(piece)  # slivers of a cut neighbour fall away
            if _plausible_digit(piece, line_height):
                pieces[(i, j)], left[(i, j)] = piece, start
            elif _plausible_digit(piece, line_height, min_height=0.0):
                short[(i, j)], left[(i, j)] = piece, start
    tall = pieces
    # Only a piece on some chain from the first cut to the last can be chosen: the others (about 60% of them on
    # real photos, such as one that ends at a cut where no piece begins) are not worth reading.
    # Solid pieces get their loops back.
    chained = _on_a_chain(tall, len(paths))
    pieces = {key: _reopened(piece, ink, left[key]) for key, piece in tall.items() if key in chained}
    pair_of: dict[tuple[int, int], tuple[int, float]] = {}
    min_pair_width = PAIR_MIN_WIDTH * line_height
    costs = dict.fromkeys(pieces, 0.0)
    # A scribble's pieces all read badly, and each round reads about one more of them: hundreds of rounds, each
    # slower than the last (a 1,000 x 130 zigzag took 15-20 s). Past its budget the blob reads as well as the
    # pieces read by then can (a long line of touching digits too may spend it: its digits must not be dropped).
    budget = _Rounds(max(MIN_ROUNDS, int(ROUNDS_PER_LINE_HEIGHT * width / line_height)))
    chosen = _best_reading(pieces, costs, crossing, score, pairs, pair_of, min_pair_width, budget, left)
    if chosen is None and width > too_wide:
        # No cut of this too-wide blob gives only digit-tall pieces (a small digit among big ones, a long dash):
        # let short pieces in at a cost rather than read the whole blob as one squeezed digit. No chain of tall
        # pieces alone means none was read above; those on a chain with short ones are read now.
        chained = _on_a_chain(tall | short, len(paths))
        pieces = {key: _reopened(piece, ink, left[key]) for key, piece in tall.items() if key in chained}
        short = {key: _reopened(piece, ink, left[key]) for key, piece in short.items() if key in chained}
        costs = dict.fromkeys(pieces, 0.0) | dict.fromkeys(short, SHORT_PIECE_COST)
        pieces |= short
        chosen = _best_reading(pieces, costs, crossing, score, pairs, pair_of, min_pair_width, budget, left)
    if chosen is None:
        return [(0, reopened(mask, ink), None)]
    out: list[tuple[int, np.ndarray, tuple[int, float] | None]] = []
    for key in chosen:
        halves = split_pair(pieces[key]) if key in pair_of else (pieces[key],)
        for k, half in enumerate(halves):
            cols = np.flatnonzero(half.any(0))
            reading = None
            if key in pair_of:
                ab, probability = pair_of[key]
                reading = (ab // 10 if k == 0 else ab % 10, probability)
            out.append((left[key] + int(cols[0]), half[:, cols[0] : cols[-1] + 1], reading))
    return out


def _reopened(piece: np.ndarray, ink: np.ndarray | None, start: int) -> np.ndarray:
    """reopened() of a piece that holds the blob's columns from `start` on."""
    return reopened(piece, None if ink is None else ink[:, start : start + piece.shape[1]])
