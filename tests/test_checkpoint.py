"""Checkpoints: atomic safetensors with metadata; anything truncated, tampered with or foreign is refused."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch

from digitrec.checkpoint import load_model, load_tensors, save_model, save_tensors
from digitrec.errors import CheckpointError
from digitrec.models import create_model


@pytest.fixture
def saved(tmp_path):
    model = create_model("lenet")
    path = tmp_path / "model.safetensors"
    save_model(path, model, {"recipe": "r", "config": {"arch": "lenet", "normalize": [0.1307, 0.3081]}})
    return path, model


def test_round_trip(saved):
    path, model = saved
    loaded, meta = load_model(path)
    assert meta["recipe"] == "r" and not loaded.training
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(loaded(x), model.eval()(x))
    assert json.loads(path.with_suffix(".json").read_text())["sha256"]


def test_loads_without_side_file(saved):
    path, _ = saved
    path.with_suffix(".json").unlink()
    assert load_model(path)[1]["recipe"] == "r"


def test_no_temporary_files_left(saved):
    path, _ = saved
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.json", "model.safetensors"]


@pytest.fixture
def failing_second_fsync(monkeypatch):
    """os.fsync fails on its second call, as a full disk would: a checkpoint's weights reached the disk, its side
    file did not."""
    calls = []
    real_fsync = os.fsync

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def _save_fails(path) -> None:
    torch.manual_seed(1)  # other weights than the saved model's, so the new file differs from the old
    with pytest.raises(OSError, match="No space left"):
        save_model(path, create_model("lenet"), {"recipe": "new", "config": {"arch": "lenet"}})


def test_a_save_that_fails_part_way_leaves_both_previous_files_byte_for_byte(saved, failing_second_fsync):
    path, _ = saved
    before = {p.name: p.read_bytes() for p in path.parent.iterdir()}
    _save_fails(path)
    assert {p.name: p.read_bytes() for p in path.parent.iterdir() if p.name in before} == before
    assert load_model(path)[1]["recipe"] == "r"


def test_a_save_that_fails_part_way_leaves_no_temporary_file(saved, failing_second_fsync):
    path, _ = saved
    _save_fails(path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.json", "model.safetensors"]


@pytest.mark.parametrize("damage", ["truncate", "flip", "pickle", "empty", "garbage_header"])
def test_damaged_checkpoints_are_refused(saved, damage):
    path, model = saved
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        path.write_bytes(data[:-10] + bytes(b ^ 0xFF for b in data[-10:]))
    elif damage == "pickle":
        path.with_suffix(".json").unlink()
        path.write_bytes(pickle.dumps(model.state_dict()))
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.with_suffix(".json").unlink()
        path.write_bytes((10**6).to_bytes(8, "little") + b"{not json")
    with pytest.raises(CheckpointError):
        load_model(path)


def test_foreign_safetensors_is_not_ours(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, str(path))
    with pytest.raises(CheckpointError, match="not a digitrec checkpoint"):
        load_model(path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_tensors(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="folder"):
        load_tensors(tmp_path)


def test_wrong_architecture_is_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    save_tensors(path, dict(create_model("lenet").state_dict()), {"config": {"arch": "fast_cnn"}})
    with pytest.raises(CheckpointError, match="does not fit"):
        load_model(path)


def test_written_files_get_the_usual_permissions(saved):
    path, _ = saved
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
