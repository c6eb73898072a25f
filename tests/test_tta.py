"""Test-time augmentation: the shifted views, and evaluation and the Predictor agreeing on what they return."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from digitrec import tta
from digitrec.checkpoint import save_model
from digitrec.cli import main
from digitrec.config import TrainConfig
from digitrec.data import MNIST
from digitrec.errors import CheckpointError, DigitrecError
from digitrec.evaluate import evaluate, evaluate_model, predict_logits, recipe_logits
from digitrec.models import create_model
from digitrec.predict import Predictor


def test_each_view_moves_the_image_by_one_pixel_and_nothing_wraps_around():
    image = np.zeros((1, 1, 28, 28), dtype=np.float32)
    image[0, 0, 10, 20] = 1.0
    image[0, 0, 0, 0] = 0.5  # at the corner: moving up or left pushes it out, not round to the other side
    views = tta.shifted_views(image, 5)
    assert views.shape == (5, 1, 28, 28)
    for view, (dy, dx) in zip(views, tta.SHIFTS[5], strict=True):
        assert view[0, 10 + dy, 20 + dx] == 1.0
        assert view[0].sum() == (1.5 if (dy, dx) in ((0, 0), (1, 0), (0, 1)) else 1.0)
    assert len(tta.shifted_views(image, 9)) == 9 and (tta.shifted_views(image, 1) == image).all()


def test_one_view_is_the_plain_log_softmax():
    logits = np.random.default_rng(0).normal(size=(6, 10)).astype(np.float32)
    expected = torch.from_numpy(logits).log_softmax(1).numpy()
    np.testing.assert_allclose(tta.mean_log_probabilities(logits, 1), expected, atol=1e-6)


def test_the_numpy_mean_matches_the_torch_one_and_stays_finite():
    """log(mean(softmax)) gave -inf for a class whose probability underflows in every view (a logit 800 below
    the top), where models.log_mean_probabilities, the torch twin, uses logsumexp and gives the number."""
    from digitrec.models import log_mean_probabilities

    logits = np.random.default_rng(1).normal(scale=5, size=(5 * 4, 10)).astype(np.float32)
    logits[:, 3] -= 800
    got = tta.mean_log_probabilities(logits, 5)
    assert np.isfinite(got).all() and got.shape == (4, 10)
    views = torch.from_numpy(logits).reshape(5, 4, 10).log_softmax(2)
    np.testing.assert_allclose(got, log_mean_probabilities(list(views)).numpy(), rtol=1e-5, atol=1e-5)


@pytest.fixture
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("fast_cnn_lite").eval()


def test_evaluation_averages_the_probabilities_of_the_shifted_views(model):
    images = torch.randint(0, 256, (7, 28, 28), dtype=torch.uint8)
    pixels = images.unsqueeze(1).float().numpy() / 255
    with torch.no_grad():
        each = model(torch.from_numpy(tta.shifted_views(pixels, 9))).softmax(1).view(9, 7, 10)
        plain = predict_logits(model, images, batch_size=3)
        averaged = predict_logits(model, images, batch_size=3, tta_views=9)
    torch.testing.assert_close(averaged.exp(), each.mean(0))
    assert not torch.allclose(averaged, plain.log_softmax(1))  # the views did change the answer
    torch.testing.assert_close(predict_logits(model, images, tta_views=1), plain)


def test_every_evaluation_of_a_run_uses_its_recipes_views(model):
    """Validation and test (evaluate.evaluate), the report (evaluate_model) and bench go through recipe_logits."""
    images = torch.randint(0, 256, (6, 28, 28), dtype=torch.uint8)
    labels = torch.arange(6) % 10
    config = TrainConfig(tta_views=5, amp=False, channels_last=False, eval_batch_size=4)
    with torch.no_grad():
        expected = predict_logits(model, images, tta_views=5)
        torch.testing.assert_close(recipe_logits(model, images, config), expected)
        data = MNIST(images, labels, images, labels, source="test", checksum="")
        torch.testing.assert_close(evaluate_model(model, data, config)[1], expected)
        loss, _ = evaluate(model, images, labels, config)
    assert loss == pytest.approx(torch.nn.functional.cross_entropy(expected, labels).item(), rel=1e-5)


def test_the_predictor_scores_a_tta_checkpoint_as_its_evaluation_does(model, tmp_path):
    path = tmp_path / "model.safetensors"
    save_model(path, model, {"recipe": "test", "config": {"arch": "fast_cnn_lite", "tta_views": 5}})
    images = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        expected = predict_logits(model, images, tta_views=5).softmax(1).numpy()
    predictor = Predictor.load(path)
    assert predictor.tta_views == 5
    np.testing.assert_allclose(
        predictor.probabilities(images.unsqueeze(1).numpy() / 255), expected, atol=1e-5
    )


def test_a_checkpoint_asking_for_unknown_views_is_refused_in_one_sentence(model, tmp_path):
    for views, shown in ((3, "3"), ("three", "'three'")):
        path = tmp_path / f"model-{views}.safetensors"
        save_model(path, model, {"recipe": "test", "config": {"arch": "fast_cnn_lite", "tta_views": views}})
        with pytest.raises(
            CheckpointError, match=f"asks for {shown} test-time views; digitrec knows 1, 5, 9, so"
        ):
            Predictor.load(path)


def test_unknown_view_counts_are_user_errors(capsys):
    with pytest.raises(DigitrecError, match="tta_views must be one of 1, 5, 9, got 3"):
        TrainConfig(tta_views=3)
    with pytest.raises(SystemExit):
        main(["train", "--recipe", "fast", "--tta-views", "3"])
    assert "invalid choice" in capsys.readouterr().err


def test_an_exported_tta_checkpoint_answers_as_the_checkpoint(model, tmp_path):
    pytest.importorskip("onnxruntime")
    from digitrec.export import export_onnx

    path = tmp_path / "model.safetensors"
    save_model(path, model, {"recipe": "test", "config": {"arch": "fast_cnn_lite", "tta_views": 9}})
    assert export_onnx(path, tmp_path / "model.onnx", log=lambda msg: None).tta_views == 9
    pixels = torch.randint(0, 256, (6, 1, 28, 28)).numpy().astype(np.float32) / 255
    on_torch, on_onnx = Predictor.load(path), Predictor.load(tmp_path / "model.onnx")
    assert on_onnx.tta_views == 9
    np.testing.assert_allclose(on_onnx.probabilities(pixels), on_torch.probabilities(pixels), atol=1e-5)
    # the metadata says what digitrec computes: the views' mean probability first, the temperature after (it
    # said "softmax(logits / temperature)" and that digitrec "also averages the log-probabilities")
    output = on_onnx.meta["export"]["output"]
    assert "for one view; digitrec scores each image in 9 views" in output
    assert "z = the log of the mean of softmax(logits) over the views" in output
    assert "softmax(z / temperature)" in output and "averages the log-probabilities" not in output
