"""What `digitrec read` costs on ink that holds no digits: scribbles, cross-hatching, a digit on a ruled line.

    OMP_NUM_THREADS=1 python benchmarks/read_worst.py              # each input once, in a fresh process each
    OMP_NUM_THREADS=1 python benchmarks/read_worst.py --only page  # the inputs whose name holds "page"

A scribble's pieces all read badly, so `read`'s search for the best cuts had no reading to stop at: a 1,000 x 130
zigzag took 13.5 s and 480 MB, a page of five 77 s (docs/realworld.md, "Scribbles and cross-hatching"). Each
input is drawn here (seeded, with PIL), saved as PNG and read by `digitrec read --json` in its own process
(--backend numpy, as `read` picks for one image), which the table times from start to exit, with the process's
peak memory (its ru_maxrss, Linux's kilobytes), and what it read. One line of written digits is read alongside
for comparison.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageDraw

PAPER, INK = 235, 20


def zigzag(width: int, height: int, step: int, pen: int) -> Image.Image:
    """A pen scribbling up and down along a line: strokes `step` px apart, from margin to margin."""
    image = Image.new("L", (width, height), PAPER)
    points = [(8 + step * k, 10 if k % 2 == 0 else height - 10) for k in range((width - 16) // step + 1)]
    ImageDraw.Draw(image).line(points, fill=INK, width=pen)
    return image


def page_of_zigzags(width: int, lines: int, scale: int) -> Image.Image:
    """`lines` scribbled-out lines one under another (the page 1,000 px wide at scale 1)."""
    image = Image.new("L", (width * scale, (160 * lines) * scale), PAPER)
    draw = ImageDraw.Draw(image)
    for k in range(lines):
        top = (20 + 155 * k) * scale
        points = [((20 + 5 * i) * scale, top + (0 if i % 2 else 110 * scale)) for i in range(192)]
        draw.line(points, fill=INK, width=2 * scale)
    return image


def cross_hatch(side: int, spacing: int) -> Image.Image:
    """Two sets of diagonal lines `spacing` px apart filling the middle of a square photo."""
    image = Image.new("L", (side, side), PAPER)
    draw = ImageDraw.Draw(image)
    margin = side // 10
    for k in range(-side, 2 * side, spacing):
        draw.line([(k, margin), (k + side - 2 * margin, side - margin)], fill=INK, width=4)
        draw.line([(k, side - margin), (k + side - 2 * margin, margin)], fill=INK, width=4)
    framed = Image.new("L", image.size, PAPER)
    framed.paste(image.crop((margin, margin, side - margin, side - margin)), (margin, margin))
    return framed


def one_on_a_ruled_line() -> Image.Image:
    image = Image.new("L", (700, 200), 255)
    draw = ImageDraw.Draw(image)
    draw.rectangle((50, 97, 649, 102), fill=0)
    draw.rectangle((330, 60, 337, 139), fill=0)
    return image


def written_digits() -> Image.Image:
    from digitrec.realworld import generate

    return Image.open(io.BytesIO(next(generate("numbers", 1, seed=0)).data))


INPUTS: dict[str, Callable[[], Image.Image]] = {
    "zigzag 480x70": lambda: zigzag(480, 70, 3, 2),
    "zigzag 1000x130": lambda: zigzag(1000, 130, 5, 3),
    "page of 5 zigzags 1000x800": lambda: page_of_zigzags(1000, 5, 1),
    "page of 5 zigzags 3000x2400": lambda: page_of_zigzags(1000, 5, 3),
    "cross-hatch 2000x2000": lambda: cross_hatch(2000, 18),
    "a 1 on a ruled line": one_on_a_ruled_line,
    "written digits (numbers, seed 0)": written_digits,
}


# the child reports its own peak memory as it exits (RUSAGE_CHILDREN gives the largest of all children so far)
CHILD = (
    "import atexit, resource, runpy, sys\n"
    "atexit.register(lambda: print('peak-kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr))\n"
    "sys.argv = ['digitrec', 'read', sys.argv[1], '--json', '--backend', 'numpy']\n"
    "runpy.run_module('digitrec', run_name='__main__')\n"
)


def read_once(path: Path) -> tuple[float, float, str]:
    """Seconds from start to exit, peak MB and the number read, by `digitrec read` in a process of its own."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, check=True
    )
    seconds = time.perf_counter() - start
    peak_kb = next(int(line.split()[1]) for line in done.stderr.splitlines() if line.startswith("peak-kb"))
    return seconds, peak_kb / 1024, json.loads(done.stdout)[0].get("number", "?")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="only the inputs whose name holds this text")
    args = parser.parse_args()
    chosen = {name: make for name, make in INPUTS.items() if args.only in name}
    if not chosen:
        parser.error(f"no input's name holds {args.only!r}; the inputs: {', '.join(INPUTS)}")
    print(f"{'input':36} {'seconds':>8} {'peak MB':>8}  read")
    with tempfile.TemporaryDirectory() as folder:
        for name, make in chosen.items():
            path = Path(folder) / f"{name.replace(' ', '_')}.png"
            make().save(path)
            seconds, peak, number = read_once(path)
            print(f"{name:36} {seconds:8.2f} {peak:8.0f}  {number.replace(chr(10), ' / ')!r}", flush=True)


if __name__ == "__main__":
    main()
