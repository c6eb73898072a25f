"""The model card: written beside every run's checkpoint and into report.html, with what a reader needs to trust it."""

from __future__ import annotations

import pytest

from digitrec import modelcard
from digitrec.config import get_recipe
from digitrec.training import train


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_mnist):
    out = tmp_path_factory.mktemp("card-run")
    return train(
        get_recipe("fast").override(epochs=1),
        out,
        recipe="fast",
        data=tiny_mnist,
        progress=False,
        log=lambda m: None,
    )


def test_every_run_writes_a_model_card_beside_the_checkpoint(run):
    card = (run.out_dir / "MODEL_CARD.md").read_text()
    for heading in (
        f"# Model card: fast ({run.config.arch})",
        "## Recipe",
        "## Data",
        "## Metrics",
        "## Calibration",
        "## Robustness",
        "## Latency and size",
        "## Intended use",
        "## Known limits",
    ):
        assert heading in card
    assert "`synthetic`" in card  # the data checksum the model was trained on
    assert f"{run.metrics['test_accuracy']:.2%}" in card
    assert card.count("\n| ") >= 10 + 8  # a row per class and per perturbation
    assert "Checkpoint size" in card and " ms median" in card and "digitrec train --recipe fast" in card


def test_report_html_holds_the_card_and_the_robustness_curves(run):
    report = (run.out_dir / "report.html").read_text()
    assert 'class="model-card"' in report and "Robustness and accuracy vs coverage" in report
    assert (run.out_dir / "robustness.png").exists()


def test_card_names_weak_spots_and_calibration():
    metrics = {
        "test_accuracy": 0.99,
        "test_loss": 0.03,
        "errors": 100,
        "count": 10000,
        "ece": 0.012,
        "per_class": [],
    }
    robustness = {
        "images": 100,
        "perturbations": [{"name": "blur", "label": "sigma", "strengths": [1, 2], "clean": 0}],
        "models": [
            {
                "clean_accuracy": 0.99,
                "perturbations": {
                    "blur": [{"strength": 1, "accuracy": 0.95}, {"strength": 2, "accuracy": 0.4}]
                },
                "coverage": [
                    {"coverage": c / 100, "accuracy": 0.99, "threshold": 0.5} for c in range(1, 101)
                ],
            }
        ],
    }
    sections = modelcard.build_card(
        metrics, {"recipe": "x", "temperature": 1.7, "reject_below": 0.6}, robustness=robustness
    )
    text = modelcard.to_markdown(sections)
    assert "T = 1.700" in text and "0.600" in text and "ECE, 15 bins) on the test set: 0.0120" in text
    assert "blur (down to 40%)" in text
    assert "<b>99.00%</b>" in modelcard.to_html(sections)


def test_an_ensembles_card_names_its_members():
    members = [{"config": {"arch": "deep_cnn"}}, {"config": {"arch": "fast_cnn"}}]
    meta = {"recipe": "robust", "config": {"arch": "deep_cnn"}, "members": members}
    text = modelcard.to_markdown(
        modelcard.build_card({"test_accuracy": 0.99, "test_loss": 0.03, "per_class": []}, meta)
    )
    assert "Model card: robust (ensemble of deep_cnn, fast_cnn)" in text
