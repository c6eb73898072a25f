"""Seeded generator of photo-like handwriting that is not MNIST, and `eval_real()` that scores a Predictor on it.

Ink shapes come from three sources: MNIST *test* digits (never trained on), pen-drawn digits from stroke
skeletons below (random slant, jitter, pen width, variant forms: open 4, barred 7, flagged 1...), and font
digits. `photo()` puts an ink shape on paper the way a phone camera sees it: paper tint and texture, faint
ruled lines, pen colour and pressure, lighting gradient, soft shadow, chalkboard polarity, rotation, blur,
sensor noise, odd sizes, JPEG compression. Sets:

    mnist-photo   single MNIST test digits, photographed
    pen-photo     single pen-drawn digits, photographed
    font-photo    single font digits (STIX / Computer Modern faces), photographed
    numbers       lines of 2-7 pen or MNIST digits, some touching, photographed
    negatives     blank pages, handwritten and printed letters, noise and scribbles: all must be rejected
    lines         two such numbers written one under the other, photographed together (not in eval-real's
                  default sets: `--sets lines`)
    close-lines   the same written close together: the rows of their ink from 0.1 line heights apart to 0.15
                  overlapping (not a default set either)
    table-photo   single pen-drawn digits, photographed on a page lying on a table that shows round it, seen at
                  a slant (not a default set)

Training negatives (augment_real.py) never come from here: letters from other fonts (DejaVu) and other pen
skeletons, scribbles from other curve generators, digit pairs from MNIST *train* digits, all from their own
seed; calibrate.py draws its calibration sets from these generators with a seed eval-real does not use.
"""

from __future__ import annotations

import io
import json
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

Array = np.ndarray
Strokes = list[list[tuple[float, float]]]

# ------------------------------------------------------------------------------------ stroke skeletons


def arc(
    cx: float, cy: float, rx: float, ry: float, start_deg: float, end_deg: float, n: int = 24
) -> list[tuple[float, float]]:
    """Points on an ellipse in a y-down unit box; angles grow clockwise on screen (0 = right, 90 = bottom)."""
    angles = np.radians(np.linspace(start_deg, end_deg, n))
    return [(cx + rx * math.cos(a), cy + ry * math.sin(a)) for a in angles]


def _line(*points: tuple[float, float]) -> list[tuple[float, float]]:
    return list(points)


# Each digit has a few variant forms, as people write them; coordinates in a unit box, y down.
DIGIT_STROKES: dict[int, list[Strokes]] = {
    0: [[arc(0.5, 0.5, 0.32, 0.48, -100, 265)], [arc(0.5, 0.5, 0.36, 0.47, -80, 290)]],
    1: [
        [_line((0.5, 0.0), (0.5, 1.0))],
        [_line((0.28, 0.22), (0.55, 0.0), (0.55, 1.0))],
        [_line((0.3, 0.2), (0.55, 0.0), (0.55, 1.0)), _line((0.3, 1.0), (0.8, 1.0))],
    ],
    2: [
        [arc(0.5, 0.3, 0.32, 0.28, 195, 385) + _line((0.15, 1.0), (0.88, 1.0))],
        [arc(0.48, 0.3, 0.3, 0.28, 190, 400) + _line((0.18, 0.98), (0.3, 0.9), (0.85, 1.0))],
    ],
    3: [
        [arc(0.47, 0.26, 0.3, 0.25, 200, 450) + arc(0.47, 0.74, 0.34, 0.26, -90, 160)],
        [_line((0.15, 0.0), (0.8, 0.0), (0.4, 0.42)) + arc(0.47, 0.7, 0.35, 0.29, -80, 160)],
    ],
    4: [
        [_line((0.68, 1.0), (0.68, 0.0), (0.1, 0.68), (0.92, 0.68))],
        [_line((0.25, 0.0), (0.15, 0.62), (0.9, 0.62)), _line((0.7, 0.25), (0.7, 1.0))],
    ],
    5: [
        [_line((0.82, 0.0), (0.28, 0.0), (0.24, 0.45)) + arc(0.5, 0.69, 0.32, 0.3, -125, 150)],
        [
            _line((0.24, 0.0), (0.2, 0.45)) + arc(0.5, 0.69, 0.32, 0.3, -125, 150),
            _line((0.24, 0.0), (0.85, 0.02)),
        ],
    ],
    6: [
        [_line((0.75, 0.0), (0.5, 0.12), (0.3, 0.35)) + arc(0.5, 0.72, 0.3, 0.27, 180, 540)],
        [arc(0.85, 0.72, 0.65, 0.72, 245, 180, 16) + arc(0.5, 0.72, 0.3, 0.27, 180, 520)],
    ],
    7: [
        [_line((0.1, 0.02), (0.88, 0.0), (0.38, 1.0))],
        [_line((0.1, 0.02), (0.88, 0.0), (0.38, 1.0)), _line((0.35, 0.52), (0.8, 0.5))],
    ],
    8: [
        [arc(0.5, 0.25, 0.25, 0.25, 90, 450), arc(0.5, 0.74, 0.31, 0.26, -90, 270)],
        [
            arc(0.5, 0.25, 0.24, 0.25, 135, 405)
            + _line((0.25, 0.65))
            + arc(0.5, 0.74, 0.31, 0.26, 180, 440)
            + _line((0.7, 0.18))
        ],
    ],
    9: [
        [arc(0.47, 0.3, 0.3, 0.3, 0, 360) + _line((0.77, 0.3), (0.72, 1.0))],
        [arc(0.47, 0.3, 0.3, 0.3, 10, 370) + _line((0.77, 0.33), (0.75, 0.7), (0.55, 1.0), (0.3, 0.95))],
    ],
}

# Handwritten capitals for the negatives set, chosen so none of them reads as a digit.
LETTER_STROKES: dict[str, Strokes] = {
    "A": [_line((0.05, 1.0), (0.5, 0.0), (0.95, 1.0)), _line((0.25, 0.6), (0.75, 0.6))],
    "E": [_line((0.85, 0.0), (0.15, 0.0), (0.15, 1.0), (0.85, 1.0)), _line((0.15, 0.5), (0.7, 0.5))],
    "F": [_line((0.85, 0.0), (0.15, 0.0), (0.15, 1.0)), _line((0.15, 0.48), (0.7, 0.48))],
    "H": [_line((0.12, 0.0), (0.12, 1.0)), _line((0.88, 0.0), (0.88, 1.0)), _line((0.12, 0.5), (0.88, 0.5))],
    "K": [
        _line((0.15, 0.0), (0.15, 1.0)),
        _line((0.85, 0.0), (0.15, 0.58)),
        _line((0.38, 0.42), (0.88, 1.0)),
    ],
    "M": [_line((0.05, 1.0), (0.12, 0.0), (0.5, 0.65), (0.88, 0.0), (0.95, 1.0))],
    "N": [_line((0.12, 1.0), (0.12, 0.0), (0.88, 1.0), (0.88, 0.0))],
    "R": [
        _line((0.15, 1.0), (0.15, 0.0)) + arc(0.4, 0.25, 0.3, 0.25, -90, 90) + _line((0.15, 0.5), (0.85, 1.0))
    ],
    "W": [_line((0.0, 0.0), (0.22, 1.0), (0.5, 0.35), (0.78, 1.0), (1.0, 0.0))],
    "X": [_line((0.1, 0.0), (0.9, 1.0)), _line((0.9, 0.0), (0.1, 1.0))],
    "#": [
        _line((0.35, 0.0), (0.28, 1.0)),
        _line((0.72, 0.0), (0.65, 1.0)),
        _line((0.05, 0.33), (0.95, 0.33)),
        _line((0.05, 0.67), (0.95, 0.67)),
    ],
    "*": [
        _line((0.5, 0.0), (0.5, 1.0)),
        _line((0.07, 0.25), (0.93, 0.75)),
        _line((0.93, 0.25), (0.07, 0.75)),
    ],
}

FONT_DIGITS_EVAL = (
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf",
    "cmr10.ttf",
    "cmss10.ttf",
    "cmb10.ttf",
    "cmtt10.ttf",
    "DejaVuSans.ttf",
    "DejaVuSerif-Italic.ttf",
)
FONT_LETTERS_EVAL = (
    "STIXGeneral.ttf",
    "STIXGeneralBol.ttf",
    "STIXGeneralItalic.ttf",
    "cmr10.ttf",
    "cmss10.ttf",
    "cmtt10.ttf",
)
FONT_LETTERS_TRAIN = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSansMono.ttf",
    "DejaVuSansMono-BoldOblique.ttf",
)
# Letters and signs that no reasonable reader takes for a digit (no O, I, l, S, Z, B, G, b, g, q, T, Y...).
NON_DIGIT_CHARS = "ACEFHKMNPRUVWXacdefhkmnpruvwx#*@&%"


def font_path(name: str) -> Path:
    """Fonts bundled with matplotlib (a dependency), found without importing it (which takes seconds)."""
    import importlib.util

    spec = importlib.util.find_spec("matplotlib")
    assert spec is not None and spec.submodule_search_locations, "matplotlib is a dependency of digitrec"
    return Path(list(spec.submodule_search_locations)[0]) / "mpl-data" / "fonts" / "ttf" / name


def draw_strokes(strokes: Strokes, rng: np.random.Generator, height: int = 96) -> Array:
    """Strokes in a unit box -> float ink coverage (H, W), as one hand would write them: slanted, wobbly, pen-wide."""
    aspect = rng.uniform(0.55, 0.85)
    slant = rng.uniform(-0.25, 0.35)  # most people lean right
    pen = rng.uniform(0.05, 0.14) * height
    phase = rng.uniform(0, 2 * math.pi, size=4)
    wobble = rng.uniform(0.0, 0.04)
    margin = pen + 0.1 * height
    width = int(aspect * height + abs(slant) * height + 2 * margin)
    scale = 4  # draw at 4x and shrink: PIL lines are not anti-aliased
    image = Image.new("L", (width * scale, int(height + 2 * margin) * scale), 0)
    draw = ImageDraw.Draw(image)
    for stroke in strokes:
        points = []
        for x, y in stroke:
            # A smooth random warp (two sines) bends every stroke of the glyph coherently, like a real hand.
            x2 = x + wobble * math.sin(3 * y + phase[0]) + rng.normal(0, 0.012)
            y2 = y + wobble * math.sin(3 * x + phase[1]) + rng.normal(0, 0.012)
            px = (
                margin
                + aspect * height * x2
                + slant * height * (1 - y2)
                + (abs(slant) * height if slant < 0 else 0)
            )
            py = margin + height * y2
            points.append((px * scale, py * scale))
        w = int(pen * scale)
        draw.line(points, fill=255, width=w, joint="curve")
        for px, py in (points[0], points[-1]):
            draw.ellipse((px - w / 2, py - w / 2, px + w / 2, py + w / 2), fill=255)
    image = image.resize((width, int(height + 2 * margin)), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.float32) / 255.0


def draw_digit(digit: int, rng: np.random.Generator, height: int = 96) -> Array:
    variants = DIGIT_STROKES[digit]
    return draw_strokes(variants[rng.integers(len(variants))], rng, height)


@lru_cache(maxsize=64)
def _font(name: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(font_path(name)), size=size)


def draw_text(text: str, font_name: str, rng: np.random.Generator, height: int = 96) -> Array:
    """A character from a TrueType font as ink coverage, cropped to its ink."""
    font = _font(font_name, int(height * 1.3))
    left, top, right, bottom = cast(tuple[int, int, int, int], font.getbbox(text))  # ints at runtime
    pad = height // 8
    image = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad), 0)
    ImageDraw.Draw(image).text((pad - left, pad - top), text, fill=255, font=font)
    return np.asarray(image, dtype=np.float32) / 255.0


def mnist_glyph(image28: Array, height: int = 96) -> Array:
    """An MNIST digit upsampled to a smooth ink coverage map (bicubic keeps the pen's shape, not the pixels)."""
    size = int(height * 28 / 20)
    big = Image.fromarray(image28.astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(big, dtype=np.float32) / 255.0 * 1.15, 0, 1)


def scribble(rng: np.random.Generator, height: int = 96) -> Array:
    """A few random curves on top of each other: what a bored pen or a crossed-out word looks like."""
    strokes = []
    for _ in range(rng.integers(3, 6)):
        control = rng.uniform(0, 1, size=(4, 2))
        t = np.linspace(0, 1, 20)[:, None]
        bezier = (
            (1 - t) ** 3 * control[0]
            + 3 * (1 - t) ** 2 * t * control[1]
            + 3 * (1 - t) * t**2 * control[2]
            + t**3 * control[3]
        )
        strokes.append([tuple(p) for p in bezier])
    return draw_strokes(strokes, rng, height)


def crop_ink(coverage: Array, level: float = 0.05) -> Array:
    rows, cols = np.flatnonzero((coverage > level).any(1)), np.flatnonzero((coverage > level).any(0))
    if len(rows) == 0:
        return coverage
    return coverage[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


# ---------------------------------------------------------------------------------------- photographs


@dataclass
class Sample:
    """One generated picture: encoded bytes as a user would upload them, and what is in it."""

    data: bytes
    label: str | None  # "7" for a digit, "3051" for a number, None for a negative
    kind: str
    boxes: list[tuple[int, int, int, int]] | None = None  # (x, y, w, h) of each digit, for numbers


def photo(
    coverage: Array,
    rng: np.random.Generator,
    *,
    boxes: list | None = None,
    long_side: int | None = None,
    line_share: float = 1.0,
) -> tuple[bytes, list]:
    """Ink coverage (H, W) in [0, 1] -> an encoded photo of it on paper; returns (bytes, boxes in photo pixels).

    `line_share`: the share of the coverage's height one line of writing takes (a page of two numbers: about
    0.4), so that the defocus scales with the writing, as on a photo of one line."""
    coverage = crop_ink(coverage) if boxes is None else coverage
    h0, w0 = coverage.shape
    # Margins: the digit is rarely centered and rarely fills the frame.
    margin = rng.uniform(0.12, 0.7, size=4) * max(h0, 0.6 * w0 if boxes is None else h0)
    canvas_h, canvas_w = int(h0 + margin[0] + margin[1]), int(w0 + margin[2] + margin[3])
    ink = np.zeros((canvas_h, canvas_w), dtype=np.float32)
    ink[int(margin[0]) : int(margin[0]) + h0, int(margin[2]) : int(margin[2]) + w0] = coverage
    offsets = (int(margin[2]), int(margin[0]))
    angle = rng.uniform(-10, 10)
    ink = ndimage.rotate(ink, angle, reshape=False, order=1, mode="constant")
    long_side = long_side or int(np.exp(rng.uniform(np.log(48), np.log(640))))
    scale = long_side / max(canvas_h, canvas_w)
    size = (max(8, round(canvas_w * scale)), max(8, round(canvas_h * scale)))
    ink = np.clip(np.asarray(Image.fromarray(ink, "F").resize(size, Image.Resampling.BILINEAR)), 0, 1)
    h, w = ink.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy, xx = yy / max(h, w), xx / max(h, w)

    chalkboard = rng.random() < 0.12
    if chalkboard:
        paper = np.array([0.12, 0.2, 0.15]) * rng.uniform(0.6, 1.6)
        pen = np.full(3, rng.uniform(0.7, 0.95))
    else:
        paper = rng.uniform(0.72, 1.0) * np.array([1.0, rng.uniform(0.95, 1.0), rng.uniform(0.85, 1.0)])
        pens = [
            np.array([0.05, 0.05, 0.08]),
            np.array([0.1, 0.15, 0.55]),
            np.full(3, 0.38),
            np.array([0.55, 0.08, 0.1]),
        ]
        pen = pens[rng.choice(4, p=[0.45, 0.3, 0.15, 0.1])] * rng.uniform(0.5, 1.2)
    texture = ndimage.gaussian_filter(
        rng.normal(0, 1, (h, w)).astype(np.float32), rng.uniform(0.5, 3)
    ) * rng.uniform(0.0, 0.06)
    pressure = 1 - rng.uniform(0, 0.35) * (
        0.5 + 0.5 * np.sin(xx * rng.uniform(3, 12) + yy * rng.uniform(3, 12))
    )
    image = np.empty((h, w, 3), dtype=np.float32)
    coverage_eff = ink * pressure
    for c in range(3):
        image[..., c] = paper[c] * (1 + texture) * (1 - coverage_eff) + pen[c] * coverage_eff
    if not chalkboard and rng.random() < 0.3:  # faint ruled lines, fainter than ink
        spacing = rng.uniform(0.08, 0.2)
        lines = (np.abs(((yy + rng.uniform(0, 1)) / spacing) % 1 - 0.5) > 0.49).astype(np.float32)
        image *= 1 - rng.uniform(0.03, 0.09) * ndimage.gaussian_filter(lines, 0.7)[..., None]
    # Lighting: a linear gradient, a vignette, and sometimes a soft shadow (a phone or a hand).
    direction = rng.uniform(0, 2 * math.pi)
    light = 1 - rng.uniform(0, 0.45) * (
        0.5 + 0.5 * ((xx - 0.5) * math.cos(direction) + (yy - 0.5) * math.sin(direction))
    )
    light *= 1 - rng.uniform(0, 0.3) * ((xx - xx.mean()) ** 2 + (yy - yy.mean()) ** 2) * 2
    if rng.random() < 0.35:
        edge_angle = rng.uniform(0, 2 * math.pi)
        distance = (xx - rng.uniform(0.2, 0.8) * xx.max()) * math.cos(edge_angle) + (
            yy - rng.uniform(0.2, 0.8) * yy.max()
        ) * math.sin(edge_angle)
        softness = rng.uniform(0.04, 0.15)
        light *= 1 - rng.uniform(0.25, 0.55) / (1 + np.exp(-distance / softness))
    image *= light[..., None]
    # defocus scales with the writing (one line of it), not with a long line's width
    blur = rng.uniform(0, 0.02) * min(h, w) * line_share
    if blur > 0.3:
        image = cast(Array, ndimage.gaussian_filter(image, (blur, blur, 0)))
    image += cast(Array, rng.normal(0, rng.uniform(0, 0.035), image.shape)).astype(np.float32)
    pixels = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    picture = Image.fromarray(pixels, "RGB")
    if rng.random() < 0.25:
        picture = picture.convert("L")
    buffer = io.BytesIO()
    if rng.random() < 0.75:
        picture.save(buffer, "JPEG", quality=int(rng.uniform(30, 95)))
    else:
        picture.save(buffer, "PNG")
    photo_boxes = []
    for x, y, bw, bh in boxes or []:
        # Boxes move with the (small) rotation about the canvas center; keep their centers right.
        cx, cy = x + offsets[0] + bw / 2 - canvas_w / 2, y + offsets[1] + bh / 2 - canvas_h / 2
        a = math.radians(-angle)
        rx, ry = (
            cx * math.cos(a) - cy * math.sin(a) + canvas_w / 2,
            cx * math.sin(a) + cy * math.cos(a) + canvas_h / 2,
        )
        photo_boxes.append(
            (round((rx - bw / 2) * scale), round((ry - bh / 2) * scale), round(bw * scale), round(bh * scale))
        )
    return buffer.getvalue(), photo_boxes


def on_table(page: bytes, rng: np.random.Generator) -> bytes:
    """A photo of a page -> a photo of it lying on a table, seen at a slant as a phone held above a desk sees it:
    the page fills 45-100% of the frame's longer side, so the table shows at its corners or all round it (wood,
    grey or dark, the page casting a soft shadow on it)."""
    import cv2

    sheet = np.asarray(Image.open(io.BytesIO(page)).convert("RGB"), dtype=np.float32) / 255
    ph, pw = sheet.shape[:2]
    fill = rng.uniform(0.45, 1.0)
    width, height = round(pw / fill), round(ph / fill)
    narrow = rng.uniform(0.0, 0.3) * pw / 2  # the far edge seen shorter: the camera tilted toward the page
    corners = np.array([[narrow, 0], [pw - narrow, 0], [pw, ph], [0, ph]], np.float32) - [pw / 2, ph / 2]
    turn = math.radians(rng.uniform(-8, 8))
    rotation = np.array([[math.cos(turn), -math.sin(turn)], [math.sin(turn), math.cos(turn)]], np.float32)
    center = np.array([width / 2, height / 2]) + rng.uniform(-0.05, 0.05, 2) * [width, height]
    target = (corners @ rotation.T + center).astype(np.float32)
    source = np.array([[0, 0], [pw, 0], [pw, ph], [0, ph]], np.float32)
    warp = cv2.getPerspectiveTransform(source, target)
    seen = cv2.warpPerspective(sheet, warp, (width, height), flags=cv2.INTER_LINEAR)
    inside = cv2.warpPerspective(np.ones((ph, pw), np.float32), warp, (width, height))[..., None]
    kind = rng.choice(3)
    if kind == 0:  # wood: streaks along the grain
        grain = ndimage.gaussian_filter(rng.normal(0, 1, (height, width)), (1.5, 20))
        grain /= max(1e-6, float(np.abs(grain).max()))
        table = np.array([0.55, 0.36, 0.2]) * rng.uniform(0.5, 1.2) * (1 + 0.35 * grain)[..., None]
    else:  # a grey or a dark desk
        table = np.full((height, width, 3), rng.uniform(0.35, 0.55) if kind == 1 else rng.uniform(0.05, 0.2))
        table *= 1 + rng.normal(0, 0.03, (height, width, 1))
    table *= 1 - 0.35 * cv2.GaussianBlur(inside[..., 0], (0, 0), 0.01 * max(width, height) + 1)[..., None]
    picture = np.clip(table * (1 - inside) + seen * inside, 0, 1)
    buffer = io.BytesIO()
    Image.fromarray((picture * 255).round().astype(np.uint8)).save(
        buffer, "JPEG", quality=int(rng.uniform(70, 95))
    )
    return buffer.getvalue()


def number_line(
    glyphs: list[Array], rng: np.random.Generator
) -> tuple[Array, list[tuple[int, int, int, int]]]:
    """Glyphs side by side on one baseline with random gaps; negative gaps make neighbours touch."""
    height = max(g.shape[0] for g in glyphs)
    gaps = rng.uniform(-0.12, 0.35, size=len(glyphs)) * height
    if rng.random() < 0.5:
        gaps = np.abs(gaps)  # half the numbers are written with clear gaps
    width = int(sum(g.shape[1] for g in glyphs) + gaps.clip(0).sum() + height)
    line = np.zeros((int(height * 1.3), width), dtype=np.float32)
    x = 0.0
    boxes = []
    for glyph, gap in zip(glyphs, gaps):
        gh, gw = glyph.shape
        y = int(rng.uniform(0, 0.3 * height - 1e-6) + (height - gh))
        x0 = int(max(0, x))
        line[y : y + gh, x0 : x0 + gw] = np.maximum(line[y : y + gh, x0 : x0 + gw], glyph)
        boxes.append((x0, y, gw, gh))
        x = x0 + gw + gap
    right = int(max(b[0] + b[2] for b in boxes))
    return line[:, :right], boxes


# ------------------------------------------------------------------------------------------------- sets

# (a set's place here seeds it: new sets go at the end)
SETS = (
    "mnist-photo",
    "pen-photo",
    "font-photo",
    "numbers",
    "negatives",
    "lines",
    "close-lines",
    "table-photo",
)
TWO_LINE_SETS = ("lines", "close-lines")
DEFAULT_SETS = SETS[:5]  # what eval-real reads unless --sets names others


def _close_together(top: Array, bottom: Array, gap: float) -> Array:
    """Two lines of ink on one page, the first ink row of `bottom` `gap` pixels under the last of `top` (a
    negative gap: their rows overlap; where strokes cross, the darker ink wins)."""
    top_rows, bottom_rows = (np.flatnonzero(line.max(axis=1) > 0.1) for line in (top, bottom))  # inked rows
    offset = max(0, int(round(top_rows[-1] + gap - bottom_rows[0])))  # bottom's first row on the page
    page = np.zeros(
        (max(top.shape[0], offset + bottom.shape[0]), max(top.shape[1], bottom.shape[1])), np.float32
    )
    page[: top.shape[0], : top.shape[1]] = top
    below = page[offset : offset + bottom.shape[0], : bottom.shape[1]]
    np.maximum(below, bottom, out=below)
    return page


@lru_cache(maxsize=1)
def _mnist_test() -> tuple[Array, Array]:
    from .data import load_mnist

    data = load_mnist()
    return data.test_images.numpy(), data.test_labels.numpy()


def generate(
    name: str, count: int, seed: int = 0, mnist: tuple[Array, Array] | None = None
) -> Iterator[Sample]:
    """Yield `count` samples of set `name`; the same (name, count, seed) always gives the same bytes."""
    rng = np.random.default_rng([SETS.index(name), seed])
    for _ in range(count):
        if name == "mnist-photo":
            images, labels = mnist or _mnist_test()
            i = int(rng.integers(len(images)))
            data, _ = photo(mnist_glyph(images[i], int(rng.integers(48, 128))), rng)
            yield Sample(data, str(int(labels[i])), name)
        elif name == "pen-photo":
            digit = int(rng.integers(10))
            data, _ = photo(draw_digit(digit, rng, int(rng.integers(48, 128))), rng)
            yield Sample(data, str(digit), name)
        elif name == "font-photo":
            digit = int(rng.integers(10))
            data, _ = photo(
                draw_text(str(digit), FONT_DIGITS_EVAL[rng.integers(len(FONT_DIGITS_EVAL))], rng, 80), rng
            )
            yield Sample(data, str(digit), name)
        elif name == "numbers":
            digits = [int(d) for d in rng.integers(10, size=int(rng.integers(2, 8)))]
            height = int(rng.integers(48, 96))
            line, boxes = number_line(_glyphs(digits, height, rng, mnist), rng)
            data, photo_boxes = photo(
                line, rng, boxes=boxes, long_side=int(rng.uniform(1.2, 3) * 60 * len(digits) ** 0.7 + 80)
            )
            yield Sample(data, "".join(map(str, digits)), name, photo_boxes)
        elif name in TWO_LINE_SETS:
            height = int(rng.integers(48, 96))
            numbers = [[int(d) for d in rng.integers(10, size=int(rng.integers(2, 8)))] for _ in range(2)]
            top, bottom = (number_line(_glyphs(digits, height, rng, mnist), rng)[0] for digits in numbers)
            if name == "lines":
                width = max(top.shape[1], bottom.shape[1])
                gap = np.zeros((int(rng.uniform(0.2, 0.8) * height), width), dtype=np.float32)
                page = np.concatenate(
                    [
                        np.pad(top, ((0, 0), (0, width - top.shape[1]))),
                        gap,
                        np.pad(bottom, ((0, 0), (0, width - bottom.shape[1]))),
                    ]
                )
            else:
                page = _close_together(top, bottom, rng.uniform(-0.15, 0.1) * height)
            longest = max(len(digits) for digits in numbers)
            data, _ = photo(
                page,
                rng,
                boxes=[],
                long_side=int(rng.uniform(1.2, 3) * 60 * longest**0.7 + 160),
                line_share=top.shape[0] / page.shape[0],
            )
            yield Sample(data, "\n".join("".join(map(str, digits)) for digits in numbers), name)
        elif name == "table-photo":
            digit = int(rng.integers(10))
            sheet, _ = photo(
                draw_digit(digit, rng, int(rng.integers(48, 128))), rng, long_side=int(rng.integers(200, 640))
            )
            yield Sample(on_table(sheet, rng), str(digit), name)
        elif name == "negatives":
            kind = ["blank", "letter-pen", "letter-font", "noise", "scribble"][
                int(rng.choice(5, p=[0.2, 0.25, 0.25, 0.15, 0.15]))
            ]
            if kind == "blank":
                coverage = np.zeros((64, 64), dtype=np.float32)
                data, _ = photo(np.pad(coverage, 1, constant_values=0.0), rng)
            elif kind == "letter-pen":
                letters = list(LETTER_STROKES)
                data, _ = photo(
                    draw_strokes(LETTER_STROKES[letters[rng.integers(len(letters))]], rng, 80), rng
                )
            elif kind == "letter-font":
                char = NON_DIGIT_CHARS[rng.integers(len(NON_DIGIT_CHARS))]
                data, _ = photo(
                    draw_text(char, FONT_LETTERS_EVAL[rng.integers(len(FONT_LETTERS_EVAL))], rng, 80), rng
                )
            elif kind == "noise":
                side = int(rng.integers(32, 400))
                noise = (
                    ndimage.gaussian_filter(rng.random((side, side)), rng.uniform(0, 4))
                    if rng.random() < 0.7
                    else rng.random((side, side))
                )
                noise = (noise - noise.min()) / max(1e-6, noise.max() - noise.min())
                buffer = io.BytesIO()
                Image.fromarray((noise * 255).astype(np.uint8)).save(buffer, "PNG")
                data = buffer.getvalue()
            else:
                data, _ = photo(scribble(rng, 80), rng)
            yield Sample(data, None, f"negative-{kind}")
        else:
            raise ValueError(f"unknown set {name!r}")


def _glyphs(
    digits: list[int], height: int, rng: np.random.Generator, mnist: tuple[Array, Array] | None
) -> list[Array]:
    """A number's digits as ink: all drawn with the pen, or all MNIST test digits (half the numbers each)."""
    if rng.random() < 0.5:
        return [crop_ink(draw_digit(d, rng, height)) for d in digits]
    images, labels = mnist or _mnist_test()
    picks = [int(rng.choice(np.flatnonzero(labels == d))) for d in digits]
    return [crop_ink(mnist_glyph(images[i], height)) for i in picks]


def _digit_counts(number: str | None) -> list[int]:
    """How many digits each line of a reading (or of a label) holds: [5, 4] for "31415" over "2718"."""
    return [len(line) for line in number.split("\n")] if number else []


WRITTEN_NAME = re.compile(r"\d{5,}_(\d+(-\d+)*|none)\.(jpg|png)")  # the files write_set writes
# which files of its folder write_set wrote: only those are ever replaced
WRITTEN_LIST = ".eval-real-files.json"


def write_set(
    name: str, count: int, out_dir: str | Path, seed: int = 0, mnist: tuple[Array, Array] | None = None
) -> list[Path]:
    """Save a set as image files named <index>_<label>.<ext> (label 'none' for negatives, lines joined by '-'), for
    `digitrec predict DIR` (or `read DIR`).

    The files an earlier call wrote into out_dir (another count or seed), listed in its WRITTEN_LIST, are removed,
    so that the folder holds this set alone and <index> names one file; other files are left alone, and a file
    named like ours that no call wrote (a user's own 00001_7.png) stops it with a DigitrecError before anything
    is written or removed."""
    from .checkpoint import atomic_write_json

    out = Path(out_dir)
    ours = refuse_files_not_written(out)
    out.mkdir(parents=True, exist_ok=True)
    listed = out / WRITTEN_LIST
    samples = list(generate(name, count, seed, mnist))
    names = [_file_name(i, sample) for i, sample in enumerate(samples)]
    # listed before they exist: a --write stopped half way leaves files that the next one knows as its own
    atomic_write_json(listed, {"set": name, "count": count, "seed": seed, "files": sorted(ours | set(names))})
    for earlier in ours - set(names):
        if WRITTEN_NAME.fullmatch(earlier):  # never a name the list was edited to hold
            (out / earlier).unlink(missing_ok=True)
    paths = []
    for file_name, sample in zip(names, samples, strict=True):
        path = out / file_name
        path.write_bytes(sample.data)
        paths.append(path)
    atomic_write_json(listed, {"set": name, "count": count, "seed": seed, "files": names})
    return paths


def refuse_files_not_written(out: Path) -> set[str]:
    """The names of the files an earlier write_set wrote into `out`, as its WRITTEN_LIST says; a DigitrecError
    where `out` holds a file named like them that the list does not name (a user's own 00001_7.png; a folder
    written by a digitrec before 7 December, which kept no list). Nothing is created or removed."""
    from .errors import DigitrecError

    listed = out / WRITTEN_LIST
    try:
        files = json.loads(listed.read_text())["files"] if listed.exists() else []
        ours = {name for name in files if isinstance(name, str)}
    except (OSError, ValueError, KeyError, TypeError):
        ours = set()  # a damaged list protects nothing: the files named like ours are then the user's
    if not out.is_dir():
        return ours
    theirs = sorted(p.name for p in out.iterdir() if WRITTEN_NAME.fullmatch(p.name) and p.name not in ours)
    if theirs:
        more = f" and {len(theirs) - 1} more file(s)" if len(theirs) > 1 else ""
        raise DigitrecError(
            f"{out} holds {theirs[0]}{more} named like the images eval-real --write writes there, which its list "
            f"({WRITTEN_LIST}; a digitrec before 7 December kept none) does not name; give --write another "
            "folder, or remove or move them, so that no file of yours is replaced."
        )
    return ours


def _file_name(index: int, sample: Sample) -> str:
    """<index>_<label>.<ext>: the label 'none' for a negative, a photo of two numbers' lines joined by '-'."""
    label = (sample.label or "none").replace("\n", "-")
    ext = "jpg" if sample.data[:2] == b"\xff\xd8" else "png"
    return f"{index:05d}_{label}.{ext}"


# ------------------------------------------------------------------------------------------ evaluation


def naive_preprocess(data: bytes) -> Array:
    """What a first try does: grayscale, squash to 28x28, no inversion, no cropping. The baseline to beat."""
    image = Image.open(io.BytesIO(data)).convert("L").resize((28, 28), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float32) / 255.0


def eval_real(
    predictor: Any,
    count: int = 500,
    seed: int = 0,
    sets: tuple[str, ...] = DEFAULT_SETS,
    log: Callable[[str], None] = print,
    show_misses: int = 0,
    mnist: tuple[Array, Array] | None = None,
) -> dict[str, Any]:
    """Score `predictor` on every set; print one line per set and return the figures.

    Each set's figures also list its misses, {"index", "truth", "read"} for every sample read wrong, in order:
    a rejected digit has "read" None, a negative read as a digit "truth" None and its "kind" (blank, scribble,
    ...). `index` names the file that `write_set` writes for the same count and seed. `show_misses` prints the
    first that many misses of each set under its line. `mnist` (test images, labels) is `generate`'s.
    """
    import torch

    from .preprocess import preprocess

    results: dict[str, Any] = {"count": count, "seed": seed}

    def report_misses(name: str, misses: list[dict[str, Any]]) -> None:
        results[name]["misses"] = misses
        for miss in misses[:show_misses]:
            truth = miss["truth"] or f"not a digit ({miss['kind']})"
            log(f"  {miss['index']:05d}  truth {truth}  read {miss['read'] or 'rejected'}")

    for name in sets:
        samples = list(generate(name, count, seed, mnist))
        start = time.perf_counter()
        if name == "numbers" or name in TWO_LINE_SETS:
            reads = [predictor.read(s.data) for s in samples]
            seconds = time.perf_counter() - start
            exact = np.mean([r.number == s.label for r, s in zip(reads, samples)])
            # per line, for `lines`: the right number of lines, each with the right number of digits
            digits_found = np.mean(
                [_digit_counts(r.number) == _digit_counts(s.label) for r, s in zip(reads, samples)]
            )
            results[name] = {
                "exact": float(exact),
                "digit_count_right": float(digits_found),
                "n": len(samples),
                "ms_per_image": 1000 * seconds / len(samples),
            }
            what = "numbers exactly right" if name == "numbers" else "photos of two numbers read exactly"
            log(
                f"{name:<12} {exact:7.2%} {what}   ({digits_found:.2%} with the right digit count, "
                f"{1000 * seconds / len(samples):.1f} ms/image, n={len(samples)})"
            )
            report_misses(
                name,
                [
                    {"index": i, "truth": s.label, "read": r.number}
                    for i, (r, s) in enumerate(zip(reads, samples))
                    if r.number != s.label
                ],
            )
            continue
        batch = np.stack([preprocess(s.data) for s in samples])
        predictions = predictor.predict_tensor(torch.from_numpy(batch)[:, None])
        seconds = time.perf_counter() - start
        rejected = np.array([p.rejected for p in predictions])
        if name == "negatives":
            kinds = sorted({s.kind for s in samples})
            per_kind = {
                k: float(np.mean([r for r, s in zip(rejected, samples) if s.kind == k])) for k in kinds
            }
            # `read` of the same photos: a number read from no digits is its kind of false alarm
            no_number = float(np.mean([predictor.read(s.data).number == "" for s in samples]))
            results[name] = {
                "rejected": float(rejected.mean()),
                "per_kind": per_kind,
                "read_no_number": no_number,
                "n": len(samples),
            }
            log(
                f"{name:<12} {rejected.mean():7.2%} rejected   ("
                + ", ".join(f"{k.removeprefix('negative-')} {v:.0%}" for k, v in per_kind.items())
                + f"; read as no number {no_number:.0%}, n={len(samples)})"
            )
            report_misses(
                name,
                [
                    {
                        "index": i,
                        "truth": None,
                        "kind": s.kind.removeprefix("negative-"),
                        "read": str(p.digit),
                    }
                    for i, (p, s) in enumerate(zip(predictions, samples))
                    if not p.rejected
                ],
            )
            continue
        labels = np.array([int(cast(str, s.label)) for s in samples])
        digits = np.array([-1 if p.digit is None else p.digit for p in predictions])
        argmax = np.array([int(np.argmax(p.probabilities)) for p in predictions])
        naive = predictor.predict_tensor(
            torch.from_numpy(np.stack([naive_preprocess(s.data) for s in samples]))[:, None]
        )
        naive_accuracy = float(np.mean([int(np.argmax(p.probabilities)) == y for p, y in zip(naive, labels)]))
        results[name] = {
            "accuracy": float(np.mean(digits == labels)),
            "accuracy_no_reject": float(np.mean(argmax == labels)),
            "rejected": float(rejected.mean()),
            "naive_accuracy": naive_accuracy,
            "n": len(samples),
            "ms_per_image": 1000 * seconds / len(samples),
        }
        log(
            f"{name:<12} {np.mean(digits == labels):7.2%} correct   ({rejected.mean():.2%} rejected, "
            f"{np.mean(argmax == labels):.2%} before rejection, naive pipeline {naive_accuracy:.2%}, "
            f"{1000 * seconds / len(samples):.1f} ms/image, n={len(samples)})"
        )
        report_misses(
            name,
            [
                {"index": i, "truth": str(y), "read": None if d < 0 else str(d)}
                for i, (d, y) in enumerate(zip(digits, labels))
                if d != y
            ],
        )
    return results


def time_folder(
    predictor: Any, count: int = 1000, seed: int = 0, log: Callable[[str], None] = print
) -> dict[str, float]:
    """Time `predict` as a user sees it: one photo after load (median of 50), and a folder of `count` photos."""
    import tempfile

    from .predict import predict_files

    with tempfile.TemporaryDirectory() as folder:
        paths = write_set("pen-photo", count, folder, seed)
        one = paths[0]
        predict_files(predictor, [one])  # warm-up: first call pays for lazy imports and allocation
        times = []
        for _ in range(50):
            start = time.perf_counter()
            predict_files(predictor, [one])
            times.append(time.perf_counter() - start)
        start = time.perf_counter()
        predict_files(predictor, paths)
        folder_seconds = time.perf_counter() - start
    result = {
        "one_image_ms": 1000 * float(np.median(times)),
        "folder_seconds": folder_seconds,
        "folder_count": count,
    }
    log(
        f"speed        {result['one_image_ms']:.1f} ms for one image after load (median of 50); "
        f"{folder_seconds:.2f} s for a folder of {count} images"
    )
    return result
