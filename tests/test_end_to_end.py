"""One end-to-end run on real MNIST: the `fast` recipe must reach 98% test accuracy (it reaches ~99% in seconds)."""

from __future__ import annotations

import json

from digitrec.cli import main


def test_fast_recipe_on_real_mnist(real_mnist, tmp_path, capsys):
    """real_mnist (conftest) finds MNIST where `digitrec data` put it too, and says where to train from."""
    out = tmp_path / "fast"
    assert main(["train", "--recipe", "fast", "--out", str(out), "--no-progress", *real_mnist.data_args]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_accuracy"] >= 0.98, metrics
    assert (out / "report.html").exists()
