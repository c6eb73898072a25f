"""One function from any image of a digit (photo, scan, drawing) to a 28x28 MNIST-like array, stage by stage.

MNIST was made by size-normalizing bilevel NIST digits into a 20x20 box with anti-aliasing, then centering
them by center of mass in 28x28, white ink on black. `preprocess()` rebuilds exactly that from a real image:

    load        EXIF orientation, alpha flattened, any mode/bit depth -> gray in [0, 1], working size
    page        a sheet photographed on a table: the table replaced by the sheet's paper, or it is taken for ink
    polarity    find which of dark-on-light or light-on-dark the image is, so ink is always "dark"
    flatten     ink contrast relative to a morphological estimate of the paper: no shadows, no uneven light
    threshold   hysteresis on the flattened ink (Otsu, floored at a minimum contrast), specks dropped
    select      keep the digit's components, drop small debris, a box drawn round it and a shadow's edge beside it
    closer      a digit left a few pixels high by shrinking a big photo: again, from a window around it, larger
    crop        to the ink's bounding box
    stroke      thicken or thin the strokes to MNIST's stroke width at the final scale
    scale20     longer side to 20 px keeping the aspect ratio, area-averaged (MNIST's anti-aliasing)
    center28    paste so the center of mass lands at the center of a 28x28 frame
    intensity   brightest stroke pixel = 1.0, as in MNIST

The stages are separate functions so that `segment.py` reuses them for a line of digits.
Only `ImageError` leaves this module for bad input; a page with no ink gives an all-zero image.
"""

from __future__ import annotations

import errno
import functools
import importlib.util
import io
import math
import os
import stat
import struct
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, cast, overload

import cv2
import numpy as np
from PIL import Image, ImageOps, TiffTags, UnidentifiedImageError

from .errors import ImageError

# The images here are small (one digit at 256 px, a line at 1,024): OpenCV's thread pool costs more than it
# gives on them, and digitrec spreads its work over processes instead (server workers, large folders).
cv2.setNumThreads(1)

# Every suffix Pillow gives a format in IMAGE_FORMATS (Image.registered_extensions()): a folder's files are read
# by these, and a file passed directly by its first bytes, so the two agree (an .apng is a PNG, an .avifs an
# AVIF). AVIF's are here even where Pillow lacks its plugin: such a file then gets a sentence naming its format.
IMAGE_SUFFIXES = (
    ".png", ".apng", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".avif", ".avifs"
)  # fmt: skip
# Photos Pillow does not read: HEIC (an iPhone's default) and camera raw files. A folder of them would seem empty,
# so expand_paths() reports them.
UNREADABLE_PHOTO_SUFFIXES = (".heic", ".heif", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".raf", ".orf", ".rw2")
# The image formats digitrec reads (Pillow format names), AVIF where the installed Pillow has its plugin
# (11.3 and later). Pillow knows some 40 more (EPS, which it hands to Ghostscript, DDS, ICO, TGA, QOI, ...):
# each is more decoder code facing uploads, and none is how handwriting is photographed or scanned.
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP") + (
    ("AVIF",) if importlib.util.find_spec("PIL.AvifImagePlugin") else ()
)
IMAGE_FORMATS_TEXT = (
    "PNG, JPEG, BMP, GIF, TIFF, WebP or AVIF"
    if "AVIF" in IMAGE_FORMATS
    else "PNG, JPEG, BMP, GIF, TIFF or WebP"
)
MAX_PIXELS = cast(int, Image.MAX_IMAGE_PIXELS)  # Pillow's decompression-bomb guard (about 89 megapixels)
# The largest file an image under that guard can need (uncompressed, 16 bytes a pixel: four float32 channels);
# a bigger one is no image digitrec would decode, and is refused before it is read into memory.
MAX_FILE_BYTES = 16 * MAX_PIXELS + (1 << 20)
MIN_SIDE = 5  # below this there is no digit to see
WORK_SIDE = 256  # longer side of the working image for one digit: ~10x the final 20 px, and fast
MIN_WORK_SIDE = 112  # small inputs (e.g. 28x28) are upsampled so thresholding keeps their shape
ZOOM_BELOW = 0.1  # a digit under this share of the working image's longer side is looked at again, closer:
ZOOM_TO = 0.3  # the photo is loaded larger so that the digit's longer side is this share of WORK_SIDE,
ZOOM_WINDOW = 3.0  # and a window this many times the digit's size, centred on it, is read instead
THIN_FROM = 1.5  # a blank working image of a photo shrunk this much or more is looked at for thin strokes,
THIN_LOAD = 4  # from the photo loaded at up to this many times the working size (thin_kept)
BACKGROUND_SIDE = 32  # the paper estimate is computed with the shorter side at this many pixels
BACKGROUND_WINDOW = 11  # closing window there: wider than any stroke, narrower than lighting changes
# the same proportions for ink_is_dark()'s median, 6x cheaper (as right)
POLARITY_SIDE, POLARITY_WINDOW = 20, 7
# ink_is_dark()'s tails shorter than this (1% of the gray range) on the small copy are the paper's noise
POLARITY_FLOOR = 0.01
POLARITY_SPOT = 4  # an extreme this many times the 2%/98% tails is ink on under 2% of the picture
# page_alone(): a page on a table, found on a copy PAGE_SIDE px long: this much lighter than the table (of the
# gray range), this share of the picture, this share of its convex hull, at most this many pixels of ramp a pixel
# of its edge
PAGE_SIDE, PAGE_CONTRAST, PAGE_SHARE, PAGE_CONVEX, PAGE_RAMP = 128, 0.2, (0.1, 0.97), 0.9, 1.5
PAGE_PAPER = 0.7  # and at least this share of it light: mostly paper
PAGE_STRAIGHT = 0.02  # its outline a polygon of at most 8 corners to within this share of the copy's diagonal
PAGE_SOLID = 1.5  # and what lies outside it this many times bolder than the ink on it
PAGE_INK = 0.15  # and the ink on it strokes: their width at most this share of the square root of its area
PAGE_CONTACT = 0.05  # and what lies outside it along at least this share of the frame
# and written on: this many pixels inside it (2 px of the copy in from its edge) darker than its paper by
# PAGE_FAINT of the contrast (a fine pen's strokes on the small copy are lighter than the cut between paper and table)
PAGE_WRITTEN, PAGE_FAINT = 3, 0.25
PAGE_ALONG = 0.5  # what lies outside along this share of the frame is a table, however thin (not a stroke)
PAGE_BARE = 0.02  # and at most this share of what lies outside it light: a table holds no paper or chalk
# without_edge_sides(): the ring SIDE_NEAR-SIDE_FAR blur widths (smooth_sigma, 1 px at least) round a part of the
# ink, each pixel of it compared with the darkest (light ink: lightest) pixel within SIDE_REACH of them; less than
# SIDE_ALIKE of the lighter level apart, it is as dark as the ink beside it, and a part with SIDE_SHARE of its ring
# so is the dark side of an edge, not strokes
SIDE_NEAR, SIDE_FAR, SIDE_REACH, SIDE_ALIKE, SIDE_SHARE = 2, 5, 7, 0.1, 0.3
# and a part of at least FRAME_AREA of the picture with FRAME_ALONG of its outline on the frame, reaching no deeper
# into the picture than FRAME_DEEP times its stroke width, lies along it (a shadow's or a table's strip), not a
# stroke the frame cuts (smaller: a speck the frame cuts; deeper: a digit, a 7's bar along the frame)
FRAME_ALONG, FRAME_AREA, FRAME_DEEP = 0.3, 0.004, 3.5
# strokes must be 30% darker than their local paper somewhere (shadows and blank pages stay blank)
INK_CONTRAST = 0.3
WEAK_FRACTION = 0.6  # hysteresis: pixels this share of the strong cut join the stroke they touch
SPECK_FRACTION = 0.0004  # components smaller than this share of the image are dust or noise
KEEP_FRACTION = 0.08  # a single digit's parts are at least this share of its largest part
BOLDER_OBJECT = 2.5  # a part at the photo's edge this many times bolder than the digit is an object, not ink,
LONGER_OBJECT = 2.0  # and so is a straight bar this many times longer than the digit's size
ROD_ASPECT = 5.0  # (a bar: at least this many times longer than wide)
OBJECT_CLEARANCE = 0.1  # ... when it lies this share of the digit's size clear of the digit
SOLID_STROKE = 0.22  # a glyph whose mean stroke is this share of its height or more has lost its loops
REOPEN_HEIGHT = 0.7  # reopened(): a core shorter than this share of the glyph lost a stroke, not a fill
REOPEN_WIDTH = 0.6  # ... and one narrower than this share of it lost a lighter digit glued beside it
# uniform_paper(): paper pixels within this many gray levels (of 255) of the paper tone (a flat fill)
PAPER_TOLERANCE = 2
INK_TOLERANCE = 25  # ... and a side of the paper tone holds ink if pixels lie farther than this from it
# ... a flat page has (almost) no pixels on the other side of the paper from its ink
OTHER_SIDE_FRACTION = 0.002
# flatten_uniform(): a flat page's ink weaker than this at its strongest is scaled up to full strength
FAINT_INK = 2 * INK_CONTRAST
BOX, FRAME = 20, 28  # MNIST: digit in a 20x20 box, centered by mass in 28x28
STROKE_WIDTH = 2.4  # mean MNIST stroke width in px at the 20-px-box scale (measured with stroke_width())

Steps = dict[str, np.ndarray]
Parts = tuple[np.ndarray, np.ndarray, np.ndarray]  # ink_parts(): labels, the area per label, kept per label


# ---------------------------------------------------------------------------------------------- loading


def open_image(source: Any, max_side: int | None = None) -> Image.Image:
    """Open a path, bytes, file object or PIL image as a fully decoded, EXIF-oriented PIL image.

    Every way a file can be unusable becomes one ImageError sentence: missing, a folder, not an image,
    truncated, a decompression bomb, empty. With `max_side`, a large JPEG is decoded at a reduced scale.
    """
    return _open(source, max_side)[0]


def _open(
    source: Any, max_side: int | None = None, gray: bool = False
) -> tuple[Image.Image, tuple[int, int]]:
    """open_image() plus the image's full (width, height) after EXIF rotation, even when decoded smaller.

    With `gray`, a color JPEG decodes its luma channel only (what conversion to gray would keep anyway)."""
    name = _describe(source)
    if isinstance(source, Image.Image):
        image = source
        try:
            image.load()  # a lazily opened image is decoded now: its file may since have been closed
        except Exception as exc:  # noqa: BLE001 - Pillow raises a bare AssertionError for a closed file
            reason = str(exc) or "its file was closed before its pixels were read"
            raise ImageError(
                f"{name} cannot be read ({reason}); call .load() on it before its file is closed, or pass the path."
            ) from None
    else:
        if isinstance(source, (bytes, bytearray, memoryview)):
            if len(source) == 0:
                raise ImageError(f"{name} is empty (0 bytes); pass an image file.")
            fp: Any = io.BytesIO(bytes(source))
        elif isinstance(source, (str, os.PathLike)):
            path = Path(source)
            if "\0" in str(path):  # the OS refuses it (ValueError: embedded null byte)
                raise ImageError(
                    f"{str(path)!r} holds a NUL character, which no file name can; check the path."
                )
            try:
                info = path.stat()
            except OSError as exc:
                raise ImageError(_unreachable(path, exc)) from None
            if stat.S_ISDIR(info.st_mode):
                raise ImageError(f"{path} is a folder; pass the image files inside it.")
            # a pipe or a device: a big photo is read twice, and a pipe with no writer never ends
            if not stat.S_ISREG(info.st_mode):
                raise ImageError(
                    f"{path} is not a regular file (a pipe or a device); save the image to a file first."
                )
            if info.st_size > MAX_FILE_BYTES:  # a 5 GB file was read whole: a MemoryError traceback
                raise ImageError(
                    f"{path} is {info.st_size / 1e9:.1f} GB, more than any image digitrec decodes can take "
                    f"({MAX_FILE_BYTES / 1e9:.1f} GB); pass an image file."
                )
            # read whole: Pillow keeps a path's file open after load() for a GIF or TIFF of several frames
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise ImageError(
                    f"{path} cannot be read ({exc.strerror or exc}); check its permissions."
                ) from None
            if not data:  # by what it holds, not its size: a file under /proc says 0 bytes and holds text
                raise ImageError(f"{path} is empty (0 bytes); pass an image file.")
            fp = io.BytesIO(data)
        elif hasattr(source, "read"):
            fp = source
        else:
            raise ImageError(
                f"cannot read an image from a {type(source).__name__}; pass a path, bytes, a PIL image or an array."
            )
        try:
            # Pillow only warns between 1x and 2x its limit; we refuse the whole range. Opening parses the header
            # (the bomb check's place); decoding, below, runs outside the lock, in parallel with other threads'.
            with quiet_pillow(bomb_is_error=True):
                image = Image.open(fp, formats=IMAGE_FORMATS)
            full_size = image.size
            # JPEG can decode at 1/2, 1/4, 1/8 scale: a 12 MP phone photo costs milliseconds, not 100s of them.
            side = max_side if max_side and max(image.size) > 2 * max_side else None
            if image.format == "JPEG" and (side or gray):
                image.draft("L" if gray else image.mode, (side, side) if side else image.size)
            if image.format == "TIFF":
                # a TIFF's load() ends by parsing its EXIF blocks, and warns of a damaged one beside our sentence:
                # parsed here first, in the lock (they are kept), so that the decode runs outside it
                with quiet_pillow():
                    exif = image.getexif()
                    for key in TiffTags.TAGS_V2_GROUPS:
                        if key in exif:
                            exif.get_ifd(key)
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageError(
                f"{name} is too large to decode safely (over {MAX_PIXELS:,} pixels, Pillow's decompression-bomb guard); "
                "resize it first."
            ) from None
        except UnidentifiedImageError:
            kind = _photo_format(source)
            if kind is not None:
                raise ImageError(
                    f"{name} is a {kind} photo, which Pillow cannot read here; save it as JPEG or PNG first."
                ) from None
            damaged = _damaged_format(fp)
            if damaged is not None:
                raise ImageError(f"{name} {damaged}") from None
            other = _other_format(fp)
            if other is not None:
                raise ImageError(
                    f"{name} is in the {other} format, which digitrec does not read; convert it to {IMAGE_FORMATS_TEXT}."
                ) from None
            raise ImageError(f"{name} is not an image digitrec can read; use {IMAGE_FORMATS_TEXT}.") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            if "MAX_TEXT_CHUNK" in str(exc):  # a PNG whose text or color-profile chunk unpacks to megabytes
                raise ImageError(
                    f"{name} holds a text or color-profile chunk too large to read safely; re-save it without "
                    "its metadata."
                ) from None
            # Truncated or corrupt data: Pillow raises OSError ("image file is truncated") and friends.
            raise ImageError(f"{name} is damaged or truncated ({exc}); re-save or re-export it.") from None
    if isinstance(source, Image.Image):
        full_size = image.size
    width, height = full_size
    if width * height > MAX_PIXELS:
        raise ImageError(
            f"{name} is too large to decode safely ({width}x{height} pixels, over Pillow's decompression-bomb guard "
            f"of {MAX_PIXELS:,}); resize it first."
        )
    if min(width, height) < MIN_SIDE:
        raise ImageError(
            f"{name} is {width}x{height} pixels, too small to hold a digit; use at least {MIN_SIDE}x{MIN_SIDE}."
        )
    stored_size = image.size
    try:
        # parsing the EXIF block warns (and Pillow keeps what it parsed); turning, below, not
        with quiet_pillow():
            image.getexif()
        if isinstance(source, Image.Image):  # the caller's: turned on a copy, so theirs stays as it is
            image = cast(Image.Image, ImageOps.exif_transpose(image))
        else:  # our own: turned in place, as a copy of a 12-megapixel PNG costs ~20 ms and as much memory
            ImageOps.exif_transpose(image, in_place=True)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not lose the picture; keep it unrotated
        pass
    if image.size != stored_size:  # rotated by 90 degrees
        full_size = (full_size[1], full_size[0])
    return image, full_size


# catch_warnings saves and restores the process's warning filters, which is not thread-safe: threads reading
# images at once (a caller's thread pool, the server's threads) left one block's filters in place for good, a
# DecompressionBombWarning turned into an error in the host program and Pillow's warnings silenced there. Our
# blocks take turns; they only parse a header or an EXIF block.
_WARNINGS_LOCK = threading.Lock()


@contextmanager
def quiet_pillow(bomb_is_error: bool = False, everything: bool = False) -> Iterator[None]:
    """Silence Pillow's own warnings (e.g. "Corrupt EXIF data": two lines of its internals), and only those (or
    every warning, `everything`), while the block runs; with `bomb_is_error`, DecompressionBombWarning raises."""
    with _WARNINGS_LOCK, warnings.catch_warnings():
        if everything:
            warnings.simplefilter("ignore")
        else:
            warnings.filterwarnings("ignore", module=r"PIL\.")
        if bomb_is_error:
            warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def _unreachable(path: Path, exc: OSError) -> str:
    """The sentence for a path whose stat() failed: missing, a dangling or looping link, or not searchable."""
    if exc.errno == errno.ELOOP:
        return f"{path} is a symbolic link that loops back on itself; point it at an image file."
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"{path} cannot be read ({exc.strerror}); check the permissions of it and of its folders."
    if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
        return f"{path} cannot be read ({exc.strerror or exc}); check the path."
    try:
        target = os.readlink(path)
    except OSError:  # not a link: simply missing
        if str(path) == "-":  # the Unix habit for standard input, which a path is not
            return (
                "- is no file, and standard input is not read as -; redirect the image into /dev/stdin instead "
                "(digitrec predict /dev/stdin < image.png)."
            )
        return f"{path} does not exist; check the path."
    return f"{path} is a symbolic link to {target}, which does not exist; check the link."


# ISO base media file brands (bytes 8-12, after the "ftyp" box name) of HEIC/HEIF photos and of AVIF images.
_BRANDS = {brand.encode(): "HEIC" for brand in ("heic", "heix", "hevc", "hevx", "heim", "heis")}
_BRANDS |= {b"mif1": "HEIF", b"msf1": "HEIF", b"avif": "AVIF", b"avis": "AVIF"}


# The opening bytes of the formats digitrec reads (BMP's two letters, "BM", would name text files too)
_SIGNATURES = {
    "PNG": (b"\x89PNG\r\n\x1a\n",),
    "JPEG": (b"\xff\xd8\xff",),
    "GIF": (b"GIF87a", b"GIF89a"),
    "TIFF": (b"II*\x00", b"MM\x00*"),
}


def _damaged_format(fp: Any) -> str | None:
    """For data Pillow cannot identify that opens as one of the formats digitrec reads, the rest of the sentence
    saying what is wrong with it (a PNG of 0x0 pixels, a JPEG cut after its first bytes): else None. They were
    told they are no image "digitrec can read; use PNG, JPEG, ...", which they are."""
    try:
        fp.seek(0)
        head = fp.read(32)
    except Exception:  # noqa: BLE001 - a stream that cannot go back: the general sentence
        return None
    if not isinstance(head, bytes):
        return None
    kind = next((k for k, marks in _SIGNATURES.items() if head.startswith(marks)), None)
    if kind is None and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        kind = "WebP"
    if kind is None:
        return None
    if kind == "PNG" and len(head) >= 24 and head[12:16] == b"IHDR":
        width, height = struct.unpack(">II", head[16:24])
        if min(width, height) < MIN_SIDE:
            return (
                f"is {width}x{height} pixels, too small to hold a digit; use at least {MIN_SIDE}x{MIN_SIDE}."
            )
    return f"is a {kind} file that is truncated or damaged, or of a kind Pillow cannot read; re-save or re-export it."


def _other_format(fp: Any) -> str | None:
    """The name of an image format Pillow knows but digitrec does not read (EPS, ICO, ...), else None.

    Only Pillow's header parsing runs here; the image is never decoded."""
    try:
        fp.seek(0)
        # e.g. "IM image format is deprecated": not the user's concern
        with quiet_pillow(everything=True), Image.open(fp) as image:
            return str(image.format)
    except Exception:  # noqa: BLE001 - not an image in any format Pillow knows
        return None


def _photo_format(source: Any) -> str | None:
    """HEIC, HEIF, AVIF or a camera raw format (DNG, CR2, ...), from the first bytes or the suffix; else None.

    Only asked once Pillow has failed to read the data, to tell a phone's photo format from a file that is no image.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        head = bytes(source[:12])
    elif isinstance(source, (str, os.PathLike)):
        try:
            with open(source, "rb") as f:
                head = f.read(12)
        except OSError:
            return None
    else:
        return None
    if head[4:8] == b"ftyp" and head[8:12] in _BRANDS:
        return _BRANDS[head[8:12]]
    if isinstance(source, (str, os.PathLike)) and is_unreadable_photo(Path(source)):
        return Path(source).suffix[1:].upper()
    return None


def load_gray(source: Any, max_side: int = WORK_SIDE, min_side: int = MIN_WORK_SIDE) -> np.ndarray:
    """Any supported input -> float32 gray in [0, 1] with its longer side resized into [min_side, max_side]."""
    return load_gray_sized(source, max_side, min_side)[0]


def load_gray_sized(
    source: Any, max_side: int = WORK_SIDE, min_side: int = MIN_WORK_SIDE
) -> tuple[np.ndarray, tuple[int, int]]:
    """load_gray() plus the input's own (width, height), to map working-image boxes back to the user's pixels."""
    if type(source).__module__ == "torch" and hasattr(source, "numpy"):  # a torch.Tensor, not importing torch
        source = source.detach().cpu()
        source = (
            source.float() if str(source.dtype) == "torch.bfloat16" else source
        ).numpy()  # no NumPy bfloat16
    if isinstance(source, np.ndarray):
        gray = _array_to_gray(source)
        size = (gray.shape[1], gray.shape[0])
    else:
        image, size = _open(source, max_side, gray=True)
        gray = _pil_to_gray(image, max_side)
        # freed before the resize below copies `gray`: 160 MB less at the peak for 40 megapixels of RGBA
        del image
    return _resize_long_side(gray, min_side, max_side), size


def _pil_to_gray(image: Image.Image, max_side: int | None = None) -> np.ndarray:
    """A PIL image -> float32 gray in [0, 1]; an 8-bit image longer than `max_side` is shrunk first, in 8 bits
    (several times faster than in float, within half a gray level of it)."""
    mode = image.mode
    if mode == "P":
        image = image.convert("RGBA")  # palette images may carry transparency
        mode = "RGBA"
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        pixels = np.asarray(image)
        if pixels.dtype.kind in "iu" and pixels.size and 0 <= pixels.min() and pixels.max() <= 1:
            # 0 and 1 are black in a file, as in an 8-bit one: not the 0/1 mask an array of them is read as
            return np.divide(pixels, 65535.0 if pixels.dtype.itemsize == 2 else 255.0, dtype=np.float32)
        return _array_to_gray(pixels)
    if mode in ("LA", "PA", "RGBA", "La", "RGBa"):
        image = image.convert("RGBA")
        extrema = cast(tuple[tuple[int, int], ...], image.getextrema())  # per band for RGBA
        if extrema[3][0] < 255:  # some transparency: composite it ourselves
            return _composite_rgba(image, *extrema[3])
    if image.mode not in ("L", "RGB", "RGBA", "1"):
        image = image.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX...
    # Pillow's own ITU-R 601 luma (as _luminance), in C: a fraction of the cost of doing it in NumPy.
    luma = image if image.mode == "L" else image.convert("L")
    if max_side and max(luma.size) > max_side:
        luma = luma.resize(_fitted(luma.size, max_side), Image.Resampling.BOX)
    return _u8_to_unit(np.asarray(luma))


ALPHA_BAND_ROWS = 64  # _composite_rgba's rows at a time: 1 MB of float32 RGBA for a 1,000-pixel-wide image


def _composite_rgba(image: Image.Image, alpha_min: int, alpha_max: int) -> np.ndarray:
    """An RGBA image with some transparency -> float32 gray in [0, 1], as _flatten_alpha composites it, a band of
    rows at a time.

    The whole image as float32 RGBA is 16 bytes a pixel, and the compositing made several such copies: a
    40-megapixel PNG of 170 KB (an upload the server accepts) took 1.7 GB to read. Band by band the cost is the
    gray image (4 bytes a pixel) and one band; each pixel is computed exactly as _flatten_alpha computes it.
    """
    width, height = image.size
    gray = np.empty((height, width), dtype=np.float32)
    bands = range(0, height, ALPHA_BAND_ROWS)

    def rows_of(top: int) -> Image.Image:
        return image.crop((0, top, width, min(top + ALPHA_BAND_ROWS, height)))

    for top in bands:
        rgba = np.asarray(rows_of(top), dtype=np.float32) / 255.0
        gray[top : top + len(rgba)] = _luminance(rgba[..., :3])
    # alpha.min() and alpha.max() in _flatten_alpha, whose alpha is float32 bytes / 255
    if np.float32(alpha_min) / np.float32(255.0) > 0.99 or alpha_max == 0:
        return gray
    top_alpha = np.float32(alpha_max) / np.float32(255.0)

    def alpha_of(top: int) -> np.ndarray:
        return (np.asarray(rows_of(top).getchannel("A"), dtype=np.float32) / 255.0) / top_alpha

    # the background is the tone that contrasts with the most opaque pixels, over the whole image
    ink_sum, ink_count = 0.0, 0
    for top in bands:
        opaque = alpha_of(top) > 0.5
        ink_sum += float(gray[top : top + len(opaque)][opaque].sum(dtype=np.float64))
        ink_count += int(opaque.sum())
    background = 1.0 if ink_sum / ink_count < 0.5 else 0.0
    for top in bands:
        alpha = alpha_of(top)
        rows = gray[top : top + len(alpha)]
        rows[:] = (rows * alpha + background * (1.0 - alpha)).astype(np.float32)
    return gray


def _u8_to_unit(a: np.ndarray) -> np.ndarray:
    return np.multiply(a, np.float32(1 / 255), dtype=np.float32)


def _luminance(rgb: np.ndarray) -> np.ndarray:
    # ITU-R 601 luma, as Pillow's convert("L"): blue ballpoint ink stays dark.
    return (rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)).astype(np.float32)


def _flatten_alpha(gray: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Composite over the background that contrasts with the most opaque pixels: strokes on a transparent canvas
    stay visible, a pencil's half-transparent ones too."""
    if alpha.min() > 0.99 or alpha.max() <= 0.0:
        return gray
    # the most opaque strokes count as opaque, however transparent the tool drew them
    alpha = alpha / alpha.max()
    opaque = alpha > 0.5
    ink_is_dark = float(gray[opaque].mean()) < 0.5
    background = 1.0 if ink_is_dark else 0.0
    return (gray * alpha + background * (1.0 - alpha)).astype(np.float32)


def _array_to_gray(array: np.ndarray) -> np.ndarray:
    """H x W or H x W x C (or 1/3 x H x W) arrays of any real dtype -> float32 gray in [0, 1]."""
    a = np.asarray(array)
    if a.dtype.kind not in "buif":
        raise ImageError(
            f"cannot read an image from an array of dtype {a.dtype}; use uint8, uint16 or float."
        )
    # Channels first, as a torch tensor would be; but three 28x28 images are three MNIST digits, not one in color.
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] > 4 and a.shape != (3, 28, 28):
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (2, 3, 4))):
        stack = (
            " (a stack of images? pass them as a list: list(images); one color image as H x W x 3)"
            if a.ndim == 3
            else ""
        )
        raise ImageError(f"an image array must be H x W or H x W x 1/2/3/4, got shape {a.shape}{stack}.")
    height, width = a.shape[:2]
    if height * width > MAX_PIXELS:
        raise ImageError(
            f"the image is too large ({width}x{height} pixels, over {MAX_PIXELS:,}); resize it first."
        )
    if min(height, width) < MIN_SIDE:
        raise ImageError(
            f"the image is {width}x{height} pixels, too small to hold a digit; use at least {MIN_SIDE}x{MIN_SIDE}."
        )
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise ImageError("the image contains NaN or infinite values; pass finite pixel values.")
    x = _to_unit_range(a)
    if x.ndim == 2:
        return x
    alpha = x[..., -1] if x.shape[-1] in (2, 4) else None
    color = x[..., :-1] if alpha is not None else x
    gray = _luminance(color) if color.shape[-1] == 3 else color[..., 0]
    return _flatten_alpha(gray, alpha) if alpha is not None else gray


def _to_unit_range(a: np.ndarray) -> np.ndarray:
    """bool and integer 0/1 masks as 0/1; uint8 / 255; floats in [0, 1] as they are, and clipped to it when
    they stray a little (to 1.5 or -0.5: an interpolation's overshoot); other integers (uint16 too) by the
    largest value of the fewest bits that hold them: up to 255 / 255 (an 8-bit image cast up), up to 4095 / 4095
    (a 12-bit sensor's), ..., up to 65535 / 65535; anything else stretched to [0, 1]."""
    if a.dtype == np.bool_:
        return a.astype(np.float32)
    if a.dtype.kind in "iu" and a.size and 0 <= a.min() and a.max() <= 1:
        return a.astype(np.float32)  # a 0/1 mask (as uint8 it would be black on black: nothing to see)
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    # Clipped in the array's own precision (exact, as clipping only picks values) and scaled in place below: a
    # 40-megapixel float TIFF, 160 MB, made two float64 copies of 320 MB each.
    if a.dtype.kind == "f" and float(a.min()) >= -0.5 and float(a.max()) <= 1.5:
        return np.clip(a, 0, 1).astype(np.float32, copy=False)
    # 8- and 16-bit integers are exact in float32, half float64's memory (a 9,400 x 9,400 16-bit PNG took 1.4 GB)
    x: np.ndarray[Any, np.dtype[np.floating[Any]]] = a.astype(
        np.float32 if a.dtype.kind in "iu" and a.dtype.itemsize <= 2 else np.float64
    )
    low, high = float(x.min()), float(x.max())
    if low >= 0 and high <= 65535:
        x /= float(2 ** max(8, math.ceil(math.log2(high + 1))) - 1)
    elif high - low <= 0 or not np.isfinite(high - low):
        return np.zeros(a.shape, dtype=np.float32)
    else:
        x -= low
        x /= high - low
    return x.astype(np.float32, copy=False)


def _resize_long_side(gray: np.ndarray, min_side: int, max_side: int) -> np.ndarray:
    height, width = gray.shape
    long_side = max(height, width)
    if min_side <= long_side <= max_side:
        return np.ascontiguousarray(gray, dtype=np.float32)
    size = _fitted((width, height), max_side if long_side > max_side else min_side)
    # BOX averages when shrinking (thin pen lines fade, not vanish); BILINEAR keeps small inputs smooth.
    method = Image.Resampling.BOX if long_side > max_side else Image.Resampling.BILINEAR
    # asarray, not astype: a float32 image is not copied again before fromarray copies it
    resized = Image.fromarray(np.asarray(gray, dtype=np.float32), "F").resize(size, method)
    return np.asarray(resized, dtype=np.float32)


def _fitted(size: tuple[int, int], long_side: int) -> tuple[int, int]:
    """(width, height) scaled so that the longer side is `long_side`, keeping the aspect ratio."""
    scale = long_side / max(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def _describe(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "the uploaded data"
    return "the image"


# ------------------------------------------------------------------------------------------- ink finding


def _shrink(gray: np.ndarray, side: int = BACKGROUND_SIDE) -> np.ndarray:
    """A copy with the shorter side at `side` px (area-averaged): paper and light live at this scale."""
    height, width = gray.shape
    factor = max(1.0, min(height, width) / side)
    size = (max(1, round(width / factor)), max(1, round(height / factor)))
    return np.asarray(Image.fromarray(gray, "F").resize(size, Image.Resampling.BOX), dtype=np.float32)


def uniform_paper(gray: np.ndarray) -> tuple[float, bool] | None:
    """(paper level, ink is dark) when the page is one flat tone all around the ink, else None.

    A drawing app's canvas, a scan or an MNIST-style image: the most common tone fills most of the image
    and the whole border, and the ink lies on one side of it only. Such a page has no shadow or gradient
    to remove, so it skips the lighting model (and its cost); a photo never passes (texture, noise, light).
    """
    count = gray.size
    levels = np.multiply(gray, 255, dtype=np.float32)
    levels += 0.5
    hist = cv2.calcHist([levels.astype(np.uint8)], [0], None, [256], [0, 256]).ravel().astype(np.int64)
    paper = int(hist.argmax())
    if hist[max(0, paper - PAPER_TOLERANCE) : paper + PAPER_TOLERANCE + 1].sum() < 0.5 * count:
        return None
    darker, lighter = hist[: max(0, paper - INK_TOLERANCE)].sum(), hist[paper + INK_TOLERANCE + 1 :].sum()
    if min(darker, lighter) > OTHER_SIDE_FRACTION * count:
        return None  # ink on both sides of the paper tone: noise, texture or a picture
    if np.abs(_frame_pixels(levels) - (paper + 0.5)).max() > PAPER_TOLERANCE + 1:
        return None  # the edge of the page is not plain paper: a shadow, a gradient, or ink reaching the edge
    return paper / 255.0, bool(darker >= lighter)


def ink_is_dark(gray: np.ndarray) -> bool:
    """Is the ink darker than the paper? Compare the tails of the image minus its local median.

    The local median is the paper whatever the polarity (ink is the minority), so subtracting it removes
    shadows and gradients that would fool a global histogram; the ink is the tail that sticks out farther.
    The global median answers first when one tail is three times the other and longer than POLARITY_FLOOR
    (three pictures in four); the others take the local median on a copy small enough for it to cost less than
    a millisecond. Where both of its tails are under POLARITY_FLOOR too, the ink covers under 2% of the picture
    and they hold the paper's noise: the residual's darkest and lightest spots decide.
    """
    small = _shrink(gray, POLARITY_SIDE)
    low, middle, high = np.percentile(small, [2, 50, 98])
    dark_tail, light_tail = middle - low, high - middle
    if max(dark_tail, light_tail) > max(3 * min(dark_tail, light_tail), POLARITY_FLOOR):
        return bool(dark_tail >= light_tail)
    residual = small - median_filter(small, POLARITY_WINDOW)
    low, high = np.percentile(residual, [2, 98])
    darkest, lightest = residual.min(), residual.max()
    tail = max(-low, high)
    if tail < POLARITY_FLOOR or max(-darkest, lightest) > POLARITY_SPOT * tail:
        # Ink on under 2% of the picture (small digits on a big page): both tails are the paper's noise, or the
        # kinks of a strong gradient clipped to white, and which was longer was chance (a clear "51" on a 4032 px
        # photo lost its ink; a 2 on a page lit from one side was read light on dark, as blank). The ink is the
        # extreme, which then stands far out of the tails.
        low, high = darkest, lightest
    return bool(-low >= high)


def median_filter(a: np.ndarray, size: int) -> np.ndarray:
    """scipy.ndimage.median_filter(a, size, mode="nearest"), exactly, 2-4x faster on the small images here:
    the middle of each size x size window by np.partition."""
    windows = np.lib.stride_tricks.sliding_window_view(np.pad(a, size // 2, mode="edge"), (size, size))
    middle = size * size // 2
    return np.partition(windows.reshape(*a.shape, size * size), middle, axis=-1)[..., middle]


MIN_SMOOTH_SIGMA = 0.7


def smooth_sigma(shape: tuple[int, ...]) -> float:
    """The blur _smooth() gives an image of `shape`: 0.7 px, more on big working images (1/200 of the shorter side)."""
    return max(MIN_SMOOTH_SIGMA, min(shape[:2]) / 200)


def _smooth(gray: np.ndarray, sigma: float | None = None) -> np.ndarray:
    # A light blur first: sensor noise and JPEG ringing must not reach the threshold as specks.
    # OpenCV's Gaussian: scipy.ndimage.gaussian_filter(sigma, mode="nearest", truncate=2.5) to 1e-7, 8x faster.
    sigma = smooth_sigma(gray.shape) if sigma is None else sigma
    side = 2 * int(2.5 * sigma + 0.5) + 1
    return cv2.GaussianBlur(gray, (side, side), sigma, borderType=cv2.BORDER_REPLICATE)


def flatten(gray: np.ndarray, dark_ink: bool = True, sigma: float | None = None) -> np.ndarray:
    """Gray -> ink strength in [0, 1] relative to the local light, the same under any lighting (flatten_parts)."""
    return flatten_parts(gray, dark_ink, sigma)[0]


def flatten_parts(
    gray: np.ndarray, dark_ink: bool = True, sigma: float | None = None
) -> tuple[np.ndarray, Parts | None]:
    """Gray -> (ink strength in [0, 1] relative to the local light, the same under any lighting; its ink_parts()
    where without_edge_sides() found them and cleared nothing, else None).

    On a small copy, a morphological closing (max then min filter) erases dark strokes and an opening
    erases light ones, leaving the paper with its gradients and shadows. Light falls on ink and paper
    alike (pixel = light x reflectance), so dividing |pixel - paper| by the local lighter level (the
    closing: paper under dark ink, chalk over a blackboard) makes a stroke in shadow as strong as one in
    the sun, while staying linear in the pixel so anti-aliased edges keep their shape.
    """
    height, width = gray.shape
    small = _shrink(gray)
    window = np.ones((BACKGROUND_WINDOW, BACKGROUND_WINDOW), dtype=np.uint8)  # OpenCV's structuring element
    lighter_small = cv2.morphologyEx(small, cv2.MORPH_CLOSE, window, borderType=cv2.BORDER_REPLICATE)
    paper_small = (
        lighter_small
        if dark_ink
        else cv2.morphologyEx(small, cv2.MORPH_OPEN, window, borderType=cv2.BORDER_REPLICATE)
    )

    # bilinear upsampling: Pillow's to 1e-7 (a test compares them), 10x faster
    def full(a: np.ndarray) -> np.ndarray:
        return cv2.resize(a, (width, height), interpolation=cv2.INTER_LINEAR)

    lighter = full(lighter_small)
    paper = lighter if dark_ink else full(paper_small)  # dark ink: the paper is the lighter level
    smooth = _smooth(gray, sigma)
    contrast = (paper - smooth) if dark_ink else (smooth - paper)
    ink = np.clip(contrast / np.maximum(lighter, 0.15), 0.0, 1.0).astype(np.float32)
    return without_edge_sides(
        ink, smooth, lighter, dark_ink, smooth_sigma(gray.shape) if sigma is None else sigma
    )


def without_edge_sides(
    ink: np.ndarray, smooth: np.ndarray, lighter: np.ndarray, dark_ink: bool, sigma: float
) -> tuple[np.ndarray, Parts | None]:
    """flatten()'s ink without the parts that are the dark side of an edge (a hard shadow's, a table's) or lie
    along the frame (light ink: the light side, mirrored).

    The closing fills a dark region narrower than its window, so the tip of a hard shadow's wedge at the frame,
    a strip of shadow or of table along one side, and (upsampled) a band along a shadow's edge come out as ink:
    a confident "1" on a blank page, a table's strip read with the digit on the page. A stroke has paper on
    both sides; a wedge's tip or a band has on one side the rest of the shadow, as dark as itself. So the ring
    just outside each part is compared with the darkest pixel near it (SIDE_*): where SIDE_SHARE of the ring
    is as dark as that, the part is cleared. A strip is all the dark there is, paper on its one side and the
    frame on the other: a part of FRAME_AREA of the picture or more with FRAME_ALONG of its outline on the frame
    is cleared too when it reaches no deeper into the picture than FRAME_DEEP times its own stroke width (a stroke
    the frame cuts touches it across its width, a small share of its outline; a digit with a stroke along the frame,
    or touching a strip, reaches deeper).
    Returns the ink, and its ink_parts() when nothing was cleared (else None)."""
    parts = ink_parts(ink)
    labels, areas, keep = parts
    if not keep.any():
        return ink, parts
    kept = kept_mask(labels, keep)
    # in pixels of the working image, for its light blur (`sigma`): a ring as far out on a blurred big photo
    near, far, reach = (max(1, round(d * max(1.0, sigma))) for d in (SIDE_NEAR, SIDE_FAR, SIDE_REACH))
    ring = _grown(kept, far) & ~_grown(labels > 0, near - 1)  # _grown(..., 0) is the mask itself
    window = np.ones((2 * reach + 1, 2 * reach + 1), np.uint8)
    # the darkest pixel near each ring pixel, and how much lighter the ring pixel is (light ink: mirrored)
    gap = smooth - cv2.erode(smooth, window) if dark_ink else cv2.dilate(smooth, window) - smooth
    alike = ring & (gap < SIDE_ALIKE * lighter)
    window = np.ones((2 * far + 1, 2 * far + 1), np.uint8)
    # each ring pixel's part: the largest label within `far` (as float32, exact for a working image's labels)
    owner = cv2.dilate(np.where(kept, labels, 0).astype(np.float32), window).astype(np.intp)
    counts = np.bincount(owner[ring], minlength=len(keep))
    sides = keep & (np.bincount(owner[alike], minlength=len(keep)) > SIDE_SHARE * counts)
    contact = np.bincount(_frame_pixels(labels), minlength=len(keep))
    for label in np.flatnonzero(keep & ~sides & (contact > 0) & (areas >= FRAME_AREA * ink.size)):
        part = labels == label
        width = stroke_width(part)
        if contact[label] >= FRAME_ALONG * 2 * areas[label] / width:  # stroke_width() is 2 x area / outline
            sides[label] = _depth_from_frame(part) <= FRAME_DEEP * width
    if not sides.any():
        return ink, parts
    return np.where(sides[labels], np.float32(0), ink), None


def _frame_pixels(a: np.ndarray) -> np.ndarray:
    """The pixels along the picture's frame, each once (the corners too)."""
    return np.concatenate([a[0], a[-1], a[1:-1, 0], a[1:-1, -1]])


def _depth_from_frame(part: np.ndarray) -> int:
    """How far into the picture a part touching its frame reaches: the most pixels any of its pixels lies from the
    nearest side of the frame that the part touches."""
    height, width = part.shape
    rows, cols = np.nonzero(part)
    away = [
        distance
        for touches, distance in (
            (rows.min() == 0, rows),
            (rows.max() == height - 1, height - 1 - rows),
            (cols.min() == 0, cols),
            (cols.max() == width - 1, width - 1 - cols),
        )
        if touches
    ]
    return int(np.min(away, axis=0).max()) + 1


def flatten_uniform(gray: np.ndarray, paper: float, dark_ink: bool, sigma: float | None = None) -> np.ndarray:
    """flatten() for a page of one flat tone: the paper is a constant, so no lighting model is needed."""
    smooth = _smooth(gray, sigma)
    if dark_ink:
        contrast, lighter = paper - smooth, paper
    else:  # the lighter level is the chalk's, as flatten()'s closing finds it next to the strokes
        contrast, lighter = smooth - paper, float(smooth.max())
    contrast *= np.float32(1 / max(lighter, 0.15))
    # Faint ink (a light gray pen on white) is still the only mark on a flat page: its strongest stroke becomes
    # full strength, where INK_CONTRAST would have called the page blank; a page with no mark past
    # INK_TOLERANCE stays blank, and ink as strong as FAINT_INK or stronger stays as it is.
    strongest = float(contrast.max())
    # INK_TOLERANCE is in gray levels of the image, the contrast a share of the lighter level: compare alike
    if INK_TOLERANCE / 255 < strongest * max(lighter, 0.15) and strongest < FAINT_INK:
        contrast *= np.float32(1 / strongest)
    return np.clip(contrast, 0.0, 1.0, out=contrast)


@functools.cache
def _histogram_bins(bins: int) -> tuple[np.ndarray, np.ndarray]:
    """(edges, centers) of `bins` equal bins over [0, 1]."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    return edges, (edges[:-1] + edges[1:]) / 2


def otsu_threshold(values: np.ndarray, bins: int = 64) -> float:
    """Otsu's threshold on values in [0, 1]: the cut that maximizes the between-class variance."""
    scaled = np.multiply(values, bins, dtype=np.float32)
    # Most values are paper (bin 0): count the others only, and bin 0 is the rest.
    index = scaled[scaled >= 1].astype(np.intp)
    hist = np.bincount(np.minimum(index, bins - 1, out=index), minlength=bins).astype(np.float64)
    hist[0] = values.size - len(index)
    edges, centers = _histogram_bins(bins)
    weight_low = np.cumsum(hist)
    weight_high = weight_low[-1] - weight_low
    mass_low = np.cumsum(hist * centers)
    mean_low = mass_low / np.maximum(weight_low, 1e-12)
    mean_high = (mass_low[-1] - mass_low) / np.maximum(weight_high, 1e-12)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def _u8(mask: np.ndarray) -> np.ndarray:
    """A boolean mask as the contiguous 0/1 uint8 image OpenCV takes, without a copy where it can."""
    return np.ascontiguousarray(mask, dtype=bool).view(np.uint8)


def label8(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected parts of a boolean mask (pixels touching by a corner belong to the same stroke): (labels, count).

    Labels run 1..count in raster order of each part's first pixel, 0 is the paper: exactly
    scipy.ndimage.label's with a 3x3 structure (OpenCV's SAUF algorithm numbers them the same way), 3-4x faster.
    """
    count, labels = cv2.connectedComponentsWithAlgorithm(_u8(mask), 8, cv2.CV_32S, cv2.CCL_SAUF)
    return labels, count - 1


def parts(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[tuple[slice, slice]]]:
    """label8()'s labels with each part's area (indexed by label, the paper's at 0) and box (row and column slices).

    The labels, areas and boxes of scipy.ndimage.label, np.bincount and find_objects, in one OpenCV pass; it costs
    more than label8(), so only segment.py, which needs the boxes, asks for them."""
    _, labels, stats, _ = cv2.connectedComponentsWithStatsWithAlgorithm(
        _u8(mask), 8, cv2.CV_32S, cv2.CCL_SAUF
    )
    boxes = [(slice(y, y + height), slice(x, x + width)) for x, y, width, height, _ in stats[1:].tolist()]
    return labels, stats[:, cv2.CC_STAT_AREA].astype(np.int64), boxes


def ink_parts(ink: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hysteresis threshold with specks dropped, as labelled parts: (labels, area per label, kept per label).

    Pixels above the strong cut, plus weaker pixels connected to them, make the ink; `keep[labels]` is
    the mask. One labelling serves the threshold, the speck filter and select_digit() alike.
    """
    strong_cut = max(otsu_threshold(ink), INK_CONTRAST)
    weak = ink > strong_cut * WEAK_FRACTION
    labels, count = label8(weak)
    areas = np.bincount(labels[weak], minlength=count + 1)  # the ink's labels only: the paper is most pixels
    areas[0] = weak.size - areas[1:].sum()
    keep = np.zeros(count + 1, dtype=bool)
    keep[labels[ink > strong_cut]] = True
    keep &= areas >= max(2, SPECK_FRACTION * ink.size)
    keep[0] = False
    return labels, areas, keep


def threshold(ink: np.ndarray) -> np.ndarray:
    """Hysteresis threshold: pixels above the strong cut, plus weaker pixels connected to them; specks dropped."""
    labels, _, keep = ink_parts(ink)
    return kept_mask(labels, keep)


def kept_mask(labels: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """keep[labels]: the mask of the kept parts, as one comparison per part when they are few (a digit's one
    to three parts), several times faster than indexing by every pixel's label."""
    kept = np.flatnonzero(keep)
    if len(kept) == 0 or len(kept) > 4:
        return keep[labels]
    mask = labels == kept[0]
    for label in kept[1:]:
        mask |= labels == label
    return mask


def speck_free_parts(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """label8()'s parts of a mask with their areas (the paper's at 0) and which of them are no specks."""
    labels, count = label8(mask)
    areas = np.bincount(labels.ravel(), minlength=count + 1)
    keep = areas >= max(2, SPECK_FRACTION * mask.size)
    keep[0] = False
    return labels, areas, keep


def ink_strength(gray: np.ndarray, steps: Steps | None = None, sigma: float | None = None) -> np.ndarray:
    """Gray image -> ink strength in [0, 1] (the page alone, polarity, flatten); a flat page takes the short way.
    `sigma`: the light blur's (default smooth_sigma, by the image's size)."""
    return ink_strength_parts(gray, steps, sigma)[0]


def ink_strength_parts(
    gray: np.ndarray, steps: Steps | None = None, sigma: float | None = None
) -> tuple[np.ndarray, Parts | None]:
    """ink_strength(), and the ink's ink_parts() where flatten_parts() has them (else None)."""
    gray = page_alone(gray)
    dark_ink, paper = _polarity(gray)
    if steps is not None:
        steps["polarity"] = gray if dark_ink else 1.0 - gray  # shown as dark ink on light paper
    ink, parts = (
        (flatten_uniform(gray, paper, dark_ink, sigma), None)
        if paper is not None
        else flatten_parts(gray, dark_ink, sigma)
    )
    if steps is not None:
        steps["flatten"] = 1.0 - ink
    return ink, parts


def page_alone(gray: np.ndarray) -> np.ndarray:
    """A photo of a page lying on a table, with the table replaced by the page's own paper; others as they are.

    A phone photo of a sheet on a desk shows the desk at the corners or all round the page: solid and dark, it was
    kept as ink beside the digit (and, larger, in its place), and where it filled most of the photo the page was
    the minority and read as light ink. On a small copy, Otsu's cut splits light from dark; the page is the
    largest light part with its holes (the ink) filled, when it
    - is PAGE_CONTRAST lighter than the rest and PAGE_SHARE of the picture;
    - has something written on it (PAGE_WRITTEN pixels PAGE_FAINT darker than its paper) but is mostly paper
      (PAGE_PAPER), and nothing light lies outside it (PAGE_BARE);
    - leaves outside it something along PAGE_CONTACT of the frame (not a digit run off the edge);
    - holds ink in strokes, not blobs (PAGE_INK: not the board inside a chalk glyph's loop);
    - leaves outside it something far bolder than its ink or along PAGE_ALONG of the frame (PAGE_SOLID: not a
      stroke run off the edge);
    - is nearly convex (PAGE_CONVEX of its hull) with straight edges (PAGE_STRAIGHT: a quadrilateral cut by the
      frame, as a sheet seen at a slant is);
    - ends in a sharp edge: no more than PAGE_RAMP pixels a boundary pixel between the two tones (a shadow's
      edge is a ramp, and the shadowed paper keeps its ink).
    Outside it, each pixel takes the value of the nearest pixel of the page a little inside its edge."""
    height, width = gray.shape
    factor = min(1.0, PAGE_SIDE / max(height, width))
    small = cv2.resize(
        gray, (max(1, round(width * factor)), max(1, round(height * factor))), interpolation=cv2.INTER_AREA
    )
    light = small > otsu_threshold(small)
    if light.all() or not light.any():
        return gray
    dark_level, light_level = float(np.median(small[~light])), float(np.median(small[light]))
    contrast = light_level - dark_level
    if contrast < PAGE_CONTRAST:
        return gray
    _, labels = cv2.connectedComponents(_u8(light), connectivity=4)  # some light: one part at least
    largest = 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
    from scipy import ndimage

    page = ndimage.binary_fill_holes(labels == largest)
    page8 = _u8(page)
    share = float(page.mean())
    within = cv2.erode(page8, np.ones((5, 5), np.uint8)).astype(bool)
    written = within & (small < light_level - PAGE_FAINT * contrast)
    if not PAGE_SHARE[0] <= share <= PAGE_SHARE[1] or written.sum() < PAGE_WRITTEN:
        return gray  # no table to speak of, or too much of it; or nothing written on the page
    if (light & ~page).sum() > PAGE_BARE * (~page).sum():
        return gray  # paper outside it too (a digit across the frame, chalk under a wall): no table
    if light[page].mean() < PAGE_PAPER:
        return gray  # a light loop filled in (chalk on a board: a 0), not a sheet mostly of paper
    along = float((~_frame_pixels(page)).mean())
    if along < PAGE_CONTACT:
        return gray  # what lies outside touches the frame only briefly: a digit run off the edge, not a table
    ink = stroke_width(page & ~light)
    if ink > PAGE_INK * math.sqrt(page.sum()):
        return gray  # its "ink" a blob, not strokes: the board inside a chalk glyph's loop, filled in
    if along < PAGE_ALONG and stroke_width(~page) < PAGE_SOLID * ink:
        return gray  # what lies outside is as thin as the writing, and short: a stroke run off the edge
    hull = cv2.convexHull(cv2.findNonZero(page8))
    if page.sum() < PAGE_CONVEX * cv2.contourArea(hull):
        return gray
    contours, _ = cv2.findContours(page8, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    outline = max(contours, key=cv2.contourArea)
    if len(cv2.approxPolyDP(outline, PAGE_STRAIGHT * math.hypot(*small.shape), True)) > 8:
        return gray  # curved: a filled glyph (a chalk 8), not a sheet's straight edges cut by the frame
    edge = page & ~cv2.erode(page8, np.ones((3, 3), np.uint8)).astype(bool)
    near_edge = cv2.dilate(_u8(edge), np.ones((5, 5), np.uint8)).astype(bool)
    between = (small > dark_level + 0.25 * contrast) & (small < light_level - 0.25 * contrast)
    if (near_edge & between).sum() > PAGE_RAMP * edge.sum():
        return gray  # a soft edge: a shadow across the page, not the page's own edge
    inside = cv2.resize(page8, (width, height), interpolation=cv2.INTER_NEAREST).astype(bool)
    margin = max(1, round(2 / factor))
    inside = cv2.erode(_u8(inside), np.ones((2 * margin + 1, 2 * margin + 1), np.uint8)).astype(bool)
    if not inside.any():
        return gray
    rows, cols = ndimage.distance_transform_edt(~inside, return_distances=False, return_indices=True)
    return gray[rows, cols]


def _polarity(gray: np.ndarray) -> tuple[bool, float | None]:
    """(Is the ink darker than the paper?, the paper's tone when the page is one flat tone, else None)."""
    uniform = uniform_paper(gray)
    return (uniform[1], uniform[0]) if uniform is not None else (ink_is_dark(gray), None)


def keep_digit_parts(labels: np.ndarray, areas: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Of the kept parts, those of one digit: none beside it at the picture's edge (drop_edge_parts), and at
    least KEEP_FRACTION of the largest (broken strokes stay)."""
    if keep.sum() <= 1:
        return keep
    keep = drop_edge_parts(labels, areas, keep)
    return keep & (areas >= KEEP_FRACTION * areas[keep].max())


def drop_edge_parts(labels: np.ndarray, areas: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Drop kept parts that touch the picture's edge, stand wholly left or right of the digit (the largest part
    inside the picture) and are smaller than it: the edge of a shadow, of the page or of a table that the threshold
    took for ink. A digit's own broken strokes share its columns (the bar of a 5, the flag of a 7, one of a 4's).
    Also drop parts at the edge that are far bolder than the digit or a straight bar far longer than it, wherever
    they lie clear of the digit: a finger or a pen in the photo (a digit's parts are written with one pen, and no
    longer than it; a stroke of the digit run off the edge lies close to the rest of it)."""
    height, width = labels.shape
    boxes = {}
    for label in np.flatnonzero(keep).tolist():
        rows, cols = np.nonzero(labels == label)
        boxes[label] = (int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1)
    edge = {
        label
        for label, (y0, y1, x0, x1) in boxes.items()
        if y0 == 0 or x0 == 0 or y1 == height or x1 == width
    }
    inside = [label for label in boxes if label not in edge]
    if not inside or not edge:
        return keep
    digit = max(inside, key=lambda label: areas[label])
    left, right = boxes[digit][2:]
    out = keep.copy()
    y0, y1 = boxes[digit][:2]
    size = max(y1 - y0, right - left)
    pen = 0.0  # the digit's stroke width, and the digit widened by OBJECT_CLEARANCE of its size: measured
    near: np.ndarray | None = None  # only if an edge part may be an object
    for label in edge:
        x0, x1 = boxes[label][2:]
        if (x1 <= left or x0 >= right) and areas[label] < areas[digit]:
            out[label] = False
        elif areas[digit] >= KEEP_FRACTION * areas[label]:
            part = labels == label
            if near is None:
                digit_ink = labels == digit
                pen, reach = stroke_width(digit_ink), max(1, round(OBJECT_CLEARANCE * size))
                near = _grown(digit_ink, reach)
            if (part & near).any():
                continue  # close to the digit: its own stroke run off the edge (a 4's stem), not an object
            if stroke_width(part) >= BOLDER_OBJECT * pen or _rod(part, size):
                out[label] = False  # a finger or a pen lying in the photo, not handwriting
    return out


def _grown(mask: np.ndarray, reach: int) -> np.ndarray:
    """The mask and every pixel within `reach` of it (a square neighbourhood)."""
    return cv2.dilate(_u8(mask), np.ones((2 * reach + 1, 2 * reach + 1), np.uint8)).astype(bool)


def _rod(part: np.ndarray, size: int) -> bool:
    """Is the part a straight bar (ROD_ASPECT times longer than wide, in any direction) LONGER_OBJECT times the
    digit's size? A pen or a ruler lying on the page; a digit's own stroke is no longer than the digit."""
    (_, _), sides, _ = cv2.minAreaRect(cv2.findNonZero(_u8(part)))
    return max(sides) >= LONGER_OBJECT * size and max(sides) >= ROD_ASPECT * max(1.0, min(sides))


FRAME_MIN_SIDE = 16  # a box drawn round a digit is at least this many working pixels on each side
FRAME_THIN = 0.1  # its line is thinner than this share of its shorter side (a boxy 0 written bold is not)
FRAME_COVER = 0.9  # and ink lies along this share of the four sides of the quadrilateral that outlines it


def _frame(part: np.ndarray, ink: np.ndarray) -> np.ndarray | None:
    """The pixels of `part` (one connected part, cut to its box) that are a box drawn round other ink: a printed
    form's field, a frame round a number, a row of boxes (comb) with one digit each; None when it is no frame.

    A frame is a convex quadrilateral outline (so a photo's tilt or perspective is fine) of a thin line that runs
    along all four sides and holds ink inside that does not touch it: a boxy 0 holds none (a slashed one only its
    own slash), a 7 or a 4 does not run along four sides. (A box whose every digit touches it stays.)
    What is erased: the outline, as thick as its line and a margin, and the comb's walls between the boxes.
    """
    contours, _ = cv2.findContours(_u8(part), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    outline = max(contours, key=cv2.contourArea)
    quad = cv2.approxPolyDP(outline, 0.03 * cv2.arcLength(outline, True), True)
    if len(quad) != 4 or not cv2.isContourConvex(quad):
        return None
    height, width = part.shape
    line = stroke_width(part)
    if line > FRAME_THIN * min(height, width):
        return None
    reach = int(np.ceil(line)) + 1
    near = _grown(part, reach)
    sides = np.zeros_like(part, dtype=np.uint8)
    cv2.polylines(sides, [quad], True, 1, 1)
    if near[sides.astype(bool)].mean() < FRAME_COVER:
        return None
    band = np.zeros_like(sides)
    cv2.polylines(band, [quad], True, 1, 2 * reach + 1)
    inside = np.zeros_like(sides)
    cv2.fillPoly(inside, [quad], 1)
    inside = inside.astype(bool) & ~band.astype(bool)
    if np.count_nonzero(ink & ~part & inside) < 4 * line * line:
        return None  # holds no ink apart from it: a boxy 0 (slashed or not), a rectangle
    frame = part & band.astype(bool)
    # a comb's walls: what is left of the part that stands the box's height and is a line's width
    rest, count = label8(part & ~frame)
    for label in range(1, count + 1):
        rows, cols = np.nonzero(rest == label)
        if np.ptp(rows) + 1 >= 0.8 * height and np.ptp(cols) + 1 <= 2 * reach + 2:
            frame |= rest == label
    return frame


def drop_frames(mask: np.ndarray) -> np.ndarray:
    """The ink mask without the boxes drawn round digits (_frame); the mask itself when there are none."""
    labels, areas, boxes = parts(mask)
    out = mask
    for label, box in enumerate(boxes, start=1):
        height, width = box[0].stop - box[0].start, box[1].stop - box[1].start
        if min(height, width) < FRAME_MIN_SIDE or areas[label] > 0.5 * height * width:
            continue  # too small, or too solid to be an outline
        frame = _frame(labels[box] == label, mask[box])
        if frame is not None:
            out = out.copy() if out is mask else out
            out[box] &= ~frame
    return out


def select_digit(mask: np.ndarray) -> np.ndarray:
    """Keep the parts of one digit: components of at least KEEP_FRACTION of the largest (broken strokes stay)."""
    labels, count = label8(mask)
    if count <= 1:
        return mask
    areas = np.bincount(labels.ravel())
    areas[0] = 0
    keep = areas >= KEEP_FRACTION * areas.max()
    return kept_mask(labels, keep)


# ------------------------------------------------------------------------------------------ MNIST shape


def stroke_width(mask: np.ndarray) -> float:
    """Mean stroke width in pixels: a stroke of length L and width w has area L*w and a perimeter of about 2L.

    The perimeter is counted as pixel transitions along rows and columns, which overcounts a Euclidean
    length by 4/pi on average; the factor puts it back.
    """
    area = float(mask.sum())
    if area == 0:
        return 0.0
    # ink at the array's edge counts as a transition to the paper beyond it
    edges = sum(np.count_nonzero(side) for side in (mask[0], mask[-1], mask[:, 0], mask[:, -1]))
    inside = np.count_nonzero(mask[1:] != mask[:-1]) + np.count_nonzero(mask[:, 1:] != mask[:, :-1])
    return float(2.0 * area / ((edges + inside) * np.pi / 4))


def reopened(piece: np.ndarray, ink: np.ndarray | None) -> np.ndarray:
    """A glyph whose loops blur or bold ink filled in, thresholded again inside itself; others as they are.

    The threshold takes a blurred or bold 8 as one blob, which reads as a confident 0 or 1; inside it the
    loops are still lighter than the strokes, so Otsu's cut over the glyph's own ink keeps the strokes and
    opens the loops again. A glyph counts as filled in when its mean stroke is SOLID_STROKE of its height.
    Opening loops keeps a glyph's height: a core shorter than REOPEN_HEIGHT of it has lost a lighter stroke
    instead (the tail of a bold 9, whose loop alone reads as a 0), and the glyph stays as it is. So does a core
    narrower than REOPEN_WIDTH of it, which has lost a lighter digit glued beside it (a faint 9 touching a bold 3
    was read as the 3 alone).
    `digitrec read` applies it to every piece it cuts from a line; preprocess() does not, as single photos
    measured the same with and without it.
    """
    height = ink_height(piece)
    if ink is None or height == 0 or stroke_width(piece) < SOLID_STROKE * height:
        return piece
    core = select_digit(piece & (ink > otsu_threshold(ink[piece])))
    kept = ink_height(core) >= REOPEN_HEIGHT * height and ink_width(core) >= REOPEN_WIDTH * ink_width(piece)
    return core if kept else piece


def ink_height(mask: np.ndarray) -> int:
    """Rows from a mask's top ink to its bottom ink (0 for no ink)."""
    rows = np.flatnonzero(mask.any(axis=1))
    return int(rows[-1] - rows[0] + 1) if len(rows) else 0


def ink_width(mask: np.ndarray) -> int:
    """Columns from a mask's leftmost ink to its rightmost (0 for no ink)."""
    return ink_height(mask.T)


def crop_to_ink(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def normalize_stroke(mask: np.ndarray) -> np.ndarray:
    """Dilate thin strokes / erode fat ones so that, once scaled to the 20 px box, they are MNIST-wide."""
    scale = BOX / max(mask.shape)
    width = stroke_width(mask)
    target = STROKE_WIDTH / scale  # MNIST's width expressed in this crop's pixels
    if width < 0.9 * target:
        radius = (target - width) / 2
        return crop_to_ink(disk_filter(np.pad(mask, int(radius) + 2), radius, grow=True))
    if width > 1.1 * target:
        radius = min((width - target) / 2, 0.35 * width)  # never erode a stroke away
        thinned = disk_filter(mask, radius, grow=False)
        return crop_to_ink(thinned) if thinned.any() else mask
    return mask


EDT_RADIUS = 16  # disk_filter's radius (pixels) past which it takes a distance transform


def disk_filter(mask: np.ndarray, radius: float, grow: bool) -> np.ndarray:
    """Grow (dilate) or thin (erode) a mask by a disk: pixels within `radius` of ink, or all of whose pixels
    within `radius` are ink (beyond the array counts as ink, so cropped strokes keep their ends).

    The same pixels as thresholding a distance transform, at a fraction of the cost: one OpenCV dilation or
    erosion by the disk (its border: paper when growing, ink when thinning). Its cost grows with the disk's
    area, though, and past EDT_RADIUS the distance transform is the cheaper (a solid 800 x 800 piece of
    cross-hatching thinned by a disk of radius 180: 0.7 s against 0.03 s).
    """
    if radius > EDT_RADIUS:
        from scipy import ndimage

        mask = np.asarray(mask, dtype=bool)  # as _u8 below takes it: any nonzero is ink
        measured = ~mask if grow else mask  # the distance from each pixel to the nearest 0 of this
        if measured.all():  # no 0 to measure to: nothing to grow, or nothing but ink to thin
            return ~measured if grow else measured.copy()
        distance = ndimage.distance_transform_edt(measured)
        return distance <= radius if grow else distance > radius
    source = _u8(mask)
    disk = _disk(radius).view(np.uint8)
    if grow:
        out = cv2.dilate(source, disk, borderType=cv2.BORDER_CONSTANT, borderValue=0)
    else:
        out = cv2.erode(source, disk, borderType=cv2.BORDER_CONSTANT, borderValue=1)
    return out.view(bool)


def _disk(radius: float) -> np.ndarray:
    """The pixels within `radius` of the center, as distance_transform_edt() measures distance."""
    squares = np.arange(-int(radius), int(radius) + 1, dtype=np.float64) ** 2
    return np.sqrt(squares[:, None] + squares[None, :]) <= radius


def scale_to_box(mask: np.ndarray) -> np.ndarray:
    """Longer side to 20 px keeping the aspect ratio; area averaging gives MNIST's gray anti-aliased edges."""
    height, width = mask.shape
    scale = BOX / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    method = Image.Resampling.BOX if scale < 1 else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(mask.astype(np.float32), "F").resize(size, method), dtype=np.float32)


def center_in_frame(glyph: np.ndarray) -> np.ndarray:
    """Paste into 28x28 so the center of mass is at the center (as MNIST did), never cutting the glyph."""
    frame = np.zeros((FRAME, FRAME), dtype=np.float32)
    height, width = glyph.shape
    total = float(glyph.sum())
    if total <= 0:
        return frame
    # Weighted by row and column sums in float64: the centre of every pixel weighted by its row and column, cheaper.
    center_y = float(glyph.sum(axis=1, dtype=np.float64) @ np.arange(height)) / total
    center_x = float(glyph.sum(axis=0, dtype=np.float64) @ np.arange(width)) / total
    top = min(max(round(FRAME / 2 - 0.5 - center_y), 0), FRAME - height)
    left = min(max(round(FRAME / 2 - 0.5 - center_x), 0), FRAME - width)
    frame[top : top + height, left : left + width] = glyph
    return frame


def to_mnist(mask: np.ndarray, steps: Steps | None = None) -> np.ndarray:
    """A boolean mask holding one digit -> float32 (28, 28) in [0, 1], white on black, like MNIST."""
    if not mask.any():
        return np.zeros((FRAME, FRAME), dtype=np.float32)
    crop = crop_to_ink(mask)
    stroked = normalize_stroke(crop)
    glyph = scale_to_box(stroked)
    frame = center_in_frame(glyph)
    peak = float(frame.max())
    out = np.clip(frame / peak, 0.0, 1.0) if peak > 0 else frame  # brightest stroke = 1.0, like MNIST
    if steps is not None:
        steps["crop"] = ~crop
        steps["stroke"] = ~stroked
        steps["scale20"] = 1.0 - glyph
        steps["center28"] = frame
        steps["mnist"] = out
    return out.astype(np.float32)


# -------------------------------------------------------------------------------------------- the one


@overload
def preprocess(image: Any, *, return_steps: Literal[False] = False) -> np.ndarray: ...
@overload
def preprocess(image: Any, *, return_steps: Literal[True]) -> tuple[np.ndarray, Steps]: ...
@overload
def preprocess(image: Any, *, return_steps: bool) -> np.ndarray | tuple[np.ndarray, Steps]: ...
def preprocess(image: Any, *, return_steps: bool = False) -> np.ndarray | tuple[np.ndarray, Steps]:
    """Any image of one digit -> float32 (28, 28) in [0, 1], white ink on black, like an MNIST digit.

    `image` is a path, bytes, file object, PIL image or NumPy array (H x W or H x W x C; uint8, uint16,
    bool or float). Raises ImageError (one sentence) for anything unusable; a blank page gives all zeros.
    With return_steps=True also returns {stage name: 2-D float image} for `--show-steps`.
    """
    steps: Steps | None = {} if return_steps else None
    gray, size = load_gray_sized(image)
    mask = digit_mask(gray, steps)
    if not mask.any() and max(size) >= THIN_FROM * max(gray.shape) and rewind(image):
        # a blank working image of a big photo: thin strokes may have faded away in the shrinking
        mask = digit_mask(thin_kept(image, gray.shape), steps)
    closer = _closer_look(image, gray, mask, size)
    if closer is not None:  # a small digit in a big photo: read again from a window around it, at more pixels
        mask = digit_mask(closer, steps)
    out = to_mnist(mask, steps)
    return (out, steps) if steps is not None else out


def digit_mask(gray: np.ndarray, steps: Steps | None = None) -> np.ndarray:
    """The working image -> the mask of its one digit (polarity, lighting, threshold, the digit's parts)."""
    if steps is not None:
        steps["gray"] = gray
    strength, parts = ink_strength_parts(gray, steps)
    labels, areas, keep = parts if parts is not None else ink_parts(strength)
    if steps is not None:
        steps["threshold"] = ~keep[labels]
    ink = kept_mask(labels, keep)
    unframed = drop_frames(ink)
    if unframed is not ink:  # a box round the digit: its parts again, without it
        labels, areas, keep = speck_free_parts(unframed)
    mask = kept_mask(labels, keep_digit_parts(labels, areas, keep))
    if steps is not None:
        steps["select"] = ~mask
    return mask


def thin_kept(image: Any, shape: tuple[int, ...]) -> np.ndarray:
    """The working image (of `shape`) of a big photo, shrunk so that thin strokes keep their darkness: a fine
    pen's 3-8 px stroke on a 2,000-4,000 px photo is a tenth of a pixel at WORK_SIDE, too faint for the threshold.
    The photo is loaded at up to THIN_LOAD times the working size, the ink widened there by a minimum (dark ink)
    or maximum (light ink) filter, and the result area-averaged down: a stroke comes out about as wide as the
    working image's noise blur (smooth_sigma), which would otherwise wash it out."""
    big, _ = load_gray_sized(image, max_side=THIN_LOAD * max(shape), min_side=MIN_WORK_SIDE)
    width = max(1, round(max(big.shape) / max(shape) * max(1.0, smooth_sigma(shape))))
    kernel = np.ones((width, width), np.uint8)
    widened = cv2.erode(big, kernel) if _polarity(big)[0] else cv2.dilate(big, kernel)
    return cv2.resize(widened, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)


def _closer_look(image: Any, gray: np.ndarray, mask: np.ndarray, size: tuple[int, int]) -> np.ndarray | None:
    """A digit written small on a big photo is a few pixels high once the photo is shrunk to WORK_SIDE. When the
    photo was shrunk and its digit spans under ZOOM_BELOW of the working image, this is the window around the
    digit, ZOOM_WINDOW times its size, cut from the photo loaded large enough for the digit to span ZOOM_TO of
    WORK_SIDE, as a working image. None when the digit is big enough or the photo small. (A digit so small that
    the working image keeps no part of it larger than dust is not found here: crop such photos.)"""
    if not mask.any() or max(size) < 1.5 * max(gray.shape):
        return None
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    digit = max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1)
    side = min(max(size), round(max(gray.shape) * ZOOM_TO * WORK_SIDE / digit))
    if digit >= ZOOM_BELOW * max(gray.shape) or side < 1.5 * max(gray.shape):
        return None
    half = ZOOM_WINDOW * digit / 2
    center_y, center_x = (rows[0] + rows[-1] + 1) / 2, (cols[0] + cols[-1] + 1) / 2
    cut = window_of(
        image, gray.shape, side, (center_y - half, center_y + half), (center_x - half, center_x + half)
    )
    return None if cut is None else _resize_long_side(cut[0], MIN_WORK_SIDE, WORK_SIDE)


def window_of(
    image: Any, work_shape: tuple[int, ...], side: int, rows: tuple[float, float], cols: tuple[float, float]
) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]] | None:
    """The part of a working image of `work_shape` between `rows` and `cols` (its pixels), cut instead from the
    photo `image` loaded with its longer side at `side`: (the window, its top-left corner in the large image,
    the large image's shape). None when the photo cannot be read again (a stream that cannot seek)."""
    if not rewind(image):
        return None
    large = load_gray(image, max_side=side)
    scale = max(large.shape) / max(work_shape)
    y0, x0 = max(0, round(rows[0] * scale)), max(0, round(cols[0] * scale))
    window = large[y0 : round(rows[1] * scale), x0 : round(cols[1] * scale)]
    return window, (y0, x0), large.shape


def rewind(image: Any) -> bool:
    """Can `image` be loaded again? A file object is rewound; a stream that cannot seek cannot."""
    if not hasattr(image, "read"):
        return True
    if not (hasattr(image, "seekable") and image.seekable()):
        return False
    image.seek(0)
    return True


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def is_unreadable_photo(path: Path) -> bool:
    return path.suffix.lower() in UNREADABLE_PHOTO_SUFFIXES


@functools.lru_cache(maxsize=1)
def _refused_suffixes() -> frozenset[str]:
    """File name suffixes of the image formats Pillow knows and digitrec does not read (TGA, ICO, EPS, ...)."""
    from PIL import Image

    return frozenset(Image.registered_extensions()) - set(IMAGE_SUFFIXES)


def is_refused_image(path: Path) -> bool:
    return path.suffix.lower() in _refused_suffixes()


def expand_paths(
    paths: list[str | Path],
    unreadable: list[Path] | None = None,
    refused: list[Path] | None = None,
    subfolders: list[Path] | None = None,
    unlisted: list[tuple[Path, str]] | None = None,
    names: list[str] | None = None,
) -> list[Path]:
    """Folders expand to the image files inside them (sorted, not recursive); files stay as given, in order.
    `names`, if given, receives each returned path as the user spelled it ("./x.png", a folder's "photos/a.png"),
    where a Path would have tidied it to "x.png", to name it in the output.

    A folder's image files are known by their suffix, and a file without one (a photo saved by an app that names
    files "IMG_0001") by its first bytes, as a file named directly is read: such a photo is read, or reported in
    `unreadable` or `refused` as a suffixed one would be, never skipped unseen.

    A folder's photos in formats Pillow does not read (UNREADABLE_PHOTO_SUFFIXES) go into `unreadable`, its
    images in the formats Pillow knows and digitrec refuses (TGA, ICO, ...) into `refused`, and its own folders
    that hold images (which are not read) into `subfolders`, if given. An entry named like an image that is not
    a readable file (a dangling link, a pipe) is kept, so that reading it says what is wrong with it. A folder
    that cannot be listed goes into `unlisted` with the reason, if given (else its error is raised), so that the
    other paths are still read.
    """
    expanded: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if _is_dir(path):
            try:
                entries = sorted(path.iterdir())
            except OSError as exc:
                if unlisted is None:
                    raise
                unlisted.append((path, exc.strerror or str(exc)))
                continue
            is_folder = [_is_dir(p) for p in entries]  # one stat() each, as is_file() was: not one per list
            folders = [p for p, folder in zip(entries, is_folder, strict=True) if folder]
            files = [p for p, folder in zip(entries, is_folder, strict=True) if not folder]
            # a file without a suffix, by its first bytes: "image", "unreadable", "refused" or None (no image)
            sniffed = {p: _sniffed(p) for p in files if not p.suffix}
            images = [p for p in files if is_image_file(p) or sniffed.get(p) == "image"]
            expanded.extend(images)
            if names is not None:
                names.extend(os.path.join(raw, p.name) for p in images)
            if unreadable is not None:
                unreadable.extend(
                    p for p in files if is_unreadable_photo(p) or sniffed.get(p) == "unreadable"
                )
            if refused is not None:
                refused.extend(p for p in files if is_refused_image(p) or sniffed.get(p) == "refused")
            if subfolders is not None:
                subfolders.extend(p for p in folders if _holds_images(p))
        else:
            expanded.append(path)
            if names is not None:
                names.append(str(raw))
    return expanded


def _sniffed(path: Path) -> str | None:
    """What a file without a suffix holds, by its first bytes: "image" (a format digitrec reads), "unreadable" (a
    photo Pillow cannot read: HEIC, ...), "refused" (a format Pillow knows and digitrec does not read: ICO, ...),
    or None (no image, or not a plain file: a pipe is never opened, it would wait for a writer). Pillow reads
    the header, never the pixels."""
    try:
        if not path.is_file():
            return None
        with quiet_pillow(), Image.open(path, formats=IMAGE_FORMATS):
            return "image"
    except Image.DecompressionBombError:  # an image: reading it says it is too large
        return "image"
    except Exception:  # noqa: BLE001 - not one digitrec reads: another format, or no image
        pass
    if _photo_format(path) is not None:
        return "unreadable"
    try:
        with path.open("rb") as fp:
            return "refused" if _other_format(fp) is not None else None
    except OSError:
        return None


def _is_dir(path: Path) -> bool:
    """Path.is_dir(), False where the path cannot be looked at (a folder above it is not searchable)."""
    try:
        return path.is_dir()
    except OSError:
        return False


def _holds_images(folder: Path) -> bool:
    """Does a folder (not a hidden one, as .git) hold image files of its own?"""
    if folder.name.startswith("."):
        return False
    try:
        return any(
            (is_image_file(p) or (not p.suffix and _sniffed(p) == "image")) and not _is_dir(p)
            for p in folder.iterdir()
        )
    except OSError:
        return False
