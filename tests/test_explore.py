"""Dataset explorer: figures and a page, and the ambiguous images it finds are the ones a person would check."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from digitrec.cli import main
from digitrec.explore import explore

pytest.importorskip("sklearn")


def test_explore_finds_mislabelled_images(tiny_mnist, tiny_fast_run, tmp_path):
    model_dir = tiny_fast_run
    # five training images given a wrong label after the model learned from the right ones
    flipped = [3, 50, 400, 777, 1100]
    labels = tiny_mnist.train_labels.clone()
    labels[flipped] = (labels[flipped] + 1) % 10
    noisy = dataclasses.replace(tiny_mnist, train_labels=labels)
    summary = explore(
        noisy, tmp_path / "explore", models=[model_dir], samples=200, embedding="tsne", log=lambda msg: None
    )
    top = [row["index"] for row in summary["ambiguous"]["images"][:10]]
    assert set(flipped) <= set(top)
    assert summary["train_counts"] == torch.bincount(labels.long(), minlength=10).tolist()
    assert {
        "class_balance.png",
        "mean_images.png",
        "embedding.png",
        "ambiguous.png",
        "explore.html",
        "explore.json",
    } <= set(summary["files"])
    page = (tmp_path / "explore" / "explore.html").read_text()
    assert page.count("<img") == 4 and "t-SNE" in page


def test_cli_without_models_still_draws_the_data(idx_folder, tmp_path, capsys):
    out = tmp_path / "explore"
    assert main(["explore", "--samples", "100", "--out", str(out), "--data-dir", str(idx_folder)]) == 0
    assert "explore.html" in capsys.readouterr().out
    saved = json.loads((out / "explore.json").read_text())
    assert sum(saved["train_counts"]) == 1200 and "ambiguous" not in saved
