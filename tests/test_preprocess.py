"""preprocess(): every stage does what a user would see, for every kind of input, and bad files fail in one sentence."""

from __future__ import annotations

import errno
import io
import os
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw
from serverkit import png_claiming

from digitrec.errors import ImageError
from digitrec.predict import Predictor
from digitrec.preprocess import (
    FRAME,
    IMAGE_FORMATS,
    IMAGE_FORMATS_TEXT,
    MAX_FILE_BYTES,
    _smooth,
    center_in_frame,
    disk_filter,
    drop_frames,
    expand_paths,
    flatten,
    ink_is_dark,
    ink_strength,
    kept_mask,
    label8,
    load_gray,
    load_gray_sized,
    median_filter,
    open_image,
    otsu_threshold,
    parts,
    preprocess,
    reopened,
    select_digit,
    stroke_width,
    threshold,
    to_mnist,
    uniform_paper,
)
from digitrec.realworld import crop_ink, draw_digit, generate, number_line
from digitrec.segment import segment


def page(digit: int = 3, seed: int = 0, size: int = 200) -> np.ndarray:
    """A dark digit on light paper as uint8 gray, the digit about half the page high."""
    rng = np.random.default_rng(seed)
    ink = draw_digit(digit, rng, height=size // 2)
    canvas = np.zeros((size, size), dtype=np.float32)
    h, w = ink.shape
    top, left = (size - h) // 2, (size - w) // 2
    canvas[top : top + h, left : left + w] = ink[: size - top, : size - left]
    return (255 * (0.92 - 0.82 * canvas)).astype(np.uint8)


def png_bytes(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def ink_box(x: np.ndarray, level: float = 0.1) -> tuple[int, int]:
    rows, cols = np.flatnonzero((x > level).any(1)), np.flatnonzero((x > level).any(0))
    return rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1


def test_output_looks_like_mnist():
    x = preprocess(page(3))
    assert x.shape == (FRAME, FRAME) and x.dtype == np.float32
    assert x.min() >= 0 and x.max() == pytest.approx(1.0)
    height, width = ink_box(x)
    assert max(height, width) in (19, 20, 21)  # the longer side fills MNIST's 20 px box
    rows, cols = np.indices(x.shape)
    center = ((x * rows).sum() / x.sum(), (x * cols).sum() / x.sum())
    assert abs(center[0] - 13.5) < 1 and abs(center[1] - 13.5) < 1  # centered by mass
    assert 0.08 < (x > 0.5).mean() < 0.3  # white strokes on a black frame, not the other way round


def test_a_one_keeps_its_aspect_ratio():
    height, width = ink_box(preprocess(page(1, seed=3)))
    assert height >= 19 and width < 14


def likeness(x1: np.ndarray, x2: np.ndarray) -> float:
    """How alike two 28x28 inputs are, up to a one-pixel shift (a faint edge pixel can move the bounding box)."""
    return max(
        np.corrcoef(x1.ravel(), np.roll(x2, (dy, dx), (0, 1)).ravel())[0, 1]
        for dy in (-1, 0, 1)
        for dx in (-1, 0, 1)
    )


def test_light_ink_on_dark_paper_gives_the_same_digit():
    dark_on_light = page(5)
    assert likeness(preprocess(dark_on_light), preprocess(255 - dark_on_light)) > 0.9


def test_chalk_on_a_board_lit_from_one_side_is_light_ink():
    # A lamp beside the board: the light ramps from 0.05 to 0.6 across it, so the picture's dark and light tails
    # are about as long as each other and only the ink's contrast with its local median tells which is the ink.
    chalk = 1 - page(5).astype(np.float32) / 255
    lamp = np.linspace(0.05, 0.6, 200)[None, :]
    noise = np.random.default_rng(0).normal(0, 0.03, (200, 200))
    board = np.clip(lamp + 0.35 * chalk + noise, 0, 1).astype(np.float32)
    assert uniform_paper(load_gray(board)) is None and not ink_is_dark(load_gray(board))
    assert likeness(preprocess(board), preprocess(page(5))) > 0.9


def test_shadow_and_gradient_are_removed():
    gray = page(8).astype(np.float32) / 255
    ramp = np.linspace(1.0, 0.35, gray.shape[1])[None, :]  # strong light falloff left to right
    shadow = np.where(np.arange(gray.shape[0])[:, None] > 120, 0.55, 1.0)
    x_clean, x_shaded = preprocess(gray), preprocess(gray * ramp * shadow)
    assert np.abs(x_clean - x_shaded).mean() < 0.03


@pytest.mark.parametrize("polarity", ["dark ink", "light ink"])
def test_a_clean_drawing_skips_the_lighting_model_and_reads_the_same(polarity):
    gray = page(4) if polarity == "dark ink" else 255 - page(4)
    assert uniform_paper(load_gray(gray)) is not None  # a drawing app's canvas: the fast path
    g = load_gray(gray)
    full = to_mnist(
        select_digit(threshold(flatten(g, polarity == "dark ink")))
    )  # the photo path on the same page
    assert np.abs(preprocess(gray) - full).mean() < 0.02


@pytest.mark.parametrize("ink", [170, 190, 215], ids=lambda ink: f"gray {ink} on white")
@pytest.mark.parametrize("polarity", ["dark ink", "light ink"])
def test_faint_ink_on_a_flat_page_is_read_as_boldly_as_black_ink(ink, polarity):
    """A digit drawn in light gray (180 and paler on white; 150 on a page of 190) was under INK_CONTRAST: "a blank
    page, no ink". On a flat page it is the only mark, so its strongest stroke counts as full strength."""
    black = page(5).astype(np.float32)  # 0.92 paper, 0.10 ink: the ink's depth scaled to `ink` below
    faint = 255 - (255 - black) * (255 - ink) / (255 - black.min())
    faint = np.where(black >= 234, 255, faint).astype(np.uint8)  # white paper, the digit's edges kept soft
    black = np.where(black >= 234, 255, black).astype(np.uint8)
    if polarity == "light ink":
        faint, black = 255 - faint, 255 - black
    assert uniform_paper(load_gray(faint)) is not None
    assert likeness(preprocess(faint), preprocess(black)) > 0.95


@pytest.mark.parametrize("paper", [250, 128, 100])
def test_a_flat_page_with_no_mark_past_the_ink_tolerance_stays_blank(paper):
    """On gray paper (128) a mark 15 levels darker was scaled to full ink and read as a 1 at 100%: the tolerance,
    in gray levels, was compared with the contrast as a share of the paper's level."""
    flat = np.full((100, 100), paper, np.uint8)
    flat[30:70, 45:52] = paper - 20  # a mark fainter than INK_TOLERANCE (25 levels): not ink
    assert preprocess(flat).max() == 0


def test_a_dark_edge_beside_the_digit_is_not_part_of_it():
    # A photo's border often catches the edge of a shadow, a table or the next sheet: a dark band along
    # one side that the threshold takes for ink. It must not shrink and shift the digit in the 28x28 frame.
    clean = page(9).astype(np.float32) / 255
    cols = np.flatnonzero((clean < 0.5).any(0))
    for band in (np.s_[:120, 194:], np.s_[40:, :5], np.s_[:, : cols[0] - 8 : 3]):
        edged = clean.copy()
        edged[band] = 0.3
        # A page with a dark edge takes the lighting model, not the flat page's short way: equal within 0.1.
        assert np.abs(preprocess(edged) - preprocess(clean)).max() < 0.1, band


def hard_shadow(angle: float, offset: float, depth: float, size: tuple[int, int] = (1200, 900)) -> np.ndarray:
    """A blank page as uint8 gray (0.88, with a little noise) under a sharp-edged shadow: `depth` darker on one side
    of a straight line at `angle` degrees, through `offset` of the width at mid-height."""
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    across = (x / width - offset) * np.cos(np.radians(angle)) + (y / height - 0.5) * np.sin(np.radians(angle))
    noise = np.random.default_rng(0).normal(0, 0.01, (height, width))
    return (255 * (0.88 * np.where(across > 0, 1.0, 1.0 - depth) + noise).clip(0, 1)).astype(np.uint8)


# Wedges narrowing to a corner or along the frame, a strip along one side, and a lit strip that turns the polarity
HARD_SHADOWS = [(30, 0.3, 0.45), (45, 0.5, 0.4), (60, 0.2, 0.5), (20, 0.7, 0.35), (135, 0.4, 0.45)]
HARD_SHADOWS += [(-30, 0.6, 0.5), (0, 0.05, 0.45), (0, 0.9, 0.45)]


@pytest.mark.parametrize("angle, offset, depth", HARD_SHADOWS)
def test_a_blank_page_under_a_hard_shadow_holds_no_ink(angle, offset, depth):
    # The lighting model fills a dark region narrower than its window: the tip of the shadow's wedge at the frame,
    # or a strip of it along one side, came out as ink (`read` gave a "1" at 100%).
    shadowed = hard_shadow(angle, offset, depth)
    assert preprocess(shadowed).max() == 0
    assert segment(shadowed) == []


def test_parts_at_the_edge_that_overlap_the_digit_or_are_the_digit_are_kept():
    clean = page(7).astype(np.float32) / 255
    rows, cols = np.flatnonzero((clean < 0.5).any(1)), np.flatnonzero((clean < 0.5).any(0))
    # A stroke from the picture's top edge down into the digit's columns, not touching it: a broken stroke.
    stroke = clean.copy()
    stroke[: rows[0] - 6, cols[0] + 5 : cols[0] + 12] = 0.1
    assert ink_box(preprocess(stroke))[0] == 20 and ink_box(preprocess(clean))[0] == 20
    assert np.abs(preprocess(stroke) - preprocess(clean)).max() > 0.5  # the stroke made the 7 shorter
    # A digit the frame cuts (touching the left edge), beside a smaller mark inside the picture: the digit stays.
    cut = np.full_like(clean, 0.92)
    cut[:, : cols[-1] - cols[0] + 1] = clean[:, cols[0] : cols[-1] + 1]
    marked = cut.copy()
    marked[90:110, 170:190] = 0.1
    everything = to_mnist(select_digit(threshold(ink_strength(load_gray(marked)))))  # no part dropped
    assert np.array_equal(preprocess(marked), everything)


def test_photos_are_not_mistaken_for_clean_pages():
    rng = np.random.default_rng(1)
    noisy = (page(4) + rng.normal(0, 12, (200, 200))).clip(0, 255).astype(np.uint8)
    lit = (page(4) * np.linspace(1.0, 0.7, 200)[None, :]).astype(np.uint8)
    assert uniform_paper(load_gray(noisy)) is None and uniform_paper(load_gray(lit)) is None


def test_stroke_width_is_normalized():
    def seven(pen_px: int) -> np.ndarray:
        image = Image.new("L", (200, 200), 230)
        ImageDraw.Draw(image).line([(50, 30), (150, 30), (90, 170)], fill=20, width=pen_px)
        return np.asarray(image)

    widths = [stroke_width(preprocess(seven(pen)) > 0.5) for pen in (2, 6, 24)]
    assert max(widths) - min(widths) < 0.8  # a fine liner and a marker end up MNIST-wide


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(1, 3000), zeros=st.floats(0.0, 1.0), ones=st.floats(0.0, 0.3), seed=st.integers(0, 2**16)
)
def test_otsu_threshold_is_otsus_cut_over_a_64_bin_histogram(size, zeros, ones, seed):
    # Paper (0), full-strength ink (1.0: the top bin) and everything between, as ink_strength() gives them.
    rng = np.random.default_rng(seed)
    values = rng.random(size).astype(np.float32)
    values[rng.random(size) < zeros] = 0.0
    values[rng.random(size) < ones] = 1.0
    hist = np.histogram(values, bins=64, range=(0.0, 1.0))[0].astype(np.float64)  # 1.0 falls in the last bin
    edges = np.linspace(0.0, 1.0, 65)
    centers = (edges[:-1] + edges[1:]) / 2
    low = np.cumsum(hist)
    high = low[-1] - low
    mass = np.cumsum(hist * centers)
    between = low * high * (mass / np.maximum(low, 1e-12) - (mass[-1] - mass) / np.maximum(high, 1e-12)) ** 2
    assert otsu_threshold(values.reshape(1, -1)) == edges[int(np.argmax(between)) + 1]


@settings(max_examples=60, deadline=None)
@given(parts=st.integers(0, 40), kept=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_kept_mask_is_the_kept_labels(parts, kept, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, parts + 1, (30, 20)).astype(np.int32)
    keep = rng.random(parts + 1) < kept
    keep[0] = False
    assert np.array_equal(kept_mask(labels, keep), keep[labels])


def test_the_center_of_mass_lands_at_the_frames_center():
    rng = np.random.default_rng(0)
    for height, width in [(20, 20), (20, 7), (9, 20), (20, 1)]:
        glyph = (rng.random((height, width)) * (rng.random((height, width)) < 0.5)).astype(np.float32)
        frame = center_in_frame(glyph)
        rows, cols = np.indices(frame.shape)
        total = frame.sum()
        center = ((frame * rows).sum() / total, (frame * cols).sum() / total)
        assert np.isclose(frame.sum(), glyph.sum()) and max(abs(c - 13.5) for c in center) <= 0.5 + 1e-9


@settings(max_examples=60, deadline=None)
@given(
    height=st.integers(1, 40),
    width=st.integers(1, 40),
    density=st.floats(0.05, 0.95),
    radius=st.one_of(st.floats(0.5, 60.0), st.integers(1, 60).map(float)),
    seed=st.integers(0, 2**16),
)
def test_disk_filter_grows_and_thins_as_a_distance_transform_would(height, width, density, radius, seed):
    """OpenCV's dilation or erosion by the disk, and past EDT_RADIUS the distance transform itself."""
    from scipy import ndimage

    mask = np.random.default_rng(seed).random((height, width)) < density
    pad = int(radius) + 2
    padded = np.pad(mask, pad)
    grown = ndimage.distance_transform_edt(~padded) <= radius if padded.any() else padded
    assert np.array_equal(disk_filter(padded, radius, grow=True), grown)
    if not mask.all():  # the distance transform is undefined without a background pixel
        thinned = ndimage.distance_transform_edt(mask) > radius
        assert np.array_equal(disk_filter(mask, radius, grow=False), thinned)
    for solid in (np.ones_like(mask), np.zeros_like(mask)):  # all ink, no ink: as they are
        assert np.array_equal(disk_filter(solid, radius, grow=False), solid)
        assert np.array_equal(disk_filter(solid, radius, grow=True), solid)


@pytest.mark.parametrize("grow", [False, True])
def test_disk_filter_gives_the_same_pixels_on_either_side_of_its_switch(grow):
    """The distance transform it takes past EDT_RADIUS and OpenCV's filter below it agree, borders included
    (beyond the array: paper when growing, ink when thinning)."""
    from digitrec import preprocess

    rng = np.random.default_rng(0)
    for _ in range(40):
        mask = rng.random((int(rng.integers(5, 90)), int(rng.integers(5, 90)))) < rng.uniform(0.3, 0.97)
        radius = float(rng.uniform(1, 30))
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(preprocess, "EDT_RADIUS", 0)
            by_distance = disk_filter(mask, radius, grow)
            patch.setattr(preprocess, "EDT_RADIUS", 1000)
            by_opencv = disk_filter(mask, radius, grow)
        assert np.array_equal(by_distance, by_opencv)


@settings(max_examples=60, deadline=None)
@given(
    height=st.integers(1, 60),
    width=st.integers(1, 60),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_label8_and_parts_number_the_parts_as_scipy_does(height, width, density, seed):
    from scipy import ndimage

    mask = np.random.default_rng(seed).random((height, width)) < density
    expected, count = ndimage.label(mask, structure=np.ones((3, 3)))
    labels, found = label8(mask[:, ::-1][:, ::-1])  # a strided view works too
    assert found == count and np.array_equal(labels, expected)
    labels, areas, boxes = parts(mask)
    assert np.array_equal(labels, expected)
    assert np.array_equal(areas, np.bincount(expected.ravel(), minlength=count + 1))
    assert boxes == ndimage.find_objects(expected)


@pytest.mark.parametrize("shape", [(5, 7), (140, 140), (300, 1024)])
def test_smooth_is_scipys_gaussian(shape):
    from scipy import ndimage

    gray = np.random.default_rng(0).random(shape, dtype=np.float32)
    sigma = max(0.7, min(shape) / 200)
    expected = ndimage.gaussian_filter(gray, sigma=sigma, mode="nearest", truncate=2.5)
    assert np.abs(_smooth(gray) - expected).max() < 1e-5


@settings(max_examples=40, deadline=None)
@given(
    height=st.integers(1, 40),
    width=st.integers(1, 40),
    size=st.sampled_from([3, 5, 7]),
    seed=st.integers(0, 2**16),
)
def test_median_filter_is_scipys(height, width, size, seed):
    from scipy import ndimage

    a = np.random.default_rng(seed).random((height, width), dtype=np.float32)
    assert np.array_equal(median_filter(a, size), ndimage.median_filter(a, size=size, mode="nearest"))


def test_opencvs_bilinear_resize_is_pillows():
    """flatten() brings its paper estimate back to full size with OpenCV's bilinear resize, in place of Pillow's
    (10x slower): the two give the same pixels. (This checks the libraries, not flatten's call of them.)"""
    import cv2

    rng = np.random.default_rng(0)
    for _ in range(20):
        small = rng.random(tuple(rng.integers(3, 40, 2)), dtype=np.float32)
        width, height = (int(n) for n in rng.integers(40, 300, 2))
        pillow = np.asarray(Image.fromarray(small, "F").resize((width, height), Image.Resampling.BILINEAR))
        assert (
            np.abs(cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR) - pillow).max() < 1e-6
        )


def holes(mask: np.ndarray) -> int:
    """Enclosed pieces of paper: the loops of an 8 are two."""
    from scipy import ndimage

    return ndimage.label(ndimage.binary_fill_holes(mask) & ~mask)[1]


def blurred_eight(blur: float) -> np.ndarray:
    """Ink strength of a bold 8 (two rings with small holes) in a soft photo."""
    from scipy import ndimage

    y, x = np.mgrid[:120, :80]
    ink = np.zeros((120, 80), dtype=np.float32)
    for cy in (38, 82):
        ring = np.hypot(y - cy, x - 40)
        ink[(ring > 6) & (ring < 20)] = 1.0
    return ndimage.gaussian_filter(ink, blur)


def test_a_bold_eight_whose_loops_the_threshold_fills_gets_them_back():
    ink = blurred_eight(blur=5.0)
    mask = threshold(ink)
    assert holes(mask) == 0  # the threshold's halo closed both loops: a solid blob
    assert holes(reopened(mask, ink)) == 2
    sharp = blurred_eight(blur=1.0)
    thin = threshold(sharp)
    assert holes(thin) == 2 and (reopened(thin, sharp) == thin).all()  # loops already open: left alone
    assert (reopened(mask, None) == mask).all()


def test_a_bold_nines_lighter_tail_is_not_cut_off_as_if_it_were_a_loops_fill():
    # A bold, dark ring with a lighter tail below it: Otsu's cut inside the glyph keeps the ring alone, which
    # reads as a 0 ("921" read "021"). The ring is 0.58 of the glyph's height: a lost stroke, not a filled loop.
    y, x = np.mgrid[:110, :70]
    ring = (np.hypot(y - 32, x - 35) <= 30) & (np.hypot(y - 32, x - 35) >= 7)
    tail = (x >= 44) & (x <= 64) & (y >= 40) & (y <= 105)
    nine = ring | tail
    ink = np.where(ring, 0.9, np.where(tail, 0.45, 0.0)).astype(np.float32)
    assert (reopened(nine, ink) == nine).all()


def test_a_faint_digit_glued_to_a_bold_one_is_not_cut_off_as_if_it_were_a_loops_fill():
    # A bold ring touching a fainter ring of the same height beside it ("39" in two inks): Otsu's cut inside the
    # glyph keeps the bold one alone, as tall as the glyph, and the faint digit was lost (read "3" for "39").
    y, x = np.mgrid[:80, :130]
    bold = (np.hypot(y - 40, x - 35) <= 34) & (np.hypot(y - 40, x - 35) >= 6)
    faint = (np.hypot(y - 40, x - 95) <= 34) & (np.hypot(y - 40, x - 95) >= 6)
    pair = bold | faint
    ink = np.where(bold, 0.9, np.where(faint, 0.4, 0.0)).astype(np.float32)
    assert (reopened(pair, ink) == pair).all()
    assert (reopened(bold, np.where(bold, 0.9, 0.0)) == bold).all()  # one solid glyph of one ink: as it is


def test_blank_and_speckled_pages_have_no_ink():
    rng = np.random.default_rng(0)
    paper = (rng.normal(0.85, 0.01, (300, 300)) * np.linspace(1, 0.7, 300)[None, :]).clip(0, 1)
    paper[rng.integers(0, 300, 5), rng.integers(0, 300, 5)] = 0.2  # a few specks of dust
    assert preprocess(paper).max() == 0


def test_exif_orientation_is_applied():
    upright = Image.fromarray(page(7)[:, 30:170])  # taller than wide
    stored = upright.rotate(90, expand=True)  # the camera stored it sideways...
    exif = Image.Exif()
    exif[0x0112] = 6  # ...and says "rotate 90 degrees clockwise to display"
    rotated_file = png_bytes(stored, "JPEG", exif=exif.tobytes(), quality=95)
    assert np.abs(preprocess(rotated_file) - preprocess(png_bytes(upright, "JPEG", quality=95))).mean() < 0.03
    assert load_gray_sized(rotated_file)[1] == upright.size  # boxes map back to the picture as displayed
    # A PIL image the caller passes is turned on a copy: the caller's image keeps its pixels and its EXIF.
    theirs = Image.open(io.BytesIO(rotated_file))
    assert np.abs(preprocess(theirs) - preprocess(rotated_file)).max() == 0
    assert theirs.size == stored.size and theirs.getexif()[0x0112] == 6


@pytest.mark.parametrize(
    "kind",
    [
        "path",
        "bytes",
        "pil",
        "rgb",
        "rgba",
        "palette",
        "cmyk",
        "uint16",
        "float",
        "gray16png",
        "bmp",
        "webp",
        "gif",
        "tiff",
    ],
)
def test_every_input_kind_reads_the_same(kind, tmp_path):
    gray = page(2)
    reference = preprocess(gray)
    image = Image.fromarray(gray)
    if kind == "path":
        path = tmp_path / "digit.png"
        image.save(path)
        source = path
    elif kind == "bytes":
        source = png_bytes(image)
    elif kind == "pil":
        source = image
    elif kind == "rgb":
        source = np.repeat(gray[..., None], 3, axis=2)
    elif kind == "rgba":  # ink on a transparent canvas, as a web drawing app exports it
        rgba = np.zeros(gray.shape + (4,), np.uint8)
        rgba[..., 3] = 255 - gray
        source = png_bytes(Image.fromarray(rgba, "RGBA"))
    elif kind == "palette":
        source = png_bytes(image.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE), transparency=0)
    elif kind == "cmyk":
        source = png_bytes(image.convert("CMYK"), "JPEG", quality=95)
    elif kind == "uint16":
        source = gray.astype(np.uint16) * 257
    elif kind == "float":
        source = gray.astype(np.float64) / 255
    elif kind == "gray16png":
        source = png_bytes(Image.fromarray(gray.astype(np.uint16) * 257))
    else:
        source = png_bytes(image.convert("RGB"), kind.upper())
    assert np.abs(preprocess(source) - reference).mean() < 0.03


def _numpy_peak_bytes(work) -> int:
    """The most memory NumPy held at once while `work()` ran, above what it held before (tracemalloc sees
    NumPy's arrays, not Pillow's images)."""
    import tracemalloc

    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        work()
        return tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


def test_a_large_transparent_image_is_composited_in_a_few_bytes_a_pixel():
    """A transparent PNG was composited as float32 RGBA copies of the whole image: a 40-megapixel one of 170 KB,
    which the server accepts, took 1.7 GB to read. Now it costs the gray image (4 bytes a pixel) and a band."""
    image = Image.new("RGBA", (2000, 2000), (0, 0, 0, 0))
    ImageDraw.Draw(image).ellipse((600, 400, 1400, 1600), outline=(0, 0, 0, 255), width=60)
    peak = _numpy_peak_bytes(lambda: load_gray(image))
    assert peak < 8 * 2000 * 2000, f"{peak / 2000 / 2000:.1f} bytes a pixel"


def test_a_large_float_image_is_scaled_without_float64_copies():
    """A float TIFF's pixels were copied to float64 and clipped into another copy (16 bytes a pixel)."""
    pixels = np.random.default_rng(0).uniform(-0.2, 1.2, (2000, 2000)).astype(np.float32)
    peak = _numpy_peak_bytes(lambda: load_gray(pixels))
    assert peak < 8 * pixels.size, f"{peak / pixels.size:.1f} bytes a pixel"


@pytest.mark.parametrize("size", [(140, 140), (300, 257), (900, 600), (513, 1000)])
def test_band_by_band_compositing_is_the_whole_image_compositing(size):
    """_composite_rgba gives, bit for bit, what _flatten_alpha gives on the whole image (sizes that are not a
    multiple of the band, alpha that is random, faint, nearly opaque or all transparent)."""
    from digitrec.preprocess import _flatten_alpha, _luminance, _pil_to_gray

    rng = np.random.default_rng(size[0])
    for alpha in (None, (0, 40), (253, 255), (0, 1)):
        rgba = rng.integers(0, 256, size[::-1] + (4,), dtype=np.uint8)
        if alpha is not None:
            rgba[..., 3] = rng.integers(*alpha, size[::-1])
        whole = rgba.astype(np.float32) / 255.0
        expected = _flatten_alpha(_luminance(whole[..., :3]), whole[..., 3])
        np.testing.assert_array_equal(_pil_to_gray(Image.fromarray(rgba, "RGBA")), expected)


@pytest.mark.parametrize("opacity", [0.3, 0.45, 0.7, 1.0])
def test_half_transparent_ink_on_a_transparent_canvas_reads_as_the_opaque_ink(opacity):
    """A pencil or highlighter tool exports its strokes at partial opacity; the flattening must still see them."""
    gray = page(2)
    reference = preprocess(gray)
    rgba = np.zeros(gray.shape + (4,), np.uint8)  # black ink, only in alpha
    rgba[..., 3] = np.round((255 - gray.astype(np.float32)) * opacity).astype(np.uint8)
    assert np.abs(preprocess(png_bytes(Image.fromarray(rgba, "RGBA"))) - reference).mean() < 0.03


@pytest.mark.parametrize("kind", ["array", "jpeg", "file"])
def test_a_digit_written_small_on_a_big_page_reads_as_a_big_one(kind, monkeypatch):
    """Shrunk whole to the working size, a 7 written 150 px high on a 3000x2000 page is 13 px high; the closer
    look reads it from a window around it at more pixels."""
    reference = preprocess(page(7))
    sheet = np.full((2000, 3000), 235, np.uint8)
    sheet[1000:1300, 600:900] = np.asarray(Image.fromarray(page(7)).resize((300, 300)))  # the 7 is 150 px
    source: object = sheet
    if kind != "array":
        data = png_bytes(Image.fromarray(sheet), "JPEG", quality=90)
        source = data if kind == "jpeg" else io.BytesIO(data)  # a file object is read twice
    x = preprocess(source)
    assert np.abs(x - reference).mean() < 0.05
    monkeypatch.setattr("digitrec.preprocess.ZOOM_BELOW", 0.0)  # no closer look: the shrunk 7 is not the same
    assert np.abs(preprocess(sheet) - reference).mean() > 2 * np.abs(x - reference).mean()


def test_steps_show_every_stage_in_order():
    x, steps = preprocess(page(6), return_steps=True)
    assert list(steps) == [
        "gray",
        "polarity",
        "flatten",
        "threshold",
        "select",
        "crop",
        "stroke",
        "scale20",
        "center28",
        "mnist",
    ]
    assert all(np.asarray(s).ndim == 2 for s in steps.values())
    assert np.array_equal(steps["mnist"], x)


def bad_input(kind: str, tmp_path: Path):
    if kind == "missing":
        return tmp_path / "nope.png"
    if kind == "folder":
        return tmp_path
    if kind == "text":
        (tmp_path / "notes.png").write_text("this is not an image")
        return tmp_path / "notes.png"
    if kind == "truncated":
        return png_bytes(Image.fromarray(page(3)), "JPEG")[:600]
    if kind == "empty-bytes":
        return b""
    if kind == "empty-file":
        (tmp_path / "empty.png").write_bytes(b"")
        return tmp_path / "empty.png"
    if kind == "proc":  # its size says 0 bytes, and it holds text
        return Path("/proc/self/status")
    if kind == "text-chunk":  # was "damaged or truncated (Decompressed data too large for ...MAX_TEXT_CHUNK)"
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_text("comment", "x" * 50_000_000, zip=True)
        return png_bytes(Image.fromarray(page(3)), "PNG", pnginfo=info)
    if kind == "zero":
        return np.zeros((0, 0), np.uint8)
    if kind == "one-pixel":
        return png_bytes(Image.new("L", (1, 1)))
    if (
        kind == "zero-png"
    ):  # Pillow cannot identify a PNG of 0x0 pixels: it was "not an image digitrec can read"
        return png_claiming(0, 0)
    if kind in ("jpeg-head", "png-head", "gif-head", "tiff-head", "webp-head"):  # cut after a few bytes
        form = {"jpeg": "JPEG", "png": "PNG", "gif": "GIF", "tiff": "TIFF", "webp": "WEBP"}[
            kind.split("-")[0]
        ]
        return png_bytes(Image.fromarray(page(3)), form)[: 20 if form == "JPEG" else 12]
    if kind == "webp-cut":  # cut after its header: Pillow's own "could not create decoder object"
        return png_bytes(Image.fromarray(page(3)), "WEBP")[:20]
    if kind == "huge-file":  # a sparse file larger than any image: it was read whole (a MemoryError at 5 GB)
        path = tmp_path / "huge.png"
        with open(path, "wb") as f:
            f.truncate(MAX_FILE_BYTES + 1)
        return path
    if kind == "bomb":
        return png_claiming(20_000, 20_000)
    if kind == "nan":
        return np.full((30, 30), np.nan)
    if kind == "shape":
        return np.zeros((30, 30, 7))
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind, words",
    [
        ("missing", "does not exist"),
        ("folder", "is a folder"),
        ("text", "not an image"),
        ("truncated", "truncated"),
        ("empty-bytes", "empty"),
        ("empty-file", "is empty (0 bytes)"),
        pytest.param(
            "proc",
            "not an image",
            marks=pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux"),
        ),
        ("text-chunk", "holds a text or color-profile chunk too large to read safely; re-save it without"),
        ("zero", "too small"),
        ("one-pixel", "1x1 pixels"),
        ("zero-png", "is 0x0 pixels, too small to hold a digit"),
        ("jpeg-head", "is a JPEG file that is truncated or damaged"),
        ("png-head", "is a PNG file that is truncated or damaged"),
        ("gif-head", "is a GIF file that is truncated or damaged"),
        ("tiff-head", "is a TIFF file that is truncated or damaged"),
        ("webp-head", "is a WebP file that is truncated or damaged"),
        ("webp-cut", "damaged or truncated"),
        ("huge-file", "more than any image digitrec decodes can take"),
        ("bomb", "decompression-bomb"),
        ("nan", "NaN"),
        ("shape", "shape"),
    ],
)
def test_bad_input_fails_with_one_clear_sentence(kind, words, tmp_path):
    with pytest.raises(ImageError) as info:
        preprocess(bad_input(kind, tmp_path))
    message = str(info.value)
    assert words in message and message.endswith(".") and "\n" not in message


def test_open_image_refuses_a_bomb_before_decoding_it():
    with pytest.raises(ImageError, match="decompression-bomb"):
        open_image(png_claiming(20_000, 20_000))


def test_folders_expand_to_their_images_only(tmp_path):
    for name in ["b.png", "a.JPG", "notes.txt", "c.jfif", "IMG_0001.HEIC", "d.dng"]:
        (tmp_path / name).write_bytes(b"x")
    unreadable: list[Path] = []
    assert [p.name for p in expand_paths([tmp_path], unreadable)] == ["a.JPG", "b.png", "c.jfif"]
    assert [p.name for p in unreadable] == ["IMG_0001.HEIC", "d.dng"]  # photos Pillow cannot read, reported


def test_a_folders_images_without_a_suffix_are_read_by_their_first_bytes(tmp_path):
    """An app that saves photos as "IMG_0001" (no suffix) left a folder of them "no images found": a file
    without a suffix is now an image when it begins as one, as a file named directly is read by its bytes, and
    one in a format digitrec does not read is reported as a suffixed one is."""
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "IMG_0001").write_bytes(_saved_as("JPEG"))
    (photos / "scan").write_bytes(_saved_as("PNG"))
    (photos / "README").write_bytes(b"not an image")
    (photos / "icon").write_bytes(_saved_as("ICO"))  # a format digitrec does not read: reported as refused
    (photos / "IMG_0002").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(100))  # an iPhone's: unreadable
    (photos / "pipe").mkdir()  # a folder named without a suffix is still not searched
    os.mkfifo(photos / "fifo")  # never opened: it would wait for a writer
    unreadable: list[Path] = []
    refused: list[Path] = []
    assert [p.name for p in expand_paths([photos], unreadable, refused)] == ["IMG_0001", "scan"]
    assert [p.name for p in unreadable] == ["IMG_0002"] and [p.name for p in refused] == ["icon"]
    assert preprocess(photos / "IMG_0001").shape[-2:] == (28, 28)
    subfolders: list[Path] = []  # a folder of such photos inside the given one is named as skipped
    expand_paths([tmp_path], subfolders=subfolders)
    assert subfolders == [photos]


def test_a_heic_photo_is_named_as_such(tmp_path):
    heic = b"\x00\x00\x00\x18ftypheic" + bytes(100)  # an iPhone photo's first bytes
    (tmp_path / "IMG_0001.HEIC").write_bytes(heic)
    (tmp_path / "renamed.jpg").write_bytes(heic)
    (tmp_path / "raw.DNG").write_bytes(bytes(100))
    for source, name in [
        (tmp_path / "IMG_0001.HEIC", "IMG_0001.HEIC is a HEIC photo"),
        (tmp_path / "renamed.jpg", "renamed.jpg is a HEIC photo"),  # by its content, whatever its name
        (heic, "the uploaded data is a HEIC photo"),
        (tmp_path / "raw.DNG", "raw.DNG is a DNG photo"),
    ]:
        with pytest.raises(
            ImageError, match=name + ", which Pillow cannot read here; save it as JPEG or PNG first"
        ):
            preprocess(source)
    with pytest.raises(ImageError, match="not an image digitrec can read"):
        preprocess(b"\x00\x00\x00\x18ftypisom" + bytes(100))  # an MP4 video is no photo


def _saved_as(fmt: str) -> bytes:
    image = Image.new("L" if fmt != "XBM" else "1", (40, 40), 255)
    ImageDraw.Draw(image).line([(10, 8), (30, 8), (18, 34)], fill=0, width=4)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["EPS", "ICO", "TGA", "PCX", "PPM", "SGI", "DDS", "XBM"])
def test_image_formats_other_than_the_documented_ones_are_refused_by_name(fmt, tmp_path):
    """Pillow decoded some 40 formats and handed EPS to Ghostscript ("damaged or truncated (Unable to locate
    Ghostscript)"); only the documented formats reach a decoder now."""
    data = _saved_as(fmt)
    path = tmp_path / f"digit.{fmt.lower()}"
    path.write_bytes(data)
    for source, name in [(data, "the uploaded data"), (path, str(path))]:
        with pytest.raises(ImageError) as refused:
            preprocess(source)
        assert str(refused.value) == (
            f"{name} is in the {fmt} format, which digitrec does not read; "
            f"convert it to {IMAGE_FORMATS_TEXT}."
        )


def test_the_sentences_name_every_format_digitrec_reads():
    """An AVIF upload was read, while every refusal said "use PNG, JPEG, BMP, GIF, TIFF or WebP"."""
    named = IMAGE_FORMATS_TEXT.upper().replace(" OR ", ", ").split(", ")
    assert sorted(named) == sorted(IMAGE_FORMATS)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP"])
def test_the_documented_image_formats_are_read(fmt):
    assert preprocess(_saved_as(fmt)).shape[-2:] == (28, 28)


def test_every_suffix_pillow_gives_a_format_digitrec_reads_is_read_in_a_folder_too(tmp_path):
    """An .apng in a folder was "skipped ... digitrec reads PNG, JPEG, ... only", while the same file passed
    directly was read: Pillow opens an APNG as PNG. A folder's files are chosen by suffix, a file passed
    directly by its bytes; every suffix of a format digitrec reads must be a folder's image suffix."""
    from digitrec.preprocess import IMAGE_FORMATS, is_image_file, is_refused_image

    ours = sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in IMAGE_FORMATS)
    assert ".apng" in ours
    assert [ext for ext in ours if not is_image_file(Path(f"digit{ext}"))] == []
    assert [ext for ext in ours if is_refused_image(Path(f"digit{ext.upper()}"))] == []

    frames = [Image.open(io.BytesIO(_saved_as("PNG"))), Image.new("L", (40, 40), 255)]
    apng = tmp_path / "digit.apng"
    frames[0].save(apng, format="PNG", save_all=True, append_images=frames[1:])  # an animated PNG
    refused: list[Path] = []
    assert expand_paths([tmp_path], refused=refused) == [apng] and refused == []
    assert preprocess(apng).shape[-2:] == (28, 28)  # read as given directly, from its first frame


@settings(max_examples=40, deadline=None)
@given(
    st.integers(5, 80),
    st.integers(5, 80),
    st.sampled_from(["uint8", "uint16", "float32", "bool", "int64"]),
    st.integers(0, 2**31),
)
def test_random_arrays_give_an_mnist_image_or_image_error(height, width, dtype, seed):
    rng = np.random.default_rng(seed)
    array = (rng.random((height, width)) * rng.choice([1, 255, 70000, -5])).astype(dtype)
    try:
        x = preprocess(array)
    except ImageError:
        return
    assert x.shape == (28, 28) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1


def test_masks_and_floats_that_overshoot_read_like_the_image():
    """A 0/1 integer mask was divided by 255 (black on black), and a float image with one pixel at 1.02 (an
    interpolation's overshoot) by 255 too: both read as a blank page."""
    gray = page(7)
    reference = preprocess(gray)
    overshoot = gray / 255.0
    overshoot[0, 0] = 1.02
    assert np.abs(preprocess(overshoot) - reference).max() < 1e-5
    mask = gray < 128
    as_bool = preprocess(mask)
    assert as_bool.sum() > 20
    for dtype in (np.uint8, np.int64):
        assert np.array_equal(preprocess(mask.astype(dtype)), as_bool)


def test_a_picture_of_several_frames_leaves_no_file_open(tmp_path):
    """Pillow keeps a path's file open after load() for a GIF or TIFF of several frames, until the garbage
    collector closes it with a ResourceWarning."""
    import gc
    import warnings

    frames = [Image.fromarray(page(7)), Image.fromarray(255 - page(7))]
    for suffix in ("gif", "tif"):
        frames[0].save(tmp_path / f"two.{suffix}", save_all=True, append_images=frames[1:])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        for suffix in ("gif", "tif"):
            preprocess(tmp_path / f"two.{suffix}")
            gc.collect()
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []


def _outline(image: np.ndarray, x0: int, y0: int, x1: int, y1: int, line: int = 3) -> np.ndarray:
    out = image.copy()
    out[y0 : y0 + line, x0:x1] = out[y1 - line : y1, x0:x1] = 30
    out[y0:y1, x0 : x0 + line] = out[y0:y1, x1 - line : x1] = 30
    return out


@pytest.mark.parametrize("angle", [0, 8])
def test_a_box_drawn_round_the_digit_is_not_part_of_it(angle):
    """A form's field round a digit was kept as its largest part: the digit read as a doubtful 4, rejected."""
    gray = page(7)
    reference = preprocess(gray)
    framed = Image.fromarray(_outline(gray, 25, 25, 175, 175)).rotate(
        angle, fillcolor=235, resample=Image.BICUBIC
    )
    x = preprocess(np.asarray(framed))
    assert ink_box(x) == pytest.approx(ink_box(reference), abs=2)
    assert (x * reference).sum() / np.sqrt((x * x).sum() * (reference * reference).sum()) > 0.7


def test_an_empty_rectangle_is_no_frame_and_a_bold_digit_is_left_alone():
    """Only an outline that holds ink is a frame: a rectangle alone (a boxy 0) and a digit stay as they are."""
    empty = _outline(np.full((200, 200), 235, np.uint8), 60, 40, 140, 160) < 128
    assert drop_frames(empty) is empty
    digit = page(0) < 128
    assert drop_frames(digit) is digit
    import cv2

    # a boxy 0 slashed corner to corner: the slash touches the outline, so the outline holds nothing of its own
    slashed = _outline(np.full((200, 200), 235, np.uint8), 60, 40, 140, 160)
    cv2.line(slashed, (61, 41), (138, 158), 30, 3)
    mask = slashed < 128
    assert drop_frames(mask) is mask


@pytest.mark.parametrize("thing", ["pen", "finger"])
def test_a_pen_or_a_finger_in_the_photo_is_not_part_of_the_digit(thing):
    """A walk-through's photos with a pen across a corner (54 of 60 read wrong or rejected) or a fingertip at the
    edge (26 of 26 rejected), clear of the digit: both were kept as ink beside it."""
    import cv2

    gray = np.full((256, 256), 235, np.uint8)  # a 7 about a third of the photo high, in its middle
    gray[88:168, 88:168] = page(7, size=160)[40:120, 40:120]
    reference = preprocess(gray)
    photo = gray.copy()
    if thing == "pen":  # a long bar across the top left corner, a little bolder than the handwriting
        cv2.line(photo, (0, 70), (200, 0), 25, 9)
    else:  # a fingertip from the right edge: a big soft blob
        cv2.ellipse(photo, (256, 200), (70, 40), 0, 0, 360, 60, -1)
    x = preprocess(photo)
    assert ink_box(x) == pytest.approx(ink_box(reference), abs=2)
    assert (x * reference).sum() / np.sqrt((x * x).sum() * (reference * reference).sum()) > 0.7


def test_a_fine_pen_on_a_full_size_photo_is_not_a_blank_page():
    """A 2-px stroke on a 2,000-px photo is a quarter of a pixel once shrunk to the working size: it faded below
    the threshold and the digit was rejected as a blank page. A blank page of the same size stays blank."""
    import cv2

    def jpeg(photo: np.ndarray) -> bytes:
        noisy = cv2.GaussianBlur(photo, (0, 0), 0.7) + np.random.default_rng(0).normal(0, 3, photo.shape)
        return png_bytes(Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)), "JPEG", quality=90)

    photo = np.full((1500, 2000), 240, np.uint8)
    cv2.line(photo, (850, 500), (1150, 500), 20, 2, cv2.LINE_AA)  # a 7: its bar and its stem, 400 px high
    cv2.line(photo, (1150, 500), (950, 900), 20, 2, cv2.LINE_AA)
    x = preprocess(jpeg(photo))
    assert x.sum() > 20 and ink_box(x)[0] == 20  # the 7, scaled to MNIST's 20 px
    assert preprocess(jpeg(np.full((1500, 2000), 240, np.uint8))).sum() == 0


def test_links_that_lead_nowhere_and_pipes_say_what_they_are(tmp_path):
    """A dangling link and a link loop said "does not exist", a pipe "is empty (0 bytes)" (/dev/stdin piped)."""
    (tmp_path / "dangling.png").symlink_to("gone.png")
    (tmp_path / "loop1.png").symlink_to("loop2.png")
    (tmp_path / "loop2.png").symlink_to("loop1.png")
    os.mkfifo(tmp_path / "pipe.png")
    for name, words in [
        ("dangling.png", "symbolic link to gone.png, which does not exist"),
        ("loop1.png", "symbolic link that loops"),
        ("pipe.png", "not a regular file"),
    ]:
        with pytest.raises(ImageError, match=words):
            preprocess(tmp_path / name)


def test_a_file_that_cannot_be_looked_at_is_an_image_error(tmp_path, monkeypatch):
    """A file in a folder the user may not search (stat() fails with EACCES) raised PermissionError."""
    hidden = tmp_path / "locked" / "x.png"
    real_stat = Path.stat

    def stat(self, *args, **kwargs):
        if self == hidden:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", stat)
    assert expand_paths([hidden]) == [hidden]
    with pytest.raises(ImageError, match="cannot be read"):
        preprocess(hidden)


def test_a_folder_names_the_subfolders_it_does_not_read_and_keeps_links_that_lead_nowhere(tmp_path):
    """Images in a subfolder and a dangling link named like an image were passed over without a word."""
    for folder in ["sub", ".git", "notes"]:
        (tmp_path / folder).mkdir()
    Image.new("L", (30, 30), 255).save(tmp_path / "a.png")
    Image.new("L", (30, 30), 255).save(tmp_path / "sub" / "b.png")
    Image.new("L", (30, 30), 255).save(tmp_path / ".git" / "c.png")
    (tmp_path / "notes" / "n.txt").write_text("no images here")
    (tmp_path / "dangling.png").symlink_to("gone.png")
    subfolders: list[Path] = []
    assert [p.name for p in expand_paths([tmp_path], subfolders=subfolders)] == ["a.png", "dangling.png"]
    assert subfolders == [tmp_path / "sub"]


def test_a_file_of_zeros_and_ones_is_black_at_any_bit_depth():
    """Pixels of 0 and 1 read as black in an 8-bit file but as a 0/1 mask (a digit) in a 16-bit PNG or a TIFF of
    32-bit integers: the same pixels gave two answers. An array of them is still a mask."""
    ones = np.zeros((60, 60), np.uint8)
    ones[10:50, 27:33] = 1
    for pixels in (ones, ones.astype(np.uint16), ones.astype(np.int32)):
        fmt = "TIFF" if pixels.dtype == np.int32 else "PNG"
        assert not preprocess(png_bytes(Image.fromarray(pixels), fmt)).any(), pixels.dtype
    assert preprocess(ones).any()


def test_a_corrupt_exif_block_warns_nobody():
    """Pillow's "Corrupt EXIF data" UserWarning reached the user's terminal as two lines of its internals."""
    broken_exif = b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\xff\xff\xff\xff"
    buffer = io.BytesIO()
    Image.fromarray(page(3)).convert("RGB").save(buffer, "JPEG", exif=broken_exif)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert preprocess(buffer.getvalue()).shape == (28, 28)


def test_images_read_on_threads_leave_no_catch_all_warnings_filter_behind():
    """Pillow's warnings were silenced with a catch-all "ignore" inside warnings.catch_warnings, which is not
    thread-safe: after images read on several threads at once (create_app's default), that filter could stay in
    place for good, and every warning of the process was silenced."""
    import threading

    broken_exif = b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\xff\xff\xff\xff"
    buffer = io.BytesIO()
    Image.fromarray(page(3)).convert("RGB").save(buffer, "JPEG", exif=broken_exif)
    data = buffer.getvalue()

    def read() -> None:
        for _ in range(200):
            preprocess(data)

    with warnings.catch_warnings():
        threads = [threading.Thread(target=read) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        left = [
            f
            for f in warnings.filters
            if f[0] == "ignore" and f[3] is None and f[2] in (Warning, UserWarning)
        ]
        assert left == []


def test_a_folder_is_expanded_with_one_stat_per_entry(tmp_path, monkeypatch):
    """Telling folders from files looked at every entry twice (2N + 1 stat() calls for N images, 13 ms more for
    a folder of 3,000 on the machine measured), where is_file() had looked once."""
    for i in range(20):
        (tmp_path / f"{i:02d}.png").write_bytes(b"x")
    calls = 0
    real_stat = Path.stat

    def stat(self, *args, **kwargs):
        nonlocal calls
        calls += 1
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", stat)
    assert len(expand_paths([tmp_path], [], [], [])) == 20
    assert calls <= 21


def test_images_read_from_many_threads_leave_the_processs_warning_filters_as_they_were():
    """catch_warnings is not thread-safe: 8 threads opening images left its filters in the host program for good
    (a DecompressionBombWarning raised as an error there, and Pillow's warnings silenced)."""
    import threading

    png = png_bytes(Image.new("L", (40, 40), 255))
    before = list(warnings.filters)

    def read_many() -> None:
        for _ in range(300):
            open_image(png)

    threads = [threading.Thread(target=read_many) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert warnings.filters == before


def test_a_damaged_tiff_is_one_sentence_without_pillows_warnings(tmp_path, recwarn):
    """A TIFF whose EXIF block is damaged warned ("Corrupt EXIF data", with Pillow's source line) from its
    load(), outside the block that silences Pillow, beside the answer."""
    from PIL import TiffImagePlugin

    image = Image.fromarray(page(3))
    buffer = io.BytesIO()
    info = TiffImagePlugin.ImageFileDirectory_v2()
    info[270] = "a description"
    image.save(buffer, "TIFF", tiffinfo=info)
    data = bytearray(buffer.getvalue())
    # the description's count, made far larger than the file: Pillow skips it, warning
    offset = data.index((270).to_bytes(2, "little"), 8)
    data[offset + 4 : offset + 8] = (10**6).to_bytes(4, "little")
    warnings.simplefilter("always")
    try:
        preprocess(bytes(data))
    except ImageError:
        pass  # a sentence is fine; a warning is not
    assert not [w for w in recwarn if "PIL" in w.filename], [str(w.message) for w in recwarn]


def test_a_16_bit_image_is_scaled_without_a_float64_copy():
    """A 16-bit image went through a float64 copy of itself: 1.4 GB for a 9,400 x 9,400 PNG."""
    import tracemalloc

    from digitrec.preprocess import _to_unit_range

    image = np.random.default_rng(0).integers(0, 4096, size=(1000, 1000), dtype=np.uint16)
    tracemalloc.start()
    try:
        scaled = _to_unit_range(image)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert scaled.dtype == np.float32 and np.allclose(
        scaled, image.astype(np.float64) / 4095, rtol=0, atol=1e-7
    )
    assert peak < 6_000_000  # one float32 copy (4 MB) and change, not float64's 8 MB and its float32 copy


def test_disk_filter_takes_a_0_1_uint8_mask_as_ink_on_both_sides_of_its_switch():
    """Past EDT_RADIUS `~` inverted a uint8 mask's bits instead of its ink (a reviewer's 40 x 40 mask)."""
    mask = np.zeros((40, 40), np.uint8)
    mask[18:22, 18:22] = 1
    for radius in (3.0, 17.0):
        assert np.array_equal(
            disk_filter(mask, radius, grow=True), disk_filter(mask.astype(bool), radius, grow=True)
        )
        assert np.array_equal(
            disk_filter(mask, radius, grow=False), disk_filter(mask.astype(bool), radius, grow=False)
        )


@pytest.mark.parametrize("dark", [True, False])
def test_the_polarity_of_small_digits_on_a_big_page_is_their_ink_not_the_papers_noise(dark):
    """Ink on under 2% of the picture (a number written 4.5% of a phone photo's width high) lay beyond both
    percentiles ink_is_dark compares, so they held the paper's noise alone and which was longer was chance: a
    faint highlight made a clear "51" light ink on dark paper, and `read` found no digits at all."""
    rng = np.random.default_rng(0)
    gray = (0.88 + rng.normal(0, 0.004, (768, 1024))).astype(np.float32)
    gray[100:300, 50:250] += 0.006  # a faint highlight on a twentieth of the page
    ink = np.zeros((768, 1024), np.uint8)
    for start, end in [((480, 360), (480, 408)), ((520, 360), (520, 408)), ((480, 360), (500, 360))]:
        cv2.line(ink, start, end, 1, 4)
    gray[ink > 0] = 0.2
    assert ink_is_dark(gray if dark else 1 - gray) == dark


@pytest.mark.parametrize("dark", [True, False])
def test_a_small_digit_on_a_page_lit_from_one_side_keeps_its_polarity(dark):
    """A 2 an eighth of the page high on a photo lit from one corner (the page 0.45-1.15 times as bright as the
    paper, clipped to white): the kinks of the clipped gradient filled both residual tails that ink_is_dark
    compares, the 2 lay beyond them, and the photo was read as light ink on dark paper: "a blank page"."""
    height, width = 1000, 1500
    light = np.linspace(0.6, 1.1, width)[None, :] * np.linspace(1.05, 0.75, height)[:, None]
    ink = np.zeros((height, width), np.uint8)
    two = np.array([[700, 470], [740, 440], [790, 450], [800, 500], [710, 590], [810, 590]], np.int32)
    cv2.polylines(ink, [two], False, 1, 9)
    gray = np.clip(np.where(ink > 0, 0.08, 0.92) * light, 0, 1).astype(np.float32)
    assert ink_is_dark(gray if dark else 1 - gray) == dark
    page = (255 * (gray if dark else 1 - gray)).astype(np.uint8)
    x = preprocess(Image.fromarray(page))
    assert x.sum() > 20 and ink_box(x)[0] == 20  # the 2, its height scaled to MNIST's 20 px


def _under_a_band_of_light(
    digits: list[int], share: float, bright: float, ink: float, dark: bool = True
) -> np.ndarray:
    """Pen digits on a page whose left `share` is `bright` times as lit as the rest (a window, a lamp), the
    light ramping between the two; the ink darkens its paper by `ink` (or, `dark` False, chalk lightens a board
    by it, and the band is a shadow: `bright` under 1)."""
    from scipy import ndimage

    rng = np.random.default_rng(0)
    line = np.pad(number_line([crop_ink(draw_digit(d, rng, 80)) for d in digits], rng)[0], 40)
    width = line.shape[1]
    lit = np.where(np.arange(width) < share * width, bright, 1.0)
    light = ndimage.gaussian_filter(lit, 0.04 * width)[None, :]
    page = (100 if dark else 90) * light * (1 - ink * line if dark else 1 + ink * line)
    return (page + rng.normal(0, 2, line.shape)).clip(0, 255).astype(np.uint8)


@pytest.mark.xfail(
    strict=True,
    reason="a known limit: lit paper is taken for light ink (docs/realworld.md, 'A band of light across the page')",
)
@pytest.mark.parametrize("share, bright, ink", [(0.25, 1.9, 0.45), (0.3, 2.0, 0.4)])
def test_a_band_of_light_across_the_page_is_not_light_ink(share, bright, ink):
    """A quarter of the page twice as lit as the rest: its paper makes the histogram's light tail three times the
    ink's dark one, and ink_is_dark takes the lit paper for light ink ("36374" read as "111", a lone digit as a
    blank page; a page lighter than the table round it, the same). Two ways of letting the image less its local
    median overrule the histogram were tried and withdrawn (they turned bold digits cropped close, a glare on a
    page half in shadow, or chalk on a slate on a light desk, the wrong way: the guards below)."""
    page = _under_a_band_of_light([3, 6, 3, 7, 4], share, bright, ink)
    assert ink_is_dark(load_gray(page))
    predictor = Predictor.pretrained(backend="numpy")
    assert predictor.read(page).number == "36374"
    # one digit on such a page was rejected as a blank page (or read as a 1)
    digits = predictor.predict([_under_a_band_of_light([d], share, bright, ink) for d in range(10)])
    assert [p.digit for p in digits] == list(range(10))


@pytest.mark.parametrize("share, shadow, ink", [(0.25, 0.5, 0.8), (0.3, 0.4, 0.6)])
def test_chalk_on_a_board_half_in_shadow_stays_light_ink(share, shadow, ink):
    page = _under_a_band_of_light([3, 6, 3, 7, 4], share, shadow, ink, dark=False)
    assert not ink_is_dark(load_gray(page))
    assert Predictor.pretrained(backend="numpy").read(page).number == "36374"


def _bold(digit: int, seed: int, widen: float, margin: float, dark: bool) -> np.ndarray:
    """A pen digit drawn with a marker (strokes widened by `widen` of its height), cropped `margin` of its
    height from its ink, dark on light or light on dark, with a little noise."""
    rng = np.random.default_rng(seed)
    glyph = crop_ink(draw_digit(digit, rng, 96))
    size = max(1, int(widen * glyph.shape[0])) | 1
    glyph = np.pad(
        cv2.dilate(glyph, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))), int(margin * 96)
    )
    image = 0.9 - 0.8 * glyph if dark else 0.1 + 0.8 * glyph
    return (255 * (image + rng.normal(0, 0.03, glyph.shape)).clip(0, 1)).astype(np.uint8)


@pytest.mark.parametrize(
    "digit, seed, widen, margin, dark",
    [
        (0, 0, 0.08, 0.0, True),
        (0, 1, 0.08, 0.1, False),
        (1, 0, 0.15, 0.0, True),
        (2, 2, 0.08, 0.0, False),
        (5, 2, 0.08, 0.0, True),
        (6, 0, 0.08, 0.0, True),
        (7, 0, 0.08, 0.0, False),
    ],
)
def test_a_bold_digit_cropped_close_keeps_its_polarity(digit, seed, widen, margin, dark):
    """The paper between a marker's strokes, cropped close, is as much of the picture as the ink, and the image
    less its local median has tails 1.5-2.2 times apart either way: a polarity test that trusts it at 1.5 turned
    these the wrong way (a review found 16 of 540 such digits lost)."""
    assert (
        Predictor.pretrained(backend="numpy").predict([_bold(digit, seed, widen, margin, dark)])[0].digit
        == digit
    )


def _slate(digit: int) -> np.ndarray:
    """A chalk digit (grainy strokes) on a dark slate filling 80% of each side of a light frame (a desk, a wall)."""
    from scipy import ndimage

    rng = np.random.default_rng(digit)
    image = np.full((300, 400), 0.8, np.float32)
    y0, x0, height, width = 30, 40, 240, 320
    image[y0 : y0 + height, x0 : x0 + width] = 0.2
    glyph = crop_ink(draw_digit(digit, rng, height // 2))
    glyph = glyph * np.clip(0.6 + 1.6 * (ndimage.gaussian_filter(rng.random(glyph.shape), 0.7) - 0.5), 0.3, 1)
    h, w = glyph.shape
    y = int(rng.uniform(y0 + 10, y0 + height - 10 - h))
    x = int(rng.uniform(x0 + 10, x0 + width - 10 - w))
    image[y : y + h, x : x + w] = image[y : y + h, x : x + w] * (1 - glyph) + 0.9 * glyph
    image = ndimage.gaussian_filter(image, 0.8) + rng.normal(0, 0.02, image.shape)
    return (255 * image.clip(0, 1)).round().astype(np.uint8)


def test_chalk_on_a_slate_on_a_light_desk_is_light_ink():
    """The mirror of a page on a table: a polarity test that let the image less its local median turn light ink
    dark (its dark tail 2.5 times its light one) read 4 of these 10 (the slate's edges, in windows mostly of the
    light desk, make that dark tail)."""
    digits = Predictor.pretrained(backend="numpy").predict([_slate(d) for d in range(10)])
    assert [p.digit for p in digits] == list(range(10))


def _sheet_with_a_seven(height: int = 400, width: int = 300) -> np.ndarray:
    """A white sheet (0.92) with a pen 7 on it, gently lit from one side."""
    sheet = np.full((height, width), 0.92, np.float32)
    cv2.polylines(sheet, [np.array([[90, 120], [210, 120], [140, 300]], np.int32)], False, 0.1, 9)
    return sheet * np.linspace(1.0, 0.9, width, dtype=np.float32)[None, :]


def _on_a_table(sheet: np.ndarray, fill: float, table: float, seed: int = 0) -> np.ndarray:
    """The sheet seen at a slant on a textured table of level `table`, the sheet `fill` of the frame."""
    rng = np.random.default_rng(seed)
    height, width = sheet.shape
    frame = (round(height / fill), round(width / fill))
    texture = cv2.GaussianBlur(rng.normal(0, 1, frame).astype(np.float32), (0, 0), 3) * 0.05
    center = np.array([frame[1] / 2, frame[0] / 2], np.float32)
    corners = np.array([[40, 0], [width - 40, 0], [width, height], [0, height]], np.float32) - [
        width / 2,
        height / 2,
    ]
    warp = cv2.getPerspectiveTransform(
        np.array([[0, 0], [width, 0], [width, height], [0, height]], np.float32),
        (corners + center).astype(np.float32),
    )
    seen = cv2.warpPerspective(sheet, warp, (frame[1], frame[0]))
    inside = cv2.warpPerspective(np.ones_like(sheet), warp, (frame[1], frame[0]))
    return np.clip((table + texture) * (1 - inside) + seen * inside, 0, 1).astype(np.float32)


@pytest.mark.parametrize("fill, table", [(0.96, 0.3), (0.96, 0.5), (0.5, 0.3), (0.5, 0.1)])
def test_a_sheet_photographed_on_a_table_reads_as_the_sheet_alone(fill, table):
    """A phone photo of a sheet on a desk: the desk's corner, solid dark at the photo's edge, was kept as ink
    beside the digit or in its place, and where the desk filled most of the photo the sheet read as light ink
    (a reviewer's phone photos: 0-8 of 20 read right). page_alone() puts the sheet's own paper where the table was."""
    sheet = _sheet_with_a_seven()
    photo = _on_a_table(sheet, fill, table)
    alone = preprocess(sheet)
    on_table = preprocess(photo)
    assert np.corrcoef(alone.ravel(), on_table.ravel())[0, 1] > 0.6  # 0.70-0.89; without page_alone 0.08-0.33


def _sheet_with_a_pen_seven(pen: int, ink: float) -> np.ndarray:
    """A white sheet (0.92) with a 7 written with a pen `pen` pixels wide, of tone `ink`."""
    sheet = np.full((400, 300), 0.92, np.float32)
    cv2.polylines(sheet, [np.array([[90, 120], [210, 120], [140, 300]], np.int32)], False, ink, pen)
    return sheet


@pytest.mark.parametrize(
    "sheet, fill",
    [
        # a fine grey pen on a page small in the photo: on the 128-px copy its strokes are lighter than the cut
        # between paper and table, and the page was taken for one with nothing written on it
        (_sheet_with_a_pen_seven(2, 0.4), 0.5),
        # a bold marker on a page filling the photo: the table, a thin strip along the frame, is no bolder than
        # the writing and was taken for a stroke run off the edge
        (_sheet_with_a_pen_seven(30, 0.1), 0.93),
    ],
    ids=["fine-grey-pen", "bold-marker"],
)
def test_a_page_on_a_table_written_with_a_fine_pen_or_a_bold_marker(sheet, fill):
    """table-photo's misses of 7 December (seed 102: 125 of 300, 114 of them rejected): pages that page_alone()
    left with their table. Each reads as the sheet alone reads."""
    alone = preprocess(sheet)
    on_table = preprocess(_on_a_table(sheet, fill, 0.3))
    assert np.corrcoef(alone.ravel(), on_table.ravel())[0, 1] > 0.8  # 0.90 and 0.93; until then 0.05 and 0.49


def test_a_strip_of_table_that_page_alone_leaves_is_no_ink():
    """table-photo photos (development seed 114) whose page page_alone() did not tell from the table (a light grey
    desk, a page lit unevenly): the table's strips along the frame were ink beside the digit, and each photo was
    rejected. A part with a large share of its outline on the frame is a strip, not a stroke, and is cleared."""
    predictor = Predictor.pretrained(backend="numpy")
    samples = list(generate("table-photo", 43, seed=114))
    photos = [samples[index] for index in (15, 19, 35, 42)]
    assert [p.digit for p in predictor.predict([s.data for s in photos])] == [int(s.label) for s in photos]


def _lit(image: np.ndarray, seed: int) -> np.ndarray:
    """A photo-like page: a 12% light ramp across it and a little noise (as uint8)."""
    rng = np.random.default_rng(seed)
    height, width = image.shape
    ramp = 1 - 0.12 * np.linspace(0, 1, width, dtype=np.float32)[None, :] * np.ones((height, 1), np.float32)
    return (255 * np.clip(image * ramp + rng.normal(0, 0.015, image.shape), 0, 1)).astype(np.uint8)


@pytest.mark.parametrize("width, pen", [(260, 26), (320, 10), (320, 18)])
def test_a_sevens_bar_along_the_photos_edge_is_no_strip_of_table(width, pen):
    """The day's reviewer: a 7 cropped tight, its bar along the photo's top edge, had 0.30 of its outline on the frame
    and was cleared as a strip (a blank page). A strip reaches into the picture about its width; the 7, through its
    diagonal, many stroke widths (FRAME_DEEP)."""
    canvas = np.zeros((200, width), np.float32)
    cv2.polylines(
        canvas, [np.array([[20, 3], [width - 20, 3], [width // 2 - 10, 199]], np.int32)], False, 1.0, pen
    )
    assert Predictor.pretrained(backend="numpy").predict(_lit(0.9 - 0.8 * canvas, pen))[0].digit == 7


def test_a_digit_touching_a_line_along_the_photos_edge_is_no_strip():
    """The reviewer's other case: a 1 standing on a ruled line (a box's edge) along the photo's foot was one part
    with the line, cleared with it as a strip (a blank page)."""
    glyph = draw_digit(1, np.random.default_rng(1), height=130).astype(np.float32)
    rows, cols = np.nonzero(glyph > 0.05)
    glyph = glyph[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    height, width = glyph.shape
    canvas = np.zeros((200, 180), np.float32)
    top = 200 - 6 - height + 2  # its foot 2 px into the line
    canvas[top : top + height, (180 - width) // 2 : (180 - width) // 2 + width] = glyph[: 200 - top]
    canvas[-6:, :] = 1.0
    assert not Predictor.pretrained(backend="numpy").predict(_lit(0.9 - 0.8 * canvas, 1))[0].blank


def test_a_shadow_across_the_page_or_a_board_under_a_light_wall_is_no_page_on_a_table():
    """page_alone() leaves alone what only looks like a sheet on a darker table: half a page in a soft shadow
    (the shadowed half keeps its ink), a chalkboard under a strip of light wall, a blank sheet."""
    from digitrec.preprocess import page_alone

    sheet = _sheet_with_a_seven()
    width = sheet.shape[1]
    ramp = 1 / (
        1 + np.exp(-(np.arange(width) - width / 2) / (0.08 * width))
    )  # a soft-edged shadow, right half
    shadowed = (sheet * (1 - 0.5 * ramp)[None, :]).astype(np.float32)
    assert page_alone(shadowed) is shadowed
    chalk = np.zeros((400, 600), np.uint8)
    cv2.putText(chalk, "3", (250, 300), cv2.FONT_HERSHEY_SIMPLEX, 6, 255, 12)
    board = np.where(chalk > 0, 0.9, 0.15).astype(np.float32)
    board[:80] = 0.85  # the wall above the board
    assert page_alone(board) is board
    board[25:55, 40:60] = 0.6  # a light switch on the wall: "written on", but the chalk outside is light too
    assert page_alone(board) is board
    # "71" cropped tight, the 1 cut by the photo's top and foot, the 7 in grey: the paper left of the 1, with the
    # 7 on it, is no page on a table, and its right is no table (the 7 was painted over)
    crossing = np.full((300, 300), 0.92, np.float32)
    cv2.line(crossing, (170, 0), (150, 299), 0.1, 18)
    seven = np.zeros((300, 300), np.uint8)
    cv2.putText(seven, "7", (30, 200), cv2.FONT_HERSHEY_SIMPLEX, 4, 255, 14)
    crossing[seven > 0] = 0.55
    assert page_alone(crossing) is crossing
    blank = _on_a_table(np.full((400, 300), 0.92, np.float32), 0.6, 0.3)
    assert page_alone(blank) is blank
    # a chalk 0 filling the photo: its loop, filled in, is light, convex and holds the board as its "ink"
    chalk = np.full((300, 240), 0.15, np.float32)
    cv2.ellipse(chalk, (120, 150), (80, 120), 0, 0, 360, 0.9, 14)
    assert page_alone(chalk) is chalk
    # a digit touching the photo's edge lies outside the paper, along the frame for one stroke only (a leading 0
    # of a number was painted over; one cut through by the edge, its paper inside the loop outside too, still is)
    edge = np.full((200, 400), 0.92, np.float32)
    cv2.ellipse(edge, (42, 100), (40, 60), 0, 0, 360, 0.1, 10)
    cv2.line(edge, (200, 40), (200, 160), 0.1, 10)
    assert page_alone(edge) is edge
