"""Confidence calibration: temperature scaling on validation logits, expected calibration error, reject threshold.

A softmax trained with label smoothing and augmentation is rarely calibrated: its 0.9 does not mean "right
9 times in 10". Dividing the logits by one temperature T fitted on the validation split fixes most of that
without changing any prediction. The split is held out only where the recipe held it out (val_size > 0): a
model trained on all 60,000 images (val_size 0: fast, best, fine-tunes, the bundled model) has seen those 5,000
images, so its confidences there read a little sharper than on new ones. The reject threshold is then chosen on
data: the highest confidence cut that still accepts all but `max_digit_rejection` of the digits of *each*
calibration set (MNIST validation images and generated photos of MNIST, pen and font digits, seeded apart from
eval-real), so that no kind of real digit pays for the others, and non-digits (which the robust recipe taught to
look uncertain) fall below it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .backends import softmax

CALIBRATION_SEED = 1  # the generated calibration sets; eval-real uses seed 0, so they never overlap
# The target is under 1% of real digits rejected; a quarter of that is left as margin for digits unlike these sets.
MAX_DIGIT_REJECTION = 0.0075
# Photos per calibration set. The 0.75% quantile of 600 rested on a set's four or five least sure photos (the
# bundled model's threshold was 0.24-0.62 for seeds 1-7 of 600, 0.38-0.60 of 1,000); 1,000 was chosen over 600,
# 2,000 and pooled sets on development seeds (docs/realworld.md, "A steadier reject threshold").
CALIBRATION_COUNT = 1000


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T > 0 minimizing the negative log-likelihood of softmax(logits / T).

    The NLL is convex in 1/T, so a coarse grid over log T followed by two finer grids around the best
    point finds the minimum to 0.1% without an optimizer's knobs.
    """
    z = logits.double().numpy()
    y = labels.long().numpy()
    picked = z[np.arange(len(y)), y]

    def nll(t: float) -> float:
        s = z / t
        top = s.max(axis=1)
        return float(np.mean(top + np.log(np.exp(s - top[:, None]).sum(axis=1)) - picked / t))

    center, width = 0.0, 3.0
    for _ in range(3):
        grid = np.linspace(center - width, center + width, 41)
        center = float(grid[int(np.argmin([nll(float(np.exp(g))) for g in grid]))])
        width /= 10
    return float(np.exp(center))


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE: the gap between confidence and accuracy, averaged over equal-width confidence bins by their share."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def choose_threshold(
    digit_confidence: np.ndarray | list[np.ndarray], max_digit_rejection: float = MAX_DIGIT_REJECTION
) -> float:
    """The confidence cut that rejects about `max_digit_rejection` of real digits in the set that needs the lowest:
    the smallest of the sets' interpolated quantiles, rounded to 4 decimals (so a set may lose one digit more)."""
    sets = digit_confidence if isinstance(digit_confidence, list) else [digit_confidence]
    cut = min(float(np.quantile(s, max_digit_rejection)) for s in sets)
    return round(max(0.0, min(cut, 0.99)), 4)


def calibrate(
    model_path: str | Path,
    count: int = CALIBRATION_COUNT,
    log: Callable[[str], None] = print,
    out_path: str | Path | None = None,
    half: bool = False,
    data_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Fit T on the MNIST validation split (held out only where the recipe's val_size is not 0), choose the
    reject threshold on generated calibration photos, and write both into the checkpoint's metadata (in place, or
    to `out_path`). In place, or over another checkpoint at `out_path`, the ONNX exports beside the checkpoint
    written that were made from what it held before are removed (`remove_stale_exports`), with one line said.

    `half` stores the weights as float16 (loading converts them back): how the bundled model stays
    under 2 MB with no measurable change in its predictions. `data_dir` is where MNIST is looked for first
    (`load_mnist`'s), for the validation split and the digits of the generated photos.
    """
    from .checkpoint import model_file
    from .folderlock import locked_run_folder

    # A run training into the folder written meanwhile would write over the calibration, or the calibration over
    # the run's finished model with the epoch it read: each refuses while the other holds the folder. Reading a
    # model takes no lock (two calibrations of one model into two folders went on side by side).
    if out_path is not None:
        refuse_out_in_another_run(model_file(out_path), model_file(model_path))
    folder = model_file(out_path or model_path).parent
    with locked_run_folder(folder) if folder.is_dir() else contextlib.nullcontext():
        return _calibrate(model_path, count, log, out_path, half, data_dir)


# what only a training run writes into its folder (a report, a model card and exports are also written by
# `evaluate --report` and `export` beside a model an earlier --out wrote)
TRAINING_OUTPUTS = ("last.safetensors", "history.json", "metrics.json")


def _training_run_folder(folder: Path) -> bool:
    """Does `folder` hold a training run (runfolder.holds_a_run) with the files its training wrote? A folder an
    earlier --out wrote holds a model with its recipe too, but none of them; in one that holds no run, a
    metrics.json is the user's."""
    from .runfolder import holds_a_run

    return holds_a_run(folder) and any((folder / name).exists() for name in TRAINING_OUTPUTS)


def refuse_out_in_another_run(out: Path, model: Path) -> None:
    """Refuse an `out` that is the model.safetensors of another run's folder: it replaced that run's model and
    left its metrics, history, last.safetensors and report describing the one that run trained. The model's own
    folder is fine (calibrated in place, or beside itself), and so is a folder an earlier --out wrote."""
    from .errors import DigitrecError

    folder = out.parent
    if out.name != "model.safetensors" or not folder.is_dir():
        return
    if model.parent.is_dir() and os.path.samefile(folder, model.parent):
        return
    if _training_run_folder(folder):
        raise DigitrecError(
            f"--out {out} is in the run folder {folder}, whose metrics, history and report describe its own run; "
            "name a new folder or .safetensors file for the calibrated model."
        )


def _calibrate(
    model_path: str | Path,
    count: int,
    log: Callable[[str], None],
    out_path: str | Path | None,
    half: bool,
    data_dir: str | Path | None,
) -> dict[str, Any]:
    from .checkpoint import load_model, model_file, save_tensors
    from .config import TrainConfig
    from .data import load_mnist, split_validation
    from .evaluate import predict_logits
    from .predict import Predictor, TorchBackend, holds_no_ink
    from .preprocess import preprocess
    from .realworld import generate

    model, meta = load_model(model_path)
    if meta.get("partial") is True:  # resuming the run writes a new model.safetensors: this calibration goes
        log(
            f"note: {model_path} is the best checkpoint so far of a run that had not finished; a model the run "
            "writes when it goes on is not calibrated: calibrate that one too."
        )
    config = TrainConfig.from_checkpoint(meta, model_path)
    data = load_mnist(data_dir, log=log)
    # A model trained on every image (val_size 0) gets the usual split (TrainConfig's default), or a sixth of a
    # smaller data set: images it trained on, not held out, and the line below says so.
    seen = not config.val_size
    val_size = config.val_size or min(TrainConfig().val_size, len(data.train_images) // 6)
    _, _, val_images, val_labels = split_validation(data.train_images, data.train_labels, val_size, seed=0)
    # The digits of the generated mnist-photo set, of which the reject threshold may be chosen: the validation
    # split's, never the test set's (those also make eval-real's mnist-photo set, which then overlapped it).
    mnist = (val_images.numpy(), val_labels.numpy())
    val_logits = predict_logits(model, val_images, tta_views=config.tta_views)  # as the Predictor will score
    temperature = fit_temperature(val_logits, val_labels)
    val_probs_raw = softmax(val_logits.numpy())
    val_probs = softmax(val_logits.numpy(), temperature)
    labels = val_labels.numpy()
    test_probs = softmax(
        predict_logits(model, data.test_images, tta_views=config.tta_views).numpy(), temperature
    )
    ece_before = expected_calibration_error(val_probs_raw, labels)
    ece_after = expected_calibration_error(val_probs, labels)
    ece_test = expected_calibration_error(test_probs, data.test_labels.numpy())
    log(
        f"temperature {temperature:.3f}: validation{' (seen in training)' if seen else ''} ECE {ece_before:.4f} -> "
        f"{ece_after:.4f}, test ECE {ece_test:.4f} (in float32, as predict runs the model)"
    )

    # scored by the Predictor itself (the recipe's views, the new temperature), on torch's threads as they are
    # (the threshold the model records is not read: it is what this replaces, and a damaged one was refused here)
    recorded = {key: value for key, value in meta.items() if key != "reject_below"}
    scorer = Predictor(
        TorchBackend(model, threads=0), recorded | {"temperature": temperature}, name=str(model_path)
    )

    def confidences(name: str) -> np.ndarray:
        samples = generate(name, count, CALIBRATION_SEED, mnist=mnist)
        batch = np.stack([preprocess(s.data) for s in samples])[:, None]
        probs = scorer.probabilities(batch).max(axis=1)
        probs[holds_no_ink(batch)] = 0.0  # blank pages: the predictor rejects them outright
        return probs

    digit_sets = [confidences(name) for name in ("mnist-photo", "pen-photo", "font-photo")]
    digit_sets.append(val_probs.max(axis=1))
    digits = np.concatenate(digit_sets)
    negatives = confidences("negatives")
    reject_below = choose_threshold(digit_sets)
    stopped = float((negatives < reject_below).mean())
    log(
        f"reject below {reject_below:.4f}: rejects {(digits < reject_below).mean():.2%} of calibration digits "
        f"and {stopped:.2%} of calibration non-digits"
    )
    calibration = {
        "temperature": temperature,
        "reject_below": reject_below,
        "calibration": {
            "val_ece_before": ece_before,
            "val_ece": ece_after,
            "test_ece": ece_test,
            "digits_rejected": float((digits < reject_below).mean()),
            "negatives_rejected": stopped,
            "count": count,
            "seed": CALIBRATION_SEED,
        },
    }
    tensors = {k: v.half() if half and v.is_floating_point() else v for k, v in model.state_dict().items()}
    written = model_file(out_path or model_path)
    # in place, or over another checkpoint (--out): the exports made from what it held go with it
    write_over(written, lambda: save_tensors(written, tensors, {**meta, **calibration}), log)
    return calibration


def write_over(
    checkpoint: Path,
    write: Callable[[], None],
    log: Callable[[str], None] = print,
    by: str = "this calibration",
) -> bool:
    """`write()` the checkpoint at `checkpoint`; where that replaced one with other contents, remove the exports
    made from the one replaced (`remove_stale_exports`, which says so `by` what) and return True."""
    before = hashlib.sha256(checkpoint.read_bytes()).hexdigest() if checkpoint.is_file() else None
    write()
    if before is None or hashlib.sha256(checkpoint.read_bytes()).hexdigest() == before:
        return False
    remove_stale_exports(checkpoint, before, log, by)
    return True


def remove_stale_exports(
    checkpoint: Path, digest: str, log: Callable[[str], None] = print, by: str = "this calibration"
) -> list[Path]:
    """Remove the ONNX exports `digitrec export` writes beside `checkpoint` by default (model.onnx and
    model.int8.onnx) when they were made from the checkpoint whose SHA-256 was `digest`, before it was rewritten
    (`by` a calibration, or an ensemble saved over it): they would go on answering with the old model, temperature
    and reject threshold. Says so in one line; returns what it removed. An export under another name is the user's
    to keep (loading it beside the new checkpoint is refused: backends.refuse_stale_export)."""
    from .backends import export_source_sha256

    removed = []
    for path in (checkpoint.with_suffix(".onnx"), checkpoint.with_suffix(".int8.onnx")):
        if path.is_file() and export_source_sha256(path) == digest:
            path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        names = " and ".join(path.name for path in removed)
        log(
            f"removed {names} from {checkpoint.parent}: exported from {checkpoint.name} before {by}, "
            f"{'they' if len(removed) > 1 else 'it'} would answer as the model it replaced; "
            f"`digitrec export {checkpoint}` (with --int8 for the int8 one) writes them again."
        )
    return removed
