"""Predictor: load a model once, preprocess images, run them in batches, calibrate, top-k, reject, read numbers.

The model sits behind a backend (a callable from float32 (N, 1, 28, 28) to logits (N, 10)), so an ONNX or
int8 runtime, or NumPy, can replace PyTorch without touching anything else here. torch is imported only by
the torch backend: `digitrec predict` with the bundled model runs on NumPy and starts in a fraction of the time.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import tta
from .backends import is_onnx, softmax
from .checkpoint import finite_number, recorded_temperature
from .errors import CheckpointError, DigitrecError, ImageError, need_extra

if TYPE_CHECKING:
    import torch

PRETRAINED_NAME = "robust"
DEFAULT_REJECT_BELOW = 0.5  # used only when a checkpoint was never calibrated
# a pair reading (segment.Piece.reading) under this confidence counts as doubtful when `read` decides whether a
# line holds digits at all: right pairs on development seeds 4 and 5 stood above it, and noise read as pairs,
# at 0.08-0.2, mostly under it (docs/realworld.md, "Lines of noise")
PAIR_DOUBT = 0.2
MIN_INK = 1.0  # total brightness of a 28x28 input below which there is nothing to read (a blank page)

Backend = Callable[[np.ndarray], np.ndarray]


@dataclass
class Prediction:
    """One image's answer. `digit` is None when rejected; `confidence` is the top probability, at the model's
    calibrated temperature where `digitrec calibrate` fitted one (else the raw softmax, which runs high). A blank
    page (`blank`) is rejected whatever the model says, so its `confidence` and `top` are the model's guess."""

    digit: int | None
    confidence: float
    probabilities: list[float]
    top: list[tuple[int, float]]
    rejected: bool
    # rejected because the input holds no ink at all (a blank page), whatever the confidence
    blank: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The JSON `predict --json` prints per image (without its path): digit, confidence, top, and why a digit
        is null: `rejected` (not sure enough), `blank` (no ink at all), as /api/predict says them."""
        return {
            "digit": self.digit,
            "confidence": self.confidence,
            "top": [list(t) for t in self.top],
            "rejected": self.rejected,
            "blank": self.blank,
        }


@dataclass
class DigitBox:
    """One digit of a number: its value, confidence (calibrated as Prediction's) and box (x, y, w, h) in the
    input's pixels.

    `doubtful`: the confidence is below the model's reject threshold, so `predict` would have rejected this image
    (a letter or a scribble among the digits, or a bad cut); `read` still gives its most likely digit."""

    digit: int
    confidence: float
    box: tuple[int, int, int, int]
    doubtful: bool = False
    line: int = 0  # the line of writing it stands in, 0 for the top one

    def to_dict(self) -> dict[str, Any]:
        """As JSON (`read --json` and `/api/read`): digit, confidence, box [x, y, w, h], doubtful and line, as
        plain Python numbers whatever NumPy types the segmenter left in them."""
        return {
            "digit": int(self.digit),
            "confidence": float(self.confidence),
            "box": [int(v) for v in self.box],
            "doubtful": bool(self.doubtful),
            "line": int(self.line),
        }


@dataclass
class ReadResult:
    """A number as `Predictor.read` reads it: the number as a string ("" when no digit was found; one line per
    line of writing, joined by newlines) and each digit, line by line and left to right, with its confidence
    and box."""

    number: str
    digits: list[DigitBox] = field(default_factory=list)
    # lines of marks left out because most of their digits were doubtful: noise, letters, a drawing
    rejected_lines: int = 0

    @property
    def lines(self) -> list[str]:
        """The number of each line of writing, top to bottom (one for a photo of one number)."""
        return self.number.split("\n") if self.number else []

    def to_dict(self) -> dict[str, Any]:
        """The JSON `read --json` prints per image (without its path): number, lines, digits, rejected_lines."""
        return {
            "number": self.number,
            "lines": self.lines,
            "digits": [d.to_dict() for d in self.digits],
            "rejected_lines": self.rejected_lines,
        }


class TorchBackend:
    """Runs a digitrec PyTorch model on CPU in inference mode.

    One thread by default: for the small batches a user sends, thread start-up and spinning cost more
    than they save, and on a busy machine several threads are 10-40x slower (measured on 2 shared cores).
    """

    def __init__(self, model: torch.nn.Module, threads: int = 1):
        self.model = model.eval()
        self.threads = threads

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        import torch

        previous = torch.get_num_threads()
        if self.threads and self.threads != previous:
            torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                return (
                    self.model(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)))
                    .float()
                    .numpy()
                )
        finally:
            if self.threads and self.threads != previous:
                torch.set_num_threads(previous)


def uncalibrated_note(predictor: Predictor, model: str | Path | None) -> str | None:
    """What to tell a user whose model was never calibrated (as train and finetune leave one), else None; a
    threshold written into the metadata otherwise is one too."""
    if "calibration" in predictor.meta or "reject_below" in predictor.meta:
        return None
    fix = (  # calibrate takes checkpoints, not exports
        "calibrate the checkpoint it was exported from (`digitrec calibrate MODEL`) and export it again"
        if is_onnx(model)
        else "`digitrec calibrate MODEL` fixes that"
    )
    config = predictor.meta.get("config")
    smoothed = isinstance(config, dict) and bool(config.get("label_smoothing"))
    # label smoothing keeps a clear digit's confidence near 0.9: low, not high
    run = "run low (it trained with label smoothing)" if smoothed else "run high"
    return (
        f"{model or predictor.name} was never calibrated, so its confidences {run} and it rejects only below the "
        f"default {predictor.reject_below:g}, a threshold chosen on no data; {fix}"
    )


def pretrained_path(name: str = PRETRAINED_NAME) -> Path:
    """A checkpoint bundled with the package: the digit model by default, `pairs` for the pair classifier."""
    return Path(str(resources.files("digitrec") / "pretrained" / f"{name}.safetensors"))


def holds_no_ink(inputs: np.ndarray) -> np.ndarray:
    """For each 28x28 model input in `inputs`, whether it is blank: its total brightness is below MIN_INK."""
    return np.asarray(inputs).reshape(-1, 28 * 28).sum(axis=1) < MIN_INK


BACKENDS = ("auto", "numpy", "onnx", "torch")


def check_backend(model: str | Path | None, backend: str | None, cli: bool = True) -> None:
    """One sentence when a backend other than ONNX Runtime ("onnx"; "auto" and None choose it) is asked to run an
    .onnx file, whose remedy names the command line's --backend (`cli`) or Predictor.load's `backend`."""
    if is_onnx(model) and backend not in (None, "auto", "onnx"):
        remedy = (
            f"drop --backend {backend} or use --backend onnx"
            if cli
            else f"pass backend='onnx' or 'auto', not {backend!r}"
        )
        raise DigitrecError(f"{model} is an ONNX file, which runs on ONNX Runtime only; {remedy}.")


class Predictor:
    """Load once, then `predict()` images, `predict_tensor()` preprocessed batches or `read()` whole numbers."""

    def __init__(
        self,
        backend: Backend,
        meta: dict[str, Any],
        model: torch.nn.Module | None = None,
        name: str = "model",
    ):
        self.backend = backend
        self.model = model
        self.meta = meta
        self.name = name
        versions = meta.get("versions")
        self.version = str(
            meta.get("version")
            or meta.get("digitrec_version")
            or (versions.get("digitrec", "") if isinstance(versions, dict) else "")
        )
        self.temperature, self.reject_below = recorded_calibration(meta, name)
        self.tta_views = tta.views_in(meta, name)  # the recipe's test-time augmentation
        # `read` also asks a pair classifier (pairs.py) about digits that overlap too deeply to cut: the bundled
        # one, or the file at `pairs_path` (`digitrec train-pairs` writes one; see use_pairs)
        self.read_pairs = True
        self.pairs_path: Path | None = None
        # which model this is, whatever runs it: "sha256:" and 12 hex digits of the file load() read
        self.model_id = ""
        self.path: Path | None = None  # the file load() read

    @classmethod
    def load(
        cls, path: str | Path, reject_below: float | None = None, backend: str | None = None
    ) -> Predictor:
        """A digitrec checkpoint (a .safetensors file or a run folder holding model.safetensors), or an `.onnx`
        file from `digitrec export`. backend="onnx" runs a checkpoint on ONNX Runtime (exported once, cached);
        "numpy" runs a checkpoint of an architecture in backends.NUMPY_ARCHS (the bundled model's among them)
        without torch, with the same probabilities to ~1e-5; "auto" is "numpy" where it can and "torch"
        elsewhere; None (the default) is "onnx" for an `.onnx` file and "torch" for a checkpoint. A checkpoint
        also sets `model`, its PyTorch module; an `.onnx` file does not."""
        if backend is not None and backend not in BACKENDS:
            raise DigitrecError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}.")
        from .checkpoint import model_file

        if not isinstance(path, (str, os.PathLike)):  # None (an unset os.environ.get), bytes: a TypeError
            raise DigitrecError(
                f"the model must be a path (a run folder, a .safetensors or an .onnx file), got {path!r}."
            )
        if not str(path):  # Path("") is "." already: a str "" (an unset variable) read the current folder
            raise DigitrecError(
                "the model's path is empty; name a run folder, a .safetensors or an .onnx file."
            )
        if "\0" in str(path):  # the OS refuses it (ValueError: embedded null byte)
            raise DigitrecError(
                f"the model's path {str(path)!r} holds a NUL character, which no file name can."
            )
        path = model_file(path)
        threshold = _checked_reject_below(reject_below)
        predictor = cls._load(path, backend)
        predictor.model_id = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        predictor.path = path
        if threshold is not None:
            predictor.reject_below = threshold
        return predictor

    @classmethod
    def _load(cls, path: Path, backend: str | None) -> Predictor:
        from .checkpoint import load_model

        if is_onnx(path):
            check_backend(path, backend, cli=False)
            from .backends import OnnxBackend

            onnx = OnnxBackend(path)
            return cls(onnx, onnx.meta, None, name=onnx.meta.get("recipe") or path.stem)
        if backend in ("numpy", "auto"):
            from .backends import NUMPY_ARCHS, NumpyBackend

            loaded = NumpyBackend.load(path)
            if loaded is not None:
                numpy_backend, meta = loaded
                return cls(numpy_backend, meta, None, name=meta.get("recipe") or path.stem)
            if backend == "numpy":
                raise DigitrecError(
                    f"the numpy backend runs {', '.join(NUMPY_ARCHS)} checkpoints with float weights, "
                    f'and {path} is not one; use --backend torch (backend="torch").'
                )
        backend = backend or "torch"
        model, meta = load_model(path)
        runner: Backend = TorchBackend(model)
        if backend == "onnx":
            need_extra("export", "the onnx backend")
            from .backends import OnnxBackend
            from .export import cached_onnx

            runner = OnnxBackend(cached_onnx(path))
        return cls(runner, meta, model, name=meta.get("recipe") or path.stem)

    @classmethod
    def pretrained(cls, reject_below: float | None = None, backend: str = "torch") -> Predictor:
        """The model bundled with the package (the `robust` recipe and one more epoch, calibrated: `make pretrained`;
        its file is `pretrained_path()`). `reject_below` and `backend` are `load`'s."""
        path = pretrained_path()
        if not path.exists():
            raise CheckpointError(f"the bundled model {path} is missing; reinstall digitrec or pass --model.")
        return cls.load(path, reject_below, backend)

    def portable(self) -> Predictor | None:
        """This predictor as another process loads it without torch (the server's reading workers): the same ONNX
        Runtime backend (which pickles as its model's bytes) or NumPy one, or for a PyTorch model the same weights
        on NumPy; with the same calibration, threshold and reading settings. None when neither can run it."""
        from .backends import NumpyBackend, NumpyEnsemble, OnnxBackend

        if isinstance(self.backend, (OnnxBackend, NumpyBackend, NumpyEnsemble)):
            backend: Backend = self.backend
        elif self.path is None or is_onnx(self.path):
            return None
        else:
            loaded = NumpyBackend.load(self.path)
            if loaded is None:
                return None
            backend = loaded[0]
        twin = Predictor(backend, self.meta, None, self.name)
        twin.reject_below, twin.read_pairs, twin.pairs_path = (
            self.reject_below,
            self.read_pairs,
            self.pairs_path,
        )
        twin.model_id, twin.path = self.model_id, self.path
        return twin

    # ------------------------------------------------------------------ single digits

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """Calibrated class probabilities (N, 10) for preprocessed float32 input (N, 1, 28, 28)."""
        if self.tta_views == 1:
            return softmax(self.backend(batch), self.temperature)
        logits = self.backend(tta.shifted_views(np.asarray(batch, dtype=np.float32), self.tta_views))
        return softmax(tta.mean_log_probabilities(logits, self.tta_views), self.temperature)

    def predict_tensor(self, batch: torch.Tensor | np.ndarray, top_k: int = 3) -> list[Prediction]:
        """Predictions for an already preprocessed batch (N, 1, 28, 28) in [0, 1], white on black ((N, 28, 28) and
        one (28, 28) image are taken too)."""
        _check_top_k(top_k)
        loaded_torch = sys.modules.get("torch")  # a tensor can only come from a process that imported torch
        if loaded_torch is not None and isinstance(batch, loaded_torch.Tensor):
            x = batch.detach().cpu().float().numpy()
        else:
            x = np.asarray(batch)
        # (N, 1, 28, 28), or without the channel or batch axis: any other shape of 784 pixels a multiple
        # ((2, 3, 28, 28) color, a 56x56 image) was cut into 28x28 pieces, each answered, some confidently
        shaped = x.shape[-2:] == (28, 28) and (x.ndim in (2, 3) or (x.ndim == 4 and x.shape[1] == 1))
        if x.dtype.kind not in "buif" or not shaped:
            raise DigitrecError(
                f"predict_tensor takes preprocessed images, (N, 1, 28, 28) floats in [0, 1], got {x.dtype} of "
                f"shape {x.shape}; use predict() for images as they come."
            )
        x = x.astype(np.float32, copy=False).reshape(-1, 1, 28, 28)
        if len(x) == 0:
            return []
        if not (np.isfinite(x).all() and x.min() >= 0 and x.max() <= 1):
            raise DigitrecError(
                f"predict_tensor takes pixel values in [0, 1], got {x.min():g} to {x.max():g}; divide 0-255 "
                "images by 255, or use predict() for images as they come."
            )
        probs = self.probabilities(x)
        blank = holds_no_ink(x)
        out = []
        for p, is_blank in zip(probs, blank):
            order = np.argsort(-p)[:top_k]
            confidence = float(p[order[0]])
            rejected = bool(is_blank or confidence < self.reject_below)
            out.append(
                Prediction(
                    digit=None if rejected else int(order[0]),
                    confidence=confidence,
                    probabilities=[float(v) for v in p],
                    top=[(int(d), float(p[d])) for d in order],
                    rejected=rejected,
                    blank=bool(is_blank),
                )
            )
        return out

    def predict(self, images: Any | Sequence[Any], top_k: int = 3) -> list[Prediction]:
        """Preprocess one image or a list (paths, bytes, PIL images, arrays, tensors) and predict them in one batch;
        each Prediction's `top` holds its `top_k` likeliest digits (1 to 10). For images that are already 28x28
        model inputs (MNIST's own, say), `predict_tensor` skips the preprocessing, which is made for photos.

        Raises `digitrec.errors.ImageError` for the first unusable image; `digitrec.predict.predict_files(predictor,
        paths)` keeps going past bad files, one result or error per file, as `digitrec predict` does.
        """
        from .preprocess import preprocess

        _check_top_k(top_k)
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        if not items:
            return []
        batch = np.stack([preprocess(item) for item in items])[:, None]
        return self.predict_tensor(batch, top_k)

    # ------------------------------------------------------------------ numbers

    def use_pairs(self, path: str | Path) -> None:
        """Read overlapping digits with the pair classifier at `path` (`digitrec train-pairs` writes one) instead of
        the bundled one; a file that is missing or is no pair classifier is refused now, not at the first read."""
        from .pairs import load_pair_scorer

        load_pair_scorer(Path(path))
        self.read_pairs, self.pairs_path = True, Path(path)

    def read(self, image: Any) -> ReadResult:
        """A photo of a number (or of several, one under another) -> the number and each digit's box and
        confidence; several lines of writing read as one number per line, joined by newlines.

        Every segment gets its most likely digit; one whose confidence is below `reject_below` is marked
        `doubtful`. A line of writing in which fewer than half the readings are sure is taken for no digits at all
        (noise, a letter, a drawing: read, such marks gave strings of doubtful 4s) and left out, counted in
        `rejected_lines`. A reading is a digit, sure unless doubtful, or a pair (two digits read as one piece by
        the pair classifier, whose confidences run lower), sure from PAIR_DOUBT (or `reject_below` if lower). A
        page with no ink reads as "".
        """
        from .pairs import load_pair_scorer
        from .segment import segment

        # Each glyph's probabilities, by its pixels: choosing its cuts, segment() has read most digits it returns.
        known: dict[bytes, np.ndarray] = {}

        def score(glyphs: np.ndarray) -> np.ndarray:
            probs = self.probabilities(glyphs[:, None])
            known.update(zip((glyph.tobytes() for glyph in glyphs), probs))
            return probs.max(axis=1)

        pieces = segment(
            image, score=score, pairs=load_pair_scorer(self.pairs_path) if self.read_pairs else None
        )
        if not pieces:
            return ReadResult("")
        # the digits of pair readings need none; a digit too narrow to cut was not read yet
        unread = [p.image for p in pieces if p.reading is None and p.image.tobytes() not in known]
        if unread:
            score(np.stack(unread))
        readings = [
            piece.reading if piece.reading is not None else _top(known[piece.image.tobytes()])
            for piece in pieces
        ]
        lines: dict[int, list[DigitBox]] = {}
        sure: dict[int, list[bool]] = {}  # per line, whether each reading (a digit, or a pair) is sure
        second_half = False  # a pair reading comes as its two halves, one after the other: counted once
        # a pair is never held to more than a digit is: --reject-below 0 keeps every line
        pair_doubt = min(PAIR_DOUBT, self.reject_below)
        for (digit, confidence), piece in zip(readings, pieces):
            doubtful = confidence < self.reject_below
            lines.setdefault(piece.line, []).append(
                DigitBox(digit, confidence, piece.box, doubtful, piece.line)
            )
            if piece.reading is None:
                sure.setdefault(piece.line, []).append(not doubtful)
            elif not second_half:
                sure.setdefault(piece.line, []).append(confidence >= pair_doubt)
            second_half = piece.reading is not None and not second_half
        kept = [line for line in sorted(lines) if 2 * sum(sure[line]) >= len(sure[line])]
        digits = []
        for number, line in enumerate(kept):  # the lines left, numbered again from 0
            for d in lines[line]:
                d.line = number
                digits.append(d)
        text = "\n".join("".join(str(d.digit) for d in lines[line]) for line in kept)
        return ReadResult(text, digits, rejected_lines=len(lines) - len(kept))


def _top(probabilities: np.ndarray) -> tuple[int, float]:
    """The most likely digit and its probability."""
    return int(probabilities.argmax()), float(probabilities.max())


@dataclass
class FileResult:
    """What `digitrec predict` prints for one input: a prediction or the sentence saying why there is none."""

    path: str
    prediction: Prediction | None = None
    error: str | None = None
    steps: str | None = None  # the picture of its preprocessing steps, where --show-steps saved one

    def to_dict(self) -> dict[str, Any]:
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        assert self.prediction is not None
        return {"path": self.path, **self.prediction.to_dict()}


PARALLEL_FROM = 64  # files; below this, starting worker processes costs more than they save


def recorded_calibration(
    meta: dict[str, Any], name: str, fix: str = "`digitrec calibrate`, or export it again from its checkpoint"
) -> tuple[float, float]:
    """The temperature and reject threshold a model's metadata records, checked: metadata is JSON anyone can
    edit (an ONNX export's carries no checksum), and a temperature of 0 answered "digit 0, confidence nan%".
    `fix`: how the sentence that refuses a damaged threshold says to write it again."""
    temperature = recorded_temperature(meta, name)
    reject_below = meta.get("reject_below", DEFAULT_REJECT_BELOW)
    if finite_number(reject_below) and 0 <= reject_below <= 1:
        return temperature, float(reject_below)
    problem = f"a reject threshold of {reject_below!r}, not a probability from 0 to 1"
    raise CheckpointError(
        f"the model {name} records {problem} (its metadata was changed by hand or damaged); write it again with "
        f"{fix}."
    )


def _checked_reject_below(reject_below: Any) -> float | None:
    """reject_below as a float, or one sentence when it is no probability. NaN too: it compares false with every
    confidence, so it turned rejection off without a word."""
    if reject_below is None:
        return None
    if not finite_number(reject_below) or not 0 <= reject_below <= 1:
        raise DigitrecError(f"reject_below must be a probability from 0 to 1, got {reject_below!r}.")
    return float(reject_below)


def _check_top_k(top_k: Any) -> None:
    """One sentence for a top_k that is not 1 to 10 (it was clamped into that range without a word)."""
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 1 <= top_k <= 10:
        raise DigitrecError(f"top_k must be a whole number from 1 to 10, got {top_k!r}.")


def _preprocess_or_error(path: str | Path) -> np.ndarray | str:
    """preprocess() in a worker process: the array, or the sentence of the ImageError."""
    from .preprocess import preprocess

    try:
        return preprocess(path)
    except ImageError as exc:
        return str(exc)


def _preprocessed(
    paths: Sequence[str | Path],
    steps_dir: str | Path | None,
    workers: int,
    log: Callable[[str], None],
    saved: dict[int, Path],
) -> Iterator[np.ndarray | str]:
    """Each file preprocessed (or its error sentence), in order; with workers > 1, a large folder is spread over
    that many processes. With `steps_dir`, the picture of each file's steps saved there goes into `saved` by the
    file's index (one that cannot be saved is said through `log`)."""
    from .preprocess import preprocess

    if steps_dir is None and len(paths) >= PARALLEL_FROM and workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn, as the server does: a fork would copy a parent whose BLAS threads may be mid-call
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            yield from pool.map(_preprocess_or_error, paths, chunksize=16)
        return
    taken: set[str] = set()
    for i, path in enumerate(paths):
        if steps_dir is None:
            yield _preprocess_or_error(path)
            continue
        try:
            x, steps = preprocess(path, return_steps=True)
        except ImageError as exc:
            yield str(exc)
            continue
        target = Path(steps_dir) / _steps_name(Path(path).stem, taken)
        try:
            save_steps(steps, target)
            saved[i] = target
        except OSError as exc:  # the picture of the steps is lost, not the digit: it is still read
            log(
                f"digitrec: cannot save the steps of {path} to {target} ({exc.strerror or exc}); its digit is read all the same."
            )
        yield x


STEPS_STEM_BYTES = 200  # a file's name may be 255 bytes: room for "-NNN.steps.png" after a long image name


def _steps_name(stem: str, taken: set[str]) -> str:
    """`<stem>.steps.png`, or `<stem>-2.steps.png`, -3, ... when an earlier image of the call had that stem
    (x.png and x.jpg, or 1.png in two folders); a stem too long for a file name with that suffix is cut."""
    if len(stem.encode("utf-8", "surrogateescape")) > STEPS_STEM_BYTES:  # cut between characters, not in one
        kept, size = [], 0
        for character in stem:
            size += len(character.encode("utf-8", "surrogateescape"))
            if size > STEPS_STEM_BYTES:
                break
            kept.append(character)
        stem = "".join(kept)
    name, n = f"{stem}.steps.png", 1
    while name in taken:
        n += 1
        name = f"{stem}-{n}.steps.png"
    taken.add(name)
    return name


def predict_files(
    predictor: Predictor,
    paths: Sequence[str | Path],
    top_k: int = 3,
    batch_size: int = 256,
    steps_dir: str | Path | None = None,
    workers: int = 1,
    log: Callable[[str], None] | None = None,
    names: Sequence[str] | None = None,
) -> list[FileResult]:
    """Predict every file; a bad file gets its error sentence and the others still go through, in batches.
    Each result's `path` is its entry in `names` where given (the path as the user spelled it), else the path.

    `workers` > 1 preprocesses a folder of PARALLEL_FROM files or more in that many worker processes. They are
    spawned, so a script that calls this with workers > 1 needs the `if __name__ == "__main__":` guard that
    multiprocessing asks for; the CLI has it. `log` (default: standard error) says which pictures of the
    preprocessing steps (`steps_dir`) could not be saved; their files are read all the same.
    """
    if log is None:
        log = _to_stderr
    results = [FileResult(str(p)) for p in (paths if names is None else names)]
    ready: list[tuple[int, np.ndarray]] = []

    def flush() -> None:
        if ready:
            predictions = predictor.predict_tensor(np.stack([x for _, x in ready])[:, None], top_k)
            for (i, _), prediction in zip(ready, predictions):
                results[i].prediction = prediction
            ready.clear()

    saved: dict[int, Path] = {}  # the pictures of the steps written, by the index of their image
    for i, x in enumerate(_preprocessed(paths, steps_dir, workers, log, saved)):
        if isinstance(x, str):
            results[i].error = x
            continue
        ready.append((i, x))
        if len(ready) >= batch_size:
            flush()
    flush()
    for i, target in saved.items():
        results[i].steps = str(target)
    return results


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def save_steps(steps: dict[str, np.ndarray], path: Path) -> None:
    """Every preprocessing stage side by side, each scaled to the same height, named underneath."""
    from PIL import Image, ImageDraw

    height, label = 140, 16
    tiles = []
    for name, image in steps.items():
        a = np.clip(np.asarray(image, dtype=np.float32), 0, 1)
        tile = Image.fromarray((a * 255).astype(np.uint8))
        width = max(28, round(tile.width * height / max(1, tile.height)))
        resample = Image.Resampling.NEAREST if max(a.shape) <= 64 else Image.Resampling.BILINEAR
        tiles.append((name, tile.resize((min(width, 3 * height), height), resample)))
    sheet = Image.new("L", (sum(t.width for _, t in tiles) + 6 * len(tiles), height + label), 128)
    draw = ImageDraw.Draw(sheet)
    x = 0
    for name, tile in tiles:
        sheet.paste(tile, (x, 0))
        draw.text((x + 2, height + 2), name, fill=255)
        x += tile.width + 6
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
