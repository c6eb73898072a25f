"""Checkpoints: atomic safetensors with metadata; anything truncated, tampered with or foreign is refused."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct

import pytest
import torch

from digitrec.checkpoint import atomic_write_text, load_model, load_tensors, save_model, save_tensors
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


def test_a_full_disk_names_the_file_it_was_writing(saved, failing_second_fsync):
    """ENOSPC carries no file name, and the CLI answered it with a traceback (it names a file it cannot write)."""
    path, _ = saved
    with pytest.raises(OSError, match="No space left") as raised:
        save_model(path, create_model("lenet"), {"recipe": "new", "config": {"arch": "lenet"}})
    assert raised.value.filename == str(path.with_suffix(".json")) and raised.value.errno == 28


def test_a_full_disk_is_one_sentence_from_the_cli(tmp_path, monkeypatch, capsys, idx_folder):
    from digitrec import checkpoint
    from digitrec.cli import main

    def full(files, durable=True):
        raise OSError(28, "No space left on device", str(next(iter(files))))

    monkeypatch.setattr(checkpoint, "atomic_write_files", full)
    assert (
        main(
            [
                "train",
                "--recipe",
                "fast",
                "--dry-run",
                "--out",
                str(tmp_path / "run"),
                "--data-dir",
                str(idx_folder),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "No space left on device; free some space there or name a path on another disk." in err
    assert "Traceback" not in err


@pytest.mark.parametrize("when", ["before the second rename", "just after the first rename"])
def test_an_interrupt_between_the_renames_leaves_a_checkpoint_that_loads(saved, monkeypatch, when):
    """Ctrl-C (or SIGTERM, which the CLI turns into one) after the weights were renamed into place and before
    the side file was: the side file's temporary was removed, and its old checksum refused the new weights for
    good ("does not match the checksum in model.json")."""
    path, _ = saved
    real_replace, calls = os.replace, []

    def replace(source, target):
        calls.append(target)
        if when == "before the second rename" and len(calls) == 2:
            raise KeyboardInterrupt
        real_replace(source, target)
        if when == "just after the first rename" and len(calls) == 1:
            raise KeyboardInterrupt  # as if it landed before the loop went on

    monkeypatch.setattr(os, "replace", replace)
    torch.manual_seed(1)
    with pytest.raises(KeyboardInterrupt):
        save_model(path, create_model("lenet"), {"recipe": "new", "config": {"arch": "lenet"}})
    monkeypatch.setattr(os, "replace", real_replace)
    assert load_model(path)[1]["recipe"] == "new"  # both files are the new save's
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


@pytest.mark.parametrize("kept", [100, 2206])
def test_a_checkpoint_cut_inside_its_header_is_called_truncated_when_its_side_file_says_so(saved, kept):
    """Cut inside the header, with its side file beside it, it was "not a digitrec checkpoint (expected a
    .safetensors file written by digitrec train)": the one file that says digitrec wrote it was not asked."""
    path, _ = saved
    path.write_bytes(path.read_bytes()[:kept])
    with pytest.raises(CheckpointError, match="does not match the checksum in model.json: it is truncated"):
        load_model(path)
    path.with_suffix(".json").unlink()  # alone, a header cut short is what it was (this one's is 2,000 bytes)
    with pytest.raises(
        CheckpointError, match="not a digitrec checkpoint" if kept < 2000 else "it is truncated"
    ):
        load_model(path)


@pytest.mark.parametrize("name", ["model.json", "model.pt"])
def test_another_file_beside_a_checkpoint_is_not_called_a_cut_checkpoint(saved, name):
    """`--model run/model.json` (a tab completion away) was said to be "truncated or was modified" by the side file
    model.json's checksum, which is model.safetensors'."""
    path, _ = saved
    other = path.parent / name
    if name != "model.json":
        other.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(CheckpointError, match="is not a digitrec checkpoint"):
        load_model(other)


def test_the_errors_that_carry_more_than_a_sentence_survive_pickling():
    """A process pool's worker that raised them broke the pool (TypeError on unpickling) instead of saying them."""
    import pickle

    from digitrec.config import ConfigValueError
    from digitrec.runfolder import UnfinishedRun

    for error in (
        ConfigValueError("lr", "learning rate must be above 0."),
        UnfinishedRun("flags.", "python."),
    ):
        again = pickle.loads(pickle.dumps(error))
        assert type(again) is type(error) and str(again) == str(error) and vars(again) == vars(error)


def test_an_export_beside_its_checkpoint_is_named_as_one_not_as_a_cut_checkpoint(saved):
    """model.onnx beside model.safetensors: the checkpoint's side file model.json was taken for the export's, and
    `evaluate m/model.onnx` said the export was truncated ("retrain or restore it")."""
    path, _ = saved
    onnx = path.with_suffix(".onnx")
    onnx.write_bytes(b"\x08\x07\x12\x07pytorch" + bytes(200))  # any ONNX protobuf's opening bytes
    with pytest.raises(CheckpointError, match="is an ONNX export, which this command does not take"):
        load_model(onnx)


def test_a_device_or_a_pipe_as_a_checkpoint_is_refused_unread(tmp_path):
    """`digitrec evaluate /dev/zero` read until the kernel killed it at 24 GB; a FIFO would wait for a writer."""
    with pytest.raises(CheckpointError, match="^/dev/zero is not a file but a device, pipe or socket"):
        load_model("/dev/zero")
    from digitrec.backends import read_onnx

    for name, load in (("model.safetensors", load_model), ("model.onnx", read_onnx)):
        fifo = tmp_path / name
        os.mkfifo(fifo)
        with pytest.raises(CheckpointError, match="is not a file but a device, pipe or socket"):
            load(fifo)


def test_a_file_larger_than_any_checkpoint_is_refused_unread(tmp_path, monkeypatch):
    from digitrec import checkpoint

    path = tmp_path / "big.safetensors"
    with path.open("wb") as f:
        f.truncate(3 * 10**9)  # sparse: no disk used
    monkeypatch.setattr(type(path), "read_bytes", lambda self: pytest.fail("read whole"))
    with pytest.raises(CheckpointError, match=r"is 3.0 GB, more than any digitrec model \(2 GB at most\)"):
        checkpoint.load_model(path)


@pytest.mark.parametrize("side", ["null", "[1, 2]", "{not json"])
def test_a_side_file_that_is_no_json_object_says_so(saved, side):
    """`null` in model.json was said to be "not valid JSON", which it is."""
    path, _ = saved
    path.with_suffix(".json").write_text(side)
    with pytest.raises(CheckpointError, match="is not the JSON object digitrec writes beside a checkpoint"):
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


@pytest.mark.parametrize("version", [2, "1", True])
def test_a_checkpoint_of_another_format_version_is_refused(tmp_path, version):
    """`format_version` was written into every checkpoint and never read: one of format 2 was loaded, resumed and
    trained as if it were format 1."""
    path = tmp_path / "model.safetensors"
    save_model(path, create_model("lenet"), {"arch": "lenet", "format_version": version})
    with pytest.raises(CheckpointError) as refused:
        load_model(path)
    assert str(refused.value) == (
        f"checkpoint {path} is in format {version!r} of digitrec checkpoints, and this digitrec reads format 1; "
        "load it with the digitrec that wrote it (a newer one, most likely)."
    )


def test_the_same_model_saved_again_is_the_same_file(tmp_path):
    """safetensors wrote its metadata in a hash map's order, which changed from save to save: the same model saved
    twice gave two files, two SHA-256s (and an ensemble saved again over itself removed its exports as stale)."""
    path = tmp_path / "model.safetensors"
    model = create_model("lenet")
    digests = set()
    for _ in range(12):
        save_model(path, model, {"arch": "lenet", "recipe": "seed-lenet", "note": "café"})
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
    assert len(digests) == 1
    tensors, meta = load_tensors(path)
    assert meta["note"] == "café" and tensors.keys() == model.state_dict().keys()


def test_written_files_get_the_usual_permissions(saved):
    path, _ = saved
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_files_get_the_usual_permissions_where_os_has_no_fchmod(tmp_path, monkeypatch):
    """Python before 3.13 on Windows has no os.fchmod: the write must still work and give the usual mode."""
    monkeypatch.delattr(os, "fchmod")
    path = tmp_path / "a.txt"
    atomic_write_text(path, "hello")
    mask = os.umask(0)
    os.umask(mask)
    assert path.read_text() == "hello"
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def header_metadata(path) -> dict:
    """The `__metadata__` of a safetensors file's header, read here so that the tests rely on no helper of ours."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length])["__metadata__"]


def test_what_save_tensors_writes_holds_the_checksum_of_its_content(saved):
    """The digest DEVELOPERS.md documents, computed here with hashlib: the header without the key as canonical
    JSON (sorted keys, no spaces), then the tensor data."""
    path, _ = saved
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    digest = header["__metadata__"].pop("digitrec_sha256")
    canonical = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    assert digest == hashlib.sha256(canonical + data[8 + length :]).hexdigest()


def _change(path, change: str) -> None:
    data = path.read_bytes()
    if change == "tensor_data":  # four bytes of weights, far from the header
        offset = len(data) - 1000
        data = data[:offset] + bytes(b ^ 0x55 for b in data[offset : offset + 4]) + data[offset + 4 :]
    else:  # the input normalization in the metadata: a valid file that would compute something else
        assert data.count(b"0.1307") == 1
        data = data.replace(b"0.1307", b"0.1308")
    path.write_bytes(data)


@pytest.mark.parametrize("change", ["tensor_data", "metadata"])
@pytest.mark.parametrize("loader", ["load_model", "load_tensors", "load_arrays", "Predictor.load"])
def test_a_lone_changed_checkpoint_is_refused(saved, change, loader):
    """Without its side file a checkpoint is checked against the SHA-256 in its own header (it loaded before)."""
    from digitrec import checkpoint
    from digitrec.predict import Predictor

    path, _ = saved
    path.with_suffix(".json").unlink()
    _change(path, change)
    load = Predictor.load if loader == "Predictor.load" else getattr(checkpoint, loader)
    with pytest.raises(CheckpointError) as refused:
        load(path)
    assert str(refused.value) == (
        f"checkpoint {path} does not match the checksum in its header: it is truncated or was modified; "
        "retrain or restore it."
    )


def test_with_its_side_file_a_changed_checkpoint_is_refused_by_the_side_files_check(saved):
    path, _ = saved
    _change(path, "tensor_data")
    with pytest.raises(CheckpointError, match="does not match the checksum in model.json"):
        load_model(path)


def test_a_checkpoint_without_the_checksum_loads_as_before(tmp_path):
    """Older runs and the bundled models have no checksum in their header: they load, alone or with a side file."""
    from safetensors.torch import save

    from digitrec.checkpoint import load_arrays
    from digitrec.predict import Predictor, pretrained_path

    model = create_model("lenet")
    meta = {"recipe": "old", "config": {"arch": "lenet", "normalize": [0.1307, 0.3081]}}
    path = tmp_path / "old.safetensors"
    path.write_bytes(save(dict(model.state_dict()), metadata={"digitrec": json.dumps(meta)}))
    assert "digitrec_sha256" not in header_metadata(path)
    loaded, loaded_meta = load_model(path)
    assert loaded_meta == meta
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(loaded(x), model.eval()(x))
    arrays, _ = load_arrays(path)
    assert all((arrays[k] == v.numpy()).all() for k, v in model.state_dict().items())
    # the bundled files lack the key until `make pretrained` rewrites them; they load either way
    assert Predictor.load(pretrained_path(), backend="numpy").name


def test_an_onnx_export_given_as_a_checkpoint_is_named_as_one(tmp_path):
    """`evaluate`, `calibrate`, `finetune` and `ensemble` said an exported model "is not a digitrec checkpoint
    (expected a .safetensors file written by `digitrec train`)", though digitrec wrote it."""
    exported = tmp_path / "model.onnx"
    exported.write_bytes(b"\x08\x07\x12\x07pytorch")  # the opening bytes of an ONNX protobuf
    with pytest.raises(CheckpointError) as refused:
        load_model(exported)
    assert str(refused.value) == (
        f"{exported} is an ONNX export, which this command does not take; pass the .safetensors checkpoint (or "
        "run folder) it was exported from."
    )


@pytest.fixture
def diverged(tmp_path):
    """A fast_cnn (NumPy runs it too) whose weights hold one NaN, as a run that diverged writes it."""
    model = create_model("fast_cnn")
    with torch.no_grad():
        next(model.parameters()).view(-1)[3] = float("nan")
    path = tmp_path / "run" / "model.safetensors"
    save_model(path, model, {"recipe": "fast", "config": {"arch": "fast_cnn", "normalize": [0.1307, 0.3081]}})
    return path


@pytest.mark.parametrize(
    "loader", ["load_model", "NumpyBackend.load", "Predictor.load numpy", "Predictor.load torch"]
)
def test_a_checkpoint_whose_weights_are_not_finite_is_refused(diverged, loader):
    """It loaded, and predict answered digit 0 with confidence NaN (`--json` printed a bare NaN, no JSON)."""
    from digitrec.backends import NumpyBackend
    from digitrec.predict import Predictor

    load = {
        "load_model": load_model,
        "NumpyBackend.load": NumpyBackend.load,
        "Predictor.load numpy": lambda path: Predictor.load(path, backend="numpy"),
        "Predictor.load torch": lambda path: Predictor.load(path, backend="torch"),
    }[loader]
    with pytest.raises(CheckpointError) as refused:
        load(diverged)
    assert str(refused.value) == (
        f"checkpoint {diverged} holds weights that are not finite numbers (NaN or infinity, in 1.0.weight): the "
        "run that wrote it diverged; train it again (with a lower --lr) or pass another model."
    )


@pytest.mark.parametrize(
    "edit, said",
    [
        ("int64", "holds whole numbers where a model keeps real-valued weights (in "),
        ("std 0", "holds a standard deviation that is not positive (in 0.std)"),
        ("variance -1", "holds a variance under zero (in 1.4.running_var)"),
    ],
)
@pytest.mark.parametrize("loader", ["load_model", "Predictor.load numpy"])
def test_weights_no_trained_model_has_are_refused(tmp_path, edit, said, loader):
    """A hand-made file with whole-number weights (cast to floats without a word) or a std of 0 passed every
    check, and predict answered digit 0 "with confidence NaN"."""
    from digitrec.predict import Predictor

    model = create_model("fast_cnn")
    tensors = dict(model.state_dict())
    if edit == "int64":
        tensors = {k: v.round().long() for k, v in tensors.items()}
    elif edit == "std 0":
        tensors["0.std"] = torch.tensor(0.0)
    else:
        tensors["1.4.running_var"] = tensors["1.4.running_var"] - 2
    path = tmp_path / "model.safetensors"
    save_tensors(
        path, tensors, {"recipe": "fast", "config": {"arch": "fast_cnn", "normalize": [0.1307, 0.3081]}}
    )
    load = load_model if loader == "load_model" else (lambda p: Predictor.load(p, backend="numpy"))
    with pytest.raises(CheckpointError) as refused:
        load(path)
    assert said in str(refused.value) and str(refused.value).endswith("or pass another model.")


def test_batch_norm_step_counters_stay_whole_numbers():
    model = create_model("fast_cnn")
    counters = [k for k, v in model.state_dict().items() if not v.is_floating_point()]
    assert counters and all(k.endswith("num_batches_tracked") for k in counters)
    from digitrec.checkpoint import refuse_unusable_weights

    refuse_unusable_weights("x", dict(model.state_dict()))  # a fresh model passes


def test_infinite_weights_are_refused_too_and_by_predict_and_evaluate_json(diverged, tmp_path, capsys):
    from digitrec.cli import main

    model, meta = create_model("fast_cnn"), {"config": {"arch": "fast_cnn", "normalize": [0.1307, 0.3081]}}
    with torch.no_grad():
        model[1][-1].bias[0] = float("inf")
    infinite = tmp_path / "inf.safetensors"
    save_model(infinite, model, meta)
    with pytest.raises(CheckpointError, match=r"not finite numbers \(NaN or infinity, in 1\.\d+\.bias\)"):
        load_model(infinite)
    image = tmp_path / "blank.png"
    from PIL import Image

    Image.new("L", (28, 28), 255).save(image)
    for args in (
        ["predict", str(image), "--model", str(diverged.parent), "--json"],
        ["evaluate", str(diverged.parent), "--json"],
    ):
        assert main(args) != 0
        captured = capsys.readouterr()
        assert captured.out == "" and "holds weights that are not finite numbers" in captured.err


def test_text_files_stay_utf8_with_a_file_name_that_is_not(tmp_path):
    """tune's best.toml names its folder; a folder named tune\\xff made a file `train --config` could not read."""
    from digitrec.checkpoint import atomic_write_text
    from digitrec.config import load_toml

    path = tmp_path / "best.toml"
    atomic_write_text(path, "# train with it: digitrec train --config tune\udcff/best.toml\nlr = 0.01\n")
    assert load_toml(path) == {"lr": 0.01}
    assert "tune\\xff/best.toml" in path.read_text("utf-8")
