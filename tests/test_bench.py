"""bench train and bench infer on a tiny model and the synthetic data set: what they report, not how fast."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from digitrec.bench import bench_infer, bench_train, infer_table, multiply_adds, train_table
from digitrec.checkpoint import load_model, save_model
from digitrec.cli import main
from digitrec.config import get_recipe
from digitrec.errors import DigitrecError
from digitrec.models import create_model

TINY = {
    "fast": get_recipe("fast").override(epochs=2),
    "slow": get_recipe("fast").override(epochs=3, lr=1e-4, amp=False, channels_last=False),
}


@pytest.fixture(autouse=True)
def inductor_freezing_restored():
    """bench infer's compiled and int8 rows turn inductor's freezing on for the whole process (a command of its
    own); the tests after them in this process compile as usual."""
    import torch._inductor.config as inductor_config

    freezing = inductor_config.freezing
    yield
    inductor_config.freezing = freezing


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_fast_run: Path) -> Path:
    return tiny_fast_run / "model.safetensors"


def test_bench_train_reports_every_recipe_and_seed(tiny_mnist) -> None:
    results = bench_train(TINY, tiny_mnist, target=0.5, seeds=2, log=lambda msg: None)
    assert [r.recipe for r in results] == ["fast", "slow"]
    for result in results:
        assert len(result.runs) == 2 and result.params > 0
        assert [run.seed for run in result.runs] == [0, 1]
        expected_epochs = 2 if result.recipe == "fast" else 3
        assert all(len(run.checks) == expected_epochs for run in result.runs)  # one test check per epoch
        # each seed's figure is what its last epoch's check measured (no validation split: the last weights are
        # kept), and the report's spread is of those figures: min, median (of two, their mean) and max
        per_seed = [run.test_accuracy for run in result.runs]
        assert per_seed == [run.checks[-1][1] for run in result.runs]
        assert result.to_dict()["test_accuracy"] == {
            "min": min(per_seed),
            "median": pytest.approx(sum(per_seed) / 2),
            "max": max(per_seed),
        }
    fast = results[0]
    assert fast.seconds_to_target is not None and fast.seconds_to_target <= max(
        r.train_seconds for r in fast.runs
    )
    # each run's peak is the process's own, whatever ran before it: it was the growth over what the process held,
    # and a later seed that reused what an earlier one had freed read almost nothing (40 MB, then 2 MB)
    import sys

    if sys.platform == "linux":
        peaks = [run.peak_mb for result in results for run in result.runs]
        assert all(peak is not None and peak > 0.8 * max(peaks) for peak in peaks), peaks
    table = train_table(results, 0.5)
    assert "| fast |" in table and "| slow |" in table and "seconds to 50.00%" in table
    assert "| peak RSS MB |" in table
    assert "| fast | " in table and " 1.0 |" in table  # fast's ratio to itself


def test_bench_train_marks_a_missed_target_and_can_stop_early(tiny_mnist) -> None:
    missed = bench_train({"fast": TINY["fast"]}, tiny_mnist, target=1.01, seeds=1, log=lambda msg: None)[0]
    assert missed.seconds_to_target is None and "missed (0/1 reached)" in train_table([missed], 1.01)
    stopped = bench_train(
        {"fast": TINY["slow"]}, tiny_mnist, target=0.0, stop_at_target=True, log=lambda msg: None
    )[0]
    assert len(stopped.runs[0].checks) == 1  # reached at the first check, so training ended there


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--target", "99"],
            "--target is a test accuracy as a fraction between 0 and 1 (0.99 for 99%), not 99; "
            "did you mean 0.99?",
        ),
        (["--target", "1.5"], "between 0 and 1 (0.99 for 99%), not 1.5."),  # it suggested 0.015, below chance
        (["--target", "100"], "between 0 and 1 (0.99 for 99%), not 100."),
        (["--target", "-1"], "between 0 and 1 (0.99 for 99%), not -1."),
        (["--recipes", ""], "--recipes names no recipe"),
        (["--recipes", " , "], "--recipes names no recipe"),
        (["--recipes", "fast,"], "--recipes 'fast,' has an empty name beside a comma"),
        (["--recipes", "fast,,default"], "has an empty name"),
        (["--recipes", "fast,fast"], "--recipes names fast more than once; give each once."),
        (["--recipes", "fast,nope"], "unknown recipe 'nope'"),
    ],
)
def test_bench_train_refuses_a_bad_target_or_recipe_list_before_any_work(
    args, message, monkeypatch, capsys
) -> None:
    def no_work(*args, **kwargs):
        raise DigitrecError("MNIST was loaded: the command went to work.")

    monkeypatch.setattr("digitrec.data.load_mnist", no_work)
    assert main(["bench", "train", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_bench_infer_times_each_backend_at_each_batch_size(tiny_checkpoint: Path, tiny_mnist) -> None:
    pytest.importorskip("onnxruntime")
    backends = ("torch-fp32", "torch-bf16", "onnx-fp32", "onnx-int8")
    said: list[str] = []
    results = bench_infer(
        tiny_checkpoint,
        tiny_mnist.test_images,
        backends=backends,
        batch_sizes=(1, 64),
        rounds=2,
        seconds=0.01,
        calibration=tiny_mnist.train_images,
        test_labels=tiny_mnist.test_labels,
        log=said.append,
    )
    # both int8 rows say their test accuracy, as README says (onnx-int8's was dropped with the export's log)
    assert any(line.startswith("onnx-int8: test accuracy ") and "(float32 " in line for line in said), said
    assert [(r.backend, r.batch_size) for r in results] == [(b, s) for b in backends for s in (1, 64)]
    per_image = multiply_adds(load_model(tiny_checkpoint)[0]).forward
    for r in results:
        assert r.images_per_s > 0 and 0 < r.p50_ms <= r.p99_ms
        assert r.multiply_adds_per_image == per_image
        assert r.multiply_adds_per_s == pytest.approx(r.images_per_s * per_image)
    table = infer_table(results)
    assert all(f"| {b} |" in table for b in backends) and "G mult-adds/s at batch 64 |" in table


def test_bench_infer_runs_torch_int8_and_says_its_accuracy(tiny_checkpoint: Path, tiny_mnist) -> None:
    pytest.importorskip("torchao")
    said: list[str] = []
    results = bench_infer(
        tiny_checkpoint,
        tiny_mnist.test_images,
        backends=("torch-fp32", "torch-int8"),
        batch_sizes=(1, 64),
        rounds=1,
        seconds=0.01,
        calibration=tiny_mnist.train_images,
        test_labels=tiny_mnist.test_labels,
        log=said.append,
    )
    assert [(r.backend, r.batch_size) for r in results] == [
        (b, s) for b in ("torch-fp32", "torch-int8") for s in (1, 64)
    ]
    assert all(r.images_per_s > 0 for r in results)
    assert any(line.startswith("torch-int8: test accuracy ") and "(float32 " in line for line in said)
    with pytest.raises(DigitrecError, match="torch-int8 needs MNIST"):
        bench_infer(
            tiny_checkpoint,
            tiny_mnist.test_images,
            backends=("torch-int8",),
            batch_sizes=(8,),
            log=said.append,
        )


def test_bench_infer_leaves_torch_int8_out_in_one_line_without_torchao(
    tiny_checkpoint: Path, tiny_mnist, monkeypatch
) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else find_spec(name, *a)
    )
    said: list[str] = []
    results = bench_infer(
        tiny_checkpoint,
        tiny_mnist.test_images,
        backends=("torch-fp32", "torch-int8"),
        batch_sizes=(8,),
        rounds=1,
        seconds=0.01,
        log=said.append,
    )
    assert [r.backend for r in results] == ["torch-fp32"]
    skipped = [line for line in said if line.startswith("torch-int8")]
    assert len(skipped) == 1 and 'pip install "digitrec[int8]"' in skipped[0]


def test_bench_infer_rejects_an_unknown_backend(tiny_checkpoint: Path, tiny_mnist) -> None:
    with pytest.raises(DigitrecError, match="unknown backend"):
        bench_infer(tiny_checkpoint, tiny_mnist.test_images, backends=("tensorrt",))


def test_bench_commands_print_json(
    tiny_checkpoint: Path, idx_folder: Path, tiny_mnist, capsys: pytest.CaptureFixture
) -> None:
    assert (
        main(
            [
                "bench",
                "infer",
                "--model",
                str(tiny_checkpoint),
                "--backends",
                "torch-fp32,onnx-fp32",
                "--batch-sizes",
                "1,16",
                "--rounds",
                "1",
                "--seconds",
                "0.01",
                "--json",
                "--data-dir",
                str(idx_folder),
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert {(r["backend"], r["batch_size"]) for r in report["results"]} == {
        (b, s) for b in ("torch-fp32", "onnx-fp32") for s in (1, 16)
    }
    assert all(r["images_per_s"] > 0 for r in report["results"])
    per_image = report["multiply_adds_per_image"]
    assert per_image == multiply_adds(load_model(tiny_checkpoint)[0]).forward
    for r in report["results"]:
        assert r["multiply_adds_per_s"] == pytest.approx(r["images_per_s"] * per_image)
    assert report["matmul_multiply_adds_per_s"] > 0
    assert {r["threads"] for r in report["results"]} == {report["threads"]}  # ONNX Runtime's as torch's

    assert (
        main(
            [
                "bench",
                "train",
                "--recipes",
                "fast",
                "--max-epochs",
                "0.5",
                "--target",
                "0.2",
                "--json",
                "--data-dir",
                str(idx_folder),
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    (fast,) = report["recipes"]
    assert fast["recipe"] == "fast" and fast["seeds"] == 1 and report["target"] == 0.2
    assert set(fast["test_accuracy"]) == {"min", "median", "max"}
    assert fast["epoch_multiply_adds"] == multiply_adds(create_model(get_recipe("fast").arch)).training * len(
        tiny_mnist.train_images
    )  # fast keeps no validation split: every training image, every epoch


def test_multiply_adds_counts_each_convolution_and_linear_layer() -> None:
    """By hand: conv 1->4 3x3 on 28x28 (26x26 out), conv 4->8 3x3 stride 2 in 2 groups (12x12 out), linear."""
    from torch import nn

    model = nn.Sequential(
        nn.Conv2d(1, 4, 3),
        nn.ReLU(),
        nn.Conv2d(4, 8, 3, stride=2, groups=2),
        nn.BatchNorm2d(8),
        nn.Flatten(),
        nn.Linear(8 * 12 * 12, 10),
    ).train()
    counted = multiply_adds(model)
    first, second, linear = 4 * 26 * 26 * 9, 8 * 12 * 12 * 2 * 9, 10 * 8 * 12 * 12
    assert counted.forward == first + second + linear
    assert counted.training == 3 * (first + second + linear) - first  # no gradient for the input image
    assert model.training and not model[2]._forward_hooks  # left as it was found
    # the docstrings' layers by hand: conv 16x12x12x25 + conv 32x12x12x(16x9) + linear 128x1152 + 128x10
    assert multiply_adds(create_model("fast_cnn_lite")).forward == 869_888
    # on the centre 24x24: conv 16x10x10x25 + conv 32x10x10x(16x9) + linear 128x800 + 128x10
    assert multiply_adds(create_model("fast_cnn_crop")).forward == 40_000 + 460_800 + 102_400 + 1_280


def test_tables_set_the_work_beside_the_matrix_multiply_rate(tiny_mnist) -> None:
    result = bench_train({"fast": TINY["fast"]}, tiny_mnist, target=0.5, log=lambda msg: None)
    work = result[0].epoch_multiply_adds
    assert work == multiply_adds(create_model(get_recipe("fast").arch)).training * len(
        tiny_mnist.train_images
    )
    table = train_table(result, 0.5, matmul_per_s=work / 2)  # a machine doing one epoch's work in 2 s
    assert table.splitlines()[-1].endswith(f"| {work / 1e9:.1f} | 2.00 |")
    assert train_table(result, 0.5).splitlines()[-1].endswith(" | - |")  # no rate measured: no floor


@pytest.mark.parametrize("native", [False, True])
def test_compiled_backend_runs_float32_where_the_cpu_would_emulate_bfloat16(monkeypatch, native) -> None:
    """On an AVX2-only CPU bfloat16 is emulated (5x slower than float32 eager there), so `torch-compiled`
    compiles the float32 model; with native bfloat16 it compiles the bfloat16 one."""
    import numpy as np
    import torch
    import torch._inductor.config as inductor_config

    from digitrec import bench, precision
    from digitrec.models import create_model

    monkeypatch.setattr(torch, "compile", lambda model, **options: model)  # dtype is chosen before compiling
    monkeypatch.setattr(precision, "native_bfloat16", lambda device_type: native)
    freezing = inductor_config.freezing
    try:
        run = bench.torch_runner(create_model("fast_cnn"), compiled=True)
        logits = run(np.zeros((2, 1, 28, 28), np.float32))
    finally:
        inductor_config.freezing = freezing  # torch_runner turns it on for the whole process
    assert logits.dtype == (torch.bfloat16 if native else torch.float32)


def _seed_run(seconds_to_target, accuracy=0.99, train_seconds=1.0):
    from digitrec.bench import SeedRun

    return SeedRun(0, seconds_to_target, accuracy, train_seconds, 0.5, None)


def test_spread_and_the_median_time_to_target_over_seeds() -> None:
    from digitrec.bench import RecipeResult, spread

    assert spread([3.0, 1.0, 2.0, 10.0]) == {"min": 1.0, "median": 2.5, "max": 10.0}
    timed = RecipeResult("fast", "fast_cnn", 10, [_seed_run(4.0), _seed_run(1.0), _seed_run(2.0)])
    assert timed.seconds_to_target == 2.0
    one_missed = RecipeResult("fast", "fast_cnn", 10, [_seed_run(4.0), _seed_run(None), _seed_run(2.0)])
    assert one_missed.seconds_to_target is None  # a seed that never got there has no time to take a median of
    assert one_missed.to_dict()["reached_target"] == 2


def test_the_table_gives_each_recipes_time_as_a_multiple_of_the_baselines() -> None:
    from digitrec.bench import RecipeResult

    fast = RecipeResult(
        "fast", "fast_cnn", 10, [_seed_run(s, a) for s, a in ((1.0, 0.99), (3.0, 0.98), (2.0, 0.995))]
    )
    slow = RecipeResult("slow", "bn_cnn", 20, [_seed_run(6.0, 0.97, train_seconds=7.0)])
    rows = train_table([slow, fast], 0.99).splitlines()[2:]
    assert rows[0].startswith("| slow | 20 | 6.00 | 3.0 | 97.00% / 97.00% / 97.00% | 7.50 | 1 |")
    assert rows[1].startswith("| fast | 10 | 2.00 | 1.0 | 98.00% / 99.00% / 99.50% | 1.50 | 3 |")


def test_the_time_to_target_is_that_of_the_first_check_to_reach_it(tiny_mnist, monkeypatch) -> None:
    """Checks at 1, 2 and 3 training seconds read 50%, 95% and 99%: 90% is first reached at 2 s."""
    from types import SimpleNamespace

    import torch

    from digitrec import bench, evaluate, training

    labels = tiny_mnist.test_labels.long()
    accuracies = iter([0.5, 0.95, 0.99])

    def scripted_logits(model, images, config):
        logits = torch.nn.functional.one_hot(labels, 10).float()
        wrong = len(labels) - round(next(accuracies) * len(labels))
        logits[:wrong] = logits[:wrong].roll(1, dims=1)
        return logits

    def fake_train(config, out, on_epoch, **kwargs):
        model = torch.nn.Linear(1, 1)
        for seconds in (1.0, 2.0, 3.0):
            if on_epoch(model, {"seconds": seconds}):
                break
        metrics = {"test_accuracy": 0.99, "train_seconds": 3.0, "eval_seconds": 0.1, "params": 2}
        return SimpleNamespace(metrics=metrics)

    monkeypatch.setattr(evaluate, "recipe_logits", scripted_logits)
    monkeypatch.setattr(training, "train", fake_train)
    run, _ = bench._train_seed("fast", get_recipe("fast"), tiny_mnist, 0.9, stop_at_target=False)
    assert run.seconds_to_target == 2.0
    assert [accuracy for _, accuracy in run.checks] == pytest.approx([0.5, 0.95, 0.99], abs=1 / len(labels))


def test_the_bench_footer_counts_one_thread_and_one_core_in_the_singular():
    """`OMP_NUM_THREADS=1 digitrec bench ...` printed "with 1 threads"."""
    from digitrec.cli import _bench_footer

    header = {"cpu": "Xeon", "cores": 1, "torch": "2.13.0", "torch_threads": 1, "load_average": [0.5, 0, 0]}
    header |= {"native_bfloat16": False}
    footer = _bench_footer(header | {"matmul_multiply_adds_per_s": 1e11})
    assert footer.startswith(
        "Xeon, 1 core (no native bfloat16), torch 2.13.0 with 1 thread; load average 0.5 before"
    )
    header |= {"cores": 2, "torch_threads": 2, "matmul_multiply_adds_per_s": 1e11, "native_bfloat16": True}
    assert _bench_footer(header).startswith("Xeon, 2 cores (native bfloat16), torch 2.13.0 with 2 threads;")


def test_the_bench_header_names_the_cpu_and_the_cores_this_process_may_use(monkeypatch):
    """The header said "x86_64" (platform.processor() is empty on Linux) and the machine's cores, 2 under
    `taskset -c 0`; nothing said whether bfloat16 autocast ran natively (`fast`: 1.0 s against 63.7 s)."""
    import os

    from digitrec.cli import _bench_header
    from digitrec.precision import native_bfloat16

    header = _bench_header()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as cpuinfo:
            names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
        if names:
            assert header["cpu"] == names[0]
    assert header["native_bfloat16"] == native_bfloat16("cpu")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert _bench_header()["cores"] == 1


def _no_work(*args, **kwargs):
    raise DigitrecError("MNIST was loaded: the command went to work.")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--backends", "bogus"], "unknown backend 'bogus'; choose from torch-fp32,"),
        (["--backends", "torch-fp32,,onnx-fp32"], "unknown backend ''"),
        (["--backends", "torch-fp32,torch-fp32"], "--backends names torch-fp32 more than once"),
        (["--backends", "torch-fp32, torch-fp32"], "--backends names torch-fp32 more than once"),
        (["--batch-sizes", "4,4"], "--batch-sizes names 4 more than once"),
    ],
)
def test_bench_infer_refuses_bad_backends_or_batch_sizes_before_loading_or_training(
    args, message, tmp_path: Path, monkeypatch, capsys
) -> None:
    """In a folder without runs/fast, `--backends bogus` trained the fast recipe there first and only then said
    'unknown backend'; repeated names gave identical rows with pooled latencies."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("digitrec.data.load_mnist", _no_work)
    assert main(["bench", "infer", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_bench_infer_says_so_when_torch_int8_was_its_only_backend_and_torchao_is_missing(
    tiny_checkpoint: Path, tiny_mnist, tmp_path: Path, monkeypatch, capsys
) -> None:
    """`--backends torch-int8` without torchao printed the skip line, then IndexError on results[0]."""
    import sys

    monkeypatch.setitem(sys.modules, "torchao", None)  # as if the int8 extra were not installed
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("digitrec.data.load_mnist", _no_work)
    assert main(["bench", "infer", "--backends", "torch-int8"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("torch-int8: skipped: it needs the int8 extra")
    assert lines[1].startswith("digitrec: error: no backend is left to time: torch-int8 needs the int8 extra")
    assert not (tmp_path / "runs").exists()  # said before training the default model
    with pytest.raises(DigitrecError, match="^no backend is left to time"):  # and by bench_infer, not []
        bench_infer(tiny_checkpoint, tiny_mnist.test_images, backends=("torch-int8",), batch_sizes=(8,))


def test_bench_infer_refuses_a_batch_larger_than_the_test_set(
    tiny_checkpoint: Path, tiny_mnist, idx_folder: Path, capsys
) -> None:
    """`--batch-sizes 10000,100000` on MNIST's 10,000 test images scored 10,000 per '100,000' call and counted
    100,000 in images/s (74,011 against 6,787 at the same p50)."""
    images = len(tiny_mnist.test_images)
    with pytest.raises(
        DigitrecError, match=f"batch size {images + 1:,} is larger than the {images:,} test images"
    ):
        bench_infer(
            tiny_checkpoint, tiny_mnist.test_images, backends=("torch-fp32",), batch_sizes=(1, images + 1)
        )
    argv = ["bench", "infer", "--model", str(tiny_checkpoint), "--backends", "torch-fp32"]
    argv += ["--batch-sizes", f"{images},{images * 10}", "--rounds", "1", "--seconds", "0.01"]
    assert main([*argv, "--data-dir", str(idx_folder)]) == 2
    err = capsys.readouterr().err
    assert f"batch size {images * 10:,} is larger than the {images:,} test images" in err
    results = bench_infer(
        tiny_checkpoint,
        tiny_mnist.test_images,
        backends=("torch-fp32",),
        batch_sizes=(images,),  # every image in one call is allowed
        rounds=1,
        seconds=0.01,
        log=lambda msg: None,
    )
    assert [r.batch_size for r in results] == [images]


def test_bench_infer_runs_onnx_runtime_on_torchs_thread_count_and_records_it(
    tiny_checkpoint: Path, tiny_mnist, monkeypatch
) -> None:
    """The ONNX Runtime rows ran on every core (threads=0) while the torch rows followed torch's count, so a ratio
    could set 2 threads against 1; now both run on torch.get_num_threads(), and each row says how many."""
    pytest.importorskip("onnxruntime")
    import torch

    from digitrec import backends

    opened: list[int] = []

    class Recorded(backends.OnnxBackend):
        def __init__(self, path, threads: int = 1, spin: bool = False):
            opened.append(threads)
            super().__init__(path, threads=threads, spin=spin)

    monkeypatch.setattr(backends, "OnnxBackend", Recorded)
    previous = torch.get_num_threads()
    torch.set_num_threads(3)  # neither 1 nor every core (this machine's 2): what follows torch shows it
    try:
        results = bench_infer(
            tiny_checkpoint,
            tiny_mnist.test_images,
            backends=("torch-fp32", "onnx-fp32"),
            batch_sizes=(8,),
            rounds=1,
            seconds=0.01,
            log=lambda msg: None,
        )
    finally:
        torch.set_num_threads(previous)
    assert opened == [3]
    assert [(r.backend, r.threads) for r in results] == [("torch-fp32", 3), ("onnx-fp32", 3)]


def test_bench_infer_says_its_figures_are_of_one_view_for_a_model_scored_in_several(
    tiny_checkpoint: Path, idx_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """For a 5-view model (`default`) bench infer printed images/s and an accuracy of one forward pass each, as if
    they were what digitrec's Predictor, which runs 5 per image, reads."""
    model, meta = load_model(tiny_checkpoint)
    five = tmp_path / "five.safetensors"
    save_model(five, model, meta | {"config": meta["config"] | {"tta_views": 5}})
    argv = [
        "bench",
        "infer",
        "--backends",
        "torch-fp32",
        "--batch-sizes",
        "1",
        "--rounds",
        "1",
        "--seconds",
        "0.01",
    ]
    argv += ["--data-dir", str(idx_folder)]
    assert main([*argv, "--model", str(five)]) == 0
    assert (
        "every figure is of one view: the model's recipe scores 5 views per image" in capsys.readouterr().out
    )
    assert main([*argv, "--model", str(five), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tta_views"] == 5
    assert main([*argv, "--model", str(tiny_checkpoint)]) == 0
    assert "of one view" not in capsys.readouterr().out
