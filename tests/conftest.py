"""Shared fixtures: a tiny synthetic MNIST that trains in a second, and IDX files written by the tests."""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import settings

from digitrec import data as data_module
from digitrec import realworld
from digitrec.data import MNIST, load_mnist, to_idx
from digitrec.errors import DataError

_CACHE: list[
    tempfile.TemporaryDirectory
] = []  # made by pytest, not on import: runkit's children import this module
# where `digitrec data` keeps MNIST for this user, remembered before the tests move the cache
_USER_MNIST: list[Path] = []


def pytest_configure(config: pytest.Config) -> None:
    """The tests' downloads and decompressed copies go to a folder of their own, never the user's cache; the
    user's MNIST folder is remembered first, so the tests on real MNIST still find what `digitrec data` put there."""
    _USER_MNIST[:] = [data_module.cache_dir()]
    _CACHE.append(tempfile.TemporaryDirectory(prefix="digitrec-test-cache-"))
    os.environ["DIGITREC_CACHE"] = _CACHE[-1].name


def pytest_unconfigure(config: pytest.Config) -> None:
    while _CACHE:
        _CACHE.pop().cleanup()


settings.register_profile("default", max_examples=60, deadline=None)
settings.register_profile("slow", max_examples=10_000, deadline=None)
settings.load_profile("default")


def make_images(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ten fixed random blob templates, one per class, shifted by up to 2 px and noised: learnable but not trivial."""
    templates_rng = torch.Generator().manual_seed(1234)
    templates = (torch.rand(10, 1, 7, 7, generator=templates_rng) > 0.55).float()
    templates = torch.nn.functional.interpolate(templates, size=(16, 16), mode="nearest")[:, 0]
    rng = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (count,), generator=rng)
    images = torch.zeros(count, 28, 28)
    shifts = torch.randint(4, 9, (count, 2), generator=rng)
    for i in range(count):
        y, x = shifts[i].tolist()
        images[i, y : y + 16, x : x + 16] = templates[labels[i]]
    images = (images * 230 + torch.rand(count, 28, 28, generator=rng) * 25).clamp(0, 255)
    return images.to(torch.uint8), labels.to(torch.uint8)


def randomize_batch_norm(model: torch.nn.Module) -> torch.nn.Module:
    """Give every BatchNorm running statistics other than 0 and 1, so a forward pass that ignores them shows."""
    with torch.no_grad():
        for name, value in model.state_dict().items():
            if "running_var" in name:
                value.uniform_(0.5, 2.0)
            elif "running_mean" in name:
                value.normal_(0, 0.3)
    return model


@dataclass(frozen=True)
class RealMNIST:
    """The real MNIST, and the arguments that make a `digitrec` command in the tests read it from the same place."""

    data: MNIST
    data_args: list[str]  # ["--data-dir", the user's cache folder] when only the user's cache has it, else []


@pytest.fixture(scope="session")
def real_mnist() -> RealMNIST:
    """The verified MNIST from the places a command looks ($DIGITREC_DATA, ../shared/mnist; the tests' own cache is
    empty) or else from the user's cache, where `digitrec data` downloads it; skips when it is in none of them."""
    try:
        return RealMNIST(load_mnist(download=False), [])
    except DataError:
        pass
    user_folder = _USER_MNIST[0] if _USER_MNIST else data_module.cache_dir()
    try:
        return RealMNIST(load_mnist(user_folder, download=False), ["--data-dir", str(user_folder)])
    except DataError as exc:  # its sentence too: a damaged cache is not the same as none
        pytest.skip(
            f"real MNIST is not in $DIGITREC_DATA, ../shared/mnist or this user's cache {user_folder} ({exc}); "
            "`digitrec data` downloads it to that cache"
        )


@pytest.fixture(scope="session")
def tiny_mnist() -> MNIST:
    train_images, train_labels = make_images(1200, seed=1)
    test_images, test_labels = make_images(300, seed=2)
    return MNIST(
        train_images, train_labels, test_images, test_labels, source="synthetic", checksum="synthetic"
    )


@pytest.fixture
def idx_folder(tmp_path: Path, tiny_mnist: MNIST, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The tiny data set as four gzipped IDX files, with the expected MD5s patched to theirs.

    The real-world sets keep the MNIST test digits they load for the rest of the process; a command run here
    on the tiny set (eval-real, calibrate) must not leave its digits to the tests that come after it.
    """
    arrays = {
        "train_images": tiny_mnist.train_images,
        "train_labels": tiny_mnist.train_labels,
        "test_images": tiny_mnist.test_images,
        "test_labels": tiny_mnist.test_labels,
    }
    files = {}
    for key, (stem, _) in data_module.FILES.items():
        raw = to_idx(arrays[key].numpy())
        (tmp_path / f"{stem}.gz").write_bytes(gzip.compress(raw))
        files[key] = (stem, hashlib.md5(raw).hexdigest())
    monkeypatch.setattr(data_module, "FILES", files)
    realworld._mnist_test.cache_clear()
    yield tmp_path
    realworld._mnist_test.cache_clear()


@pytest.fixture(scope="session")
def tiny_fast_run(tmp_path_factory: pytest.TempPathFactory, tiny_mnist: MNIST) -> Path:
    """The `fast` recipe trained for 4 epochs on the tiny set: a real checkpoint with BatchNorm statistics."""
    from digitrec.config import get_recipe
    from digitrec.training import train

    out = tmp_path_factory.mktemp("tiny-fast-run")
    train(
        get_recipe("fast").override(epochs=4),
        out,
        recipe="fast",
        data=tiny_mnist,
        progress=False,
        report=False,
        log=lambda msg: None,
    )
    return out
