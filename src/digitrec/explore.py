"""Dataset explorer: class balance, mean image per class, a 2-D embedding and the most ambiguous training images.

Writes PNGs, explore.json and one self-contained explore.html. Ambiguity comes from trained models: an image
is ambiguous when the models disagree with its label or with each other, and least ambiguous when all of
them give its label a high probability.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import atomic_write_json, atomic_write_text
from .data import MNIST, as_input
from .errors import DigitrecError, need_extra
from .plots import image_grid, plt, save_figure

if TYPE_CHECKING:
    from .robustness import Scored

EMBEDDINGS = ("auto", "tsne", "umap")


def class_balance(data: MNIST, path: Path) -> Path:
    """Bars of each digit's share of the training and of the test images, against an even 10%."""
    train = torch.bincount(data.train_labels.long(), minlength=10).numpy()
    test = torch.bincount(data.test_labels.long(), minlength=10).numpy()
    fig, ax = plt.subplots(figsize=(8, 3.5), layout="constrained")
    digits = np.arange(10)
    ax.bar(digits - 0.2, 100 * train / train.sum(), width=0.4, label=f"train ({train.sum():,})")
    ax.bar(digits + 0.2, 100 * test / test.sum(), width=0.4, label=f"test ({test.sum():,})")
    ax.axhline(10, color="gray", lw=0.8, ls=":")
    ax.set(xticks=digits, xlabel="digit", ylabel="share of images (%)", title="Class balance")
    ax.legend()
    return save_figure(fig, path)


def mean_images(data: MNIST, path: Path) -> Path:
    """The mean training image of each class, and its per-pixel standard deviation below it."""
    images, labels = data.train_images.float(), data.train_labels.long()
    fig, axes = plt.subplots(2, 10, figsize=(12, 2.8), layout="constrained")
    for digit in range(10):
        members = images[labels == digit]
        for row, (values, name) in enumerate(((members.mean(0), "mean"), (members.std(0), "std"))):
            ax = axes[row, digit]
            ax.imshow(values.numpy(), cmap="magma")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(f"{digit} ({len(members):,})", fontsize=9)
            if digit == 0:
                ax.set_ylabel(name)
    fig.suptitle("Mean and standard deviation of each class (training set)")
    return save_figure(fig, path)


def sample_indices(labels: torch.Tensor, count: int, seed: int = 0) -> torch.Tensor:
    """`count` indices into `labels` (all of them if fewer), drawn without repeats from `seed`, in ascending
    order."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    return order[: min(count, len(labels))].sort().values


def has_umap() -> bool:
    """umap-learn installed and importable (numba, which it needs, refuses a NumPy newer than it knows)."""
    try:
        import umap  # noqa: F401
    except ImportError:  # not installed too: ModuleNotFoundError is one
        return False
    return True


def require_embedding(method: str) -> None:
    """Refuse an unknown embedding, or umap where umap-learn is missing: before any figure is drawn, not after."""
    if method not in EMBEDDINGS:
        raise DigitrecError(f"unknown embedding {method!r}; choose one of {', '.join(EMBEDDINGS)}.")
    if method == "umap" and not has_umap():
        raise DigitrecError(
            "--embedding umap needs umap-learn, installed and importable, which no digitrec extra installs; "
            "`pip install umap-learn`, or use --embedding tsne."
        )


def embed(pixels: np.ndarray, method: str = "auto", seed: int = 0) -> tuple[np.ndarray, str]:
    """2-D coordinates of flattened images: PCA to 50 dimensions, then UMAP (if installed and asked) or t-SNE."""
    require_embedding(method)
    need_extra("explore", "digitrec explore")
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    reduced = PCA(n_components=min(50, *pixels.shape), random_state=seed).fit_transform(pixels)
    if method != "tsne" and has_umap():
        import umap  # optional: faster and keeps more global structure than t-SNE

        return umap.UMAP(random_state=seed).fit_transform(reduced), "UMAP"
    perplexity = min(30.0, (len(pixels) - 1) / 3)  # t-SNE needs perplexity < number of points
    return TSNE(perplexity=perplexity, init="pca", random_state=seed).fit_transform(reduced), "t-SNE"


def embedding_plot(coords: np.ndarray, labels: np.ndarray, method: str, path: Path) -> Path:
    """A scatter of the 2-D embedding, a color per digit, each digit's label drawn at the median of its points."""
    fig, ax = plt.subplots(figsize=(7.5, 7), layout="constrained")
    colors = plt.get_cmap("tab10")
    for digit in range(10):
        points = coords[labels == digit]
        if len(points):
            ax.scatter(points[:, 0], points[:, 1], s=4, color=colors(digit), alpha=0.6, label=str(digit))
            center = np.median(points, axis=0)
            ax.text(
                float(center[0]),
                float(center[1]),
                str(digit),
                fontsize=16,
                weight="bold",
                ha="center",
                va="center",
                bbox=dict(boxstyle="circle", fc="white", alpha=0.8, ec=colors(digit)),
            )
    ax.set(title=f"{method} of {len(coords):,} training images (PCA-50 of the pixels)", xticks=[], yticks=[])
    ax.legend(markerscale=4, fontsize=8, ncol=2, loc="best")
    return save_figure(fig, path)


def ambiguity(probabilities: list[torch.Tensor], labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per image: how many distinct answers the models and the label give, and the models' mean probability of the label.

    Sorting by the first (descending) then the second (ascending) puts first the images that the models
    argue about or all read as another digit: mislabelled, badly written or truly ambiguous ones.
    """
    labels = labels.long()
    predicted = torch.stack([p.argmax(1) for p in probabilities], dim=1)  # (N, models)
    answers = torch.cat([predicted, labels[:, None]], dim=1)
    distinct = torch.tensor([len(set(row)) for row in answers.tolist()])
    label_probability = torch.stack([p.gather(1, labels[:, None])[:, 0] for p in probabilities]).mean(0)
    return {"distinct": distinct, "label_probability": label_probability, "predicted": predicted}


def most_ambiguous(
    probabilities: list[torch.Tensor], labels: torch.Tensor, count: int = 36
) -> list[dict[str, Any]]:
    """The `count` images ambiguity() ranks first (most distinct answers, then least probable label): index,
    label, each model's answer and the label's mean probability."""
    scores = ambiguity(probabilities, labels)
    # one sort key: distinct answers dominate, the label's probability (in [0, 1]) breaks ties
    key = scores["distinct"].double() * 2 - scores["label_probability"].double()
    order = key.argsort(descending=True)[:count]
    return [
        {
            "index": int(i),
            "label": int(labels[i]),
            "predicted": scores["predicted"][i].tolist(),
            "label_probability": float(scores["label_probability"][i]),
        }
        for i in order
    ]


def ambiguous_plot(images: torch.Tensor, rows: list[dict[str, Any]], path: Path) -> Path:
    """most_ambiguous's images in a grid, each titled #index label→each model's answer."""
    titles = [f"#{r['index']} {r['label']}→{','.join(map(str, r['predicted']))}" for r in rows]
    return image_grid([images[r["index"]] for r in rows], titles, ["red"] * len(rows), path, columns=9)


def explore(
    data: MNIST,
    out_dir: str | Path,
    models: Sequence[str | Path | Scored] = (),
    samples: int = 2000,
    embedding: str = "auto",
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Write every figure, explore.json and explore.html into out_dir; returns the summary written to explore.json."""
    from .evaluate import image_tag
    from .robustness import Scored, load_all

    require_embedding(embedding)
    # first: a model that does not load stops the command before the embedding (loaded ones are taken as they are)
    paths = [m for m in models if not isinstance(m, Scored)]
    scored = [m for m in models if isinstance(m, Scored)] + load_all(paths)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = {
        "Class balance": class_balance(data, out_dir / "class_balance.png"),
        "Mean image per class": mean_images(data, out_dir / "mean_images.png"),
    }
    chosen = sample_indices(data.train_labels, samples, seed)
    pixels = as_input(data.train_images[chosen]).reshape(len(chosen), -1).numpy()
    log(f"embedding {len(chosen):,} training images in 2-D")
    coords, method = embed(pixels, embedding, seed)
    figures[f"{method} embedding"] = embedding_plot(
        coords, data.train_labels[chosen].numpy(), method, out_dir / "embedding.png"
    )
    summary: dict[str, Any] = {
        "train_counts": torch.bincount(data.train_labels.long(), minlength=10).tolist(),
        "test_counts": torch.bincount(data.test_labels.long(), minlength=10).tolist(),
        "embedding": {"method": method, "images": len(chosen)},
        "data_checksum": data.checksum,
    }
    if scored:
        probabilities = []
        for m in scored:
            log(f"scoring {len(data.train_images):,} training images with {m.name}")
            probabilities.append(F.softmax(m.scorer(data.train_images).float() / m.temperature, dim=1))
        rows = most_ambiguous(probabilities, data.train_labels)
        title = f"Most ambiguous training images (label→{', '.join(m.name for m in scored)})"
        figures[title] = ambiguous_plot(data.train_images, rows, out_dir / "ambiguous.png")
        summary["ambiguous"] = {"models": [m.path for m in scored], "images": rows}
    else:
        log("no --model given: skipping the most ambiguous images (they need at least one trained model)")
        # an earlier run's figure, of other models, would be listed as written by this one; the earlier run's
        # explore.json says it made one (an ambiguous.png of the user's own is left alone)
        try:
            earlier = json.loads((out_dir / "explore.json").read_text())
        except (OSError, ValueError):
            earlier = None
        if isinstance(earlier, dict) and "ambiguous" in earlier:
            (out_dir / "ambiguous.png").unlink(missing_ok=True)
    atomic_write_json(out_dir / "explore.json", summary)
    counts = "".join(
        f"<tr><td>{d}</td><td>{summary['train_counts'][d]:,}</td><td>{summary['test_counts'][d]:,}</td></tr>"
        for d in range(10)
    )
    sections = "".join(f"<h2>{html.escape(name)}</h2>{image_tag(path)}" for name, path in figures.items())
    atomic_write_text(
        out_dir / "explore.html",
        f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>digitrec explore</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}img{{max-width:100%}}</style>
</head><body><h1>MNIST explorer</h1>
<p>Data checksum <code>{html.escape(data.checksum)}</code>, from {html.escape(data.source)}.</p>
<table><tr><th>digit</th><th>train</th><th>test</th></tr>{counts}</table>
{sections}
</body></html>
""",
    )
    # what this command wrote (--out may hold other commands' files: robustness.png was listed as written)
    summary["files"] = sorted(
        {Path(path).name for path in figures.values()} | {"explore.json", "explore.html"}
    )
    return summary
