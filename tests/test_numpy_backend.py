"""The NumPy forward pass that lets `digitrec predict` skip importing torch gives the torch path's answers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import randomize_batch_norm

from digitrec.backends import NUMPY_ARCHS, WINDOW_FLOATS, NumpyBackend, NumpyEnsemble
from digitrec.checkpoint import load_ensemble, save_model, save_tensors
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
    model = randomize_batch_norm(create_model(arch, (0.2, 0.4)))
    path = tmp_path / "model.safetensors"
    save_model(path, model, {"recipe": "test", "config": {"arch": arch}, "temperature": 0.7})
    x = real_world_batch(3)
    torch_path = Predictor.load(path, backend="torch")
    numpy_path = Predictor.load(path, backend="auto")
    assert isinstance(numpy_path.backend, NumpyBackend)
    np.testing.assert_allclose(numpy_path.backend(x), torch_path.backend(x), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(numpy_path.probabilities(x), torch_path.probabilities(x), rtol=0, atol=1e-5)


def test_a_batch_runs_in_chunks_sized_by_the_largest_convolution_and_gives_the_same_logits():
    torch.manual_seed(2)
    model = randomize_batch_norm(create_model("deep_cnn"))
    tensors = {k: v.numpy() for k, v in model.state_dict().items()}
    backend = NumpyBackend(tensors, "deep_cnn")
    # deep_cnn's largest im2col matrix: its second 3x3 convolution, 24x24 outputs of 3x3x32 inputs each
    assert backend.chunk == WINDOW_FLOATS // (24 * 24 * 3 * 3 * 32) > 1
    x = np.random.default_rng(0).random((3 * backend.chunk + 1, 1, 28, 28), dtype=np.float32)
    one_by_one = np.concatenate([backend(image[None]) for image in x])
    np.testing.assert_allclose(backend(x), one_by_one, rtol=0, atol=1e-5)


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


def _random_model(arch: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = create_model(arch)
    with torch.no_grad():
        for name, value in model.state_dict().items():
            if "running_var" in name:
                value.uniform_(0.5, 2.0)
    return model.eval()


def test_an_ensemble_votes_with_the_mean_of_calibrated_probabilities_in_torch_and_numpy(tmp_path):
    members = []
    for i, (arch, temperature) in enumerate((("deep_cnn", 0.5), ("fast_cnn_lite", 2.0))):
        members.append(tmp_path / f"{arch}.safetensors")
        save_model(
            members[-1], _random_model(arch, i), {"config": {"arch": arch}, "temperature": temperature}
        )
    model, meta = load_ensemble(members)
    path = tmp_path / "ensemble.safetensors"
    save_model(path, model, meta)
    x = real_world_batch(3)
    expected = np.log(
        np.mean(
            [
                torch.softmax(_random_model(arch, i)(torch.from_numpy(x)) / t, dim=1).detach().numpy()
                for i, (arch, t) in enumerate((("deep_cnn", 0.5), ("fast_cnn_lite", 2.0)))
            ],
            axis=0,
        )
    )
    torch_path = Predictor.load(path, backend="torch")
    numpy_path = Predictor.load(path, backend="auto")
    assert isinstance(numpy_path.backend, NumpyEnsemble) and numpy_path.meta["arch"] == "ensemble"
    np.testing.assert_allclose(torch_path.backend(x), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(numpy_path.backend(x), expected, rtol=1e-4, atol=1e-4)
    assert [m["temperature"] for m in meta["members"]] == [0.5, 2.0]


def test_an_ensemble_with_a_member_numpy_cannot_run_runs_on_torch(tmp_path):
    members = []
    for i, arch in enumerate(("deep_cnn", "lenet")):
        members.append(tmp_path / f"{arch}.safetensors")
        save_model(members[-1], _random_model(arch, i), {"config": {"arch": arch}})
    path = tmp_path / "ensemble.safetensors"
    save_model(path, *load_ensemble(members))
    assert isinstance(Predictor.load(path, backend="auto").backend, TorchBackend)
    with pytest.raises(CheckpointError, match="already an ensemble"):
        load_ensemble([path, members[0]])
    with pytest.raises(CheckpointError, match="two or more"):
        load_ensemble(members[:1])


def test_a_damaged_ensemble_is_refused(tmp_path):
    members = []
    for i in range(2):
        members.append(tmp_path / f"m{i}.safetensors")
        save_model(members[-1], _random_model("fast_cnn", i), {"config": {"arch": "fast_cnn"}})
    model, meta = load_ensemble(members)
    tensors = dict(model.state_dict())
    path = tmp_path / "ensemble.safetensors"
    save_tensors(path, {**tensors, "members.2.0.mean": tensors["members.0.0.mean"].clone()}, meta)
    with pytest.raises(CheckpointError, match="no member's"):
        Predictor.load(path, backend="numpy")
    with pytest.raises(CheckpointError, match="does not fit"):
        Predictor.load(path, backend="torch")
    save_tensors(path, tensors, {**meta, "members": meta["members"][:1]})
    with pytest.raises(CheckpointError, match="invalid list of ensemble members"):
        Predictor.load(path, backend="auto")
