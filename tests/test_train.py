"""The training loop on tiny synthetic data: it learns, writes a complete run folder, and is deterministic."""

from __future__ import annotations

import json

import pytest
import torch

from digitrec.checkpoint import load_model, load_tensors
from digitrec.config import TrainConfig
from digitrec.errors import DigitrecError
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
    """Every file README lists, and nothing that RUN_OUTPUTS misses (a new run would leave it behind, stale)."""
    from digitrec.runfolder import RUN_OUTPUTS

    names = {p.name for p in tiny_run.out_dir.iterdir()}
    assert names == set(RUN_OUTPUTS) - {"model.onnx", "model.int8.onnx"}  # those two are `export`'s
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
        with pytest.raises(
            DigitrecError,
            match="device cuda was asked for \\(--device or a config file's device\\) but no CUDA GPU is available",
        ):
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


def test_a_dry_runs_report_scores_robustness_on_a_few_images(tiny_mnist, tmp_path):
    """seed-cnn-bn's dry run took 41 s, 27 of them scoring 33 perturbations of 1,000 test images for its report."""
    from digitrec.config import DRY_RUN_ROBUSTNESS_IMAGES

    quiet = {"progress": False, "log": lambda m: None}
    train(TINY, tmp_path / "dry", data=tiny_mnist, dry_run=True, **quiet)
    card = (tmp_path / "dry" / "MODEL_CARD.md").read_text()
    assert f"Accuracy on {DRY_RUN_ROBUSTNESS_IMAGES:,} MNIST test images under each perturbation" in card
    run = train(TINY, tmp_path / "full", data=tiny_mnist, **quiet)
    card = (tmp_path / "full" / "MODEL_CARD.md").read_text()
    assert f"Accuracy on {min(1000, len(tiny_mnist.test_images)):,} MNIST test images under each" in card
    # the run's validation accuracy, which the report's metrics (the test set's) do not carry
    assert f"Validation accuracy {run.metrics['val_accuracy']:.2%} (chose the checkpoint)." in card


def test_metrics_count_the_epochs_trained_with_their_fraction(tiny_mnist, tmp_path):
    """A run of half an epoch (`fast` trains 0.85, `finetune --epochs 0.5`) recorded "epochs": 1, its one row."""
    lines: list[str] = []
    run = train(
        TINY.override(epochs=0.5), tmp_path, data=tiny_mnist, progress=False, report=False, log=lines.append
    )
    assert [row["epoch"] for row in run.history] == [0.5] and run.metrics["epochs"] == 0.5
    # and the epoch line said "epoch   1/1" for half an epoch
    assert [line.split("  train")[0] for line in lines if line.startswith("epoch")] == ["epoch 0.5/0.5"]


def test_epoch_lines_count_whole_epochs_and_the_part_of_the_last(tiny_mnist, tmp_path):
    lines: list[str] = []
    train(
        TINY.override(epochs=2.5), tmp_path, data=tiny_mnist, progress=False, report=False, log=lines.append
    )
    said = [line.split("  train")[0] for line in lines if line.startswith("epoch")]
    assert said == ["epoch   1/2.5", "epoch   2/2.5", "epoch 2.5/2.5"]
    # history.json, the report's table and its curves count them alike (the last row said 3)
    history = json.loads((tmp_path / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2, 2.5]


def test_an_interrupted_run_closes_its_progress_bar_before_the_interrupt_is_said(
    tiny_mnist, tmp_path, monkeypatch
):
    """Ctrl-C left the epoch's bar drawn: "stopped; digitrec train --resume ..." was printed onto its line."""
    import digitrec.training

    closed: list[bool] = []

    class Bar:
        def update(self, n):
            pass

        def close(self):
            closed.append(True)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(digitrec.training, "_progress", lambda *args: Bar())
    monkeypatch.setattr(digitrec.training, "train_steps", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(TINY, tmp_path, data=tiny_mnist, progress=True, report=False, log=lambda message: None)
    assert closed == [True]


def test_a_finished_run_resumed_says_it_is_evaluated_and_not_that_it_trains(
    tiny_mnist, tmp_path, monkeypatch, capsys
):
    train(TINY, tmp_path, data=tiny_mnist, progress=False, report=False, log=lambda message: None)
    lines: list[str] = []
    train(TINY, tmp_path, data=tiny_mnist, resume=True, progress=False, report=False, log=lines.append)
    assert any("evaluating it again, without training" in line for line in lines)
    assert not any(line.startswith("training ") for line in lines), lines
    # its model.safetensors removed: one sentence, not "evaluating it again" and then "does not exist"
    (tmp_path / "model.safetensors").unlink()
    lines.clear()
    with pytest.raises(
        DigitrecError, match="run whose model.safetensors is gone, so there is nothing to evaluate"
    ):
        train(TINY, tmp_path, data=tiny_mnist, resume=True, progress=False, report=False, log=lines.append)
    assert not any("evaluating it again" in line for line in lines), lines
    # `--resume RUN --nproc 2`: said once, by the launcher, before any worker starts (each rank said it)
    import digitrec.distributed
    from digitrec.cli import main

    def no_torchrun(*args, **kwargs):
        raise AssertionError("torchrun started")

    monkeypatch.setattr(digitrec.distributed.subprocess, "Popen", no_torchrun)
    assert main(["train", "--resume", str(tmp_path), "--nproc", "2"]) == 2
    assert capsys.readouterr().err.count("model.safetensors is gone") == 1


def test_a_finished_run_evaluated_again_is_reported_from_the_cpu(tiny_mnist, tmp_path, monkeypatch):
    """Evaluating a finished run again keeps its checkpoint, so the model was never moved to the CPU for saving:
    on a GPU the report's robustness section then compared GPU logits with CPU labels and stopped with a
    traceback. Here (a CPU) the move itself is what is checked."""
    import digitrec.training

    train(TINY, tmp_path, data=tiny_mnist, progress=False, report=False, log=lambda message: None)
    moved: list[bool] = []
    cpu = torch.nn.Module.cpu
    monkeypatch.setattr(torch.nn.Module, "cpu", lambda self: moved.append(True) or cpu(self))
    reported: list[bool] = []
    monkeypatch.setattr(
        digitrec.training, "write_report", lambda *args, **kwargs: reported.append(bool(moved))
    )
    train(TINY, tmp_path, data=tiny_mnist, resume=True, progress=False, log=lambda message: None)
    assert reported == [True]


def test_an_epoch_count_is_never_rounded_to_a_whole_one():
    from digitrec.training import _epochs

    said = [_epochs(step, 1000) for step in (1000, 3000, 850, 2995, 1, 999)]
    assert said == ["1", "3", "0.85", "2.995", "0.001", "0.999"]
    # epochs of 30,000 steps (batch size 2): four decimals still round to a whole one ("1." was said)
    assert [_epochs(step, 30_000) for step in (30_001, 60_001, 29_999)] == [
        "1.000033",
        "2.000033",
        "0.999967",
    ]


def test_a_history_row_for_a_sliver_of_an_epoch_says_the_epoch_line_s_number(tiny_mnist, tmp_path):
    """A run of 2.0002 epochs said "epoch 2.0003/2.0003" and wrote rows [1, 2, 2.0]; metrics said 0.851 for
    fast's "0.85". Rows, lines and metrics.json now say one number."""
    lines: list[str] = []
    config = TINY.override(batch_size=2, epochs=2.002)  # 500 steps an epoch: the last epoch is one step
    run = train(config, tmp_path, data=tiny_mnist, progress=False, report=False, log=lines.append)
    said = [line.split("  train")[0] for line in lines if line.startswith("epoch")]
    assert said[-1] == "epoch 2.002/2.002"
    assert [row["epoch"] for row in run.history] == [1, 2, 2.002] and run.metrics["epochs"] == 2.002
    lines.clear()  # 14 steps of 16: 0.875 of an epoch, which the line rounds to 0.88
    run = train(
        TINY.override(epochs=0.85),
        tmp_path / "part",
        data=tiny_mnist,
        progress=False,
        report=False,
        log=lines.append,
    )
    assert [line.split("  train")[0] for line in lines if line.startswith("epoch")] == ["epoch 0.88/0.88"]
    assert [row["epoch"] for row in run.history] == [0.88] and run.metrics["epochs"] == 0.88


@pytest.mark.parametrize("seed", [2**45, 2**63 - 1])
def test_every_seed_the_config_accepts_trains_and_a_small_one_keeps_its_draws(tiny_mnist, tmp_path, seed):
    """TrainConfig takes seeds up to 2**63 - 1, but the data order and per-step seeds multiply the seed past the
    2**64 torch's generators take: `--seed 4611686018427387904` stopped with an overflow traceback."""
    from digitrec.training import epoch_order

    config = TINY.override(seed=seed, augment="affine", val_size=0)
    run = train(
        config, tmp_path, data=tiny_mnist, dry_run=True, progress=False, report=False, log=lambda m: None
    )
    assert run.metrics["steps"] > 0 and run.model_path.exists()
    # seeds that worked before draw as they did: the same order as an unreduced seed
    expected = torch.randperm(50, generator=torch.Generator().manual_seed(7 * 100_003 + 2))
    assert torch.equal(epoch_order(50, 7, 2, torch.device("cpu")), expected)


def test_a_run_with_threads_leaves_torchs_thread_count_as_it_was(tiny_mnist, tmp_path):
    """`digitrec.train(..., threads=2)` left torch on 2 threads, so the next run of the process with threads = 0
    trained on 2, not on the default the CLI command its card gives uses: other weights for the same config."""
    before = torch.get_num_threads()
    config = TINY.override(epochs=1, threads=before + 1)
    train(config, tmp_path, data=tiny_mnist, dry_run=True, progress=False, report=False, log=lambda m: None)
    assert torch.get_num_threads() == before


def test_more_threads_than_cores_trains_and_says_it_is_slower(tiny_mnist, tmp_path, monkeypatch):
    """`--threads 1000` on 2 cores had not finished a 7-step dry run in two minutes, without a word; it is allowed
    (the one way to reproduce the weights of a machine with that many threads), and now said."""
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    lines: list[str] = []
    for threads in (2, 3):
        config = TINY.override(epochs=1, threads=threads)
        train(config, tmp_path / str(threads), data=tiny_mnist, dry_run=True, progress=False, report=False,
              log=lines.append)  # fmt: skip
    notes = [line for line in lines if line.startswith("note:")]
    assert notes == [
        "note: 3 threads on 2 cores: each step will take longer than on 2 (so many only reproduce the weights of a "
        "machine that has them)"
    ]


def test_validation_scores_one_view_and_the_test_set_the_recipes_views(tiny_mnist, tmp_path, monkeypatch):
    """`default` (five views) spent 1.4 s of its 10 s scoring each epoch's validation in five views, which chose
    the same epoch as one view in 20 runs of 20; the test set and the checkpoint keep the recipe's views."""
    from digitrec import training

    views: list[tuple[int, int]] = []
    real = training.recipe_logits

    def recording(model, images, config):
        views.append((len(images), config.tta_views))
        return real(model, images, config)

    monkeypatch.setattr(training, "recipe_logits", recording)
    monkeypatch.setattr("digitrec.evaluate.recipe_logits", recording)
    config = TINY.override(epochs=2, tta_views=5, val_size=200)
    run = train(config, tmp_path, data=tiny_mnist, progress=False, report=False, log=lambda m: None)
    assert views == [(200, 1), (200, 1), (len(tiny_mnist.test_images), 5)]
    assert load_tensors(tmp_path / "model.safetensors")[1]["config"]["tta_views"] == 5
    assert run.metrics["test_accuracy"] > 0


def test_partial_last_batch_of_one_is_dropped():
    assert steps_in_epoch(129, 64) == 2 and steps_in_epoch(130, 64) == 3 and steps_in_epoch(128, 64) == 2


def test_too_few_images_for_a_batch_names_the_split_only_where_there_is_one():
    """Without a validation split the sentence said "choose a smaller --val-size" of a split of 0."""
    from digitrec.config import TrainConfig
    from digitrec.errors import DataError
    from digitrec.training import _steps_per_epoch

    with pytest.raises(DataError, match="after the validation split of 5: .* choose a smaller --val-size"):
        _steps_per_epoch(1, TrainConfig(val_size=5), 1)
    with pytest.raises(
        DataError, match="^3 training image\\(s\\), too few for one batch of two per process; train on"
    ):
        _steps_per_epoch(3, TrainConfig(val_size=0, batch_size=4), 2)
    assert _steps_per_epoch(4, TrainConfig(val_size=0, batch_size=4), 2) == 1


def test_bfloat16_autocast_runs_only_where_the_cpu_computes_in_bfloat16(monkeypatch):
    """Without AVX-512 BF16 or AMX, PyTorch emulates bfloat16 (10x slower than float32 on an AVX2 CPU): recipes
    that ask for it run in float32 there."""
    from digitrec import precision

    cpu = torch.device("cpu")
    try:
        for avx512_bf16, amx in ((False, False), (True, False), (False, True)):
            precision.native_bfloat16.cache_clear()
            monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
            monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
            assert precision.native_bfloat16("cpu") == (avx512_bf16 or amx)
            for amp in (True, False):
                with precision.autocast(cpu, amp):
                    assert torch.is_autocast_enabled("cpu") == (amp and (avx512_bf16 or amx))
    finally:
        precision.native_bfloat16.cache_clear()  # the next caller asks the real CPU again


def test_a_gpu_that_only_emulates_bfloat16_trains_in_float32(monkeypatch):
    """torch.cuda.is_bf16_supported() counts emulation as support (a T4, V100 or RTX 20xx), and MPS has bfloat16
    from macOS 14 only: both were taken as native, so every amp recipe ran emulated there (or failed on MPS)."""
    from digitrec import precision

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    try:
        for macos_14, native in ((False, False), (True, True)):
            precision.native_bfloat16.cache_clear()
            monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor, v=macos_14: v)
            assert precision.native_bfloat16("cuda") is False
            assert precision.native_bfloat16("mps") is native
    finally:
        precision.native_bfloat16.cache_clear()


@pytest.mark.parametrize("native", [True, False])
def test_the_first_line_says_whether_the_run_computes_in_bfloat16(native, tiny_mnist, tmp_path, monkeypatch):
    """The tutorial tells users the run prints which precision it used; the start line said nothing when it was
    bfloat16 (only the fallback to float32 was said)."""
    from digitrec import precision, training

    # the start line (training's own name) and autocast (precision's) ask the same question
    monkeypatch.setattr(training, "native_bfloat16", lambda device_type: native)
    monkeypatch.setattr(precision, "native_bfloat16", lambda device_type: native)
    lines: list[str] = []
    train(
        TINY.override(amp=True),
        tmp_path,
        data=tiny_mnist,
        dry_run=True,
        progress=False,
        report=False,
        log=lines.append,
    )
    first = lines[0]
    assert first.startswith("training ") and (" on cpu in bfloat16, " in first) == native
    assert any("bfloat16 autocast off" in line for line in lines) == (not native)
    lines.clear()
    train(
        TINY.override(amp=False),
        tmp_path / "fp32",
        data=tiny_mnist,
        dry_run=True,
        progress=False,
        report=False,
        log=lines.append,
    )
    assert "bfloat16" not in lines[0] and not any("autocast off" in line for line in lines)


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


def test_weight_decay_shrinks_weight_matrices_and_kernels_only():
    """With zero gradients, one AdamW step is the decoupled decay alone: p * (1 - lr * weight_decay) for
    weights, nothing for biases and batch norm."""
    from digitrec.models import create_model
    from digitrec.training import make_optimizer

    torch.manual_seed(0)
    model = create_model("bn_cnn")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for optimizer in ("adamw", "sgd", "adam"):
        config = TrainConfig(optimizer=optimizer, lr=0.1, weight_decay=0.5, momentum=0.9)
        groups = make_optimizer(model, config).param_groups
        decayed = {id(p) for g in groups if g["weight_decay"] == 0.5 for p in g["params"]}
        assert {name for name, p in model.named_parameters() if id(p) in decayed} == {
            name for name, p in model.named_parameters() if p.ndim >= 2
        }, optimizer
    optimizer = make_optimizer(model, TrainConfig(optimizer="adamw", lr=0.1, weight_decay=0.5))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    biases_and_norms = 0
    for name, p in model.named_parameters():
        if name.endswith(".weight") and p.ndim >= 2:
            torch.testing.assert_close(p.detach(), before[name] * 0.95, msg=name)
        else:
            biases_and_norms += 1
            assert torch.equal(p.detach(), before[name]), name
    assert biases_and_norms >= 4  # the network has conv and linear biases and batch-norm scales


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_the_training_loss_is_label_smoothed_cross_entropy(tiny_mnist, smoothing):
    """One full-batch step of an MLP (no dropout, no batch norm) at a negligible learning rate: the loss it
    reports is (1 - e) x NLL + e x the mean over the ten classes of -log p, worked out here from the logits.
    The labels are the model's own confident answers, so the two terms differ widely."""
    from digitrec.data import as_input
    from digitrec.models import create_model
    from digitrec.training import make_optimizer, train_steps

    images = tiny_mnist.train_images[:256]
    config = TrainConfig(
        arch="mlp_500_256", batch_size=256, lr=1e-12, label_smoothing=smoothing, device="cpu"
    )
    torch.manual_seed(0)
    model = create_model(config.arch, config.normalize)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)
        log_p = model(as_input(images)).log_softmax(1)
    labels = log_p.argmax(1)
    nll, spread = -log_p.max(1).values.mean(), (-log_p.mean(1)).mean()
    assert spread > nll + 1
    expected = (1 - smoothing) * nll + smoothing * spread
    loss, _ = train_steps(model, make_optimizer(model, config), images, labels, config, range(1), 1, 1)
    assert float(loss) == pytest.approx(expected.item(), rel=1e-5)


def test_validation_is_the_seed_0_split_held_out_of_training_whatever_the_seed(
    tiny_mnist, tmp_path, monkeypatch
):
    """Training sees exactly the split's training images and validation exactly its validation images, for a
    run of any seed: `digitrec calibrate` fits the temperature on the same seed-0 split, which must be held out."""
    import digitrec.training as training
    from digitrec.data import split_validation

    seen: dict[str, list[torch.Tensor]] = {"train": [], "val": []}
    real_train_steps, real_evaluate = training.train_steps, training.evaluate

    def recording_train_steps(model, optimizer, images, *args, **kwargs):
        seen["train"].append(images.cpu())
        return real_train_steps(model, optimizer, images, *args, **kwargs)

    def recording_evaluate(model, images, labels, config):
        seen["val"].append(images.cpu())
        return real_evaluate(model, images, labels, config)

    monkeypatch.setattr(training, "train_steps", recording_train_steps)
    monkeypatch.setattr(training, "evaluate", recording_evaluate)
    config = TINY.override(epochs=1, val_size=300, seed=7)
    train(config, tmp_path, data=tiny_mnist, progress=False, report=False, log=lambda m: None)
    train_images, _, val_images, _ = split_validation(
        tiny_mnist.train_images, tiny_mnist.train_labels, 300, seed=0
    )
    assert len(seen["train"]) == len(seen["val"]) == 1
    assert torch.equal(seen["train"][0], train_images) and torch.equal(seen["val"][0], val_images)
    rows = {bytes(image.numpy()) for image in tiny_mnist.train_images}
    assert len(rows) == len(
        tiny_mnist.train_images
    )  # no duplicate images, so disjoint rows mean disjoint images
    assert not {bytes(image.numpy()) for image in train_images} & {
        bytes(image.numpy()) for image in val_images
    }


def test_the_checkpoint_kept_is_the_first_epoch_with_the_best_validation_accuracy(
    tiny_mnist, tmp_path, monkeypatch
):
    """Validation accuracies 50%, 90%, 90%, 70%: the weights saved are epoch 2's, not the last epoch's nor
    epoch 3's (a tie is no improvement), and the validation accuracy reported is that epoch's. (This replaces
    test_best_checkpoint_is_chosen_on_validation, which compared the two figures only: a run that saved every
    epoch's weights passed it.)"""
    import digitrec.training as training

    scripted = iter([0.5, 0.9, 0.9, 0.7])
    monkeypatch.setattr(training, "evaluate", lambda *args: (1.0, next(scripted)))
    snapshots: list[dict[str, torch.Tensor]] = []

    def snapshot(model, row):
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return False

    config = TINY.override(epochs=4, schedule="constant")
    run = train(
        config, tmp_path, data=tiny_mnist, progress=False, report=False, log=lambda m: None, on_epoch=snapshot
    )
    assert [row["val_accuracy"] for row in run.history] == [0.5, 0.9, 0.9, 0.7]
    assert run.metrics["val_accuracy"] == 0.9
    saved, _ = load_tensors(run.model_path)
    assert all(torch.equal(saved[k], snapshots[1][k]) for k in saved)
    assert not all(torch.equal(saved[k], snapshots[2][k]) for k in saved)  # epochs 2 and 3 did differ


# SGD at a learning rate of 100: LeNet's loss on the tiny set is NaN within its first epoch (19 steps of 64)
DIVERGING = TrainConfig(
    arch="lenet", epochs=2, batch_size=64, optimizer="sgd", lr=100.0, val_size=0, device="cpu"
)


def test_a_run_whose_loss_turns_nan_stops_with_one_sentence_and_writes_nothing(tiny_mnist, tmp_path):
    """It trained on, wrote NaN into history.json and metrics.json, and a model.safetensors of NaN weights that
    every loader refuses."""
    from digitrec.errors import TrainingDiverged

    with pytest.raises(TrainingDiverged) as stopped:
        train(DIVERGING, tmp_path, data=tiny_mnist, progress=False, report=False, log=lambda m: None)
    assert str(stopped.value) == (
        "training diverged in epoch 1, between steps 1 and 19: the loss is nan; lower the learning rate "
        "(--lr, now 100) and train again."
    )
    assert list(tmp_path.iterdir()) == []  # no checkpoint, model, history or metrics


def diverging_from(monkeypatch, first_step: int) -> None:
    """Train at a sound learning rate, then at 100 from the 0-based step `first_step` on."""
    from digitrec import training

    sound = training.lr_at
    monkeypatch.setattr(
        training, "lr_at", lambda c, s, *rest: 100.0 if s >= first_step else sound(c, s, *rest)
    )


@pytest.mark.parametrize(
    "every, first_step, where, kept",
    [
        (0, 19, "in epoch 2, between steps 20 and 38", 19),  # found at the end of the epoch
        (5, 12, "in epoch 1, between steps 11 and 15", 10),  # found at the mid-epoch checkpoint after it
    ],
    ids=["epoch-end", "mid-epoch-checkpoint"],
)
def test_a_run_that_diverges_later_keeps_its_last_good_checkpoint(
    tiny_mnist, tmp_path, monkeypatch, every, first_step, where, kept
):
    """The folder is as the last checkpoint before the divergence left it: finite weights to look at, nothing
    of the steps after, no metrics; a new run needs --overwrite, as --resume would diverge again."""
    from digitrec.errors import TrainingDiverged

    diverging_from(monkeypatch, first_step)
    config = DIVERGING.override(lr=0.05, checkpoint_every_steps=every)
    with pytest.raises(TrainingDiverged) as stopped:
        train(config, tmp_path, data=tiny_mnist, progress=False, report=False, log=lambda m: None)
    assert str(stopped.value) == (
        f"training diverged {where}: the loss is nan; lower the learning rate (--lr, now 0.05) and train again "
        f"with --overwrite ({tmp_path} keeps the last checkpoint before it, of step {kept}, which --resume would "
        "take the same way)."
    )
    tensors, meta = load_tensors(tmp_path / "last.safetensors")
    assert meta["state"]["step"] == kept and all(
        t.isfinite().all() for t in tensors.values() if t.is_floating_point()
    )
    assert not (tmp_path / "metrics.json").exists()
    if every == 0:  # the first epoch's row and model, as a run killed after it would leave them
        assert [row["epoch"] for row in json.loads((tmp_path / "history.json").read_text())] == [1]
        load_model(tmp_path / "model.safetensors")  # finite weights: it loads
    else:
        assert not (tmp_path / "history.json").exists() and not (tmp_path / "model.safetensors").exists()


def test_weights_that_stop_being_finite_stop_the_run_even_with_a_finite_loss(
    tiny_mnist, tmp_path, monkeypatch
):
    """An epoch's last update can break the weights after its loss was computed: that epoch's checkpoint would
    have held them."""
    from digitrec import training
    from digitrec.errors import TrainingDiverged

    steps = training.train_steps

    def breaking_the_weights(model, *args, **kwargs):
        result = steps(model, *args, **kwargs)
        with torch.no_grad():
            next(model.parameters())[0] = float("inf")
        return result

    monkeypatch.setattr(training, "train_steps", breaking_the_weights)
    with pytest.raises(
        TrainingDiverged, match="in epoch 1, between steps 1 and 19: the weights are no longer finite"
    ):
        train(
            DIVERGING.override(lr=0.05),
            tmp_path,
            data=tiny_mnist,
            progress=False,
            report=False,
            log=lambda m: None,
        )
    assert list(tmp_path.iterdir()) == []


def test_train_that_diverges_is_one_sentence_on_the_command_line(idx_folder, tmp_path, capsys):
    from digitrec.cli import main

    out = tmp_path / "run"
    args = ["train", "--recipe", "seed-lenet", "--lr", "100", "--epochs", "1", "--batch-size", "64"]
    args += [
        "--val-size",
        "0",
        "--data-dir",
        str(idx_folder),
        "--out",
        str(out),
        "--no-progress",
        "--no-report",
    ]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert "test accuracy" not in captured.out
    assert captured.err.strip().splitlines()[-1] == (
        "digitrec: error: training diverged in epoch 1, between steps 1 and 19: the loss is nan; lower the "
        "learning rate (--lr, now 100) and train again."
    )
    assert not (out / "metrics.json").exists() and not (out / "model.safetensors").exists()


# ---------------------------------------------------------------- one run per folder at a time

SMALL = TrainConfig(arch="mlp_500_256", epochs=2, batch_size=64, val_size=200, device="cpu", threads=1)
QUIET = {"progress": False, "report": False, "log": lambda message: None}


def _contents(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_a_second_run_into_a_folder_in_use_is_refused_and_leaves_the_first_alone(tiny_mnist, tmp_path):
    """Two runs into one folder at once both trained there: the second's metrics and model.json described the
    first's weights (train() reads model.safetensors back to test it), and `evaluate` refused the folder."""
    import os

    from digitrec.errors import DigitrecError

    reference = train(SMALL, tmp_path / "alone", data=tiny_mnist, **QUIET)
    shared = tmp_path / "shared"
    refusals = []

    def second_runs(model, row):  # the first run is training in `shared`, between two epochs
        before = _contents(shared)
        for kwargs in ({}, {"overwrite": True}, {"resume": True}, {"dry_run": True, "overwrite": True}):
            sentence = f"{shared} is in use by another digitrec run \\(pid {os.getpid()}\\); wait for it"
            with pytest.raises(DigitrecError, match=sentence) as refused:
                train(SMALL.override(seed=1), shared, data=tiny_mnist, **kwargs, **QUIET)
            refusals.append(str(refused.value))
            assert _contents(shared) == before  # nothing of the first run touched
        return False

    first = train(SMALL, shared, data=tiny_mnist, on_epoch=second_runs, **QUIET)
    assert len(refusals) == 8 and all(sentence.count(".") == 1 for sentence in refusals)
    assert first.metrics["test_accuracy"] == reference.metrics["test_accuracy"]
    model, meta = load_model(shared / "model.safetensors")  # the checksums hold: evaluate takes the folder
    assert meta["config"]["seed"] == 0
    kept, _ = load_tensors(shared / "model.safetensors")
    alone, _ = load_tensors(tmp_path / "alone" / "model.safetensors")
    assert all(torch.equal(kept[k], alone[k]) for k in alone)
    # the lock went with the run: the folder holds only the run's files, and the next run may start there
    assert not [p.name for p in shared.iterdir() if p.name.startswith(".")]
    train(SMALL.override(seed=1), shared, data=tiny_mnist, **QUIET)


def test_a_lock_held_by_another_process_refuses_the_run_and_a_stale_lock_file_does_not(tiny_mnist, tmp_path):
    import subprocess
    import sys

    from digitrec.errors import DigitrecError
    from digitrec.folderlock import LOCK_FILE

    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("the user's")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode()); print('held', flush=True); "
            "sys.stdin.read()",
            str(out / LOCK_FILE),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        before = _contents(out)
        with pytest.raises(
            DigitrecError, match=f"{out} is in use by another digitrec run \\(pid {holder.pid}\\)"
        ):
            train(SMALL, out, data=tiny_mnist, **QUIET)
        assert _contents(out) == before
    finally:
        holder.communicate("", timeout=30)  # the holder exits: its lock goes with it, its file stays
    assert (out / LOCK_FILE).exists()
    run = train(SMALL, out, data=tiny_mnist, **QUIET)  # a lock file nobody holds refuses nothing
    assert run.metrics["test_accuracy"] > 0
    assert (out / "notes.txt").read_text() == "the user's" and not (out / LOCK_FILE).exists()


def test_the_lock_is_released_when_a_run_is_refused_fails_or_is_interrupted(tiny_mnist, tmp_path):
    from digitrec.errors import DigitrecError

    new = tmp_path / "new" / "run"
    with pytest.raises(DigitrecError, match="early stopping watches the validation accuracy"):
        train(SMALL.override(val_size=0, early_stopping_patience=1), new, data=tiny_mnist, **QUIET)
    assert not (tmp_path / "new").exists()  # a refused run leaves no folder it made

    def interrupt(model, row):
        if row["epoch"] == 2:  # after epoch 1's checkpoint
            raise KeyboardInterrupt
        return False

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(SMALL, out, data=tiny_mnist, on_epoch=interrupt, **QUIET)
    resumed = train(SMALL, out, data=tiny_mnist, resume=True, **QUIET)  # not refused as in use
    assert resumed.metrics["epochs"] == 2


def test_a_symbolic_link_at_the_locks_name_is_refused_not_written_through(tiny_mnist, tmp_path):
    """The lock followed a link left at .digitrec.lock and wrote its pid over the target's contents."""
    from digitrec.errors import DigitrecError
    from digitrec.folderlock import LOCK_FILE

    out = tmp_path / "run"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (out / LOCK_FILE).symlink_to(victim)
    with pytest.raises(DigitrecError, match="is a symbolic link where digitrec keeps the folder's lock"):
        train(SMALL, out, data=tiny_mnist, dry_run=True, **QUIET)
    assert victim.read_text() == "precious"


def test_default_run_folders_of_runs_started_in_the_same_second_differ(tmp_path, monkeypatch):
    """Both runs took runs/fast-<the same second> and trained into it at once."""
    from digitrec import folderlock

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(folderlock.time, "strftime", lambda fmt, *args: "20261207-101010")
    first = folderlock.default_out_dir("fast")
    second = folderlock.default_out_dir("fast")
    assert (first.name, second.name) == ("fast-20261207-101010", "fast-20261207-101010-2")
    assert first.is_dir() and second.is_dir()


def test_a_dry_run_caps_the_clean_epochs_with_the_epochs(tiny_mnist, tmp_path):
    """`digitrec train --epochs 5 --clean-epochs 2 --dry-run` stopped with "clean_epochs must be between 0 and
    epochs (1), got 2.0": the dry run capped the epochs to DRY_RUN_MAX_EPOCHS but not the clean epochs."""
    config = TINY.override(epochs=5, clean_epochs=2, augment="affine")
    run = train(
        config, tmp_path, data=tiny_mnist, dry_run=True, progress=False, report=False, log=lambda m: None
    )
    assert run.metrics["epochs"] == 1 and run.config.clean_epochs == 1 and run.model_path.exists()
