"""Matplotlib figures for a run: training curves, test samples, confusion matrix, confident mistakes."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .checkpoint import atomic_write_bytes  # noqa: E402


def save_figure(fig, path: Path) -> Path:
    """PNG bytes written atomically. Every figure sets its own margins: `bbox_inches="tight"` or tight_layout()
    would draw it twice, which doubles the report's drawing time. zlib's fastest level saves about a tenth of
    the drawing time (encoding is part of it), for files about 10% larger."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, pil_kwargs={"compress_level": 1})
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def curves(history: list[dict[str, float]], path: Path, label_smoothing: float = 0.0) -> Path:
    """Loss and accuracy per epoch, train and validation side by side. With label smoothing the train loss is
    the smoothed one the optimizer sees, which stays well above the validation set's plain cross-entropy."""
    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    smoothed = f" (label smoothing {label_smoothing:g})" if label_smoothing else ""
    for key, label in (("train", "train"), ("val", "validation")):
        if f"{key}_loss" in history[0]:
            ax_loss.plot(
                epochs,
                [row[f"{key}_loss"] for row in history],
                marker="o",
                label=label + smoothed if key == "train" else label,
            )
            ax_acc.plot(epochs, [100 * row[f"{key}_accuracy"] for row in history], marker="o", label=label)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.92, wspace=0.22)
    ax_loss.set(title="Loss", xlabel="epoch", ylabel="cross-entropy")
    ax_acc.set(title="Accuracy", xlabel="epoch", ylabel="accuracy (%)")
    if ax_acc.get_ylim()[1] > 100:  # matplotlib's margin ran the axis past what an accuracy can be
        ax_acc.set_ylim(top=100)
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    return save_figure(fig, path)


def image_grid(
    images: list[torch.Tensor], titles: list[str], colors: list[str], path: Path, columns: int = 12
) -> Path:
    """Images in one mosaic drawn by a single imshow (one axes per image costs about a second per figure)."""
    rows = max(1, (len(images) + columns - 1) // columns)
    cell_w, cell_h = 32, 42  # 28x28 image plus a margin and room for the title above it
    mosaic = torch.zeros(rows * cell_h, columns * cell_w)
    for k, image in enumerate(images):
        top, left = (k // columns) * cell_h + cell_h - 30, (k % columns) * cell_w + 2
        mosaic[top : top + 28, left : left + 28] = image.float()
    fig, ax = plt.subplots(figsize=(columns * 1.1, rows * 1.45))
    ax.imshow(mosaic.numpy(), cmap="gray_r", vmin=0, vmax=255, interpolation="nearest")
    ax.axis("off")
    for k, (title, color) in enumerate(zip(titles, colors)):
        x, y = (k % columns) * cell_w + cell_w / 2, (k // columns) * cell_h + 7
        ax.text(x, y, title, ha="center", va="center", fontsize=8, color=color)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.99)
    return save_figure(fig, path)


def samples(
    images: torch.Tensor, labels: torch.Tensor, predicted: torch.Tensor, path: Path, count: int = 36
) -> Path:
    """The first `count` test images with truth / prediction; wrong ones in red."""
    titles = [f"{int(labels[i])} / {int(predicted[i])}" for i in range(count)]
    colors = ["black" if labels[i] == predicted[i] else "red" for i in range(count)]
    return image_grid([images[i] for i in range(count)], titles, colors, path)


def mistakes(images: torch.Tensor, mistakes: list[dict[str, Any]], path: Path) -> Path:
    """The most confident mistakes: 'truth -> prediction (confidence)'."""
    if not mistakes:
        fig = plt.figure(figsize=(4, 1))
        fig.text(0.5, 0.5, "no mistakes", ha="center")
        return save_figure(fig, path)
    # rounded down, and at most 99.9%: a mistake made at 0.9996 (or at a float32 softmax's 1.0) never reads "100%"
    titles = [
        f"{m['label']}→{m['predicted']} {min(99.9, math.floor(m['confidence'] * 1000) / 10):.1f}%"
        for m in mistakes
    ]
    return image_grid([images[m["index"]] for m in mistakes], titles, ["red"] * len(mistakes), path)


def confusion(matrix: list[list[int]], path: Path) -> Path:
    """Confusion matrix with counts; the diagonal is hidden from the colour scale so errors stand out."""
    counts = torch.tensor(matrix)
    off_diagonal = counts.clone().fill_diagonal_(0)
    fig, ax = plt.subplots(figsize=(6, 5.4))
    image = ax.imshow(off_diagonal.numpy(), cmap="Reds")
    # the commonest errors' cells are dark red: their counts in white
    dark = 0.6 * max(1, int(off_diagonal.max()))
    for i in range(10):
        for j in range(10):
            ax.text(
                j,
                i,
                str(int(counts[i, j])),
                ha="center",
                va="center",
                fontsize=7,
                color="#1f5fa8" if i == j else "white" if off_diagonal[i, j] >= dark else "black",
            )
    ax.set(
        xticks=range(10),
        yticks=range(10),
        xlabel="predicted",
        ylabel="true",
        title="Confusion matrix (test set)",
    )
    bar = fig.colorbar(image, ax=ax, fraction=0.046, label="errors")
    bar.locator = MaxNLocator(integer=True)  # counts: no 0.5 or 1.5 ticks
    bar.update_ticks()
    fig.subplots_adjust(left=0.1, right=0.9, bottom=0.1, top=0.93)
    return save_figure(fig, path)
