"""The graphed trainer (graphed.py): its step follows the training loop, and it refuses recipes it cannot replay."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from digitrec.checkpoint import load_model, load_tensors
from digitrec.cli import main
from digitrec.config import get_recipe
from digitrec.errors import DigitrecError
from digitrec.evaluate import predict_logits
from digitrec.graphed import GraphedTrainer, gpu_table, graphed_runs
from digitrec.training import train

# 1,200 tiny images in batches of 192: six full batches and a partial one of 48 per epoch, two epochs in all
TINY = get_recipe("fast").override(epochs=2, batch_size=192)


def biases_before_batch_norm(model: nn.Sequential) -> set[str]:
    """State-dict names of each conv or linear bias that a BatchNorm (after a max-pool or not) cancels, and of
    that BatchNorm's running mean, in a model of create_model's shape (its body is index 1)."""
    names: set[str] = set()
    before = None
    for index, layer in enumerate(model[1]):
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            before = index
        elif isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)) and before is not None:
            names |= {f"1.{before}.bias", f"1.{index}.running_mean"}
            before = None
        elif not isinstance(layer, nn.MaxPool2d):
            before = None
    return names


def assert_trained_alike(expected: dict, got: dict, model: nn.Module) -> None:
    """Each tensor within 10% of its norm, but the biases a BatchNorm cancels and their running means (below)."""
    noise = biases_before_batch_norm(model)
    for name, tensor in expected.items():
        if name not in noise:
            new, old = got[name].double().cpu(), tensor.double().cpu()
            drift = float((new - old).norm() / old.norm().clamp_min(1e-12))
            assert drift < 0.1, f"{name} differs by {drift:.2%} of its norm"


def test_the_eager_graph_step_trains_as_the_training_loop(tiny_mnist, tmp_path: Path) -> None:
    config = TINY.override(amp=False)  # float32, so that the two differ by rounding alone
    run = train(
        config, tmp_path, recipe="fast", data=tiny_mnist, progress=False, report=False, log=lambda m: None
    )
    trainer, (graphed,) = graphed_runs(config, tiny_mnist, [config.seed], torch.device("cpu"), graph=False)
    assert trainer.total_steps == run.metrics["steps"] == 14 and len(trainer.full) == 12
    expected, _ = load_tensors(tmp_path / "model.safetensors")
    got = trainer.state_dict()
    assert expected.keys() == got.keys()
    # A bias just before a BatchNorm gets a gradient of rounding noise, which Adam's normalized step turns into
    # full-size moves: it (and the running mean that tracks it) differs; the function the model computes does not.
    # The other weights carry that noise's echo: a few elements whose own gradient is near zero move by up to a
    # step's size (how many depends on the CPU's kernels and thread count), so each tensor is compared as a whole.
    assert (
        len(biases_before_batch_norm(trainer.model)) == 4
    )  # two such biases and their BatchNorms' running means
    assert_trained_alike(expected, got, trainer.model)
    logits = [
        predict_logits(model, tiny_mnist.test_images)
        for model in (load_model(tmp_path / "model.safetensors")[0], trainer.model)
    ]
    # The logits span 5.5; the echoes move them by 0.01 on the 2-core CI machine and 0.03 on a 16-core GPU host,
    # where one test image of 300 may change its answer.
    torch.testing.assert_close(logits[0], logits[1], rtol=0, atol=0.1)
    assert graphed.test_accuracy == pytest.approx(run.metrics["test_accuracy"], abs=1 / 300)
    epoch_losses = [row["train_loss"] for row in run.history]  # two epochs of 1,200 images each
    assert graphed.train_loss == pytest.approx(sum(epoch_losses) / len(epoch_losses), rel=1e-3)
    assert graphed.train_seconds > 0 and graphed.eval_seconds > 0


def test_seeds_reset_the_trainer_in_place(tiny_mnist) -> None:
    """A second seed starts from its own fresh weights: running seed 1 alone or after seed 0 gives the same model."""
    config = TINY.override(epochs=1)
    alone, _ = graphed_runs(config, tiny_mnist, [1], torch.device("cpu"), graph=False)
    after, runs = graphed_runs(config, tiny_mnist, [0, 1], torch.device("cpu"), graph=False)
    assert [r.seed for r in runs] == [0, 1]
    for name, tensor in alone.state_dict().items():
        torch.testing.assert_close(after.state_dict()[name], tensor, msg=name)


@pytest.mark.parametrize(
    ("recipe", "reason"),
    [
        ("default", "augmentation (affine)"),
        ("robust", "outlier exposure"),
        ("seed-lenet", "the sgd optimizer"),
    ],
)
def test_recipes_whose_step_changes_are_refused_in_one_sentence(tiny_mnist, recipe: str, reason: str) -> None:
    with pytest.raises(DigitrecError, match="times one fixed step") as caught:
        GraphedTrainer(get_recipe(recipe), tiny_mnist.train_images, tiny_mnist.train_labels, graph=False)
    assert reason in str(caught.value)


def test_a_graph_needs_a_cuda_device(tiny_mnist) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(DigitrecError, match="CUDA graphs need a CUDA GPU"):
        GraphedTrainer(TINY, tiny_mnist.train_images, tiny_mnist.train_labels, graph=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run through the device tool)")
def test_the_replayed_graph_trains_as_the_eager_steps_on_a_gpu(tiny_mnist) -> None:
    cuda = torch.device("cuda")
    eager, (eager_run,) = graphed_runs(TINY, tiny_mnist, [0], cuda, graph=False)
    graphed, runs = graphed_runs(TINY, tiny_mnist, [0, 0], cuda, graph=True)
    assert graphed.warmup_seconds is not None and graphed.warmup_seconds > 0
    for run in runs:  # the second run replays the same graph after resetting in place
        assert run.test_accuracy == pytest.approx(
            eager_run.test_accuracy, abs=2 / len(tiny_mnist.test_labels)
        )
    # in bfloat16 the rounding noise a BatchNorm cancels moves its bias as on a CPU (above): compared alike
    assert_trained_alike(eager.state_dict(), graphed.state_dict(), graphed.model)


def test_bench_gpu_prints_json_and_refuses_other_recipes(
    idx_folder: Path, capsys: pytest.CaptureFixture
) -> None:
    args = ["bench", "gpu", "--device", "cpu", "--seeds", "2", "--data-dir", str(idx_folder)]
    assert main([*args, "--json"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert "no CUDA device (cpu): the graphed runs are skipped" in captured.err
    assert report["device"] == "CPU" and list(report["modes"]) == ["eager"]
    eager = report["modes"]["eager"]
    assert [r["seed"] for r in eager["runs"]] == [0, 1]
    low, median, high = (eager["test_accuracy"][k] for k in ("min", "median", "max"))
    assert 0 <= low <= median <= high <= 1
    assert main(args) == 0
    assert "eager         0" in capsys.readouterr().out
    assert main([*args, "--recipe", "default"]) == 2
    assert "times one fixed step" in capsys.readouterr().err


def test_the_gpu_table_prints_each_run_each_mode_and_the_ratio() -> None:
    def mode(seconds: float, warmup: float) -> dict:
        runs = [
            {"seed": s, "test_accuracy": 0.99 + s / 1000, "train_seconds": seconds, "eval_seconds": 0.01}
            for s in (0, 1)
        ]
        return {
            "warmup_seconds": warmup,
            "runs": runs,
            "test_accuracy": {"min": 0.99, "median": 0.9905, "max": 0.991},
            "train_plus_eval_seconds": {
                "min": seconds + 0.01,
                "median": seconds + 0.01,
                "max": seconds + 0.01,
            },
        }

    report = {
        "recipe": "fast",
        "device": "NVIDIA H200",
        "torch": "2.11.0",
        "modes": {"graphed": mode(0.1, 5.0), "eager": mode(0.99, 0.03)},
        "eager_over_graphed": 9.0,
    }
    lines = gpu_table(report).splitlines()
    assert lines[0] == "fast on NVIDIA H200 (torch 2.11.0), data set resident on the device"
    assert lines[2] == "graphed       0   99.00%     0.100    0.010         0.110"
    assert lines[4].startswith(
        "graphed     all  99.00% / 99.05% / 99.10% (min / median / max), train+eval median 0.110 s"
    )
    assert lines[4].endswith("warm-up and capture 5.00 s (once, not counted)")
    assert lines[7].endswith("train+eval median 1.000 s, warm-up 0.03 s (once, not counted)")
    assert lines[8] == "eager / graphed train+eval time: 9.0x (medians, same run)"
