"""Scoring a model (logits, loss, accuracy), test-set metrics and report.html.

predict_logits, recipe_logits, evaluate, fraction_correct and loss_and_accuracy score a model as training's
validation and test do; compute_metrics adds per-class precision/recall/F1, confusion, calibration, mistakes.
"""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import tta
from .calibrate import expected_calibration_error
from .checkpoint import atomic_write_json, atomic_write_text, recorded_temperature
from .config import TrainConfig
from .data import MNIST, as_input
from .models import log_mean_probabilities
from .precision import autocast


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: torch.Tensor,
    batch_size: int = 1000,
    amp: bool = False,
    channels_last: bool = False,
    tta_views: int = 1,
) -> torch.Tensor:
    """Logits (float32) for uint8 images (N, 28, 28), in batches, with the model in eval mode.

    With `channels_last` the model's kernels go channels-last too (a checkpoint loads them contiguous, and a
    contiguous kernel makes the convolutions and max-pools of a channels-last batch 2-10x slower in bfloat16).
    With `tta_views` > 1 each image is scored in that many 1-pixel shifts (tta.py) and the result is the log of
    their mean probability.
    """
    model.eval()
    if channels_last and any(
        p.dim() == 4 and not p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters()
    ):
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # stub lacks memory_format
    device = next(model.parameters()).device
    outputs = []
    for start in range(0, len(images), batch_size):
        x = as_input(images[start : start + batch_size].to(device))
        if tta_views > 1:
            padded = F.pad(x, (1, 1, 1, 1))
            x = torch.cat([padded[..., rows, cols] for rows, cols in tta.windows(tta_views)])
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            logits = model(x).float()
        if tta_views > 1:  # the log of the mean probability over the views
            logits = log_mean_probabilities(
                logits.log_softmax(1).view(tta_views, -1, logits.shape[1]).unbind()
            )
        outputs.append(logits)
    return torch.cat(outputs) if outputs else torch.zeros(0, 10)


def recipe_logits(model: nn.Module, images: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """predict_logits the way `config`'s recipe evaluates: its batch size, bfloat16, layout and test-time views."""
    return predict_logits(
        model, images, config.eval_batch_size, config.amp, config.channels_last, config.tta_views
    )


def evaluate(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, config: TrainConfig
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of `model` on a labelled set."""
    return loss_and_accuracy(recipe_logits(model, images, config), labels)


def fraction_correct(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    """The fraction of predicted classes equal to their labels, exactly (9915 / 10000 is 0.9915; a float32
    mean gave 0.9915000200271606 to metrics.json)."""
    return (predicted == labels.to(predicted.device)).sum().item() / max(len(labels), 1)


def loss_and_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of logits against their labels."""
    labels = labels.to(logits.device).long()
    loss = F.cross_entropy(logits, labels).item()
    return loss, fraction_correct(logits.argmax(1), labels)


def accuracy_as_reported(correct: torch.Tensor, metric: str = "accuracy") -> float:
    """Test accuracy the way a source computes it: "accuracy" is correct / total; "batch_mean:N" averages the
    accuracies of consecutive batches of N, so a short last batch weighs as much as a full one.

    >>> correct = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0])
    >>> accuracy_as_reported(correct), accuracy_as_reported(correct, "batch_mean:4")
    (0.6, 0.75)
    """
    correct = correct.double()  # float32 gave 0.6000000238418579 for the 0.6 above
    if metric == "accuracy":
        return correct.mean().item()
    batch = int(metric.removeprefix("batch_mean:"))
    return torch.stack([part.mean() for part in correct.split(batch)]).mean().item()


def compute_metrics(
    logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0, mistakes: int = 36
) -> dict[str, Any]:
    """Everything the report shows, from logits (N, 10) and labels (N,)."""
    labels = labels.long().cpu()
    logits = logits.float().cpu()
    probabilities = F.softmax(logits / temperature, dim=1)
    predicted = probabilities.argmax(1)
    confusion = torch.bincount(labels * 10 + predicted, minlength=100).reshape(10, 10)
    true_positive = confusion.diag().float()
    precision = true_positive / confusion.sum(0).clamp(min=1)
    recall = true_positive / confusion.sum(1).clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    wrong = (predicted != labels).nonzero().flatten()
    confidence = probabilities.max(1).values
    worst = wrong[confidence[wrong].argsort(descending=True)][:mistakes]
    return {
        "test_accuracy": fraction_correct(predicted, labels),
        "test_loss": F.cross_entropy(logits / temperature, labels).item(),
        "errors": len(wrong),
        "count": len(labels),
        "ece": expected_calibration_error(probabilities.numpy(), labels.numpy()),
        "temperature": temperature,
        "per_class": [
            {
                "digit": d,
                "precision": precision[d].item(),
                "recall": recall[d].item(),
                "f1": f1[d].item(),
                "support": int(confusion[d].sum()),
            }
            for d in range(10)
        ],
        "confusion": confusion.tolist(),
        "mistakes": [
            {
                "index": int(i),
                "label": int(labels[i]),
                "predicted": int(predicted[i]),
                "confidence": confidence[i].item(),
            }
            for i in worst
        ],
    }


def evaluate_model(
    model: nn.Module, data: MNIST, config: TrainConfig, temperature: float = 1.0
) -> tuple[dict[str, Any], torch.Tensor]:
    """(metrics, logits) of `model` on the MNIST test set, scored as `config`'s recipe evaluates."""
    logits = recipe_logits(model, data.test_images, config)
    return compute_metrics(logits, data.test_labels, temperature), logits


def evaluate_ensemble(paths: list[str | Path], data: MNIST) -> dict[str, Any]:
    """Test metrics of several checkpoints voting together: the mean of their calibrated probabilities.

    Each member is evaluated the way its own recipe evaluates (batch size, bfloat16, layout) and softened by
    its own temperature; the result holds the ensemble's metrics and each member's test accuracy.
    """
    from .checkpoint import load_model

    members, votes = [], []
    for path in paths:
        model, meta = load_model(path)
        logits = recipe_logits(model, data.test_images, TrainConfig.from_checkpoint(meta, path)).float().cpu()
        votes.append(F.log_softmax(logits / recorded_temperature(meta, path), dim=1))
        members.append(
            {"path": str(path), "test_accuracy": fraction_correct(logits.argmax(1), data.test_labels)}
        )
    metrics = compute_metrics(log_mean_probabilities(votes), data.test_labels)
    return metrics | {"members": members}


def _same_folder(a: Path, b: Path) -> bool:
    return a.is_dir() and b.is_dir() and os.path.samefile(a, b)


def write_report(
    out_dir: str | Path,
    model: nn.Module,
    data: MNIST,
    *,
    config: TrainConfig,
    history: list[dict[str, float]] | None = None,
    title: str | None = None,
    meta: dict[str, Any] | None = None,
    logits: torch.Tensor | None = None,
    checkpoint: str | Path | None = None,
    trained_config: TrainConfig | None = None,
    robustness_images: int | None = None,
) -> dict[str, Any]:
    """Write evaluation.json, the PNG figures, MODEL_CARD.md and one self-contained report.html into out_dir.

    `config` says how the model is scored (batch size, bfloat16, test-time views) and the curves' label smoothing.
    `meta` is the checkpoint's metadata for the model card; by default out_dir/model.json (a run's own), if any.
    `checkpoint` is the file evaluated, whose size the card gives (default: out_dir/model.safetensors, a run's own).
    `logits` are the model's test-set logits when the caller has them already (training has just evaluated).
    `trained_config` is the config the model was trained with, for the card, where `config` (how it is evaluated
    here) differs from it: `evaluate --tta-views` changes how a run is scored, not how it was trained.
    `robustness_images`: how many test images the robustness section scores (default robustness.REPORT_IMAGES;
    a dry run's report scores fewer, a quick check).
    """
    from . import modelcard, plots, robustness

    out_dir = Path(out_dir)
    if meta is None and (out_dir / "model.json").exists():
        meta = json.loads((out_dir / "model.json").read_text())
    # a calibrated checkpoint reports its calibration error at its own temperature
    temperature = recorded_temperature(meta or {}, checkpoint or out_dir)
    if logits is None:
        metrics, logits = evaluate_model(model, data, config, temperature)
    else:
        metrics = compute_metrics(logits, data.test_labels, temperature)
    predicted = logits.argmax(1)
    atomic_write_json(out_dir / "evaluation.json", metrics)
    figures = {}
    if history:
        figures["Training curves"] = plots.curves(history, out_dir / "curves.png", config.label_smoothing)
    elif (out_dir / "curves.png").is_file() and not (
        checkpoint and _same_folder(Path(checkpoint).parent, out_dir)
    ):
        (out_dir / "curves.png").unlink()  # another model's curves, left by an earlier report in the folder
    figures["Test samples (truth / prediction)"] = plots.samples(
        data.test_images, data.test_labels, predicted, out_dir / "samples.png"
    )
    figures["Confusion matrix"] = plots.confusion(metrics["confusion"], out_dir / "confusion.png")
    figures["Most confident mistakes (truth → prediction, confidence)"] = plots.mistakes(
        data.test_images, metrics["mistakes"], out_dir / "mistakes.png"
    )
    # one view each, whatever views the headline figures average (the card says so)
    robust = robustness.for_report(
        model, data, robustness_images or robustness.REPORT_IMAGES, config, temperature
    )
    figures["Robustness and accuracy vs coverage"] = robustness.plot(robust, out_dir / "robustness.png")
    scored = metrics
    # the card says how it was scored
    if trained_config and trained_config.tta_views != config.tta_views:
        scored = {**metrics, "scored_tta_views": config.tta_views}
    card = modelcard.write_model_card(
        out_dir, model, scored, meta, trained_config or config, data, robust, checkpoint
    )
    report = out_dir / "report.html"
    atomic_write_text(
        report,
        render_html(
            title or f"digitrec run {out_dir.name}",
            metrics,
            figures,
            config,
            history,
            modelcard.to_html(card),
        ),
    )
    return metrics


def image_tag(path: Path) -> str:
    """An <img> tag holding the PNG at `path` inline (base64), so an HTML report is one self-contained file."""
    encoded = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{encoded}">'


def render_html(
    title: str,
    metrics: dict[str, Any],
    figures: dict[str, Path],
    config: TrainConfig | None,
    history: list[dict[str, float]] | None,
    model_card_html: str = "",
) -> str:
    rows = "".join(
        f"<tr><td>{c['digit']}</td><td>{c['precision']:.4f}</td><td>{c['recall']:.4f}</td><td>{c['f1']:.4f}</td><td>{c['support']}</td></tr>"
        for c in metrics["per_class"]
    )
    history_rows = "".join(
        "<tr>"
        + "".join(
            f"<td>{_percent(row.get(k)) if k.endswith('accuracy') else _fmt(row.get(k))}</td>"
            for k in ("epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "seconds")
        )
        + "</tr>"
        for row in history or []
    )
    sections = "".join(f"<h2>{html.escape(name)}</h2>{image_tag(path)}" for name, path in figures.items())
    config_json = html.escape(json.dumps(config.to_dict(), indent=2)) if config else ""
    # the optimizer's loss: with label smoothing it stays well above the validation set's plain cross-entropy
    smoothed = f" (label smoothing {config.label_smoothing:g})" if config and config.label_smoothing else ""
    temperature = metrics.get("temperature", 1.0)
    at_temperature = f" (at the calibrated temperature {temperature:.3g})" if temperature != 1.0 else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}
img{{max-width:100%;border:1px solid #eee}}.big{{font-size:2em;font-weight:600}}pre{{background:#f6f6f6;padding:1em;overflow:auto}}</style>
</head><body>
<h1>{html.escape(title)}</h1>
<p class="big">Test accuracy {metrics["test_accuracy"]:.2%}</p>
<p>{metrics["errors"]} errors on {metrics["count"]} test images; test loss {metrics["test_loss"]:.4f}{at_temperature};
expected calibration error {metrics["ece"]:.4f}.</p>
<h2>Per class</h2>
<table><tr><th>digit</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr>{rows}</table>
{("<h2>History</h2><table><tr><th>epoch</th><th>train loss" + smoothed + "</th><th>train acc</th><th>val loss</th><th>val acc</th><th>lr</th><th>seconds so far</th></tr>" + history_rows + "</table>") if history_rows else ""}
{sections}
{model_card_html}
{("<h2>Configuration</h2><pre>" + config_json + "</pre>") if config_json else ""}
</body></html>
"""


def _percent(value: Any) -> str:
    """An accuracy cell as the rest of the report gives accuracies: 96.58%."""
    return "" if value is None else f"{100 * value:.2f}%"


def _fmt(value: Any) -> str:
    """A history cell: 4 significant digits, blank where the epoch has none (tune._fmt: settings, 3 digits)."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
