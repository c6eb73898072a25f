"""Test-set metrics on hand-worked examples: confusion orientation, per-class figures, mistakes, calibration."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from digitrec import calibrate
from digitrec.evaluate import compute_metrics

# Six images: truth 0, 0, 0, 1, 1, 2 read as 0, 0, 1, 1, 2, 2; each logit row is `strength` at the digit read
LABELS = torch.tensor([0, 0, 0, 1, 1, 2])
READ = [0, 0, 1, 1, 2, 2]
STRENGTH = [5.0, 4.0, 1.0, 6.0, 3.0, 2.0]


def _logits() -> torch.Tensor:
    logits = torch.zeros(6, 10)
    for i, (digit, strength) in enumerate(zip(READ, STRENGTH, strict=True)):
        logits[i, digit] = strength
    return logits


def _confidence(strength: float) -> float:
    return math.exp(strength) / (math.exp(strength) + 9)


def test_the_confusion_matrix_has_truth_in_rows_and_the_reading_in_columns():
    metrics = compute_metrics(_logits(), LABELS)
    confusion = np.array(metrics["confusion"])
    expected = np.zeros((10, 10), dtype=int)
    expected[0, 0], expected[0, 1], expected[1, 1], expected[1, 2], expected[2, 2] = 2, 1, 1, 1, 1
    np.testing.assert_array_equal(confusion, expected)
    assert (metrics["test_accuracy"], metrics["errors"], metrics["count"]) == (pytest.approx(4 / 6), 2, 6)


def test_precision_recall_f1_and_support_per_digit():
    per_class = compute_metrics(_logits(), LABELS)["per_class"]
    # digit 0: read 0 twice, both right (precision 1); 2 of its 3 images read right (recall 2/3)
    expected = {0: (1.0, 2 / 3, 0.8, 3), 1: (0.5, 0.5, 0.5, 2), 2: (0.5, 1.0, 2 / 3, 1)}
    for digit, (precision, recall, f1, support) in expected.items():
        row = per_class[digit]
        assert row["digit"] == digit
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx((precision, recall, f1)), digit
        assert row["support"] == support, digit
    for row in per_class[3:]:  # never present, never read: zeros, not NaN
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == (0.0, 0.0, 0.0, 0)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_mistakes_come_most_confident_first_with_their_confidence(temperature):
    metrics = compute_metrics(_logits(), LABELS, temperature=temperature)
    # the two misreadings: image 2 (strength 1) and image 4 (strength 3), so image 4 first
    assert metrics["mistakes"] == [
        {"index": 4, "label": 1, "predicted": 2, "confidence": pytest.approx(_confidence(3 / temperature))},
        {"index": 2, "label": 0, "predicted": 1, "confidence": pytest.approx(_confidence(1 / temperature))},
    ]
    assert compute_metrics(_logits(), LABELS, mistakes=1)["mistakes"][0]["index"] == 4
    expected_loss = -np.mean(
        [math.log(_confidence(s / temperature) if r == y else 1 / (math.exp(s / temperature) + 9))
         for s, r, y in zip(STRENGTH, READ, LABELS.tolist(), strict=True)]
    )  # fmt: skip
    assert metrics["test_loss"] == pytest.approx(expected_loss, rel=1e-5)


def test_ece_weighs_each_confidence_bin_by_its_share():
    # The six confidences fall in five of the 15 bins; the two most confident (both right) share one. So the
    # ECE is the mean over the images of |confidence - right|, where an unweighted sum of the bins' gaps is not.
    right = [r == y for r, y in zip(READ, LABELS.tolist(), strict=True)]
    expected = np.mean([abs(_confidence(s) - ok) for s, ok in zip(STRENGTH, right, strict=True)])
    assert compute_metrics(_logits(), LABELS)["ece"] == pytest.approx(expected, rel=1e-5)
    probabilities = torch.softmax(_logits(), 1)
    assert calibrate.expected_calibration_error(probabilities.numpy(), LABELS.numpy()) == pytest.approx(
        expected
    )


def test_accuracies_are_exact_fractions_not_float32_means():
    """9,915 right of 10,000 is 0.9915 in metrics.json and `evaluate --json`; a float32 mean wrote
    0.9915000200271606 (and the training loop's validation and test accuracies the same way)."""
    from digitrec.evaluate import loss_and_accuracy

    labels = torch.arange(10_000) % 10
    logits = torch.nn.functional.one_hot(labels, 10).float()
    logits[:85] = logits[:85].roll(1, dims=1)  # 85 wrong
    assert compute_metrics(logits, labels)["test_accuracy"] == 0.9915
    assert loss_and_accuracy(logits, labels)[1] == 0.9915


def test_the_report_says_which_loss_it_shows(tmp_path, monkeypatch):
    """A review found the train curve (label-smoothed, so it cannot go much below 0.5) beside the validation
    set's plain cross-entropy under one "cross-entropy" label, a calibrated model's test loss at its temperature
    with nothing said, and a mistake at 0.9996 titled "100%"."""
    from digitrec import plots
    from digitrec.config import TrainConfig
    from digitrec.evaluate import render_html

    metrics = compute_metrics(_logits(), LABELS, temperature=0.5)
    history = [
        {
            "epoch": 1,
            "train_loss": 0.6,
            "train_accuracy": 0.9,
            "val_loss": 0.1,
            "val_accuracy": 0.97,
            "lr": 0.1,
            "seconds": 2.0,
        }
    ]
    page = render_html("run", metrics, {}, TrainConfig(label_smoothing=0.1), history)
    assert "train loss (label smoothing 0.1)" in page and "seconds so far" in page
    assert "(at the calibrated temperature 0.5)" in page
    assert "at the calibrated" not in render_html(
        "run", compute_metrics(_logits(), LABELS), {}, None, history
    )

    labels: list[str] = []
    legend = plots.plt.Axes.plot

    def plot(self, *args, label="", **kwargs):
        labels.append(label)
        return legend(self, *args, label=label, **kwargs)

    monkeypatch.setattr(plots.plt.Axes, "plot", plot)
    plots.curves(history, tmp_path / "curves.png", label_smoothing=0.1)
    assert labels[0] == "train (label smoothing 0.1)" and "validation" in labels

    titles: list[str] = []
    monkeypatch.setattr(plots, "image_grid", lambda images, got, *args: titles.extend(got))
    plots.mistakes(
        torch.zeros(1, 28, 28),
        [{"index": 0, "label": 1, "predicted": 7, "confidence": 0.9996}],
        tmp_path / "m.png",
    )
    assert titles == ["1→7 99.9%"]


def test_the_report_gives_accuracies_in_percent_and_the_commonest_errors_readably(tmp_path, monkeypatch):
    """A review found the History table's accuracies as fractions (0.9658) beside percentages everywhere else, the
    confusion matrix's largest errors in black on its darkest red, and its colour bar ticked at 0.5 errors."""
    from digitrec import plots
    from digitrec.evaluate import render_html

    history = [
        {"epoch": 1, "train_loss": 0.6, "train_accuracy": 0.9, "val_loss": 0.1, "val_accuracy": 0.9658}
    ]
    page = render_html("run", compute_metrics(_logits(), LABELS), {}, None, history)
    assert "<td>90.00%</td>" in page and "<td>96.58%</td>" in page

    colors: dict[str, str] = {}
    text = plots.plt.Axes.text

    def record(self, x, y, s, *args, **kwargs):
        colors[s] = kwargs.get("color", "")
        return text(self, x, y, s, *args, **kwargs)

    monkeypatch.setattr(plots.plt.Axes, "text", record)
    matrix = [[900 if i == j else 0 for j in range(10)] for i in range(10)]
    matrix[0][8], matrix[0][6] = 30, 5
    plots.confusion(matrix, tmp_path / "confusion.png")
    assert (colors["30"], colors["5"], colors["900"]) == ("white", "black", "#1f5fa8")


def test_the_accuracy_axis_stops_at_100_percent(tmp_path, monkeypatch):
    """With one epoch at 92% (train) and 99.9% (validation) the axis ran to 100.3%."""
    from digitrec import plots

    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.append(fig) or path)
    row = {"epoch": 1, "train_loss": 0.3, "train_accuracy": 0.92, "val_loss": 0.02, "val_accuracy": 0.999}
    plots.curves([row], tmp_path / "curves.png")
    bottom, top = figures[0].axes[1].get_ylim()
    assert top == 100 and bottom < 92
