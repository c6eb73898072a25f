"""One end-to-end run on real MNIST: the `fast` recipe must reach 98% test accuracy (it reaches ~99% in seconds)."""

from __future__ import annotations

import json

import pytest

from digitrec.cli import main
from digitrec.data import load_mnist
from digitrec.errors import DataError


@pytest.fixture(scope="module")
def real_mnist():
    try:
        return load_mnist(download=False)
    except DataError:
        pytest.skip("real MNIST is not on this machine (run `digitrec data` first)")


def test_fast_recipe_on_real_mnist(real_mnist, tmp_path, capsys):
    out = tmp_path / "fast"
    assert main(["train", "--recipe", "fast", "--out", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_accuracy"] >= 0.98, metrics
    assert (out / "report.html").exists()
