"""segment(): a line of digits becomes one box per digit, left to right, in the input's own pixels."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from digitrec.realworld import crop_ink, draw_digit, number_line
from digitrec.segment import cut_path, segment, split_by_recognition


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
    assert len(seen) >= 3 and max(seen) > 1.05 > min(seen)  # the whole blob and its pieces were asked

    def reads_narrow_ink(glyphs: np.ndarray) -> np.ndarray:
        return np.array([0.99 if _ink_aspect(g) < 1.0 else 0.05 for g in glyphs])

    assert len(segment(image, score=reads_narrow_ink)) == 2


def test_a_cut_path_goes_round_the_ink():
    mask = np.zeros((40, 40), dtype=bool)
    mask[:, 10:14] = True  # a stroke on the left
    mask[:, 26:30] = True  # and one on the right
    mask[18:22, 10:30] = True  # joined by a bar: the cut must cross it, and only it
    path = cut_path(mask, 20, 8)
    assert path.shape == (40,) and ((path >= 14) & (path < 26)).all()
    assert mask[np.arange(40), path].sum() == 4  # the bar's thickness


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


def test_dust_and_a_ruled_line_are_not_digits():
    image, _ = line_image([9, 6], gap=0.3)
    page = Image.fromarray(image)
    draw = ImageDraw.Draw(page)
    draw.line([(0, page.height - 15), (page.width, page.height - 15)], fill=60, width=2)
    for x in (15, 200, 230):
        draw.ellipse((x, 10, x + 3, 13), fill=40)
    assert len(segment(np.asarray(page))) == 2


def test_a_blank_page_reads_nothing():
    assert segment(np.full((100, 400), 220, np.uint8)) == []
