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


def test_cli_without_models_removes_an_earlier_ambiguous_figure(idx_folder, tmp_path, capsys, monkeypatch):
    """It said it skipped the ambiguous images, then listed an earlier run's ambiguous.png among what it wrote."""
    from digitrec import explore as explore_module

    monkeypatch.setattr(explore_module, "embed", lambda pixels, method, seed: (pixels[:, :2], "t-SNE"))
    out = tmp_path / "explore"
    out.mkdir()
    # a picture of the user's own by that name: no explore.json says an earlier run made it, so it stays
    (out / "ambiguous.png").write_bytes(b"my own picture")
    explore = ["explore", "--samples", "100", "--out", str(out), "--data-dir", str(idx_folder)]
    assert main(explore) == 0
    assert (out / "ambiguous.png").read_bytes() == b"my own picture"
    capsys.readouterr()
    (out / "ambiguous.png").write_bytes(b"another model's figure")
    (out / "explore.json").write_text(
        '{"ambiguous": {"models": ["m"], "images": []}}'
    )  # as a run with --model
    (out / "robustness.png").write_bytes(b"another command's figure")
    assert main(explore) == 0
    captured = capsys.readouterr()
    assert "skipping the most ambiguous images" in captured.err and "ambiguous.png" not in captured.out
    assert not (out / "ambiguous.png").exists()
    # and it lists the files it wrote, not every PNG, HTML and JSON file in --out (robustness.png was listed)
    names = sorted(["class_balance.png", "mean_images.png", "embedding.png", "explore.json", "explore.html"])
    assert f"wrote {', '.join(names)} to {out};" in captured.out


@pytest.mark.parametrize("problem", ["missing model", "unwritable --out"])
def test_cli_checks_the_models_and_the_out_folder_before_the_embedding(
    problem, idx_folder, tmp_path, capsys, monkeypatch
):
    """`--model nope` ran the 2,000-image t-SNE and wrote figures first; an --out under /proc failed at the end."""
    from pathlib import Path

    from digitrec import data
    from digitrec import explore as explore_module

    if problem == "unwritable --out" and not Path("/proc/self").is_dir():
        pytest.skip("needs Linux's /proc")
    monkeypatch.setattr(explore_module, "embed", lambda *a, **k: pytest.fail("embedded before the checks"))
    # MNIST may have to be downloaded first: a wrong --model or --out is said before it is looked for
    monkeypatch.setattr(data, "load_mnist", lambda *a, **k: pytest.fail("loaded MNIST before the checks"))
    out = tmp_path / "explore"
    if problem == "missing model":
        args = ["--model", str(tmp_path / "nope"), "--out", str(out)]
    else:
        args = ["--out", "/proc/nope"]
    assert main(["explore", *args, "--data-dir", str(idx_folder)]) == 2
    err = capsys.readouterr().err
    assert (
        "does not exist" in err or "cannot write into the folder /proc/nope" in err
    ) and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())


def test_umap_asked_for_and_missing_is_said_before_any_figure(idx_folder, tmp_path, capsys, monkeypatch):
    """`--embedding umap` without umap-learn drew the class balance and mean images, then failed."""
    from digitrec import data
    from digitrec import explore as explore_module

    monkeypatch.setattr(explore_module, "has_umap", lambda: False)
    monkeypatch.setattr(data, "load_mnist", lambda *a, **k: pytest.fail("loaded MNIST before the check"))
    out = tmp_path / "explore"
    assert main(["explore", "--embedding", "umap", "--out", str(out), "--data-dir", str(idx_folder)]) == 2
    err = capsys.readouterr().err
    assert "needs umap-learn" in err and "pip install umap-learn" in err and "Traceback" not in err
    assert not out.exists() or not any(out.iterdir())


def test_the_library_call_checks_the_embedding_before_drawing(tiny_mnist, tmp_path, monkeypatch):
    from digitrec import explore as explore_module

    monkeypatch.setattr(explore_module, "has_umap", lambda: False)
    with pytest.raises(Exception, match="needs umap-learn"):
        explore(tiny_mnist, tmp_path / "explore", embedding="umap")
    with pytest.raises(Exception, match="unknown embedding 'pca'"):
        explore(tiny_mnist, tmp_path / "explore", embedding="pca")
    assert not (tmp_path / "explore").exists()


def test_a_umap_that_does_not_import_is_as_if_it_were_not_installed(tmp_path, monkeypatch):
    """umap-learn found but failing to import (numba refusing a newer NumPy): auto fell back to t-SNE before,
    and for a while raised the ImportError instead, after drawing the first figures."""
    import sys

    from digitrec import explore as explore_module
    from digitrec.errors import DigitrecError

    package = tmp_path / "umap"
    package.mkdir()
    (package / "__init__.py").write_text('raise ImportError("Numba needs NumPy 2.0 or less")\n')
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "umap", raising=False)
    assert not explore_module.has_umap()
    with pytest.raises(DigitrecError, match="needs umap-learn, installed and importable"):
        explore_module.require_embedding("umap")
    explore_module.require_embedding("auto")  # auto takes t-SNE then
