"""Robustness: test accuracy under rotation, scale, shift, stroke, blur, noise, contrast and inversion, and accuracy vs coverage.

Every perturbation is applied to the MNIST test images at several strengths with a fixed seed, so two models
(or two runs of this command) are scored on exactly the same perturbed images. Perturbed images are rounded
back to 8 bits, as a real image file would be, and go through the same `predict_logits` as the test set, with
the model's recipe's evaluation settings (batch size, bfloat16, memory layout) and one view of each image.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .augment import random_affine
from .backends import OnnxBackend, is_onnx
from .config import TrainConfig
from .errors import DigitrecError

Scorer = Callable[[torch.Tensor], torch.Tensor]  # uint8 images (N, 28, 28) -> logits (N, 10)
Perturb = Callable[[torch.Tensor, float, torch.Generator], torch.Tensor]  # float (N, 1, 28, 28) in [0, 1]

SEED = 0
COVERAGES = (1.0, 0.99, 0.98, 0.95, 0.9, 0.8)  # the rows of the accuracy-vs-coverage table
CURVE_POINTS = 50  # the coverage curve also has a row at every 1/50 (2%) of the images
ONNX_BATCH = 1_000  # images per ONNX Runtime call when an exported model is scored
REPORT_IMAGES = 1000  # a run's report scores this many test images; `digitrec robustness` scores all of them


def _rotate(x: torch.Tensor, degrees: float, generator: torch.Generator) -> torch.Tensor:
    return random_affine(x, generator, degrees=degrees)


def _scale(x: torch.Tensor, factor: float, generator: torch.Generator) -> torch.Tensor:
    return random_affine(x, generator, scale=(factor, factor))


def _translate(x: torch.Tensor, pixels: float, generator: torch.Generator) -> torch.Tensor:
    return random_affine(x, generator, translate_px=pixels)


def _stroke(x: torch.Tensor, pixels: float, generator: torch.Generator) -> torch.Tensor:
    """Dilate (positive) or erode (negative) by |pixels| passes of a 3x3 max / min filter."""
    for _ in range(int(abs(pixels))):
        x = (
            F.max_pool2d(x, 3, stride=1, padding=1)
            if pixels > 0
            else -F.max_pool2d(-x, 3, stride=1, padding=1)
        )
    return x


def _blur(x: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    if sigma <= 0:
        return x
    radius = max(1, math.ceil(3 * sigma))
    taps = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-(taps**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()

    def band(size: int) -> torch.Tensor:  # the 1-D blur as a (size, size) matrix, zeros beyond the border
        offset = torch.arange(size)[None, :] - torch.arange(size)[:, None]
        return torch.where(offset.abs() <= radius, kernel[(offset + radius).clamp(0, 2 * radius)], 0.0)

    # separable: down the columns, then along the rows; the same as a zero-padded conv2d, 30x faster here
    return band(x.shape[-2]) @ x @ band(x.shape[-1]).T


def _noise(x: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    return x + std * torch.randn(x.shape, generator=generator, dtype=x.dtype)


def _contrast(x: torch.Tensor, factor: float, generator: torch.Generator) -> torch.Tensor:
    """Faint ink on the same black background: the stroke's brightness is multiplied by `factor`."""
    return x * factor


def _invert(x: torch.Tensor, amount: float, generator: torch.Generator) -> torch.Tensor:
    """Blend toward the negative: 1 is black ink on white paper, the way people write; 0.5 is flat gray."""
    return (1 - amount) * x + amount * (1 - x)


@dataclass(frozen=True)
class Perturbation:
    """One family of perturbations; `clean` is the strength that leaves an image as it is (plotted too)."""

    name: str
    label: str
    strengths: tuple[float, ...]
    clean: float
    apply: Perturb


PERTURBATIONS: tuple[Perturbation, ...] = (
    Perturbation("rotation", "rotation, random within ± degrees", (15, 30, 45, 60), 0, _rotate),
    Perturbation("scale", "scale factor", (1.3, 0.8, 0.6, 0.4), 1, _scale),
    Perturbation("translation", "shift, random within ± pixels", (2, 4, 6, 8), 0, _translate),
    Perturbation("stroke", "stroke: erode (-) / dilate (+) pixels", (-2, -1, 1, 2), 0, _stroke),
    Perturbation("blur", "Gaussian blur sigma (pixels)", (0.5, 1.0, 1.5, 2.0), 0, _blur),
    Perturbation("noise", "Gaussian noise std (pixel range 0-1)", (0.1, 0.2, 0.3, 0.5), 0, _noise),
    Perturbation("contrast", "ink brightness factor", (0.75, 0.5, 0.35, 0.2), 1, _contrast),
    Perturbation("inversion", "inversion amount", (0.1, 0.2, 0.35, 1.0), 0, _invert),
)


def perturb(images: torch.Tensor, perturbation: Perturbation, strength: float) -> torch.Tensor:
    """uint8 images (N, 28, 28) -> the same images perturbed, rounded back to uint8; seeded by name and strength."""
    from .data import as_input

    seed = SEED + sum(map(ord, perturbation.name)) * 1000 + round(strength * 100)
    generator = torch.Generator().manual_seed(seed)
    x = as_input(images)
    x = perturbation.apply(x, float(strength), generator)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)[:, 0]


@dataclass
class Scored:
    """A model to score: its name on the plots, where it came from, and how to get its logits."""

    name: str
    path: str
    scorer: Scorer
    temperature: float = 1.0


def torch_scorer(model: torch.nn.Module, config: TrainConfig) -> Scorer:
    """Scores with the model's own evaluation settings: `config`'s batch size, bfloat16 and memory layout, as
    `digitrec evaluate` scores, but one view of each image (tta.py: the curves are of the images as perturbed)."""
    from .evaluate import recipe_logits

    single_view = config.override(tta_views=1)

    def score(images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return recipe_logits(model, images, single_view)

    return score


def load_scored(path: str | Path) -> Scored:
    """A run folder, a .safetensors checkpoint or an exported .onnx file, ready to score (a checkpoint the way
    its recipe evaluates, one view each, so the clean row is `digitrec evaluate --tta-views 1`'s accuracy)."""
    from .checkpoint import load_model, model_file, recorded_temperature
    from .data import as_input

    path = model_file(path)
    scorer: Scorer
    if is_onnx(path):
        backend = OnnxBackend(path)

        def score_onnx(images: torch.Tensor) -> torch.Tensor:
            # in batches, as the torch path scores: all 60,000 training images at once (`explore`) took ~10 GB
            return torch.cat(
                [
                    torch.from_numpy(backend(as_input(images[start : start + ONNX_BATCH]).numpy()))
                    for start in range(0, len(images), ONNX_BATCH)
                ]
            )

        meta, scorer = backend.meta, score_onnx
    else:
        model, meta = load_model(path)
        scorer = torch_scorer(model, TrainConfig.from_checkpoint(meta, path))
    # resolved: `digitrec robustness .` in a run folder (or `model.onnx` there) was named "" in table and legend
    name = path.resolve().parent.name if path.stem == "model" else path.stem
    return Scored(name, str(path), scorer, recorded_temperature(meta, path))


def load_all(paths: Sequence[str | Path]) -> list[Scored]:
    """load_scored for each path; models whose names would clash (runs/fast and other/fast are both `fast`)
    are named by their paths as given, so the table, the plot and the JSON tell them apart."""
    models = [load_scored(path) for path in paths]
    names = [m.name for m in models]
    for model, path in zip(models, paths):
        if names.count(model.name) > 1:
            model.name = str(path)
    return models


def coverage_curve(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> list[dict[str, float]]:
    """Accuracy on the answers kept when the least confident ones are rejected, from keeping all down to 2%.

    Each row gives the coverage (share of images answered), the accuracy on those and the confidence
    threshold that keeps them: the numbers to choose a Predictor's `reject_below` from.
    """
    confidence, predicted = F.softmax(logits.float() / temperature, dim=1).max(1)
    order = confidence.argsort(descending=True)
    correct = (predicted == labels.long())[order].float().cumsum(0)
    n = len(order)
    rows = []
    for coverage in sorted(
        {*COVERAGES, *(i / CURVE_POINTS for i in range(1, CURVE_POINTS + 1))}, reverse=True
    ):
        # rounded down (the float's error aside), so a row keeps no more than its coverage: on 50 images
        # round() kept all 50 for 99%, and the table's 99% row was 100%
        kept = max(1, math.floor(coverage * n + 1e-9))
        rows.append(
            {
                "coverage": kept / n,
                "accuracy": (correct[kept - 1] / kept).item(),
                "threshold": confidence[order[kept - 1]].item(),
            }
        )
    return rows


def evaluate_robustness(
    models: Sequence[Scored],
    images: torch.Tensor,
    labels: torch.Tensor,
    perturbations: Sequence[Perturbation] = PERTURBATIONS,
    log: Callable[[str], None] = lambda msg: None,
) -> dict[str, Any]:
    """Accuracy of every model under every perturbation and strength, plus each model's accuracy-vs-coverage curve.

    Each perturbed set is made once and scored by all models, so the models see identical images.
    """
    if not models:
        raise DigitrecError("robustness needs at least one model; pass a run folder or a model file.")
    from .evaluate import fraction_correct

    labels = labels.long()

    def accuracy(logits: torch.Tensor) -> float:
        return fraction_correct(logits.argmax(1), labels)

    clean_logits = [m.scorer(images) for m in models]
    results: list[dict[str, Any]] = [
        {
            "name": m.name,
            "path": m.path,
            "clean_accuracy": accuracy(logits),
            "perturbations": {},
            "coverage": coverage_curve(logits, labels, m.temperature),
        }
        for m, logits in zip(models, clean_logits, strict=True)
    ]
    for p in perturbations:
        for result in results:
            result["perturbations"][p.name] = []
        for strength in p.strengths:
            perturbed = perturb(images, p, strength)
            for m, result in zip(models, results, strict=True):
                result["perturbations"][p.name].append(
                    {"strength": strength, "accuracy": accuracy(m.scorer(perturbed))}
                )
        log(
            f"{p.name:<12} "
            + "  ".join(
                f"{r['name']}: " + " ".join(f"{row['accuracy']:.1%}" for row in r["perturbations"][p.name])
                for r in results
            )
        )
    return {
        "images": len(images),
        "perturbations": [
            {"name": p.name, "label": p.label, "strengths": list(p.strengths), "clean": p.clean}
            for p in perturbations
        ],
        "models": results,
    }


def summary(result: dict[str, Any]) -> dict[str, float]:
    """One number per perturbation for one model's result: the mean accuracy over its strengths (the model card's table)."""
    return {
        name: sum(row["accuracy"] for row in rows) / len(rows)
        for name, rows in result["perturbations"].items()
    }


def coverage_at(result: dict[str, Any], coverage: float) -> dict[str, float]:
    """The coverage-curve row closest to `coverage` that keeps no more than it (on few images the rows lie
    apart, and a tie went to the row above: the 99% row of 50 images was all of them)."""
    rows = [row for row in result["coverage"] if row["coverage"] <= coverage + 1e-9] or result["coverage"]
    return min(rows, key=lambda row: abs(row["coverage"] - coverage))


def plot(report: dict[str, Any], path: str | Path) -> Path:
    """One panel per perturbation (accuracy vs strength, the clean point included) and one of accuracy vs coverage; a line per model."""
    from .plots import plt, save_figure

    panels = len(report["perturbations"]) + 1
    columns = 3
    rows = math.ceil(panels / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    for ax in axes.flat[panels:]:
        ax.axis("off")
    for ax, p in zip(axes.flat, report["perturbations"], strict=False):  # spare panels stay blank
        for model in report["models"]:
            points = sorted(
                [(p["clean"], model["clean_accuracy"])]
                + [(row["strength"], row["accuracy"]) for row in model["perturbations"][p["name"]]]
            )
            ax.plot([s for s, _ in points], [100 * a for _, a in points], marker="o", label=_label(model))
        ax.set(title=p["name"], xlabel=p["label"], ylabel="accuracy (%)", ylim=(0, 101))
        ax.axvline(p["clean"], color="gray", lw=0.8, ls=":")
        ax.grid(alpha=0.3)
    ax = axes.flat[panels - 1]
    for model in report["models"]:
        curve = model["coverage"]
        ax.plot(
            [100 * row["coverage"] for row in curve],
            [100 * row["accuracy"] for row in curve],
            label=_label(model),
        )
    ax.set(
        title="rejecting low-confidence answers",
        xlabel="coverage: answered (%)",
        ylabel="accuracy on answered (%)",
    )
    ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(f"Accuracy under perturbation ({report['images']:,} MNIST test images)")
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.07, top=0.92, hspace=0.45, wspace=0.25)
    return save_figure(fig, Path(path))


def _label(model: dict[str, Any]) -> str:
    """A model's name as a legend entry: matplotlib leaves out every label that starts with "_" (a run folder
    named _baseline had a line and no entry)."""
    return " " + model["name"] if model["name"].startswith("_") else model["name"]


def table(report: dict[str, Any]) -> str:
    """Plain-text tables: accuracy per perturbation and strength (a column per model), then accuracy vs coverage."""
    names = [m["name"] for m in report["models"]]
    width = max(10, *(len(n) for n in names))
    lines = [
        f"accuracy on {report['images']:,} MNIST test images, one view each",
        f"{'perturbation':<14}{'strength':>9}  " + "  ".join(f"{n:>{width}}" for n in names),
    ]
    lines.append(
        f"{'none':<14}{'':>9}  " + "  ".join(f"{m['clean_accuracy']:>{width}.2%}" for m in report["models"])
    )
    for p in report["perturbations"]:
        for i, strength in enumerate(p["strengths"]):
            cells = "  ".join(
                f"{m['perturbations'][p['name']][i]['accuracy']:>{width}.2%}" for m in report["models"]
            )
            lines.append(f"{p['name'] if i == 0 else '':<14}{strength:>9g}  {cells}")
    lines += ["", f"{'coverage':<14}{'':>9}  " + "  ".join(f"{n:>{width}}" for n in names)]
    for coverage in COVERAGES:
        rows = [coverage_at(m, coverage) for m in report["models"]]
        cells = "  ".join(f"{row['accuracy']:>{width}.2%}" for row in rows)
        # the share of images a row keeps, where few images leave no row at exactly the coverage asked for
        kept = rows[0]["coverage"] if rows else coverage
        decimals = 0 if abs(kept - coverage) < 1e-9 else 1
        lines.append(f"{kept:<14.{decimals}%}{'':>9}  {cells}")
    return "\n".join(lines)


def write(report: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """robustness.json and robustness.png in out_dir."""
    from .checkpoint import atomic_write_json

    out_dir = Path(out_dir)
    atomic_write_json(out_dir / "robustness.json", report)
    return {"json": out_dir / "robustness.json", "plot": plot(report, out_dir / "robustness.png")}


def for_report(
    model: torch.nn.Module, data: Any, images: int, config: TrainConfig, temperature: float = 1.0
) -> dict[str, Any]:
    """The run report's robustness section: every perturbation on the first `images` test images (a few seconds),
    scored the way `config`'s recipe evaluates, one view each, at the model's calibrated `temperature` (the
    confidences, and so which answers the coverage curves reject first, are the Predictor's)."""
    scored = Scored("this model", "", torch_scorer(model, config), temperature)
    return evaluate_robustness([scored], data.test_images[:images], data.test_labels[:images])
