"""MODEL_CARD.md for a model: size, recipe, data and checksum, metrics, calibration, robustness, latency, use and limits.

The card is built once as a list of sections and rendered twice, as Markdown (MODEL_CARD.md beside the
checkpoint) and as HTML (a section of report.html), so the two can never disagree.
"""

from __future__ import annotations

import contextlib
import html
import json
import platform
import re
import shlex
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import atomic_write_text
from .config import DRY_RUN_BATCHES, TrainConfig
from .data import MNIST
from .feedback import FEEDBACK_SUFFIX, finetune_base, is_finetune
from .models import count_parameters
from .robustness import COVERAGES, coverage_at, summary

Row = list[str]


@dataclass
class Section:
    """A heading, then paragraphs, then an optional table, then an optional bullet list."""

    title: str
    paragraphs: list[str] = field(default_factory=list)
    table: tuple[Row, list[Row]] | None = None
    bullets: list[str] = field(default_factory=list)


LATENCY_REPEATS = 30  # timed forward passes of one image (a tenth as many, at least 3, of a batch)
LATENCY_BATCH = 256


def measure_latency(model: nn.Module) -> dict[str, Any]:
    """Median forward time of one image, and per image in a batch of LATENCY_BATCH, on the model's device, in
    milliseconds."""
    repeats, batch_size = LATENCY_REPEATS, LATENCY_BATCH
    model = model.eval()
    device = next(model.parameters()).device

    def median_ms(x: torch.Tensor, runs: int) -> float:
        times = []
        with torch.inference_mode():
            model(x)  # warm-up: first calls allocate and pick kernels
            for _ in range(runs):
                start = time.perf_counter()
                model(x)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        return 1000 * statistics.median(times)

    one = median_ms(torch.zeros(1, 1, 28, 28, device=device), repeats)
    batch = median_ms(torch.zeros(batch_size, 1, 28, 28, device=device), max(3, repeats // 10))
    return {
        "single_ms": one,
        "batch_ms_per_image": batch / batch_size,
        "batch_size": batch_size,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.system()}",
    }


def build_card(
    metrics: dict[str, Any],
    meta: dict[str, Any] | None = None,
    config: TrainConfig | None = None,
    data: MNIST | None = None,
    robustness: dict[str, Any] | None = None,
    latency: dict[str, Any] | None = None,
    size_bytes: int | None = None,
    params: int | None = None,
    weights: str | None = "float32",
    checkpoint: Path | None = None,
) -> list[Section]:
    """The card's sections from what a run knows; any part left out is simply not shown. `weights` is the type
    the checkpoint stores its weights in (float16 after `calibrate --half`; None: not said)."""
    meta = meta or {}
    config = config or (TrainConfig.from_checkpoint(meta) if meta.get("config") else None)
    recipe = meta.get("recipe", "custom")
    arch = config.arch if config else meta.get("arch", "?")
    members = meta.get("members") if isinstance(meta.get("members"), list) else None
    # how many shifted views a Predictor averages (tta.py): an ensemble's are its first member's, as its
    # recipe's are a run's
    recipe_views = config.tta_views if config else 1
    if members:  # `digitrec ensemble --out`; `config` is its first member's, for how to evaluate it
        recipe, config = "ensemble", None
        arch = "ensemble of " + ", ".join(str((m.get("config") or {}).get("arch", "?")) for m in members)
    train_count = len(data.train_images) if data else 60_000
    tuned = None if members else _finetune(meta, data, train_count, checkpoint)
    dry_run = config is not None and (meta.get("metrics") or {}).get("dry_run") is True
    # the best checkpoint so far of a run stopped before its end (training.py writes it after each better epoch)
    unfinished = ", unfinished run" if meta.get("partial") is True else ""
    title = f"Model card: {recipe}{', dry run' if dry_run else ''}{unfinished} ({arch})"
    sections = [_details_section(title, meta, arch, params or meta.get("params"), size_bytes, weights)]
    if config:
        sections.append(_recipe_section(config, meta, recipe, tuned, dry_run))
    if members:
        sections.append(_members_section(members, meta))
    sections.append(_data_section(metrics, meta, config, data, members, tuned, dry_run, train_count))
    chosen_by = (meta.get("metrics") or {}).get("val_accuracy")
    if metrics.get("val_accuracy") is None and isinstance(chosen_by, float):
        # the test figures are this evaluation's; the validation accuracy is the run's, which chose the checkpoint
        metrics = {**metrics, "val_accuracy": chosen_by}
    sections.append(_metrics_section(metrics, config))
    calibration = _calibration_section(metrics, meta)
    if calibration:
        sections.append(calibration)
    # how many shifted views the headline figures average (tta.py); robustness and latency are of one view
    views = int(metrics.get("scored_tta_views") or recipe_views)
    if robustness:
        sections.append(_robustness_section(robustness, views))
    if latency:  # the checkpoint's size is in the first section; the views are those the Predictor runs
        sections.append(_latency_section(latency, recipe_views))
    sections.append(_intended_use_section())
    sections.append(_limits_section(config, tuned, robustness, members))
    return sections


def _details_section(
    title: str,
    meta: dict[str, Any],
    arch: str,
    params: int | None,
    size_bytes: int | None,
    weights: str | None,
) -> Section:
    """The card's first section: architecture, parameters, checkpoint size, when and with what it was trained."""
    details = [f"Architecture {code(arch)}" + (f", {params:,} parameters" if params else "") + "."]
    if size_bytes:
        stored = f"safetensors, {weights} weights" if weights else "safetensors"
        details.append(f"Checkpoint size {size_bytes / 1e6:.2f} MB ({stored}).")
    created = meta.get("created")
    versions = meta.get("versions", {})
    if created or versions:
        details.append(
            f"Trained {created + ' ' if created else ''}with "
            + ", ".join(f"{k} {v}" for k, v in versions.items())
            + "."
        )
    return Section(title, details)


def _recipe_section(
    config: TrainConfig, meta: dict[str, Any], recipe: str, tuned: _FineTune | None, dry_run: bool
) -> Section:
    """The settings that matter and the command that trains the same model again."""
    defaults = TrainConfig().to_dict()
    recipe_rows = [
        [key, code(value)]
        for key, value in config.to_dict().items()
        if key in _SETTINGS or (key in _SETTINGS_IF_SET and value != defaults[key])
    ]
    run = meta.get("metrics") or {}
    processes, threads = run.get("world_size"), run.get("threads")
    nproc = processes if isinstance(processes, int) and processes > 1 else 1
    text = [_reproduce_finetune(tuned, config) if tuned else _reproduce(recipe, config, dry_run, nproc)]
    if str(run.get("device", "")).startswith("cpu") and not config.threads and isinstance(threads, int):
        # torch chose the count (the machine's cores), and a float sum's order depends on it
        again = (
            f"`digitrec finetune` has no --threads: run it with OMP_NUM_THREADS={threads}"
            if tuned
            else f"add `--threads {threads}`"
        )
        text.append(
            f"It trained on {threads} CPU thread{'s' if threads != 1 else ''}{' per process' if nproc > 1 else ''}"
            f"; the same weights need as many ({again} on a machine with other cores)."
        )
    if meta.get("partial") is True:
        text.append(
            "This checkpoint is the best so far of a run that had not finished: the settings are the whole run's, "
            "and the figures below are of a model trained for fewer epochs than they say."
        )
    if config.source:
        text.append(f"Source: {config.source}.")
    return Section("Recipe", text, (["setting", "value"], recipe_rows))


def _data_section(
    metrics: dict[str, Any],
    meta: dict[str, Any],
    config: TrainConfig | None,
    data: MNIST | None,
    members: list[Any] | None,
    tuned: _FineTune | None,
    dry_run: bool,
    train_count: int,
) -> Section:
    """What it trained and was tested on, and the checksum of that data."""
    checksum = (data.checksum if data else None) or meta.get("data_checksum", "unknown")
    steps = int((meta.get("metrics") or {}).get("steps") or 0)
    training = (
        _finetuned_on(tuned) if tuned else _trained_on(config, bool(members), dry_run, steps, train_count)
    )
    data_text = [
        f"MNIST: 28x28 grayscale handwritten digits, white ink on black. Trained on {training}; "
        f"tested on the {metrics.get('count', 10000):,} test images."
    ]
    data_text += _augmented(config) if config and not members else []
    if tuned:  # the run's checksum mixes the corrections into MNIST's (feedback.finetune)
        digest = meta.get("data_checksum") or "unknown"
        data_text.append(
            "Data checksum (MD5 of MNIST's checksum followed by the corrections' pixels and labels"
            + (", of which there were none" if not tuned.with_corrections else "")
            + f"; not MNIST's own): {code(digest)}"
            + (
                f". MNIST's (MD5 over the four files' MD5s): {code(tuned.mnist_checksum)}"
                if tuned.mnist_checksum
                else ""
            )
            + (f"; MNIST loaded from {data.source}." if data else ".")
        )
    else:
        data_text.append(
            f"Data checksum (MD5 over the four files' MD5s): {code(checksum)}"
            + (f"; loaded from {data.source}." if data else ".")
            + (
                " The non-digits are drawn by the code (augment_real.py, from a fixed seed), not read from files."
                if config and config.negatives and not members
                else ""
            )
        )
    return Section("Data", data_text)


def _metrics_section(metrics: dict[str, Any], config: TrainConfig | None) -> Section:
    """Test accuracy and loss (and how it was scored, where not as the recipe scores), per-class scores."""
    per_class = [
        [str(c["digit"]), f"{c['precision']:.4f}", f"{c['recall']:.4f}", f"{c['f1']:.4f}", str(c["support"])]
        for c in metrics.get("per_class", [])
    ]
    overall = [
        f"Test accuracy **{metrics['test_accuracy']:.2%}** ({metrics.get('errors', '?')} errors), "
        f"test loss {metrics['test_loss']:.4f}"
        + (
            f" (at the calibrated temperature {metrics['temperature']:.3g}, which moves the loss, not the accuracy)."
            if metrics.get("temperature", 1.0) != 1.0
            else "."
        )
        + (_scored_views(int(metrics["scored_tta_views"]), config) if metrics.get("scored_tta_views") else "")
    ]
    if metrics.get("val_accuracy") is not None:
        one_view = ", each image in one view" if config is not None and config.tta_views > 1 else ""
        overall.append(f"Validation accuracy {metrics['val_accuracy']:.2%} (chose the checkpoint{one_view}).")
    return Section(
        "Metrics",
        overall,
        (["digit", "precision", "recall", "F1", "support"], per_class) if per_class else None,
    )


def _calibration_section(metrics: dict[str, Any], meta: dict[str, Any]) -> Section | None:
    """The test ECE, the temperature and the reject threshold, where there are any (None: no section)."""
    calibration = (
        [f"Expected calibration error (ECE, 15 bins) on the test set: {metrics['ece']:.4f}."]
        if "ece" in metrics
        else []
    )
    if "temperature" in meta:
        calibration.append(f"Calibrated by temperature scaling: T = {float(meta['temperature']):.3f}.")
    if "reject_below" in meta:
        calibration.append(f"A Predictor rejects answers below confidence {float(meta['reject_below']):.3f}.")
    return Section("Calibration", calibration) if calibration else None


def _one_view(views: int) -> str:
    """What a single-view figure says beside headline figures of `views` views."""
    return f", one view each (the test accuracy above averages {views} views per image)" if views > 1 else ""


def _robustness_section(robustness: dict[str, Any], views: int = 1) -> Section:
    """Mean and worst accuracy under each perturbation, and accuracy when the least confident are rejected."""
    result = robustness["models"][0]
    means = summary(result)
    rows = [
        [
            p["name"],
            p["label"],
            ", ".join(f"{s:g}" for s in p["strengths"]),
            f"{means[p['name']]:.2%}",
            f"{min(r['accuracy'] for r in result['perturbations'][p['name']]):.2%}",
        ]
        for p in robustness["perturbations"]
    ]
    coverage = ", ".join(f"{coverage_at(result, c)['accuracy']:.2%} at {c:.0%}" for c in COVERAGES[1:4])
    return Section(
        "Robustness",
        [
            f"Accuracy on {robustness['images']:,} MNIST test images under each perturbation{_one_view(views)} "
            "(`digitrec robustness` scores all 10,000 and plots the curves). Clean accuracy on them: "
            f"{result['clean_accuracy']:.2%}.",
            f"Rejecting the least confident answers: accuracy {coverage} coverage.",
        ],
        (["perturbation", "strength means", "strengths", "mean accuracy", "worst"], rows),
    )


def _latency_section(latency: dict[str, Any], views: int = 1) -> Section:
    """measure_latency's figures in one sentence."""
    per_view = f" (one view; the Predictor runs {views} per image)" if views > 1 else ""
    return Section(
        "Latency",
        [
            f"Forward pass of one image{per_view}: {latency['single_ms']:.2f} ms median; in batches of {latency['batch_size']}: "
            f"{latency['batch_ms_per_image']:.3f} ms per image ({latency['device']}, {latency['threads']} thread{'s' * (latency['threads'] != 1)}, "
            f"{latency['machine']}; measured while writing this card, so a busy machine reads slower)."
        ],
    )


def _intended_use_section() -> Section:
    """What the model is for, and what not without a person checking."""
    return Section(
        "Intended use",
        [
            "Reading single handwritten digits, and learning how digit classifiers are trained, evaluated and served. "
            "Not for decisions about people (grading, cheques, forms, ballots) without a person checking rejected "
            "and low-confidence answers.",
        ],
    )


def _limits_section(
    config: TrainConfig | None,
    tuned: _FineTune | None,
    robustness: dict[str, Any] | None,
    members: list[Any] | None = None,
) -> Section:
    """What the data and the input format limit it to, and the perturbations it falls below 90% under."""
    limits = [
        *(_ensemble_limits(members) if members else _data_limits(config, tuned)),
        "Inputs must look like MNIST (white on black, centered, 20x20 box in 28x28). `digitrec predict` and the "
        "server preprocess photos into that form; raw tensors passed to the model must already be in it.",
    ]
    if robustness:
        weak = [
            f"{p['name']} (down to {min(r['accuracy'] for r in robustness['models'][0]['perturbations'][p['name']]):.0%})"
            for p in robustness["perturbations"]
            if min(r["accuracy"] for r in robustness["models"][0]["perturbations"][p["name"]]) < 0.9
        ]
        if weak:
            limits.append("Accuracy falls below 90% under: " + ", ".join(weak) + ".")
    return Section("Known limits", bullets=limits)


def _scored_views(views: int, config: TrainConfig | None) -> str:
    """The Metrics sentence for a model scored with other test-time views than its recipe's (`evaluate
    --tta-views`)."""
    how = (
        "each image once, unshifted"
        if views == 1
        else f"the mean probability over {views} shifted copies of each image"
    )
    recipe = f" ({config.tta_views} view{'s' if config.tta_views != 1 else ''})" if config else ""
    return (
        f" Scored with `--tta-views {views}` ({how}), not the way its recipe scores it{recipe}; "
        "`digitrec evaluate` without `--tta-views` scores it the recipe's way."
    )


def _trained_on(
    config: TrainConfig | None, ensemble: bool, dry_run: bool, steps: int, train_count: int
) -> str:
    """What the model was trained on, for the card's Data section."""
    if ensemble:
        return "the MNIST training set, as each member's own card says"
    if config is None:
        return "the MNIST training set"
    if dry_run:
        # what the run's log line says: the dry run's subset of the training images, of which it saw `steps`
        images = min(DRY_RUN_BATCHES * config.batch_size, train_count - config.val_size)
        return (
            f"the first {images:,} training images only, {steps} step{'s' * (steps != 1)} of {config.batch_size} "
            "(a dry run, "
            "`--dry-run`: a check that the pipeline runs, not a trained model)"
        )
    if not config.val_size:
        return f"all {train_count:,} training images"
    return f"{train_count:,} training images less {config.val_size:,} held out for validation"


# The settings table's rows: these always, and these others where they differ from TrainConfig's defaults (they
# change what a run trains on or how it is evaluated, and a recipe that leaves them off has no row for them).
_SETTINGS = (
    "epochs",
    "batch_size",
    "optimizer",
    "lr",
    "weight_decay",
    "schedule",
    "label_smoothing",
    "augment",
    "val_size",
    "seed",
    "normalize",
)
_SETTINGS_IF_SET = ("ema_decay", "clean_epochs", "negatives", "early_stopping_patience", "tta_views")


@dataclass(frozen=True)
class _FineTune:
    """What a checkpoint of `digitrec finetune` records (feedback.finetune); None where it does not say."""

    source: str | None  # the checkpoint it started from, as given to --model
    # that path is the card's own checkpoint: the fine-tune was written over the model it began from
    replaced: bool
    base_recipe: str | None  # that model's recipe
    with_corrections: bool  # False: --no-corrections, MNIST alone
    corrections: int | None
    repeat: int | None
    database: str | None
    lr_scale: float | None
    mnist_images: int | None
    mnist_checksum: str | None


def _finetune(
    meta: dict[str, Any], data: MNIST | None, train_count: int, checkpoint: Path | None = None
) -> _FineTune | None:
    """The fine-tune a checkpoint's metadata describes, or None for a run of `digitrec train`.

    A model.safetensors holds what finetune recorded at the top of its metadata, a last.safetensors under
    `extra`. Older fine-tunes recorded neither the learning-rate scale nor MNIST's own size and checksum: then
    they are those of `data` where that is not the training set (`evaluate --report` passes plain MNIST), and
    where it is (training passes the enlarged set, whose checksum the metadata records), its size less the
    repeated corrections."""
    found = meta.get("extra")
    extra: dict[str, Any] = found if isinstance(found, dict) else {}

    def get(key: str) -> Any:
        return meta.get(key, extra.get(key))

    if not is_finetune(meta):
        return None
    recipe = str(meta.get("recipe", ""))
    source = get("finetuned_from")
    feedback = get("feedback") if isinstance(get("feedback"), dict) else None
    mnist = get("mnist") if isinstance(get("mnist"), dict) else {}

    def whole(value: Any, least: int) -> int | None:
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= least else None

    corrections = whole((feedback or {}).get("corrections"), 0)
    repeat = whole((feedback or {}).get("repeat"), 1)
    scale = get("lr_scale")
    with_corrections = feedback is not None or recipe.endswith(FEEDBACK_SUFFIX)
    training_set = data is not None and data.checksum == meta.get("data_checksum")
    images = whole(mnist.get("images"), 1)
    if images is None and not (training_set and with_corrections):
        images = train_count  # MNIST, or the training set where it added nothing to MNIST
    elif images is None and corrections is not None and repeat is not None:
        images = train_count - corrections * repeat
    checksum = mnist.get("checksum") if isinstance(mnist.get("checksum"), str) else None
    if checksum is None and data is not None and not training_set:
        checksum = data.checksum
    database = (feedback or {}).get("database")
    base = finetune_base(recipe)
    # fine-tuned from the file at its own path (`finetune --out` into the folder it began from)
    replaced = False
    if source is not None and checkpoint is not None:
        with contextlib.suppress(OSError):
            replaced = Path(str(source)).resolve() == checkpoint.resolve()
    return _FineTune(
        source=str(source) if source is not None else None,
        replaced=replaced,
        base_recipe=base or None,
        with_corrections=with_corrections,
        corrections=corrections,
        repeat=repeat,
        database=database if isinstance(database, str) else None,
        lr_scale=float(scale) if isinstance(scale, (int, float)) and not isinstance(scale, bool) else None,
        mnist_images=images if images and images > 0 else None,
        mnist_checksum=checksum,
    )


def _finetuned_on(tuned: _FineTune) -> str:
    """What a fine-tune trained on, for the card's Data section (after "Trained on")."""
    text = (
        f"MNIST's {tuned.mnist_images:,} training images" if tuned.mnist_images else "MNIST's training images"
    )
    if not tuned.with_corrections:
        text += " without corrections (`--no-corrections`), none held out for validation"
    else:
        count = tuned.corrections
        text += f" plus {f'{count:,} ' if count is not None else ''}correction{'s' if count != 1 else ''} its users "
        text += "sent (the 28x28 images the model saw, with the digit they said)"
        if tuned.repeat is not None:
            text += f", each repeated {tuned.repeat} time{'s' if tuned.repeat != 1 else ''}"
        if tuned.repeat is not None and tuned.mnist_images and count is not None:
            text += f" ({tuned.mnist_images + count * tuned.repeat:,} images an epoch, none held out for validation)"
        else:
            text += ", none held out for validation"
    said = "" if tuned.replaced else " (its own card says what that was trained on)"
    return text + f", starting from {_start(tuned, 'another model')}{said}"


def _start(tuned: _FineTune, unknown: str) -> str:
    """The model a fine-tune started from, as the card names it."""
    if tuned.replaced:
        return f"an earlier model at this same path ({code(tuned.source)}), which this one replaced"
    return code(tuned.source) if tuned.source else unknown


def _reproduce_finetune(tuned: _FineTune, config: TrainConfig) -> str:
    """Where a fine-tune started and the `digitrec finetune` command that makes it again, as far as its metadata
    tells; its settings table shows the fine-tune's own settings, not those of the model it started from."""
    start = _start(tuned, "another model (not recorded)")
    recipe = f" (recipe {code(tuned.base_recipe)})" if tuned.base_recipe else ""
    rate = (
        f"{tuned.lr_scale:g} times its recipe's learning rate"
        if tuned.lr_scale
        else "a fraction of its recipe's learning rate"
    )
    text = (
        f"Fine-tuned from {start}{recipe} by `digitrec finetune`: training went on from that model's weights for "
        f"{_value(config.epochs)} epoch{'s' if config.epochs != 1 else ''} at {rate} (lr below) with a cosine "
        "decay and no validation split; the table gives the settings of this fine-tune, the others are that model's."
    )
    known = tuned.source is not None and not tuned.replaced and tuned.lr_scale is not None
    if tuned.with_corrections:
        known = known and tuned.repeat is not None
    if not known:
        return (
            text
            + " Its metadata does not record the whole `digitrec finetune` command; model.json has its values."
        )
    flags = ["--model", str(tuned.source)]
    if tuned.with_corrections:
        flags += ["--feedback", tuned.database or "DB"]
    else:
        flags.append("--no-corrections")
    # every digit (:g kept six: --lr-scale 0.123456789 came back as 0.123457, other weights)
    flags += ["--epochs", _value(config.epochs), "--lr-scale", _value(tuned.lr_scale)]
    flags += ["--repeat", str(tuned.repeat)] if tuned.with_corrections else []
    command = " ".join(["digitrec finetune", *(shlex.quote(flag) for flag in flags)])
    if not tuned.with_corrections:
        return text + f" Reproduce it with {code(command)}."
    held = f"the same {tuned.corrections:,}" if tuned.corrections is not None else "the same"
    where = "DB a database" if not tuned.database else "the database"
    return (
        text
        + f" Reproduce it with {code(command)}, {where} holding {held} corrections (the server may have added "
        "more since)."
    )


# Each augmentation, as the Data section describes it; "none", "rotate10", "affine" and "affine-elastic" keep
# MNIST's look, and the settings table names them.
_LOOKS = {
    "robust": "photo-like augmentation (`robust`: rotation, scale, shear and shift, elastic warps, thicker and "
    "thinner strokes, re-thresholding, blur, ink darkness and noise), so that its digits look like photographed "
    "and scanned ones after preprocessing",
}


def _augmented(config: TrainConfig) -> list[str]:
    """The Data section's sentences on what training added to MNIST's images: a photo-like augmentation and
    non-digits (outlier exposure). None for a recipe that trains on MNIST's look alone."""
    text = []
    if config.augment in _LOOKS:
        clean = f", except in the last {_value(config.clean_epochs)} epochs" if config.clean_epochs else ""
        text.append(f"Every training batch went through {_LOOKS[config.augment]}{clean}.")
    if config.negatives:
        share = (
            f"one non-digit for every {_value(1 / config.negatives)} digits"
            if config.negatives < 1 and (1 / config.negatives).is_integer()
            else f"{_value(config.negatives)} non-digits per digit"
        )
        text.append(
            f"Non-digits joined every batch, {share} (`negatives` {_value(config.negatives)}): generated letters, "
            "scribbles, specks and two of the batch's digits side by side, which it was trained to answer with no "
            "digit, its probability spread evenly over all ten (outlier exposure)."
        )
    return text


def _data_limits(config: TrainConfig | None, tuned: _FineTune | None) -> list[str]:
    """The Known limits bullets on what the model was trained on: MNIST alone, or with a photo-like augmentation,
    non-digits or users' corrections, each of which the card of a plain MNIST run does not claim."""
    robust = config is not None and config.augment in _LOOKS
    negatives = config is not None and bool(config.negatives)
    corrections = tuned is not None and tuned.with_corrections
    if not (robust or negatives or corrections):
        return [
            "Trained only on MNIST: digits written by US Census Bureau employees and high-school students, scanned, "
            "size-normalized and centered. Other handwriting, pens and cameras differ; expect lower accuracy on them.",
            "One digit 0-9 per image. Letters, symbols and blank images still get a digit from the network itself; "
            "`Predictor` rejects blank and low-confidence images, but only as well as its calibration allows.",
        ]
    digits = (
        "Its digits are MNIST's (written by US Census Bureau employees and high-school students, scanned, "
        "size-normalized and centered)"
    )
    if corrections:
        assert tuned is not None
        count = tuned.corrections if tuned.corrections is not None else "some"
        digits += f" and {count} correction{'s' if count != 1 else ''} its users sent"
    if robust:
        digits += (
            ", warped, thickened, blurred and noised in training to look like photographed and scanned digits"
        )
    digits += ". Other handwriting, pens and cameras differ; expect lower accuracy on them"
    digits += " than on MNIST (`digitrec eval-real` measures it on generated photos)." if robust else "."
    if corrections:
        digits += " A few corrections teach it the hands they show, not handwriting in general."
    if negatives:
        answers = (
            "One digit 0-9 per image. It was trained to answer non-digits (letters, scribbles, specks, two digits "
            "side by side) with no digit, but it still gives every image a digit, and non-digits unlike those it "
            "saw may get a confident one"
        )
    else:
        answers = "One digit 0-9 per image. Letters, symbols and blank images still get a digit from the network itself"
    return [
        digits,
        answers
        + "; `Predictor` rejects blank and low-confidence images, but only as well as its calibration allows.",
    ]


def _ensemble_limits(members: list[Any]) -> list[str]:
    """An ensemble's Known limits bullets on what its members were trained on: a plain MNIST model's where every
    member is one, else how many saw photo-like augmentation or non-digits (a robust member's was "Trained
    only on MNIST")."""
    configs = []
    for member in members:
        with contextlib.suppress(Exception):  # a member's record digitrec cannot read counts as neither
            configs.append(
                TrainConfig.from_dict((member if isinstance(member, dict) else {}).get("config") or {})
            )
    looks = sum(config.augment in _LOOKS for config in configs)
    negatives = sum(bool(config.negatives) for config in configs)
    if not (looks or negatives):
        return _data_limits(None, None)
    return [
        f"Its members' digits are MNIST's ({looks} of {len(members)} members warped, thickened, blurred and noised "
        f"in training to look like photographed and scanned digits, {negatives} of {len(members)} also trained on "
        "non-digits; each member's own card says how). Other handwriting, pens and cameras differ; expect lower "
        "accuracy on them than on MNIST (`digitrec eval-real` measures it on generated photos).",
        "One digit 0-9 per image. Every image still gets a digit from the members, and non-digits unlike those "
        "they saw may get a confident one; `Predictor` rejects blank and low-confidence images, but only as well "
        "as its calibration allows.",
    ]


# Settings that say where a recipe comes from; they do not change what a run trains.
_DESCRIPTIVE = ("source", "reported_accuracy", "reported_metric", "notes")


def _value(value: Any) -> str:
    """A setting as a TOML value (and a flag's, strings aside): 2.0 as 2, tuples as arrays."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def _reproduce(recipe: str, config: TrainConfig, dry_run: bool, nproc: int = 1) -> str:
    """The sentence with the `digitrec train` command that trains this config again: the recipe, then a flag for
    each setting that differs from it, and a TOML file for the settings no flag sets; `--nproc N` for a run of N
    processes (each normalizes its share of a batch on a CPU, so one process trains other weights)."""
    from .config import DRY_RUN_MAX_EPOCHS, RECIPES, TRAIN_OVERRIDES

    def capped(base: TrainConfig) -> TrainConfig:  # --dry-run caps the epochs and records the capped figure
        return base.override(epochs=min(base.epochs, DRY_RUN_MAX_EPOCHS)) if dry_run else base

    def differences(base: TrainConfig) -> dict[str, Any]:
        ours, theirs = config.to_dict(), capped(base).to_dict()
        return {k: v for k, v in ours.items() if v != theirs[k] and k not in _DESCRIPTIVE}

    custom = recipe == "custom"  # a TrainConfig given to digitrec.train(): said from the recipe nearest to it
    if custom:
        recipe = min(RECIPES, key=lambda name: len(differences(RECIPES[name])))
    elif recipe not in RECIPES:  # a fine-tuned run, or a recipe since renamed
        return f"Recipe {code(recipe)}, not a named recipe; its full values are in model.json."
    changed = differences(RECIPES[recipe])
    flags, toml = [], []
    for key, value in changed.items():
        if key in TRAIN_OVERRIDES:
            flags.append(f"--{key.replace('_', '-')} {value if isinstance(value, str) else _value(value)}")
        elif key == "amp":
            flags.append("--amp" if value else "--no-amp")
        elif key == "compile" and value:
            flags.append("--compile")
        elif value is not None:
            toml.append(f"{key} = {_value(value)}")
    own = " with settings of its own" if flags or toml else ""
    named = (
        f"A custom configuration, nearest to recipe {code(recipe)}"
        if custom
        else f"Recipe {code(recipe)}{own}"
    )
    flags += [f"--nproc {nproc}"] if nproc > 1 else []
    flags += ["--dry-run"] if dry_run else []
    if toml:
        command = " ".join(["digitrec train --config FILE", *flags])
        return (
            f"{named}; reproduce it with {code(command)}, FILE a TOML file holding "
            + ", ".join(code(line) for line in [f'recipe = "{recipe}"', *toml])
            + " (one per line)."
        )
    command = " ".join([f"digitrec train --recipe {recipe}", *flags])
    return f"{named}; reproduce it with {code(command)}."


def _members_section(members: list[Any], meta: dict[str, Any]) -> Section:
    """What an ensemble is made of, and the `digitrec ensemble` command that builds it again."""
    rows = []
    for member in members:
        member = member if isinstance(member, dict) else {}
        accuracy = member.get("test_accuracy")
        rows.append(
            [
                code(member.get("path", "?")),
                code(member.get("recipe") or "custom"),
                code((member.get("config") or {}).get("arch", "?")),
                f"{float(member.get('temperature', 1.0)):.3f}",
                f"{accuracy:.2%}" if isinstance(accuracy, (int, float)) else "?",
            ]
        )
    paths = " ".join(shlex.quote(str(m.get("path", "?"))) for m in members if isinstance(m, dict))
    text = [
        f"An ensemble of {len(members)} models: the mean of their probabilities, each softened by its own "
        f"temperature. Rebuild it with {code(f'digitrec ensemble {paths} --out PATH')} (the paths as given when it was built)"
        + (", then `digitrec calibrate PATH`." if "temperature" in meta else "."),
        "Each member's training settings are on its own model card.",
    ]
    return Section(
        "Members", text, (["member", "recipe", "architecture", "temperature", "test accuracy"], rows)
    )


def to_markdown(sections: list[Section]) -> str:
    """The card as Markdown (MODEL_CARD.md): the first title as # and the others as ##, paragraphs, a pipe table,
    a bullet list."""
    lines: list[str] = []
    for index, section in enumerate(sections):
        lines += [("# " if index == 0 else "## ") + section.title, ""]
        for paragraph in section.paragraphs:
            lines += [paragraph, ""]
        if section.table:
            headers, rows = section.table
            lines.append("| " + " | ".join(headers) + " |")
            lines.append("|" + "|".join("---" for _ in headers) + "|")
            # a | in a cell (a member's path) would start another column: escaped, as GFM allows even in code
            lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
            lines.append("")
        if section.bullets:
            lines += [f"- {bullet}" for bullet in section.bullets] + [""]
    return "\n".join(lines)


def code(text: Any) -> str:
    """`text` as a Markdown code span, whatever it holds: a fence of one backtick more than its longest run of
    them, and a space inside the fence where the text starts or ends with a backtick or with spaces at both ends
    (CommonMark strips one such space). A path with a backtick in it broke the span it stood in."""
    text = " ".join(str(text).splitlines())
    fence = "`" * (max((len(run) for run in _BACKTICKS.findall(text)), default=0) + 1)
    spaced = text.startswith(" ") and text.endswith(" ") and text.strip()
    pad = " " if text.startswith("`") or text.endswith("`") or spaced else ""
    return f"{fence}{pad}{text}{pad}{fence}"


_BACKTICKS = re.compile(r"`+")
# a code span as CommonMark reads one: a run of backticks, then the first run of the same length
_CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", re.S)


def _inline_html(text: str) -> str:
    """Escape, then turn the Markdown we write (code spans, **bold** outside them) into tags."""
    parts, start = [], 0
    for span in _CODE_SPAN.finditer(text):
        parts.append(_bold_html(text[start : span.start()]))
        inside = span.group(2)
        if inside.startswith(" ") and inside.endswith(" ") and inside.strip():
            inside = inside[1:-1]
        parts.append(f"<code>{html.escape(inside)}</code>")
        start = span.end()
    return "".join(parts) + _bold_html(text[start:])


def _bold_html(text: str) -> str:
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", html.escape(text))


def to_html(sections: list[Section]) -> str:
    """The card as HTML for report.html: a <section class="model-card">, the first title as <h2> and the others as
    <h3>."""
    parts = []
    for index, section in enumerate(sections):
        tag = "h2" if index == 0 else "h3"
        parts.append(f"<{tag}>{_inline_html(section.title)}</{tag}>")
        parts += [f"<p>{_inline_html(p)}</p>" for p in section.paragraphs]
        if section.table:
            headers, rows = section.table
            parts.append(
                "<table><tr>"
                + "".join(f"<th>{_inline_html(h)}</th>" for h in headers)
                + "</tr>"
                + "".join(
                    "<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in row) + "</tr>" for row in rows
                )
                + "</table>"
            )
        if section.bullets:
            parts.append("<ul>" + "".join(f"<li>{_inline_html(b)}</li>" for b in section.bullets) + "</ul>")
    return '<section class="model-card">' + "\n".join(parts) + "</section>"


_FLOAT_TYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


def stored_weights(checkpoint: Path) -> str | None:
    """The floating-point type(s) a safetensors checkpoint stores its weights in, from its header ("float16"
    after `calibrate --half`, which loading turns back into float32); None when the file does not say."""
    from .checkpoint import parse_header

    try:
        header, _ = parse_header(checkpoint.read_bytes())
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(header, dict):
        return None
    types = {
        _FLOAT_TYPES[entry["dtype"]]
        for key, entry in header.items()
        if key != "__metadata__" and isinstance(entry, dict) and entry.get("dtype") in _FLOAT_TYPES
    }
    return " and ".join(sorted(types)) or None


def write_model_card(
    out_dir: str | Path,
    model: nn.Module,
    metrics: dict[str, Any],
    meta: dict[str, Any] | None = None,
    config: TrainConfig | None = None,
    data: MNIST | None = None,
    robustness: dict[str, Any] | None = None,
    checkpoint: str | Path | None = None,
) -> list[Section]:
    """Measure latency and size, build the card and write out_dir/MODEL_CARD.md; returns the sections for report.html.

    The size and weight type are those of `checkpoint`, the file the card describes (by default the run's own
    out_dir/model.safetensors: `evaluate MODEL --report DIR` names its MODEL, wherever DIR is)."""
    out_dir = Path(out_dir)
    checkpoint = Path(checkpoint) if checkpoint is not None else out_dir / "model.safetensors"
    size = checkpoint.stat().st_size if checkpoint.is_file() else None
    sections = build_card(
        metrics,
        meta,
        config,
        data,
        robustness,
        measure_latency(model),
        size,
        count_parameters(model),
        stored_weights(checkpoint) if size else None,
        checkpoint,
    )
    atomic_write_text(out_dir / "MODEL_CARD.md", to_markdown(sections))
    return sections
