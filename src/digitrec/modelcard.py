"""MODEL_CARD.md for a model: data and checksum, recipe, metrics, calibration, robustness, latency, size, use and limits.

The card is built once as a list of sections and rendered twice, as Markdown (MODEL_CARD.md beside the
checkpoint) and as HTML (a section of report.html), so the two can never disagree.
"""

from __future__ import annotations

import html
import json
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import atomic_write_text
from .config import TrainConfig
from .data import MNIST
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


def measure_latency(model: nn.Module, repeats: int = 30, batch_size: int = 256) -> dict[str, Any]:
    """Median forward time of one image, and per image in a batch, on the model's device, in milliseconds."""
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
) -> list[Section]:
    """The card's sections from what a run knows; any part left out is simply not shown. `weights` is the type
    the checkpoint stores its weights in (float16 after `calibrate --half`; None: not said)."""
    meta = meta or {}
    config = config or (TrainConfig.from_checkpoint(meta) if meta.get("config") else None)
    recipe = meta.get("recipe", "custom")
    arch = config.arch if config else meta.get("arch", "?")
    members = meta.get("members") if isinstance(meta.get("members"), list) else None
    if members:  # `digitrec ensemble --out`; `config` is its first member's, for how to evaluate it
        recipe, config = "ensemble", None
        arch = "ensemble of " + ", ".join(str((m.get("config") or {}).get("arch", "?")) for m in members)
    train_count = len(data.train_images) if data else 60_000
    dry_run = config is not None and (meta.get("metrics") or {}).get("dry_run") is True
    params = params or meta.get("params")
    sections = []

    details = [f"Architecture `{arch}`" + (f", {params:,} parameters" if params else "") + "."]
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
    sections.append(Section(f"Model card: {recipe}{', dry run' if dry_run else ''} ({arch})", details))

    if config:
        recipe_rows = [
            [key, f"`{value}`"]
            for key, value in config.to_dict().items()
            if key
            in (
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
        ]
        run = meta.get("metrics") or {}
        processes, threads = run.get("world_size"), run.get("threads")
        nproc = processes if isinstance(processes, int) and processes > 1 else 1
        text = [_reproduce(recipe, config, dry_run, nproc)]
        if str(run.get("device", "")).startswith("cpu") and not config.threads and isinstance(threads, int):
            # torch chose the count (the machine's cores), and a float sum's order depends on it
            text.append(
                f"It trained on {threads} CPU thread{'s' if threads != 1 else ''}{' per process' if nproc > 1 else ''}"
                f"; the same weights need as many (add `--threads {threads}` on a machine with other cores)."
            )
        if config.source:
            text.append(f"Source: {config.source}.")
        sections.append(Section("Recipe", text, (["setting", "value"], recipe_rows)))
    if members:
        sections.append(_members_section(members, meta))

    checksum = (data.checksum if data else None) or meta.get("data_checksum", "unknown")
    steps = int((meta.get("metrics") or {}).get("steps") or 0)
    training = _trained_on(config, bool(members), dry_run, steps, train_count)
    sections.append(
        Section(
            "Data",
            [
                f"MNIST: 28x28 grayscale handwritten digits, white ink on black. Trained on {training}; "
                f"tested on the {metrics.get('count', 10000):,} test images.",
                f"Data checksum (MD5 over the four files' MD5s): `{checksum}`"
                + (f"; loaded from {data.source}." if data else "."),
            ],
        )
    )

    per_class = [
        [str(c["digit"]), f"{c['precision']:.4f}", f"{c['recall']:.4f}", f"{c['f1']:.4f}", str(c["support"])]
        for c in metrics.get("per_class", [])
    ]
    overall = [
        f"Test accuracy **{metrics['test_accuracy']:.2%}** ({metrics.get('errors', '?')} errors), "
        f"test loss {metrics['test_loss']:.4f}."
    ]
    if metrics.get("val_accuracy") is not None:
        overall.append(f"Validation accuracy {metrics['val_accuracy']:.2%} (chose the checkpoint).")
    sections.append(
        Section(
            "Metrics",
            overall,
            (["digit", "precision", "recall", "F1", "support"], per_class) if per_class else None,
        )
    )

    calibration = (
        [f"Expected calibration error (ECE, 15 bins) on the test set: {metrics['ece']:.4f}."]
        if "ece" in metrics
        else []
    )
    if "temperature" in meta:
        calibration.append(f"Calibrated by temperature scaling: T = {float(meta['temperature']):.3f}.")
    if "reject_below" in meta:
        calibration.append(f"A Predictor rejects answers below confidence {float(meta['reject_below']):.3f}.")
    if calibration:
        sections.append(Section("Calibration", calibration))

    if robustness:
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
        sections.append(
            Section(
                "Robustness",
                [
                    f"Accuracy on {robustness['images']:,} MNIST test images under each perturbation (`digitrec robustness` "
                    "scores all 10,000 and plots the curves). Clean accuracy on them: "
                    f"{result['clean_accuracy']:.2%}.",
                    f"Rejecting the least confident answers: accuracy {coverage} coverage.",
                ],
                (["perturbation", "strength", "strengths", "mean accuracy", "worst"], rows),
            )
        )

    if latency or size_bytes:
        speed = []
        if latency:
            speed.append(
                f"Forward pass of one image: {latency['single_ms']:.2f} ms median; in batches of {latency['batch_size']}: "
                f"{latency['batch_ms_per_image']:.3f} ms per image ({latency['device']}, {latency['threads']} thread{'s' * (latency['threads'] != 1)}, "
                f"{latency['machine']}; measured while writing this card, so a busy machine reads slower)."
            )
        sections.append(Section("Latency and size", speed))

    limits = [
        "Trained only on MNIST: digits written by US Census Bureau employees and high-school students, scanned, "
        "size-normalized and centered. Other handwriting, pens and cameras differ; expect lower accuracy on them.",
        "One digit 0-9 per image. Letters, symbols and blank images still get a digit from the network itself; "
        "`Predictor` rejects blank and low-confidence images, but only as well as its calibration allows.",
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
    sections.append(
        Section(
            "Intended use",
            [
                "Reading single handwritten digits, and learning how digit classifiers are trained, evaluated and served. "
                "Not for decisions about people (grading, cheques, forms, ballots) without a person checking rejected "
                "and low-confidence answers.",
            ],
        )
    )
    sections.append(Section("Known limits", bullets=limits))
    return sections


def _trained_on(
    config: TrainConfig | None, ensemble: bool, dry_run: bool, steps: int, train_count: int
) -> str:
    """What the model was trained on, for the card's Data section."""
    if ensemble:
        return "the MNIST training set, as each member's own card says"
    if config is None:
        return "the MNIST training set"
    if dry_run:
        images = min(steps * config.batch_size, train_count - config.val_size)
        return (
            f"the first {images:,} training images only, {steps} steps of {config.batch_size} (a dry run, "
            "`--dry-run`: a check that the pipeline runs, not a trained model)"
        )
    if not config.val_size:
        return f"all {train_count:,} training images"
    return f"{train_count:,} training images less {config.val_size:,} held out for validation"


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

    if recipe == "custom":
        return "A custom configuration; its full values are in model.json."
    if recipe not in RECIPES:  # a fine-tuned run, or a recipe since renamed
        return f"Recipe `{recipe}`, not a named recipe; its full values are in model.json."
    base = RECIPES[recipe]
    if dry_run:  # --dry-run caps the epochs and records the capped figure: a flag only where the cap differs
        base = base.override(epochs=min(base.epochs, DRY_RUN_MAX_EPOCHS))
    ours, theirs = config.to_dict(), base.to_dict()
    changed = {k: v for k, v in ours.items() if v != theirs[k] and k not in _DESCRIPTIVE}
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
    flags += [f"--nproc {nproc}"] if nproc > 1 else []
    flags += ["--dry-run"] if dry_run else []
    if toml:
        command = " ".join(["digitrec train --config FILE", *flags])
        return (
            f"Recipe `{recipe}`{own}; reproduce it with `{command}`, FILE a TOML file holding "
            + ", ".join(f"`{line}`" for line in [f'recipe = "{recipe}"', *toml])
            + " (one per line)."
        )
    command = " ".join([f"digitrec train --recipe {recipe}", *flags])
    return f"Recipe `{recipe}`{own}; reproduce it with `{command}`."


def _members_section(members: list[Any], meta: dict[str, Any]) -> Section:
    """What an ensemble is made of, and the `digitrec ensemble` command that builds it again."""
    rows = []
    for member in members:
        member = member if isinstance(member, dict) else {}
        accuracy = member.get("test_accuracy")
        rows.append(
            [
                f"`{member.get('path', '?')}`",
                f"`{member.get('recipe') or 'custom'}`",
                f"`{(member.get('config') or {}).get('arch', '?')}`",
                f"{float(member.get('temperature', 1.0)):.3f}",
                f"{accuracy:.2%}" if isinstance(accuracy, (int, float)) else "?",
            ]
        )
    paths = " ".join(str(m.get("path", "?")) for m in members if isinstance(m, dict))
    text = [
        f"An ensemble of {len(members)} models: the mean of their probabilities, each softened by its own "
        f"temperature. Rebuild it with `digitrec ensemble {paths} --out PATH` (the paths as given when it was built)"
        + (", then `digitrec calibrate PATH`." if "temperature" in meta else "."),
        "Each member's training settings are on its own model card.",
    ]
    return Section(
        "Members", text, (["member", "recipe", "architecture", "temperature", "test accuracy"], rows)
    )


def to_markdown(sections: list[Section]) -> str:
    lines: list[str] = []
    for index, section in enumerate(sections):
        lines += [("# " if index == 0 else "## ") + section.title, ""]
        for paragraph in section.paragraphs:
            lines += [paragraph, ""]
        if section.table:
            headers, rows = section.table
            lines.append("| " + " | ".join(headers) + " |")
            lines.append("|" + "|".join("---" for _ in headers) + "|")
            lines += ["| " + " | ".join(row) + " |" for row in rows]
            lines.append("")
        if section.bullets:
            lines += [f"- {bullet}" for bullet in section.bullets] + [""]
    return "\n".join(lines)


def _inline_html(text: str) -> str:
    """Escape, then turn the Markdown we write (`code`, **bold**) into tags."""
    import re

    text = html.escape(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)


def to_html(sections: list[Section]) -> str:
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
    from .checkpoint import _parse_header

    try:
        header, _ = _parse_header(checkpoint.read_bytes())
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
    )
    atomic_write_text(out_dir / "MODEL_CARD.md", to_markdown(sections))
    return sections
