"""segment(): a line of digits becomes one box per digit, left to right, in the input's own pixels."""

from __future__ import annotations

import io
import zlib

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from digitrec.pairs import CLASSES, NO_PAIR
from digitrec.predict import Predictor
from digitrec.preprocess import MIN_WORK_SIDE, ink_strength, load_gray, load_gray_sized, threshold, to_mnist
from digitrec.realworld import _close_together, crop_ink, draw_digit, generate, number_line
from digitrec.segment import (
    CUT_INK_COST,
    CUT_SIDEWAYS,
    CUT_STRAY,
    MAX_PIECE_WIDTH,
    MIN_ROUNDS,
    PIECE_COST,
    READ_SIDE,
    SHORT_PIECE_COST,
    SINGLE_DOUBT,
    SMALL_PART,
    _best_chain,
    _best_reading,
    _Blob,
    _on_a_chain,
    _plausible_digit,
    clean,
    components,
    cut_columns,
    cut_path,
    cut_paths,
    cut_two_line_parts,
    drop_edge_debris,
    line_ink,
    merge_broken,
    segment,
    split,
    split_by_recognition,
    split_lines,
    strokes_crossed,
)


def ink_mask(page) -> np.ndarray:
    """What preprocessing takes for ink on a page (polarity, flattening, threshold), at up to 2,000 px."""
    return threshold(ink_strength(load_gray(page, max_side=2000)))


def line_image(digits: list[int], seed: int = 0, gap: float | None = None, height: int = 80):
    """Pen digits on a light page; returns (uint8 gray, true boxes (x, y, w, h))."""
    rng = np.random.default_rng(seed)
    glyphs = [crop_ink(draw_digit(d, rng, height)) for d in digits]
    if gap is None:
        line, boxes = number_line(glyphs, rng)
    else:  # exact spacing: negative gap = overlapping (touching) neighbours
        hmax = max(g.shape[0] for g in glyphs)
        width = sum(g.shape[1] for g in glyphs) + int(gap * height) * (len(glyphs) - 1)
        line, boxes, x = np.zeros((hmax, width + 5), np.float32), [], 0
        for g in glyphs:
            line[hmax - g.shape[0] :, x : x + g.shape[1]] = np.maximum(
                line[hmax - g.shape[0] :, x : x + g.shape[1]], g
            )
            boxes.append((x, hmax - g.shape[0], g.shape[1], g.shape[0]))
            x += g.shape[1] + int(gap * height)
    pad = 40
    page = np.pad(line, pad)
    boxes = [(x + pad, y + pad, w, h) for x, y, w, h in boxes]
    return (255 * (0.9 - 0.8 * page)).astype(np.uint8), boxes


def iou(a, b) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    ix = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    iy = max(0, min(ay + ah, by + bh) - max(ay, by))
    return ix * iy / (aw * ah + bw * bh - ix * iy)


def test_separate_digits_get_one_box_each_left_to_right():
    image, boxes = line_image([3, 0, 5, 1, 8], gap=0.3)
    pieces = segment(image)
    assert len(pieces) == 5
    assert [p.box[0] for p in pieces] == sorted(p.box[0] for p in pieces)
    assert all(iou(p.box, b) > 0.6 for p, b in zip(pieces, boxes))
    assert all(p.image.shape == (28, 28) and p.image.max() == 1.0 for p in pieces)


def test_boxes_are_in_the_input_pixels_even_for_a_big_photo():
    image, boxes = line_image([4, 7, 2], gap=0.3)
    big = np.asarray(Image.fromarray(image).resize((image.shape[1] * 5, image.shape[0] * 5)))
    pieces = segment(big)
    assert len(pieces) == 3
    assert all(iou(p.box, tuple(5 * v for v in b)) > 0.6 for p, b in zip(pieces, boxes))


def test_a_broken_stroke_stays_one_digit():
    image, _ = line_image([7, 4], gap=0.4)
    broken = image.copy()
    cut_row = 40 + 30  # a horizontal gap through both digits' strokes
    broken[cut_row : cut_row + 3, :] = 230
    assert len(segment(broken)) == 2


def test_touching_digits_are_split():
    image, boxes = line_image([2, 3, 6], gap=-0.06)
    pieces = segment(image)
    assert len(pieces) == 3
    assert all(
        abs((p.box[0] + p.box[2] / 2) - (b[0] + b[2] / 2)) < 0.3 * b[2] + 4 for p, b in zip(pieces, boxes)
    )


def _ink_aspect(glyph: np.ndarray) -> float:
    cols, rows = np.flatnonzero(glyph.any(0) > 0), np.flatnonzero(glyph.any(1) > 0)
    return (cols[-1] - cols[0] + 1) / (rows[-1] - rows[0] + 1)


def test_the_classifier_picks_how_many_digits_a_blob_holds():
    image, _ = line_image([0, 0], gap=-0.04)
    seen = []

    def reads_wide_ink(glyphs: np.ndarray) -> np.ndarray:
        """A classifier that is sure of wide shapes only: it must get the two touching 0s as one piece."""
        seen.extend(_ink_aspect(g) for g in glyphs)
        return np.array([0.99 if _ink_aspect(g) > 1.05 else 0.3 for g in glyphs])

    assert len(segment(image, score=reads_wide_ink)) == 1
    # the whole blob was read: sure of it, no chain of two pieces (each costing PIECE_COST) could read better,
    # and none was read
    assert max(seen) > 1.05

    def reads_narrow_ink(glyphs: np.ndarray) -> np.ndarray:
        seen.extend(_ink_aspect(g) for g in glyphs)
        return np.array([0.99 if _ink_aspect(g) < 1.0 else 0.05 for g in glyphs])

    seen.clear()
    assert len(segment(image, score=reads_narrow_ink)) == 2
    assert max(seen) > 1.05 > min(seen)  # the whole blob and its pieces were read


def test_a_cut_path_goes_round_the_ink():
    mask = np.zeros((40, 40), dtype=bool)
    mask[:, 10:14] = True  # a stroke on the left
    mask[:, 26:30] = True  # and one on the right
    mask[18:22, 10:30] = True  # joined by a bar: the cut must cross it, and only it
    path = cut_path(mask, 20, 8)
    assert path.shape == (40,) and ((path >= 14) & (path < 26)).all()
    assert mask[np.arange(40), path].sum() == 4  # the bar's thickness


def _one_path_at_a_time(mask: np.ndarray, column: int, reach: int) -> np.ndarray:
    """cut_path as it was before it found the paths of all columns in one pass: the reference."""
    height, width = mask.shape
    lo, hi = max(0, column - reach), min(width, column + reach + 1)
    span = hi - lo
    cost = mask[:, lo:hi].astype(np.float32) + CUT_STRAY * ((np.arange(lo, hi) - column) / reach) ** 2
    total = cost[0].copy()
    moves = np.zeros((height, span), dtype=np.int8)
    for row in range(1, height):
        left = np.concatenate([[np.inf], total[:-1]]) + CUT_SIDEWAYS
        right = np.concatenate([total[1:], [np.inf]]) + CUT_SIDEWAYS
        options = np.stack([left, total, right])
        choice = np.argmin(options, axis=0)
        total = options[choice, np.arange(span)] + cost[row]
        moves[row] = choice.astype(np.int8) - 1
    path = np.empty(height, dtype=np.int64)
    position = int(np.argmin(total))
    for row in range(height - 1, -1, -1):
        path[row] = position + lo
        position += int(moves[row, position])
    return path


def test_cut_paths_finds_each_columns_path_in_one_pass():
    """Ties included (random masks are full of them), near the edges and with reaches wider than the blob."""
    rng = np.random.default_rng(7)
    compared = 0
    for _ in range(400):
        height, width = int(rng.integers(2, 90)), int(rng.integers(1, 120))
        mask = rng.random((height, width)) < rng.uniform(0, 0.8)
        reach = int(rng.integers(1, 40))
        columns = sorted({int(c) for c in rng.integers(0, width, size=int(rng.integers(1, 8)))})
        for column, path in zip(columns, cut_paths(mask, columns, reach), strict=True):
            assert np.array_equal(path, _one_path_at_a_time(mask, column, reach))
            compared += 1
    assert compared > 1_000 and cut_paths(np.ones((3, 3), bool), [], 2) == []


def test_a_slanted_cut_separates_digits_that_overlap_in_x():
    mask = np.zeros((60, 50), dtype=bool)
    for row in range(60):  # two strokes leaning right, each overlapping the other's columns
        shift = row // 3
        mask[row, 22 - shift : 26 - shift] = True
        mask[row, 36 - shift : 40 - shift] = True
    path = cut_path(mask, 22, 15)
    assert mask[np.arange(60), path].sum() == 0  # it leans with the writing between the strokes

    def narrow_is_sure(glyphs: np.ndarray) -> np.ndarray:
        return np.array([0.99 if _ink_aspect(g) < 0.6 else 0.1 for g in glyphs])

    pieces = split_by_recognition(mask, 60, narrow_is_sure)
    assert len(pieces) == 2 and all(p.sum() == 240 for _, p in pieces)


def test_overlapping_pen_digits_are_read_apart():
    image, boxes = line_image([6, 1, 8], gap=-0.1)

    def narrow_is_sure(glyphs: np.ndarray) -> np.ndarray:
        return np.array([0.95 if _ink_aspect(g) < 1.0 else 0.05 for g in glyphs])

    pieces = segment(image, score=narrow_is_sure)
    assert len(pieces) == 3


def test_a_blob_too_wide_for_one_digit_is_always_cut():
    image, boxes = line_image([5, 3, 0, 6], gap=-0.1)

    def reads_wide_ink(glyphs: np.ndarray) -> np.ndarray:
        """A classifier that would rather read the whole touching line as one (very wide) digit."""
        return np.array([0.99 if _ink_aspect(g) > 1.6 else 0.3 for g in glyphs])

    pieces = segment(image, score=reads_wide_ink)
    height = max(b[3] for b in boxes)
    assert len(pieces) >= 2
    assert all(p.box[2] <= MAX_PIECE_WIDTH * height for p in pieces)


def test_touching_blobs_are_cut_at_their_thinnest_column_not_at_the_middle():
    mask = np.zeros((40, 100), dtype=bool)
    mask[:, 2:38] = True  # a narrow blob...
    mask[20:22, 38:43] = True  # ...joined by a thin bridge, well left of the middle (column 50)...
    mask[:, 43:98] = True  # ...to a wide one
    [cut] = cut_columns(mask, 2)
    assert 38 <= cut < 43
    (left_x, left), (right_x, right) = split(mask, 2)
    assert (left_x, right_x) == (0, cut) and right[:, 43 - cut : 98 - cut].all()  # the wide blob is whole


def test_a_too_wide_blob_with_a_short_digit_is_still_cut():
    """A small digit hanging on a big one by a long stroke: no cut gives only digit-tall pieces, so short
    pieces come in at a cost; the blob, too wide for one digit, must not be read as one squeezed digit."""
    mask = np.zeros((100, 160), dtype=bool)
    mask[:, 10:22] = True  # a 1 the height of the line
    mask[60:66, 22:120] = True  # a long dash from it...
    mask[52:100, 110:150] = True  # ...to a digit half the line's height

    def always_fair(glyphs: np.ndarray) -> np.ndarray:
        return np.full(len(glyphs), 0.9)

    pieces = split_by_recognition(mask, 100, always_fair)
    assert len(pieces) >= 2
    assert all(p.shape[1] <= MAX_PIECE_WIDTH * 100 for _, p in pieces)
    assert sum(int(p.sum()) for _, p in pieces) == int(mask.sum())  # every stroke in some piece


def test_a_piece_must_be_as_tall_as_a_digit_and_no_wider():
    line_height = 100.0
    full = np.zeros((100, 60), dtype=bool)
    full[:, 25:35] = True  # a 1: the whole height of the line
    assert _plausible_digit(full, line_height)
    fragment = np.zeros((100, 60), dtype=bool)
    fragment[:40, 25:35] = True  # the top of a 1 cut off by a slanted cut: not a digit of its own
    assert not _plausible_digit(fragment, line_height)
    wide = np.zeros((100, 200), dtype=bool)
    wide[:, 10:190:20] = True  # ink spread over two digits' width
    assert not _plausible_digit(wide, line_height)


@pytest.fixture(scope="module")
def bundled() -> Predictor:
    return Predictor.pretrained(backend="numpy")


@pytest.mark.parametrize(("digits", "gap"), [([7, 2, 3], -0.05), ([4, 1], -0.1), ([1, 7, 4], -0.08)])
def test_the_bundled_model_reads_touching_pen_digits(bundled, digits, gap):
    image, _ = line_image(digits, gap=gap)
    assert bundled.read(image).number == "".join(map(str, digits))


# A 3 written over a 0's side: the digit classifier alone gives the 0, which carries the 3's tips, only 0.34
# and reads its halves as two 1s ("311"); the pair classifier (pairs.py) reads the blob as "30".
@pytest.mark.parametrize(("digits", "seed"), [([1, 0, 6], 3), ([3, 0], 1), ([6, 0], 1), ([0, 8], 3)])
def test_the_bundled_model_reads_digits_that_share_a_stroke(bundled, digits, seed):
    """Written over each other, the 0's side and its neighbour's stroke merge: only a straight cut down it reads."""
    image, _ = line_image(digits, seed=seed, gap=-0.1)
    assert bundled.read(image).number == "".join(map(str, digits))


def test_blurred_bold_eights_in_a_line_are_read_with_their_loops(bundled):
    """eval-real's numbers (development seed 2): the 8s of these two photos threshold into solid blobs."""
    samples = list(generate("numbers", 65, seed=2))
    for sample in (samples[0], samples[64]):
        assert sample.label in ("0572811", "2478")
        assert bundled.read(sample.data).number == sample.label  # "0572111" and "2477" with the loops shut


def test_a_cut_along_a_stroke_crosses_it_once():
    assert (
        strokes_crossed(np.array([0, 1, 1, 1, 0, 0, 1, 0], dtype=bool), 2.0) == 1.5
    )  # a stroke, and a thin one
    along = np.zeros(60, dtype=bool)
    along[10:50] = True  # 40 rows down a stroke 4 wide: one stroke split lengthwise, not ten crossed
    assert strokes_crossed(along, 4.0) == 1.0


def faded(image: np.ndarray, box: tuple[int, int, int, int], contrast: float) -> np.ndarray:
    """The page with the ink inside `box` lightened to `contrast` (its darkening of the paper, as a share)."""
    paper = float(np.median(image))
    x, y, w, h = box
    out = image.astype(np.float32)
    region = out[y - 2 : y + h + 2, x - 2 : x + w + 2]
    region[:] = paper - (paper - region) * contrast * paper / (paper - float(image.min()))
    return out.round().astype(np.uint8)


def test_a_faint_digit_next_to_clear_ones_is_read():
    image, boxes = line_image([3, 0, 5], gap=0.4)
    page = faded(image, boxes[1], 0.24)  # under preprocess's INK_CONTRAST: a lone digit this faint is no ink
    x, y, w, h = boxes[1]
    assert not ink_mask(page)[y : y + h, x : x + w].any()
    assert line_ink(load_gray(page, max_side=2000))[y : y + h, x : x + w].any()
    pieces = segment(page)
    assert len(pieces) == 3 and iou(pieces[1].box, boxes[1]) > 0.6


def test_a_faint_digit_leaning_on_a_clear_one_is_read():
    # The faint 0's rim touches the 5's: one faint part holds both, and the 0 is what lies beyond the 5's ink.
    image, boxes = line_image([3, 0, 5], gap=-0.06)
    page = faded(image, boxes[1], 0.24)
    x, y, w, h = boxes[1]
    core = (slice(y + h // 4, y + 3 * h // 4), slice(x + 2, x + w // 2))  # the 0's left half, off the 5
    assert not ink_mask(page)[core].any()
    assert line_ink(load_gray(page, max_side=2000))[core].sum() > 0.05 * w * h
    pieces = segment(page)
    assert len(pieces) == 3 and iou(pieces[1].box, boxes[1]) > 0.6


def test_a_faint_small_digit_on_the_baseline_is_read():
    # A small faint 6 written lower than its taller neighbours: more than half of it, but less than
    # SMALL_PART of a line height, lies in their rows.
    rng = np.random.default_rng(0)
    glyphs = [crop_ink(draw_digit(d, rng, height)) for d, height in ((4, 90), (6, 66), (9, 90))]
    line = np.zeros((230, 320), np.float32)
    boxes = []
    for glyph, x, bottom in zip(glyphs, (20, 120, 200), (180, 205, 180)):
        gh, gw = glyph.shape
        line[bottom - gh : bottom, x : x + gw] = glyph
        boxes.append((x, bottom - gh, gw, gh))
    page = faded((255 * (0.9 - 0.8 * line)).astype(np.uint8), boxes[1], 0.24)
    x, y, w, h = boxes[1]
    in_band = 180 - y
    assert 0.5 * h <= in_band < SMALL_PART * min(g.shape[0] for g in glyphs[::2])
    assert not ink_mask(page)[y : y + h, x : x + w].any()
    assert line_ink(load_gray(page, max_side=2000))[y : y + h, x : x + w].any()
    assert len(segment(page)) == 3


def test_a_faint_number_under_a_clear_one_is_read_but_a_lone_faint_patch_is_not(bundled):
    """A second number written with a lighter hand (under INK_CONTRAST, as a line's faint digits may be) lay
    outside the rows of the clear ink and was dropped whole: "52806" over a faint "3947" read "52806". On a
    4,000-px photo the same happened to a line whose thin strokes faded at the working size."""
    rng = np.random.default_rng(2)
    lines = [
        number_line([crop_ink(draw_digit(d, rng, 80)) for d in digits], rng)[0]
        for digits in ([5, 2, 8, 0, 6], [3, 9, 4, 7])
    ]
    width = max(line.shape[1] for line in lines)
    top, bottom = (np.pad(line, ((0, 0), (0, width - line.shape[1]))) for line in lines)
    page = np.pad(np.concatenate([0.8 * top, np.zeros((35, width), np.float32), 0.22 * bottom]), 40)
    image = (255 * (0.9 - page)).astype(np.uint8)
    assert bundled.read(image).lines == ["52806", "3947"]
    # One faint digit-sized patch below a clear line is no line of writing: paper texture, a stain.
    glyph = crop_ink(draw_digit(0, rng, 80))
    lone = np.pad(glyph, ((0, 0), (20, width - 20 - glyph.shape[1])))
    page = np.pad(np.concatenate([0.8 * top, np.zeros((35, width), np.float32), 0.22 * lone]), 40)
    assert bundled.read((255 * (0.9 - page)).astype(np.uint8)).lines == ["52806"]


def test_a_digit_whose_parts_read_clearly_stays_whole():
    # A blob the classifier reads as one digit at 0.4, and each half of it at 0.99: two clear pieces do not
    # make two digits unless they pay PIECE_COST each (the stem and loop of a pen 6 read as "10").
    image, _ = line_image([0, 0], gap=-0.04)

    def halves_read_clearly(glyphs: np.ndarray) -> np.ndarray:
        return np.array([0.4 if _ink_aspect(g) > 1.05 else 0.99 for g in glyphs])

    assert len(segment(image, score=halves_read_clearly)) == 1


def test_a_faint_shadow_edge_is_not_a_digit():
    image, _ = line_image([3, 0, 5], gap=0.4)
    page = image.astype(np.float32)
    page[:, -30:] *= 0.78  # a shadow over the right edge of the picture: faint, tall, at the border
    assert len(segment(page.round().astype(np.uint8))) == 3


def test_a_dark_corner_below_the_line_is_not_a_digit():
    image, boxes = line_image([3, 0, 5], gap=0.4)
    page = image.copy()
    page[-45:, :20] = 30  # the edge of a table or a shadow's corner: dark, digit-sized, at the border
    assert len(segment(image)) == 3
    pieces = segment(page)
    assert len(pieces) == 3 and all(iou(p.box, b) > 0.6 for p, b in zip(pieces, boxes))


def test_digits_at_the_edge_of_a_slanted_line_are_kept():
    # A line rising to the right, its first digit on the bottom edge and its last on the top edge; and debris
    # at the bottom right, where the line has risen away from it.
    blobs = [_Blob(10 + 60 * k, 60 + 60 * k, 120 - 30 * k, 200 - 30 * k, [k + 1]) for k in range(5)]
    assert blobs[0].y1 == 200 and blobs[-1].y0 == 0
    debris = _Blob(340, 370, 150, 200, [6])
    kept = drop_edge_debris([*blobs, debris], (200, 400), line_height=80)
    assert kept == blobs


def test_digits_the_frame_cuts_are_kept_in_every_line_of_a_tight_crop():
    """A photo cropped tight round two numbers: a digit of the top line touches the top edge, one of the bottom
    line the bottom edge. Both were dropped as debris, the bottom one for lying outside the rows of one line
    fitted through both lines' digits ("52806" over "3917" read "52806" alone)."""
    top = [_Blob(10 + 60 * k, 55 + 60 * k, 5, 85, [k + 1]) for k in range(5)]
    top[2] = _Blob(130, 175, 0, 85, [3])  # a tall 8 cut by the top edge
    bottom = [_Blob(10 + 60 * k, 55 + 60 * k, 115, 195, [k + 6]) for k in range(4)]
    bottom[1] = _Blob(70, 115, 118, 200, [7])  # a 9's tail cut by the bottom edge
    debris = _Blob(380, 400, 20, 200, [10])  # a shadow's edge down the right border, across both lines
    kept = drop_edge_debris([*top, *bottom, debris], (200, 400), line_height=80)
    assert kept == [*top, *bottom]


def test_a_digits_detached_tail_joins_it_but_a_whole_one_stands_alone():
    # Three digits 100 px high; a bold 2's tail, broken off by the threshold, stands 60 px high 2 px right of
    # the second (it read as a "1" at 1.00 beside it: "865122" came out "8651221"); a 1 as tall as the line
    # stands as far right of the third.
    digits = [_Blob(0, 60, 0, 100, [1]), _Blob(80, 140, 0, 100, [2]), _Blob(160, 220, 0, 100, [3])]
    tail = _Blob(142, 150, 30, 90, [4])
    one = _Blob(222, 232, 5, 95, [5])
    areas = np.array([0, 2000, 2000, 2000, 300, 700])
    merged = merge_broken([*digits, tail, one], areas, line_height=100)
    assert [(b.x0, b.x1) for b in merged] == [(0, 60), (80, 150), (160, 220), (222, 232)]
    assert sorted(merged[1].labels) == [2, 4]


def test_dust_and_dots_are_dropped_but_a_short_dash_is_left_for_merge_broken():
    """clean(): a flat speck with a sliver of a digit's ink is dust (or a full stop); a flat dash wider than a
    quarter of the line height may be a 5's detached bar, which merge_broken decides about."""
    digits = [_Blob(0, 25, 0, 40, [1]), _Blob(40, 65, 0, 40, [2]), _Blob(80, 105, 0, 40, [3])]
    dot = _Blob(110, 114, 36, 40, [4])
    dash = _Blob(120, 135, 2, 6, [5])
    areas = np.array([0, 500, 500, 500, 12, 50])
    kept, line_height = clean([*digits, dot, dash], areas)
    assert line_height == 40 and kept == [*digits, dash]


def test_a_short_part_far_from_the_digits_is_kept_only_with_a_digits_ink():
    """merge_broken: a short part near a digit joins it, one far from every digit stands alone as a digit when it
    holds a quarter of a typical digit's ink (a small 0), and is dropped as dust when it holds less."""
    digits = [_Blob(0, 60, 0, 100, [1]), _Blob(80, 140, 0, 100, [2])]
    small_zero = _Blob(300, 330, 40, 90, [3])  # 50 px high: under BROKEN_PART of the line
    speck = _Blob(400, 420, 50, 70, [4])
    areas = np.array([0, 2000, 2000, 600, 100])
    merged = merge_broken([*digits, small_zero, speck], areas, line_height=100)
    assert [(b.x0, b.x1) for b in merged] == [(0, 60), (80, 140), (300, 330)]


def test_a_blank_page_reads_nothing():
    assert segment(np.full((100, 400), 220, np.uint8)) == []


@settings(max_examples=80, deadline=None)
@given(values=st.lists(st.integers(0, 200), min_size=1, max_size=60), size=st.integers(1, 12))
def test_moving_average_is_scipys_uniform_filter(values, size):
    from scipy import ndimage

    from digitrec.segment import moving_average

    profile = np.array(values, dtype=np.int64)
    expected = ndimage.uniform_filter1d(profile.astype(np.float32), size)
    assert np.array_equal(moving_average(profile, size), expected)


@pytest.mark.parametrize("side", [1400, 1600])
def test_a_number_written_small_on_a_big_page_is_read_from_a_closer_look(bundled, side):
    """Digits 45 px high on a page of `side` px: shrunk to READ_SIDE they would be 29-33 px high; read again
    from a window around the line at more pixels, with the boxes in the page's own pixels."""
    image, boxes = line_image([2, 0, 4, 8], seed=3, gap=0.35, height=40)
    page = np.full((side * 3 // 4, side), int(image[0, 0]), np.uint8)
    top, left = side // 3, side // 2
    page[top : top + image.shape[0], left : left + image.shape[1]] = image
    result = bundled.read(page)
    assert result.number == "2048"
    shifted = [(x + left, y + top, w, h) for x, y, w, h in boxes]
    assert all(iou(d.box, b) > 0.6 for d, b in zip(result.digits, shifted))


@pytest.mark.parametrize("thickness", [12, 16])
def test_an_underline_with_more_ink_than_the_digits_is_not_the_line_height(bundled, thickness):
    """A long underline holding over four digits' ink was the only big part, so the line height became its
    thickness: it was kept, and every digit it spanned was merged into one blob ("3252222146952")."""
    digits = [3, 5, 8, 2, 7, 1, 4, 6, 9, 0]
    image, _ = line_image(digits, gap=0.3)
    image[-24 : -24 + thickness, 10:-10] = 30  # under the digits, not touching them or the edge
    gray, _ = load_gray_sized(image, max_side=READ_SIDE, min_side=MIN_WORK_SIDE)
    _, blobs, areas = components(line_ink(gray))
    _, line_height = clean(blobs, areas)
    assert line_height > 40  # the digits are 80 px high on a page under READ_SIDE
    assert bundled.read(image).number == "".join(map(str, digits))


def boxed(
    image: np.ndarray, boxes: list[tuple[int, int, int, int]], margin: int = 10, line: int = 3
) -> np.ndarray:
    """The image with a dark rectangle outline drawn round each box (x, y, w, h), `margin` px outside it."""
    out = image.copy()
    for x, y, w, h in boxes:
        x0, y0, x1, y1 = x - margin, y - margin, x + w + margin, y + h + margin
        out[y0 : y0 + line, x0:x1] = out[y1 - line : y1, x0:x1] = 30
        out[y0:y1, x0 : x0 + line] = out[y0:y1, x1 - line : x1] = 30
    return out


def test_a_number_in_a_frame_or_in_a_row_of_boxes_is_read(bundled):
    """A frame round the number was one part spanning every digit: merged with them all, it read "1358331"; a box
    per digit, joined into a comb, read "4514467"."""
    digits = [3, 5, 8, 2, 7]
    image, boxes = line_image(digits, gap=0.3)
    xs, ys = [b[0] for b in boxes], [b[1] for b in boxes]
    whole = (
        min(xs),
        min(ys),
        max(b[0] + b[2] for b in boxes) - min(xs),
        max(b[1] + b[3] for b in boxes) - min(ys),
    )
    walls = [(a[0] + a[2] + b[0]) // 2 for a, b in zip(boxes, boxes[1:])]  # midway between neighbours
    edges = [whole[0] - 10, *walls, whole[0] + whole[2] + 10]
    comb = [(x0, whole[1] - 8, x1 - x0, whole[3] + 16) for x0, x1 in zip(edges, edges[1:])]  # walls shared
    for framed in (boxed(image, [whole]), boxed(image, comb, margin=0)):
        assert bundled.read(framed).number == "35827"


def fine_pen_photo(text: str, width: int = 4000, height: int = 300, pen: int = 3) -> bytes:
    """A JPEG phone photo of `text` written with a fine pen (`pen` px) in digits `height` px high."""
    from PIL import ImageDraw, ImageFilter

    from digitrec.realworld import DIGIT_STROKES

    page = Image.new("L", (width, width * 3 // 4), 245)
    draw = ImageDraw.Draw(page)
    x0, y0 = width // 5, width * 3 // 10
    for k, digit in enumerate(text):
        for stroke in DIGIT_STROKES[int(digit)][0]:
            points = [(x0 + k * height + 0.6 * height * x, y0 + height * y) for x, y in stroke]
            draw.line(points, fill=15, width=pen, joint="curve")
    noisy = np.asarray(page.filter(ImageFilter.GaussianBlur(0.7)), np.float32)
    noisy = noisy + np.random.default_rng(0).normal(0, 3, noisy.shape)
    out = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def test_a_number_in_fine_pen_on_a_full_size_photo_is_read(bundled):
    """Written with a 3-px pen on a 2,000- or 4,000-px photo, "2048" faded away at read's working size (1,024 px)
    and read as ""."""
    for width in (2000, 4000):
        assert bundled.read(fine_pen_photo("2048", width, height=width * 3 // 40)).number == "2048"


def _blobs_along(xs, ys, height=50, width=30):
    return [
        _Blob(int(x), int(x) + width, int(y), int(y) + height, [i + 1])
        for i, (x, y) in enumerate(zip(xs, ys))
    ]


@pytest.mark.parametrize("slope", [0.0, 0.18, -0.18])  # level, and written 10 degrees up or down
def test_one_slanted_line_with_jumpy_digits_stays_one_line(slope):
    """Eight digits, each up to 0.3 of its height above or below the baseline, on a line that rises or falls by
    1.4 line heights from end to end: one line, so `read` reads it as before."""
    rng = np.random.default_rng(0)
    xs = np.arange(8) * 50.0
    ys = 100 + slope * xs + rng.uniform(-15, 15, size=8)
    blobs = _blobs_along(xs, ys)
    assert split_lines(blobs, 50.0) == [blobs]


@pytest.mark.parametrize("slope", [0.0, 0.15, -0.15])
def test_lines_one_under_another_are_told_apart_and_their_small_parts_follow(slope):
    """Two numbers written one under another, a third of a line height apart, read as one jumble of both
    lines ("23341185" for 31415 over 2718: a 1 above a 7 read as one tall digit)."""
    xs = np.arange(5) * 50.0
    top = _blobs_along(xs, 100 + slope * xs)
    bottom = _blobs_along(xs[:4], 167 + slope * xs[:4])
    bar = _Blob(60, 80, 172 + int(slope * 60), 180 + int(slope * 60), [99])  # a 5's detached bar, in line 2
    lines = split_lines([*top, *bottom, bar], 50.0)
    assert lines == [top, [*bottom, bar]]


@pytest.mark.parametrize("overlap", [-5.0, 0.0, 7.0])  # rows 5 px apart, touching, 7 px overlapping
def test_lines_written_closer_than_the_line_gap_are_told_apart(overlap):
    """Two numbers whose digits' rows come within a tenth of a line height (or overlap: a tall 7 over a 1 a line
    below) read as one line of both: a joined line's parts lie a line height apart in their middles. A part
    joining the two lines (taller than a digit) goes with one of them."""
    rng = np.random.default_rng(1)
    xs = np.arange(5) * 50.0
    top = _blobs_along(xs, 100 + rng.uniform(-4, 4, size=5))
    bottom = _blobs_along(xs[:4] + 25, 150 - overlap + rng.uniform(-4, 4, size=4))
    joint = _Blob(230, 260, 118, 188, [99])  # a stroke across both lines, 1.4 line heights tall
    lines = split_lines([*top, *bottom, joint], 50.0)
    assert len(lines) == 2 and lines[0][:5] == top and lines[1][:4] == bottom
    assert joint in lines[0] + lines[1] and len(lines[0]) + len(lines[1]) == 10


def test_a_tall_digit_in_pieces_does_not_make_a_line_of_its_own():
    """A bold 8 twice the others' height, its loops found as two parts: its top loop, two-thirds of a line high
    and level with nothing else, is no line of its own ("4" over "2280687")."""
    xs = np.arange(6) * 50.0
    line = _blobs_along(xs, np.full(6, 100.0))
    loops = [_Blob(300, 335, 55, 87, [98]), _Blob(300, 335, 90, 150, [99])]  # 32 and 60 px of a 95-px 8
    assert split_lines([*line, *loops], 50.0) == [[*line, *loops]]


def test_a_number_written_at_half_the_height_is_a_line_of_its_own():
    """Under a number 50 px high, one written 25 px high: its digits were short parts of the first line (the bar of
    a 5, a dot) and joined it, and the two read as one jumble ("23806" for "52806" over "3917")."""
    xs = np.arange(5) * 50.0
    top = _blobs_along(xs, np.full(5, 100.0))
    bottom = _blobs_along(xs[:4], np.full(4, 175.0), height=25, width=15)
    dot = _Blob(230, 236, 145, 151, [99])  # a speck between them is no line: it joins the nearest
    low = _Blob(260, 275, 125, 150, [98])  # a small digit on the first line's baseline stays in it
    assert split_lines([*top, *bottom, dot, low], 50.0) == [[*top, dot, low], bottom]
    assert split_lines([*bottom, *top], 50.0) == [top, bottom]  # top to bottom, whatever the order found


def test_the_bundled_model_reads_a_smaller_number_under_a_big_one(bundled):
    rng = np.random.default_rng(2)
    lines = [
        number_line([crop_ink(draw_digit(d, rng, height)) for d in digits], rng)[0]
        for digits, height in (([5, 2, 8, 0, 6], 80), ([3, 9, 4, 7], 40))
    ]
    width = max(line.shape[1] for line in lines)
    page = np.concatenate([np.pad(line, ((0, 30), (0, width - line.shape[1]))) for line in lines])
    result = bundled.read((255 * (0.9 - 0.8 * np.pad(page, 40))).astype(np.uint8))
    assert result.lines == ["52806", "3947"]


def test_a_dash_between_two_lines_belongs_to_neither():
    """A short stroke in the gap between two lines (an underline, a dash) joined the nearer line, where
    merge_broken put it together with the digit under it."""
    xs = np.arange(4) * 50.0
    top = _blobs_along(xs, np.full(4, 100.0))
    bottom = _blobs_along(xs, np.full(4, 180.0))
    dash = _Blob(100, 130, 163, 168, [99])  # 13 px under the top line, 12 over the bottom one
    bar = _Blob(60, 80, 182, 188, [98])  # a 5's detached bar, in the bottom line's rows
    assert split_lines([*top, *bottom, dash, bar], 50.0) == [top, [*bottom, bar]]


def test_an_underline_under_a_short_number_leaves_its_digits_as_they_were(bundled):
    """ "37" underlined, over "2718": the underline, too short for a ruled line, joined the top line and was merged
    with the 7 over it ("32")."""
    rng = np.random.default_rng(2)
    lines = [
        number_line([crop_ink(draw_digit(d, rng, 80)) for d in digits], rng)[0]
        for digits in ([3, 7], [2, 7, 1, 8])
    ]
    width = max(line.shape[1] for line in lines)
    top, bottom = (np.pad(line, ((0, 0), (0, width - line.shape[1]))) for line in lines)
    page = np.pad(np.concatenate([top, np.zeros((50, width), np.float32), bottom]), 40)
    row = 40 + top.shape[0] + 15
    page[row : row + 5, 35:155] = 1.0  # 120 px long: under two digits 80 px high
    assert bundled.read((255 * (0.9 - 0.8 * page)).astype(np.uint8)).lines == ["37", "2718"]


def test_the_bundled_model_reads_two_numbers_one_under_the_other(bundled):
    rng = np.random.default_rng(5)
    lines = [
        number_line([crop_ink(draw_digit(d, rng, 80)) for d in digits], rng)[0]
        for digits in ([3, 1, 4, 1, 5], [2, 7, 1, 8])
    ]
    width = max(line.shape[1] for line in lines)
    page = np.concatenate(
        [
            np.pad(lines[0], ((0, 30), (0, width - lines[0].shape[1]))),
            np.pad(lines[1], ((0, 0), (0, width - lines[1].shape[1]))),
        ]
    )
    result = bundled.read((255 * (0.9 - 0.8 * np.pad(page, 40))).astype(np.uint8))
    assert result.number == "31415\n2718" and result.lines == ["31415", "2718"]
    assert [d.line for d in result.digits] == [0] * 5 + [1] * 4
    assert all(
        a.box[0] < b.box[0] for a, b in zip(result.digits[:4], result.digits[1:5])
    )  # each line left to right


# ------------------------------------------------------------------ each piece read once, and only those that count


def _chains(pieces: list[tuple[int, int]], count: int) -> list[list[tuple[int, int]]]:
    """Every chain of pieces from cut 0 to cut count - 1, found by trying them all."""
    if count == 1:
        return [[]]

    def from_cut(i: int) -> list[list[tuple[int, int]]]:
        if i == count - 1:
            return [[]]
        return [[(i, j), *rest] for a, j in pieces if a == i for rest in from_cut(j)]

    return from_cut(0)


@settings(max_examples=300, deadline=None)
@given(st.integers(2, 7), st.data())
def test_the_best_chain_is_chosen_from_the_pieces_on_a_chain_alone(count, data):
    """split_and_read reads only the pieces _on_a_chain keeps: the others could not change the chain chosen
    (values from a few levels, so that ties are common: they must be broken as before)."""
    every = [(i, j) for i in range(count) for j in range(i + 1, count)]
    pieces = data.draw(st.lists(st.sampled_from(every), unique=True))
    levels = st.sampled_from([-3.0, -1.5, -1.0, -0.5, 0.0])
    value = {key: data.draw(levels) for key in pieces}
    crossing = [0.0, *(data.draw(st.sampled_from([0.0, 0.5, 1.0])) for _ in range(count - 2)), 0.0]
    kept = _on_a_chain(value, count)
    assert kept == {piece for chain in _chains(pieces, count) for piece in chain}
    assert _best_chain({key: v for key, v in value.items() if key in kept}, crossing) == _best_chain(
        value, crossing
    )


def _every_pair_of_cuts_chain(value, crossing):
    """_best_chain as it was until 7 December: a loop over every pair of cuts (cuts² a round)."""
    count = len(crossing)
    best = np.full(count, -np.inf)
    best[0] = 0.0
    came_from = np.zeros(count, dtype=np.int64)
    for j in range(1, count):
        for i in range(j):
            if (i, j) in value:
                total = best[i] + value[(i, j)] - PIECE_COST - CUT_INK_COST * crossing[j]
                if total > best[j]:
                    best[j], came_from[j] = total, i
    if not np.isfinite(best[-1]):
        return None
    chosen, j = [], count - 1
    while j > 0:
        chosen.append((int(came_from[j]), j))
        j = int(came_from[j])
    return chosen[::-1]


@settings(max_examples=300, deadline=None)
@given(st.integers(2, 9), st.data())
def test_the_best_chain_over_the_pieces_is_the_one_over_every_pair_of_cuts(count, data):
    """The same chain, ties broken the same way (values from a few levels, so that ties are common)."""
    every = [(i, j) for i in range(count) for j in range(i + 1, count)]
    pieces = data.draw(st.lists(st.sampled_from(every), unique=True))
    value = {key: data.draw(st.sampled_from([-3.0, -1.5, -1.0, -0.5, 0.0])) for key in pieces}
    crossing = [0.0, *(data.draw(st.sampled_from([0.0, 0.5, 1.0])) for _ in range(count - 2)), 0.0]
    assert _best_chain(value, crossing) == _every_pair_of_cuts_chain(value, crossing)


def test_a_scribble_spends_its_rounds_and_reads_what_it_has_read_by_then(monkeypatch):
    """A pen scribbling up and down along a line: every piece reads badly, and each round of _best_reading read
    about one more, hundreds of rounds (15-20 s for one 1,000 x 130 zigzag, 77 s for a page of five). Now the
    blob has a budget of rounds; past it, the chain is the best of the pieces read by then: doubtful digits, which
    `read` then leaves out as a line of no digits."""
    from digitrec import segment as segment_module

    image = Image.new("L", (480, 70), 235)
    points = [(8 + 3 * k, 10 if k % 2 == 0 else 60) for k in range(155)]
    ImageDraw.Draw(image).line(points, fill=20, width=2, joint="curve")
    rounds = []
    spend = segment_module._Rounds.spend

    def counted(self):
        rounds.append(self.left)
        return spend(self)

    monkeypatch.setattr(segment_module._Rounds, "spend", counted)
    result = Predictor.pretrained(backend="numpy").read(np.asarray(image))
    assert rounds[-1] == 0 and len(rounds) > MIN_ROUNDS  # spent to the last, then out (once: one blob)
    assert len(rounds) == rounds[0] + 1
    assert result.number == "" and not result.digits and result.rejected_lines == 1


def test_a_line_that_spends_its_rounds_keeps_the_digits_read_by_then(monkeypatch):
    """A long line of touching digits can spend its budget too (a reviewer's 17-digit line took 164 rounds):
    while a blob past its budget held no digits, `read` dropped such lines, or parts of them. Here the budget is
    cut to two rounds, so that this 9-digit line spends it."""
    from digitrec import segment as segment_module

    digits = [5, 7, 7, 6, 4, 0, 4, 4, 9]
    page, _ = line_image(digits, seed=3, gap=-0.08)
    # threshold 0: the rougher reading is mostly doubtful, which `read` would leave out as no digits
    predictor = Predictor.pretrained(reject_below=0.0, backend="numpy")
    unlimited = predictor.read(page).number
    monkeypatch.setattr(segment_module, "MIN_ROUNDS", 2)  # the first chain is read, then no round is left
    monkeypatch.setattr(segment_module, "ROUNDS_PER_LINE_HEIGHT", 0)
    spent = predictor.read(page).number
    assert unlimited == "577640449"
    assert spent.isdigit(), spent  # fewer rounds, a rougher reading ("568479" here), but a reading


def _eager_reading(pieces, costs, crossing, score, pairs, min_pair_width):
    """What _best_reading gives, the long way (as read() did until 2026-12-06): every piece read, every wide one
    asked if it is a pair; the chain and the pair readings of its pieces."""
    if not pieces:
        return None, {}
    glyphs = np.stack([to_mnist(piece) for piece in pieces.values()])
    values = np.log(np.clip(score(glyphs), 1e-6, 1.0))
    wide = np.array([np.ptp(np.flatnonzero(p.any(0))) + 1 >= min_pair_width for p in pieces.values()])
    pair_of = {}
    if pairs is not None and wide.any():
        log_p = pairs(glyphs[wide])
        single = values[wide] + log_p[:, NO_PAIR]
        best = log_p[:, :NO_PAIR].argmax(axis=1)
        pair_log_p = log_p[np.arange(len(best)), best]
        pair = pair_log_p + SINGLE_DOUBT * np.log(np.clip(1.0 - np.exp(values[wide]), 1e-6, 1.0))
        asked = [key for key, is_wide in zip(pieces, wide) if is_wide]
        for key, ab, p, s, lp in zip(asked, best, pair, single, pair_log_p):
            if p > s:
                pair_of[key] = (int(ab), float(np.exp(lp)))
        values[wide] = np.maximum(single, pair)
    value = {key: v - costs[key] for key, v in zip(pieces, values.tolist())}
    chosen = _best_chain(value, crossing)
    return chosen, {key: pair_of[key] for key in chosen or [] if key in pair_of}


def _eager_best_reading(
    pieces, costs, crossing, score, pairs=None, pair_of=None, min_pair_width=0.0, budget=None, left=None
):
    """_eager_reading in _best_reading's place (it reads in one round: no budget to spend; `left` is where each
    piece's columns start in the blob, which to_mnist does not need)."""
    chosen, found = _eager_reading(pieces, costs, crossing, score, pairs, min_pair_width)
    if pair_of is not None:
        pair_of |= found
    return chosen


def test_each_distinct_piece_is_read_once_and_its_reading_goes_to_each_cut_that_left_it():
    """Two cuts through one gap leave the same piece: _best_reading reads it once. A piece with the same ink
    count and box as another (its mirror image) is another piece and keeps its own reading."""
    rng = np.random.default_rng(0)
    left = np.zeros((40, 90), dtype=bool)
    left[:, 4:40] = rng.random((40, 36)) < 0.4
    mirrored = np.zeros_like(left)
    mirrored[:, 4:40] = left[:, 4:40][:, ::-1]
    confidence = {to_mnist(left).tobytes(): 0.95, to_mnist(mirrored).tobytes(): 0.2}
    read: list[bytes] = []

    def score(glyphs: np.ndarray) -> np.ndarray:
        read.extend(g.tobytes() for g in glyphs)
        return np.array([confidence[g.tobytes()] for g in glyphs])

    def pairs(glyphs: np.ndarray) -> np.ndarray:  # never a pair, a little less sure of the mirror image
        out = np.full((len(glyphs), CLASSES), np.log(0.001))
        out[:, NO_PAIR] = [np.log(0.9 if confidence[g.tobytes()] < 0.5 else 0.95) for g in glyphs]
        return out

    # Two chains: left, left, mirrored (three pieces) and mirrored, mirrored; the mirror image reads badly.
    pieces = {(0, 1): left, (0, 2): mirrored, (1, 2): left.copy(), (2, 3): mirrored.copy()}
    costs = dict.fromkeys(pieces, 0.0)
    crossing = [0.0, 0.0, 0.0, 0.0]
    pair_of: dict[tuple[int, int], tuple[int, float]] = {}
    chosen = _best_reading(pieces, costs, crossing, score, pairs, pair_of, min_pair_width=20)
    assert chosen == [(0, 1), (1, 2), (2, 3)]
    assert sorted(read) == sorted(confidence)  # each of the two read once
    assert (chosen, pair_of) == _eager_reading(pieces, costs, crossing, score, pairs, 20)


def _by_pixels(seed: int):
    """A digit and a pair classifier whose answers for a glyph depend on its pixels only, not on its batch."""

    def rng(glyph: np.ndarray) -> np.random.Generator:
        return np.random.default_rng([seed, zlib.crc32(glyph.tobytes())])

    def score(glyphs: np.ndarray) -> np.ndarray:
        return np.array([rng(g).uniform(0.02, 1.0) for g in glyphs])

    def pairs(glyphs: np.ndarray) -> np.ndarray:
        logits = np.stack([3 * rng(g).standard_normal(CLASSES) for g in glyphs])
        logits -= logits.max(axis=1, keepdims=True)
        return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))

    return score, pairs


def _counting(pairs, asked: dict[str, int], kind: str):
    def counted(glyphs: np.ndarray) -> np.ndarray:
        asked[kind] += len(glyphs)
        return pairs(glyphs)

    return counted


def test_asking_the_pair_classifier_about_the_chosen_pieces_only_chooses_as_asking_about_all():
    """_best_reading asks the pair classifier about the wide pieces of the chain it would choose, then chooses
    again, until that chain holds no piece it has not asked about: the chain and its pair readings are those of
    asking about every wide piece, for fewer asked."""
    rng = np.random.default_rng(1)
    asked = {"lazily": 0, "all": 0}
    for seed in range(80):
        count = int(rng.integers(3, 8))
        keys = [(i, j) for i in range(count) for j in range(i + 1, min(count, i + 4)) if rng.random() < 0.7]
        pieces = {}
        for i, j in keys:  # ink from cut i to cut j, 10 px apart: pieces over two cuts or more are wide
            piece = np.zeros((30, 10 * count + 10), dtype=bool)
            piece[:, 10 * i + 2 : 10 * j - 2] = rng.random((30, 10 * (j - i) - 4)) < 0.6
            pieces[(i, j)] = piece
        costs = {key: float(rng.choice([0.0, SHORT_PIECE_COST])) for key in pieces}
        crossing = [0.0, *(float(rng.choice([0.0, 0.5, 1.0])) for _ in range(count - 2)), 0.0]
        score, pairs = _by_pixels(seed)
        pair_of: dict[tuple[int, int], tuple[int, float]] = {}
        chosen = _best_reading(pieces, costs, crossing, score, _counting(pairs, asked, "lazily"), pair_of, 15)
        expected = _eager_reading(pieces, costs, crossing, score, _counting(pairs, asked, "all"), 15)
        assert (chosen, pair_of) == expected
    assert asked["lazily"] < 0.6 * asked["all"]


def _scored(predictor: Predictor, glyphs: np.ndarray, seen: list[bytes]) -> np.ndarray:
    seen += [glyph.tobytes() for glyph in glyphs]
    return predictor.probabilities(glyphs[:, None]).max(axis=1)


@pytest.mark.parametrize(("digits", "seed"), [([5, 3, 0, 6], 0), ([1, 0, 6], 3), ([3, 0], 1)])
def test_reading_only_the_pieces_that_can_matter_finds_the_same_digits(bundled, monkeypatch, digits, seed):
    """The pieces and readings segment() gives are those it gave reading every piece and asking the pair classifier
    about every wide one (as before 2026-12-06), for fewer pieces read."""
    from digitrec import segment as segmenting
    from digitrec.pairs import load_pair_scorer

    image, _ = line_image(digits, seed=seed, gap=-0.1)
    pairs = load_pair_scorer()
    pruned: list[bytes] = []
    found = segment(image, score=lambda g: _scored(bundled, g, pruned), pairs=pairs)
    monkeypatch.setattr(segmenting, "_on_a_chain", lambda pieces, count: set(pieces))
    monkeypatch.setattr(segmenting, "_best_reading", _eager_best_reading)
    every: list[bytes] = []
    before = segment(image, score=lambda g: _scored(bundled, g, every), pairs=pairs)
    assert len(pruned) < len(every) / 2
    assert [p.box for p in found] == [p.box for p in before]
    assert all(np.array_equal(p.image, q.image) for p, q in zip(found, before))
    # a pair reading's probability to float rounding: NumPy sums a batch of one image in another order
    assert [p.reading and (p.reading[0], pytest.approx(p.reading[1], abs=1e-6)) for p in found] == [
        p.reading for p in before
    ]


def test_short_pieces_on_a_chain_are_read_when_no_chain_of_tall_ones_covers_a_wide_blob(monkeypatch):
    from digitrec import segment as segmenting

    mask = np.zeros((100, 160), dtype=bool)  # as in test_a_too_wide_blob_with_a_short_digit_is_still_cut
    mask[:, 10:22] = True
    mask[60:66, 22:120] = True
    mask[52:100, 110:150] = True

    def by_ink(glyphs: np.ndarray) -> np.ndarray:
        return np.array([0.2 + 0.7 * float(g.mean()) for g in glyphs])

    found = split_by_recognition(mask, 100, by_ink)
    monkeypatch.setattr(segmenting, "_on_a_chain", lambda pieces, count: set(pieces))
    monkeypatch.setattr(segmenting, "_best_reading", _eager_best_reading)
    before = split_by_recognition(mask, 100, by_ink)
    assert len(found) >= 2 and [x for x, _ in found] == [x for x, _ in before]
    assert all(np.array_equal(p, q) for (_, p), (_, q) in zip(found, before))


@pytest.mark.parametrize(("digits", "gap"), [([7, 2, 3], -0.05), ([1, 4, 7], None)])
def test_read_reads_each_glyph_once_and_as_reading_its_digits_afresh_would(bundled, digits, gap):
    """Predictor.read keeps the probabilities segment() computed choosing its cuts: a digit it chose is not
    read again (a lone narrow digit, never asked about, is read at the end), and each reading is the one a
    fresh look at the digit's glyph gives."""
    from digitrec.pairs import load_pair_scorer

    image, _ = line_image(digits, gap=gap)
    seen: list[bytes] = []

    def backend(batch: np.ndarray) -> np.ndarray:
        seen.extend(glyph.tobytes() for glyph in np.asarray(batch, np.float32).reshape(-1, 28, 28))
        return bundled.backend(batch)

    predictor = Predictor(backend, bundled.meta, name=bundled.name)
    result = predictor.read(image)
    assert len(seen) == len(set(seen))  # no glyph twice
    pieces = segment(image, score=lambda g: _scored(bundled, g, []), pairs=load_pair_scorer())
    fresh = bundled.probabilities(np.stack([p.image for p in pieces])[:, None])
    assert len(result.digits) == len(pieces) == len(digits)
    for digit, piece, probabilities in zip(result.digits, pieces, fresh):
        expected = piece.reading or (int(probabilities.argmax()), float(probabilities.max()))
        assert (digit.digit, digit.box) == (expected[0], piece.box)
        assert digit.confidence == pytest.approx(expected[1], abs=1e-6)


def _touching_lines(seed: int, gap: int) -> np.ndarray:
    """ "52806" over "3947" in pen, the bottom line's first ink row `gap` px under the top line's last (negative:
    their rows overlap, and with these seeds some digit of one line touches one of the other)."""
    rng = np.random.default_rng(seed)
    top, bottom = (
        number_line([crop_ink(draw_digit(d, rng, 80)) for d in digits], rng)[0]
        for digits in ([5, 2, 8, 0, 6], [3, 9, 4, 7])
    )
    page = _close_together(top, bottom, gap)
    return (255 * (0.9 - 0.8 * np.pad(page, 40))).astype(np.uint8)


@pytest.mark.parametrize(("seed", "gap"), [(2, -4), (5, -8), (7, -4)])
def test_two_lines_whose_digits_touch_are_read_apart(bundled, seed, gap):
    """A digit of one line touching one of the next made one part of both lines' rows, which went whole to one
    line: "8389" for "52806" over "3947" (seed 2), "5289" over "394" (5), "806" over "8347" (7)."""
    assert bundled.read(_touching_lines(seed, gap)).lines == ["52806", "3947"]


@pytest.mark.parametrize(("seed", "tall"), [(1, 7), (4, 1), (4, 9), (5, 4), (9, 9)])
def test_one_digit_written_twice_as_tall_as_the_others_is_not_cut_into_two_lines(bundled, seed, tall):
    """A part two line heights tall is two lines' digits touching only where the rest of the writing says so: one
    tall digit in a line of short ones stays whole ("57" over "7806" for "57806" when every such part was cut)."""
    rng = np.random.default_rng(seed)
    glyphs = [crop_ink(draw_digit(d, rng, 150 if i == 1 else 80)) for i, d in enumerate([5, tall, 8, 0, 6])]
    line = number_line(glyphs, rng)[0]
    assert bundled.read((255 * (0.9 - 0.8 * np.pad(line, 40))).astype(np.uint8)).lines == [f"5{tall}806"]


@pytest.mark.parametrize(("seed", "tall", "angle"), [(1, 7, 16), (2, 1, 16), (2, 1, 20), (1, 1, 20)])
def test_one_tall_digit_on_a_slanted_line_is_not_cut_into_two_lines(bundled, seed, tall, angle):
    """On a line written at a slant, the neighbours of one tall digit stand higher on one side and lower on the
    other: measured straight up and down they looked like two lines ("7806" over "57" for "57806" at 16 degrees)."""
    rng = np.random.default_rng(seed)
    glyphs = [crop_ink(draw_digit(d, rng, 150 if i == 1 else 80)) for i, d in enumerate([5, tall, 8, 0, 6])]
    line = np.pad(number_line(glyphs, rng)[0], 120)
    turn = cv2.getRotationMatrix2D((line.shape[1] / 2, line.shape[0] / 2), angle, 1.0)
    line = cv2.warpAffine(line, turn, (line.shape[1], line.shape[0]))
    assert bundled.read((255 * (0.9 - 0.8 * line)).astype(np.uint8)).lines == [f"5{tall}806"]


def test_a_part_across_two_lines_is_cut_where_they_touch_and_its_ink_counted_in_each_half():
    """Two lines of hollow boxes (50 px tall), the last box of the top line joined by a short stroke to the box under
    it: one part 105 px tall, cut in two at the stroke; the labels and the areas agree after the cut."""
    mask = np.zeros((200, 330), dtype=bool)

    def box(x: int, y: int) -> None:
        mask[y : y + 50, x : x + 30] = True
        mask[y + 4 : y + 46, x + 4 : x + 26] = False

    for x in (10, 60, 110, 160, 260):
        box(x, 20)  # the top line: rows 20-69
    for x in (35, 85, 135, 210):
        box(x, 80)  # the bottom line: rows 80-129
    box(260, 75)  # ... and its last box, rows 75-124, under the top line's last
    mask[70:75, 270:273] = True  # the joint
    labels, blobs, areas = components(mask)
    kept, line_height = clean(blobs, areas)
    assert line_height == 50
    parts, cut_areas = cut_two_line_parts(kept, labels, areas, line_height)
    assert len(parts) == len(kept) + 1
    assert sorted((b.y0, b.y1) for b in parts if b.x0 == 260) == [
        (20, 73),
        (73, 125),
    ]  # cut inside the joint (rows 70-74)
    assert np.array_equal(np.bincount(labels.ravel(), minlength=len(cut_areas)), cut_areas)
    assert [len(line) for line in split_lines(parts, line_height)] == [5, 5]


def test_a_strip_too_thin_for_a_closer_look_is_read_at_its_working_size(bundled):
    """A 20 x 20,000 photo of stripes: the window of its closer look was 3 px wide, and `read` refused the whole
    photo as "the image is 3x3390 pixels, too small to hold a digit" (predict answered it)."""
    stripes = np.repeat(np.tile(np.array([20, 235], np.uint8), 500), 20)[:, None].repeat(20, axis=1)
    buffer = io.BytesIO()
    Image.fromarray(stripes).save(buffer, "PNG")
    result = bundled.read(buffer.getvalue())  # answered, not refused
    assert all(0 <= d.box[1] < 20_000 and d.box[0] < 20 for d in result.digits)


def test_a_ruled_line_alone_is_no_number(bundled):
    """A page holding only a drawn line: the line height came from the line itself, and `read` cut it into 67
    doubtful 4s (predict rejects it)."""
    page = np.full((200, 700), 255, np.uint8)
    page[97:103, 50:650] = 0
    buffer = io.BytesIO()
    Image.fromarray(page).save(buffer, "PNG")
    assert bundled.read(buffer.getvalue()).number == ""
    page[20:90, 330:338] = 0  # and a 1 written above it is still read
    buffer = io.BytesIO()
    Image.fromarray(page).save(buffer, "PNG")
    assert bundled.read(buffer.getvalue()).number == "1"
    page[20:90, 330:338] = 255
    page[60:140, 330:338] = 0  # a 1 standing on it: one blob with the line, a known limit (ruled lines)
    buffer = io.BytesIO()
    Image.fromarray(page).save(buffer, "PNG")
    # it read "774577", five of its six digits doubtful; now that line is left out as no digits
    standing = bundled.read(buffer.getvalue())
    assert standing.number in ("", "1") and all(not d.doubtful for d in standing.digits)


def test_a_read_under_a_time_limit_stops_with_one_sentence_past_it(bundled):
    """The server reads under a limit (a read that has begun runs on a worker to its end): past it, an
    ImageError; outside the limit's context, reads are as before."""
    from digitrec.errors import ImageError
    from digitrec.segment import time_limit

    page, _ = line_image([3, 1, 4, 1, 5], seed=0)
    with time_limit(None):
        assert bundled.read(page).number == "31415"
    with time_limit(0.0), pytest.raises(ImageError, match=r"^reading this photo took over 0 s, .* crop it"):
        bundled.read(page)
    assert bundled.read(page).number == "31415"  # the limit went with its context


# Digits drawn as polylines in a unit box, as a reviewer drew them (a closed 4 with its small triangle, an
# octagonal 0, a 2 and a 9)
POLYLINE_DIGITS = {
    "0": [
        (0.5, 0.05),
        (0.2, 0.2),
        (0.15, 0.5),
        (0.2, 0.8),
        (0.5, 0.95),
        (0.8, 0.8),
        (0.85, 0.5),
        (0.8, 0.2),
        (0.5, 0.05),
    ],
    "2": [(0.2, 0.25), (0.35, 0.08), (0.6, 0.05), (0.8, 0.2), (0.75, 0.45), (0.2, 0.92), (0.85, 0.92)],
    "4": [(0.65, 0.95), (0.65, 0.05), (0.15, 0.65), (0.85, 0.65)],
    "9": [
        (0.75, 0.4),
        (0.5, 0.5),
        (0.25, 0.38),
        (0.28, 0.15),
        (0.5, 0.05),
        (0.72, 0.15),
        (0.75, 0.4),
        (0.72, 0.95),
    ],
}


def polyline_photo(text: str, size: tuple[int, int], height: int, seed: int = 0) -> bytes:
    """`text` written `height` px high with a pen a tenth of that wide, on a gray page of `size` with sensor noise,
    as a JPEG."""
    width_px = int(height * 0.6)
    page = Image.new("L", size, 225)
    draw = ImageDraw.Draw(page)
    x = (size[0] - len(text) * width_px * 1.35) / 2
    y, pen = (size[1] - height) / 2, max(3, height // 10)
    for digit in text:
        points = [(x + px * width_px, y + py * height) for px, py in POLYLINE_DIGITS[digit]]
        draw.line(points, fill=35, width=pen, joint="curve")
        for px, py in points:
            draw.ellipse([px - pen / 2, py - pen / 2, px + pen / 2, py + pen / 2], fill=35)
        x += width_px * 1.35
    noisy = np.asarray(page, np.float32) + np.random.default_rng(seed).normal(0, 4, (size[1], size[0]))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("text", "size", "height"),
    [("40", (4032, 3024), 188), ("2404", (4032, 3024), 196), ("4029", (1024, 768), 46)],
)
def test_digits_some_fifty_px_high_at_the_working_size_keep_their_loops(bundled, text, size, height):
    """A phone photo of "40" with digits 4.3% of its width read as "10": at the working size (1,024 px) they stood
    44 px high, and the light blur, sized for the picture (sigma 3.8 px), filled the 4's triangle (a solid
    wedge, read as a 1); 10 of 30 such numbers were misread. The ink is now blurred for the digits' size."""
    assert bundled.read(polyline_photo(text, size, height)).number == text
