"""The NumPy forward pass that lets `digitrec predict` skip importing torch gives the torch path's answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from digitrec.backends import NUMPY_ARCHS, NumpyBackend
from digitrec.checkpoint import save_model, save_tensors
from digitrec.errors import CheckpointError, DigitrecError
from digitrec.models import create_model
from digitrec.predict import Predictor, TorchBackend, pretrained_path
from digitrec.preprocess import preprocess
from digitrec.realworld import generate


def real_world_batch(count: int = 12) -> np.ndarray:
    """Preprocessed photos, scans and non-digits, plus a blank page, noise and saturated input."""
    images = [
        preprocess(sample.data)
        for name in ("mnist-photo", "pen-photo", "font-photo", "negatives")
        for sample in generate(name, count, seed=5)
    ]
    rng = np.random.default_rng(0)
    extra = [np.zeros((28, 28)), np.ones((28, 28)), *rng.random((4, 28, 28))]
    return np.stack(images + extra).astype(np.float32)[:, None]


def test_bundled_model_gives_the_torch_probabilities():
    x = real_world_batch()
    torch_path = Predictor.load(pretrained_path(), backend="torch")
    numpy_path = Predictor.load(pretrained_path(), backend="numpy")
    assert isinstance(torch_path.backend, TorchBackend) and isinstance(numpy_path.backend, NumpyBackend)
    assert numpy_path.meta == torch_path.meta and numpy_path.model is None
    np.testing.assert_allclose(numpy_path.probabilities(x), torch_path.probabilities(x), rtol=0, atol=1e-5)
    same = [(p.digit, p.rejected) for p in numpy_path.predict_tensor(x)]
    assert same == [(p.digit, p.rejected) for p in torch_path.predict_tensor(x)]


@pytest.mark.parametrize("arch", sorted(NUMPY_ARCHS))
def test_every_numpy_architecture_matches_torch(arch, tmp_path):
    """Random weights and batch-norm statistics, so a change to models.py that NUMPY_ARCHS misses fails here."""
    torch.manual_seed(1)
    model = create_model(arch, (0.2, 0.4))
    with torch.no_grad():
        for name, value in model.state_dict().items():
            if "running_var" in name:
                value.uniform_(0.5, 2.0)
            elif "running_mean" in name:
                value.normal_(0, 0.3)
    path = tmp_path / "model.safetensors"
    save_model(path, model, {"recipe": "test", "config": {"arch": arch}, "temperature": 0.7})
    x = real_world_batch(3)
    torch_path = Predictor.load(path, backend="torch")
    numpy_path = Predictor.load(path, backend="auto")
    assert isinstance(numpy_path.backend, NumpyBackend)
    np.testing.assert_allclose(numpy_path.backend(x), torch_path.backend(x), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(numpy_path.probabilities(x), torch_path.probabilities(x), rtol=0, atol=1e-5)


def test_other_architectures_run_on_torch(tmp_path):
    path = tmp_path / "model.safetensors"
    save_model(path, create_model("lenet"), {"recipe": "test", "config": {"arch": "lenet"}})
    assert isinstance(Predictor.load(path, backend="auto").backend, TorchBackend)
    with pytest.raises(DigitrecError, match="use --backend torch"):
        Predictor.load(path, backend="numpy")


def test_a_state_dict_that_does_not_fit_is_refused(tmp_path):
    tensors = dict(create_model("fast_cnn").state_dict())
    tensors["1.7.weight"] = tensors["1.7.weight"][:, :100]
    path = tmp_path / "model.safetensors"
    save_tensors(path, tensors, {"config": {"arch": "fast_cnn"}})
    with pytest.raises(CheckpointError, match="does not fit architecture"):
        Predictor.load(path, backend="numpy")
