"""What one photo costs in `digitrec predict` at the sizes people send: generated, page-sized and phone-sized.

    OMP_NUM_THREADS=1 python benchmarks/phone_photo.py            # NumPy backend, as `digitrec predict` uses
    OMP_NUM_THREADS=1 python benchmarks/phone_photo.py --calls 10 --backend onnx

One pen digit is photographed by `realworld.photo` at a phone camera's 4,032 px (about 20 s to generate), saved
as JPEG at quality 85 and 92 and as PNG, and shrunk to 1,600 px as the web page does before uploading. Each file
is timed from path to answer (`predict_files`), through `preprocess()` alone and through decoding alone
(`preprocess._open`), median of --calls calls after one warm-up; `eval-real --speed`'s repeated photo runs
alongside for comparison.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from digitrec.predict import Predictor, predict_files
from digitrec.preprocess import WORK_SIDE, _open, preprocess
from digitrec.realworld import draw_digit, photo, write_set

PHONE_SIDE = 4032  # the long side of a 12-megapixel phone camera's photo
PAGE_SIDE = 1600  # what the web page shrinks a photo to before uploading it (UPLOAD_MAX_SIDE in app.js)


def median_ms(call: Callable[[Path], object], path: Path, calls: int) -> float:
    call(path)  # warm-up: lazy imports, allocation
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call(path)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def write_files(folder: Path) -> list[Path]:
    """The repeated photo of `eval-real --speed`, then the phone photo at page size and full size."""
    rng = np.random.default_rng([99, 0])
    data, _ = photo(draw_digit(4, rng, 96), rng, long_side=PHONE_SIDE)
    picture = Image.open(io.BytesIO(data)).convert("RGB")
    paths = [write_set("pen-photo", 1, folder, 0)[0]]
    page = picture.resize(
        (PAGE_SIDE, round(PAGE_SIDE * picture.height / picture.width)), Image.Resampling.BILINEAR
    )
    for image, name, options in [
        (page, "page-1600-q92.jpg", {"quality": 92}),
        (picture, "phone-q85.jpg", {"quality": 85}),
        (picture, "phone-q92.jpg", {"quality": 92}),
        (picture, "phone.png", {}),
    ]:
        image.save(folder / name, **options)
        paths.append(folder / name)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=30, help="timed calls per file and stage (default 30)")
    parser.add_argument("--backend", default="numpy", choices=["numpy", "torch", "onnx"])
    args = parser.parse_args()
    predictor = Predictor.pretrained(backend=args.backend)
    with tempfile.TemporaryDirectory() as folder:
        paths = write_files(Path(folder))
        print(
            f"{'file':<22} {'pixels':>10} {'MB':>6} {'predict ms':>11} {'preprocess ms':>14} {'decode ms':>10}"
        )
        for path in paths:
            width, height = Image.open(path).size
            predict = median_ms(lambda p: predict_files(predictor, [p]), path, args.calls)
            prepare = median_ms(preprocess, path, args.calls)
            decode = median_ms(lambda p: _open(p, WORK_SIDE, gray=True), path, args.calls)
            size = path.stat().st_size / 1e6
            print(
                f"{path.name:<22} {width}x{height:<5} {size:6.2f} {predict:11.1f} {prepare:14.1f} {decode:10.1f}"
            )


if __name__ == "__main__":
    main()
