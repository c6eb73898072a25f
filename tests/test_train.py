"""The training loop on tiny synthetic data: it learns, writes a complete run folder, and is deterministic."""

from __future__ import annotations

import json

import pytest
import torch

from digitrec.checkpoint import load_model, load_tensors
from digitrec.config import TrainConfig
from digitrec.training import steps_in_epoch, train

TINY = TrainConfig(
    arch="fast_cnn",
    epochs=3,
    batch_size=64,
    lr=4e-3,
    schedule="onecycle",
    val_size=200,
    eval_batch_size=256,
    label_smoothing=0.1,
)


@pytest.fixture(scope="module")
def tiny_run(tiny_mnist, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return train(TINY, out, recipe="tiny", data=tiny_mnist, progress=False, log=lambda m: None)


def test_it_learns(tiny_run):
    assert tiny_run.metrics["test_accuracy"] > 0.9
    assert tiny_run.history[-1]["train_loss"] < tiny_run.history[0]["train_loss"]


def test_run_folder_is_complete(tiny_run):
    names = {p.name for p in tiny_run.out_dir.iterdir()}
    for expected in (
        "model.safetensors",
        "model.json",
        "last.safetensors",
        "last.json",
        "history.json",
        "metrics.json",
        "evaluation.json",
        "report.html",
        "curves.png",
        "confusion.png",
        "samples.png",
        "mistakes.png",
    ):
        assert expected in names
    metrics = json.loads((tiny_run.out_dir / "metrics.json").read_text())
    assert 0 <= metrics["test_accuracy"] <= 1 and metrics["params"] == 215_690
    assert {"test_loss", "val_accuracy", "train_seconds"} <= metrics.keys()
    history = json.loads((tiny_run.out_dir / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert "Test accuracy" in (tiny_run.out_dir / "report.html").read_text()


def test_checkpoint_loads_with_no_other_input(tiny_run, tiny_mnist):
    model, meta = load_model(tiny_run.model_path)
    assert meta["recipe"] == "tiny" and meta["config"]["arch"] == "fast_cnn"
    assert meta["metrics"]["test_accuracy"] == tiny_run.metrics["test_accuracy"]
    assert meta["data_checksum"] == "synthetic" and "torch" in meta["versions"]
    x = tiny_mnist.test_images[:300].unsqueeze(1).float() / 255
    accuracy = (model(x).argmax(1) == tiny_mnist.test_labels.long()).float().mean().item()
    assert accuracy == pytest.approx(tiny_run.metrics["test_accuracy"], abs=1e-6)


def test_best_checkpoint_is_chosen_on_validation(tiny_run):
    best_epoch = max(tiny_run.history, key=lambda row: row["val_accuracy"])
    assert tiny_run.metrics["val_accuracy"] == best_epoch["val_accuracy"]


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
        ),
    ],
)
def test_same_seed_same_weights(tiny_mnist, tmp_path, device):
    config = TINY.override(epochs=1, augment="affine", device=device)
    runs = [
        train(config, tmp_path / str(i), data=tiny_mnist, progress=False, report=False, log=lambda m: None)
        for i in range(2)
    ]
    a, _ = load_tensors(runs[0].model_path)
    b, _ = load_tensors(runs[1].model_path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c, _ = load_tensors(
        train(
            config.override(seed=1),
            tmp_path / "other",
            data=tiny_mnist,
            progress=False,
            report=False,
            log=lambda m: None,
        ).model_path
    )
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_resume_continues_exactly(tiny_mnist, tmp_path):
    # a schedule that does not depend on the run length, so a 1-epoch run is the first half of a 2-epoch one
    config = TINY.override(  # on the CPU, on every machine (a GPU's determinism: test_same_seed_same_weights)
        epochs=2,
        val_size=0,
        augment="affine",
        weight_decay=0.01,
        schedule="step",
        step_epochs=1,
        gamma=0.5,
        device="cpu",
    )
    full = train(config, tmp_path / "full", data=tiny_mnist, progress=False, report=False, log=lambda m: None)
    train(
        config.override(epochs=1),
        tmp_path / "half",
        data=tiny_mnist,
        progress=False,
        report=False,
        log=lambda m: None,
    )
    # pretend the 1-epoch run was a 2-epoch run that stopped after epoch 1, then resume it
    tensors, meta = load_tensors(tmp_path / "half" / "last.safetensors")
    from digitrec.checkpoint import save_tensors

    meta["config"]["epochs"] = 2.0
    meta["state"]["finished"] = False
    save_tensors(tmp_path / "half" / "last.safetensors", tensors, meta)
    resumed = train(
        TrainConfig(),
        tmp_path / "half",
        data=tiny_mnist,
        resume=True,
        progress=False,
        report=False,
        log=lambda m: None,
    )
    a, _ = load_tensors(full.model_path)
    b, _ = load_tensors(resumed.model_path)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.metrics["test_accuracy"] == full.metrics["test_accuracy"]


def test_a_run_begun_on_a_gpu_resumes_on_the_cpu(tiny_mnist, tmp_path):
    """`digitrec train --resume DIR --device cpu`: the checkpoint's own device is replaced, the run ends as one
    that never moved (its data order, schedule and seeds do not depend on the device)."""
    from digitrec.checkpoint import save_tensors
    from digitrec.errors import DigitrecError

    config = TINY.override(epochs=2, val_size=0, schedule="step", step_epochs=1, gamma=0.5, device="cpu")
    quiet = {"data": tiny_mnist, "progress": False, "report": False, "log": lambda m: None}
    full = train(config, tmp_path / "full", **quiet)
    train(config.override(epochs=1), tmp_path / "half", **quiet)
    tensors, meta = load_tensors(tmp_path / "half" / "last.safetensors")
    meta["config"].update(epochs=2.0, device="cuda")  # as if begun on a GPU machine, stopped after epoch 1
    meta["state"]["finished"] = False
    save_tensors(tmp_path / "half" / "last.safetensors", tensors, meta)
    if not torch.cuda.is_available():
        with pytest.raises(DigitrecError, match="--device cuda was asked for but no CUDA GPU is available"):
            train(TrainConfig(), tmp_path / "half", resume=True, **quiet)
    resumed = train(TrainConfig(), tmp_path / "half", resume=True, resume_device="cpu", **quiet)
    assert resumed.metrics["device"] == "cpu" and resumed.config.device == "cpu"
    a, _ = load_tensors(full.model_path)
    b, _ = load_tensors(resumed.model_path)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_early_stopping_stops(tiny_mnist, tmp_path):
    config = TINY.override(
        arch="mlp_500_256", epochs=30, lr=1e-12, schedule="constant", early_stopping_patience=2
    )
    run = train(config, tmp_path, data=tiny_mnist, progress=False, report=False, log=lambda m: None)
    assert len(run.history) < 30


def test_dry_run_is_quick_and_complete(tiny_mnist, tmp_path):
    run = train(
        TINY.override(epochs=50),
        tmp_path,
        data=tiny_mnist,
        dry_run=True,
        progress=False,
        report=False,
        log=lambda m: None,
    )
    assert run.metrics["epochs"] == 1 and run.model_path.exists()


def test_partial_last_batch_of_one_is_dropped():
    assert steps_in_epoch(129, 64) == 2 and steps_in_epoch(130, 64) == 3 and steps_in_epoch(128, 64) == 2


def test_bfloat16_autocast_runs_only_where_the_cpu_computes_in_bfloat16(monkeypatch):
    """Without AVX-512 BF16 or AMX, PyTorch emulates bfloat16 (10x slower than float32 on an AVX2 CPU): recipes
    that ask for it run in float32 there."""
    from digitrec import training

    cpu = torch.device("cpu")
    try:
        for avx512_bf16, amx in ((False, False), (True, False), (False, True)):
            training.native_bfloat16.cache_clear()
            monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
            monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
            assert training.native_bfloat16("cpu") == (avx512_bf16 or amx)
            for amp in (True, False):
                with training.autocast(cpu, amp):
                    assert torch.is_autocast_enabled("cpu") == (amp and (avx512_bf16 or amx))
    finally:
        training.native_bfloat16.cache_clear()  # the next caller asks the real CPU again


def test_clean_epochs_turn_augmentation_off_for_the_last_steps(tiny_mnist, tmp_path, monkeypatch):
    import digitrec.training as training

    asked: list[str] = []

    def recording(x, kind, generator):
        asked.append(kind)
        return x

    monkeypatch.setattr(training, "augment_batch", recording)
    config = TINY.override(epochs=2, augment="affine", clean_epochs=0.5, val_size=0)
    train(config, tmp_path, recipe="tiny", data=tiny_mnist, progress=False, report=False, log=lambda m: None)
    per_epoch = steps_in_epoch(len(tiny_mnist.train_images), config.batch_size)
    clean = round(0.5 * per_epoch)
    assert len(asked) == 2 * per_epoch
    assert asked == ["affine"] * (2 * per_epoch - clean) + ["none"] * clean


def test_a_validation_split_that_leaves_no_batch_is_one_sentence(tiny_mnist, tmp_path):
    from digitrec.errors import DataError

    leaves_one = len(tiny_mnist.train_images) - 1
    with pytest.raises(DataError, match="1 training image\\(s\\) left after the validation split"):
        train(
            TINY.override(val_size=leaves_one), tmp_path, data=tiny_mnist, progress=False, log=lambda m: None
        )
