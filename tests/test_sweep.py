"""`digitrec sweep`: recipes x seeds, one process each, summarized in one table."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from digitrec.errors import DigitrecError
from digitrec.sweep import summary_table, sweep


def test_unknown_recipe_fails_before_any_run(tmp_path):
    with pytest.raises(DigitrecError, match="unknown recipe"):
        sweep(["fast", "nope"], [0], tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "recipes, seeds, flags, refused",
    [
        (["fast"], [0, 0], [], "--seeds names 0 more than once"),  # two trainings into one folder at once
        (["fast", "fast"], [0], [], "--recipes names fast more than once"),  # each job ran twice
        (["fast"], [0], ["--epochs", "0"], "epochs must be a positive number"),  # every job started, failed
        (["fast"], [0], ["--epochs", "-1"], "epochs must be a positive number"),
        (["fast"], [-1], [], "seed must be a whole number"),
    ],
    ids=["seed-twice", "recipe-twice", "zero-epochs", "negative-epochs", "negative-seed"],
)
def test_a_sweep_train_would_refuse_fails_before_any_run(
    tmp_path, monkeypatch, recipes, seeds, flags, refused
):
    monkeypatch.setattr(subprocess, "Popen", None)  # no job may start
    with pytest.raises(DigitrecError, match=refused):
        sweep(recipes, seeds, tmp_path, parallel=2, train_flags=flags)
    assert not any(tmp_path.iterdir())


def test_a_device_this_machine_lacks_fails_once_before_any_run(tmp_path, monkeypatch):
    """`--device cuda` without a GPU started every job, and each failed with train's sentence in its log."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(subprocess, "Popen", None)  # no job may start
    with pytest.raises(DigitrecError, match="--device cuda was asked for but no CUDA GPU is available"):
        sweep(["fast"], [0, 1], tmp_path, train_flags=["--device", "cuda"])
    assert not any(tmp_path.iterdir())


def test_a_data_dir_without_mnist_fails_once_before_any_run(tmp_path, monkeypatch, capsys):
    from digitrec.cli import main

    monkeypatch.setattr(subprocess, "Popen", None)  # no job may start
    (tmp_path / "empty").mkdir()
    args = ["sweep", "--seeds", "0", "1", "--data-dir", str(tmp_path / "empty"), "--out", str(tmp_path / "s")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and "empty" in err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    "bad, said",
    [
        (["--recipes", "no-such-recipe"], "no-such-recipe"),
        (["--parallel", "0"], "--parallel must be at least 1"),
        (["--seeds", "1", "1"], "--seeds names 1 more than once"),
    ],
)
def test_a_bad_argument_is_said_before_mnist_is_looked_for(tmp_path, monkeypatch, capsys, bad, said):
    """MNIST was found (or downloaded) first: with a --data-dir lacking it, a bad --recipes, --parallel or --seeds
    was said only after the data was put right, and without one the download came first."""
    from digitrec import data
    from digitrec.cli import main

    def no_data(*args, **kwargs):
        raise AssertionError("MNIST looked for before the arguments were checked")

    monkeypatch.setattr(data, "load_mnist", no_data)
    monkeypatch.setattr(subprocess, "Popen", None)  # no job may start
    assert main(["sweep", *bad, "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err


def test_a_sweep_run_again_starts_its_jobs_over(tmp_path, monkeypatch):
    """train refuses a folder holding an unfinished run, so an interrupted sweep run again failed those jobs."""
    from digitrec.cli import build_parser

    commands = []

    class Finished:
        returncode = 1

        def __init__(self, command, **kwargs):
            commands.append(command)

        def poll(self):
            return self.returncode

    monkeypatch.setattr(subprocess, "Popen", Finished)
    sweep(["fast"], [0], tmp_path, train_flags=["--epochs", "1"])
    assert build_parser().parse_args(commands[0][3:]).overwrite


def test_summary_has_one_line_per_run_and_a_mean_per_recipe():
    rows = [
        {
            "recipe": "fast",
            "seed": s,
            "ok": True,
            "test_accuracy": a,
            "test_loss": 0.1,
            "train_seconds": 2.0,
            "out": "x",
        }
        for s, a in ((0, 0.990), (1, 0.992))
    ] + [{"recipe": "fast", "seed": 2, "ok": False, "out": "runs/x"}]
    table = summary_table(rows).splitlines()
    assert len(table) == 1 + 3 + 1
    assert "failed" in table[3] and "runs/x/train.log" in table[3]
    assert "99.10% +- 0.14% over 2 seeds" in table[4]


@pytest.mark.slow
def test_sweep_two_seeds_on_mnist(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "digitrec",
            "sweep",
            "--recipes",
            "fast",
            "--seeds",
            "0",
            "1",
            "--epochs",
            "0.1",
            "--parallel",
            "2",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "summary.json").read_text())
    assert [row["seed"] for row in rows] == [0, 1] and all(row["test_accuracy"] > 0.9 for row in rows)
    assert rows[0]["test_loss"] != rows[1]["test_loss"]  # the seeds made different runs
    assert "over 2 seeds" in result.stdout
