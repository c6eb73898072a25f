"""The command line as a user meets it: listings, JSON output, and one-sentence errors with a non-zero exit."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from digitrec.checkpoint import load_model, save_model
from digitrec.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "digitrec", *args], capture_output=True, text=True, timeout=120
    )


def test_recipes_json_lists_every_recipe(capsys):
    assert main(["recipes", "--json"]) == 0
    recipes = json.loads(capsys.readouterr().out)
    assert {
        "seed-mlp",
        "seed-mlp-bn",
        "seed-mlp-dropout",
        "seed-lenet",
        "seed-cnn",
        "seed-cnn-bn",
        "default",
    } <= recipes.keys()
    assert recipes["seed-mlp-bn"]["reported_accuracy"] == 0.956


def test_a_bare_digitrec_lists_the_commands_and_where_to_start(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "predict" in err and "serve" in err and "start here: `digitrec train`" in err


def test_recipes_and_models_tables(capsys):
    assert main(["recipes"]) == 0
    recipes = capsys.readouterr().out
    assert "seed-cnn-bn" in recipes
    # seed 001 reports a mean of per-batch accuracies, which the table gave as if it were plain accuracy
    (bn,) = [line for line in recipes.splitlines() if line.startswith("seed-mlp-bn ")]
    assert bn.endswith("95.60% (a mean of per-batch accuracies, batches of 128)")
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "lenet" in out and "21,840" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--recipe", "nope"], "unknown recipe 'nope'"),
        (["train", "--recipe", "fast", "--epochs", "-2"], "epochs must be a positive number"),
        (["evaluate", "missing-model.safetensors"], "does not exist"),
        (["train", "--resume", "no-such-run"], "no last.safetensors"),
        (["data", "--data-dir", "/no/such/folder"], "does not hold the four MNIST files"),
        (["finetune", "--model", "m", "--no-corrections", "--feedback", "f.db"], "takes no --feedback"),
        (["predict", "x.png", "--model", "m.onnx", "--backend", "numpy"], "is an ONNX file"),
        (["serve", "--model", "m.onnx", "--backend", "torch", "--port", "0"], "is an ONNX file"),
        (["serve", "--model", "no-such-run", "--port", "0"], "does not exist"),
        (["serve", "--body-timeout", "0", "--port", "0"], "--body-timeout must be a positive number"),
        (["serve", "--feedback-max-mb", "0", "--port", "0"], "--feedback-max-mb must be a positive number"),
        (["train", "--resume", "some-run", "--recipe", "fast"], "--resume continues a run with its own"),
        (["train", "--resume", "some-run", "--overwrite"], "so --overwrite would be ignored"),
    ],
)
def test_user_errors_are_one_sentence_without_traceback(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args",
    [
        ["train", "--recipe", "fast", "--out", "{file}"],
        ["evaluate", "some-run", "--report", "{file}"],
        ["predict", "some.png", "--show-steps", "{file}"],
        ["eval-real", "--write", "{file}"],
        ["robustness", "some-run", "--out", "{file}"],
        ["explore", "--out", "{file}"],
        ["calibrate", "some-run", "--out", "{file}"],
        ["train", "--recipe", "fast", "--out", "{file}/sub"],
        ["evaluate", "some-run", "--report", "{file}/sub"],
        ["calibrate", "some-run", "--out", "{file}/m.safetensors"],
        ["ensemble", "run-a", "run-b", "--out", "{file}/e"],
        ["train-pairs", "--count", "300", "--epochs", "1", "--out", "{file}/p.safetensors"],
        ["predict", "some.png", "--show-steps", "{file}/sub"],
        ["feedback", "export", "--out", "{file}/sub"],
    ],
)
def test_an_output_folder_that_is_a_file_is_refused_before_any_work(args, tmp_path, capsys):
    """A file in the way, also as a parent of the folder: below one, these were tracebacks after the work."""
    existing = tmp_path / "afile"
    existing.write_text("not a folder")
    with pytest.raises(SystemExit) as stopped:
        main([a.replace("{file}", str(existing)) for a in args])
    assert stopped.value.code == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert existing.read_text() == "not a folder"


def test_train_pairs_refuses_a_folder_for_its_file_before_any_work(tmp_path, capsys):
    """It trained for the whole run, then failed to write over the folder, in a sentence about a .tmp file."""
    with pytest.raises(SystemExit) as stopped:
        main(["train-pairs", "--count", "300", "--epochs", "1", "--out", str(tmp_path)])
    assert stopped.value.code == 2
    assert f"is a folder; name the file to write, such as '{tmp_path / 'pairs.safetensors'}'" in (
        capsys.readouterr().err
    )
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "args",
    [
        ["export", "no-such-model", "--out", "{below}/model.onnx"],
        ["export", "no-such-model", "--out", "/proc/no-such-folder/model.onnx"],
        ["predict", "{image}", "--show-steps", "/proc/no-such-folder"],
        ["feedback", "export", "--feedback-db", "{db}", "--out", "/proc/no-such-folder"],
        ["evaluate", "no-such-model", "--report", "/proc/no-such-folder"],
        # these three said so only after the whole calibration, evaluation or training
        ["calibrate", "no-such-model", "--out", "/proc/no-such-folder/m.safetensors"],
        ["ensemble", "no-such-a", "no-such-b", "--out", "/proc/no-such-folder/e.safetensors"],
        ["train-pairs", "--count", "300", "--epochs", "1", "--out", "/proc/no-such-folder/p.safetensors"],
    ],
)
def test_an_output_folder_that_cannot_be_made_is_one_sentence_before_any_work(args, tmp_path, capsys):
    """These were tracebacks (exit 1); export's came after the whole export and parity check."""
    from PIL import Image

    from digitrec.feedback import FeedbackStore

    if "/proc/" in " ".join(args) and not Path("/proc/self").is_dir():
        pytest.skip("needs Linux's /proc")
    existing = tmp_path / "afile"
    existing.write_text("not a folder")
    Image.new("L", (40, 40), 255).save(tmp_path / "digit.png")
    FeedbackStore(tmp_path / "fb.sqlite")
    values = {
        "{below}": f"{existing}/sub",
        "{image}": str(tmp_path / "digit.png"),
        "{db}": str(tmp_path / "fb.sqlite"),
    }
    for key, value in values.items():
        args = [arg.replace(key, value) for arg in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "is a file, not a folder" in err or "cannot write into the folder /proc/no-such-folder" in err
    assert existing.read_text() == "not a folder"


@pytest.mark.parametrize("samples", ["0", "-5", "60001", "many"])
def test_explore_refuses_a_sample_count_it_cannot_embed(samples, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["explore", "--samples", samples])
    assert stopped.value.code == 2
    assert "is not a number of training images; use 10-60000" in capsys.readouterr().err


def test_resume_refuses_flags_it_would_ignore(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path), "--recipe", "seed-mlp", "--epochs", "3", "--amp"]) == 2
    assert (
        "--resume continues a run with its own settings, so --recipe, --amp, --epochs would be ignored"
        in capsys.readouterr().err
    )


@pytest.mark.parametrize(
    "flags",
    [
        ["--seed", "0"],
        ["--no-amp"],
        ["--val-size", "0"],
        ["--weight-decay", "0"],
        ["--label-smoothing", "0"],
        ["--momentum", "0"],
        ["--ema-decay", "0"],
        ["--clean-epochs", "0"],
        ["--early-stopping-patience", "0"],
        ["--checkpoint-every-steps", "0"],
    ],
    ids=lambda flags: " ".join(flags),
)
def test_resume_refuses_a_flag_given_as_0_or_off_too(tmp_path, flags, capsys):
    """0 == False: `--resume RUN --seed 0` (or --no-amp) was silently ignored, where --seed 1 was refused."""
    assert main(["train", "--resume", str(tmp_path), *flags]) == 2
    assert f"so {flags[0]} would be ignored" in capsys.readouterr().err


def test_resume_still_takes_device_and_the_switches_it_does_not_check(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path), "--device", "cpu", "--no-report", "--no-progress"]) == 2
    assert "has no last.safetensors to resume from" in capsys.readouterr().err  # not "would be ignored"


@pytest.mark.parametrize(
    "args",
    [
        ["train", "--out", ""],  # trained into the current folder
        ["train", "--recipe", ""],  # these three: taken for the flag left out (the default recipe, ...)
        ["train", "--config", ""],
        ["train", "--recipe", "fast", "--data-dir", ""],  # read the current folder for MNIST
        ["train", "--resume", "run", "--recipe", ""],
        ["train", "--resume", ""],  # started a new run of the default recipe
        ["evaluate", "run", "--report", ""],  # these: wrote into the current folder
        ["predict", "some.png", "--show-steps", ""],
        ["calibrate", "run", "--out", ""],
        ["ensemble", "run-a", "run-b", "--out", ""],
        ["eval-real", "--write", ""],
        ["robustness", "run", "--out", ""],
        ["sweep", "--out", ""],
        ["tune", "--out", ""],
        ["finetune", "--model", "run", "--out", ""],
        ["feedback", "export", "--out", ""],
        ["train-pairs", "--out", ""],
        [
            "export",
            "run",
            "--out",
            "",
        ],  # these: taken for the flag left out (the default beside the model, ...)
        ["predict", "some.png", "--model", ""],
        ["eval-real", "--model", ""],
        ["serve", "--model", ""],
        ["tune", "--recipe", ""],
        ["bench", "gpu", "--recipe", ""],
        ["eval-real", "--data-dir", ""],
        ["serve", "--feedback-db", ""],  # these: the default database in the home folder, as if not given
        ["feedback", "export", "--feedback-db", ""],
        ["finetune", "--model", "run", "--feedback", ""],  # its flag, also spelt --feedback-db
        ["tune", "--study", ""],  # joined the default study
        ["tune", "--storage", ""],  # SQLAlchemy's words
        ["eval-real", "--sets", ""],
    ],
)
def test_an_empty_name_is_refused_not_read_as_the_current_folder_or_the_default(
    args, tmp_path, monkeypatch, capsys
):
    """`--out "$RUN"` with $RUN unset: each of these wrote into the current folder, read it, or did as if the
    flag was not given."""
    import importlib.util

    def reached(*args, **kwargs):
        raise AssertionError("the command began its work")

    monkeypatch.setattr("digitrec.data.load_mnist", reached)  # no command here gets that far
    monkeypatch.setattr("digitrec.training.train", reached)
    if importlib.util.find_spec("fastapi") is not None:
        monkeypatch.setattr("digitrec.server.serve", reached)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        main(args)
    assert stopped.value.code == 2
    flag = args[args.index("") - 1]
    err = capsys.readouterr().err.replace("--feedback/--feedback-db", "--feedback")
    assert f"error: argument {flag}: is empty (an unset shell variable?); name " in err
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []


def test_an_empty_recipe_in_a_config_file_is_an_unknown_recipe(idx_folder, tmp_path, capsys):
    """It trained the default recipe."""
    config = tmp_path / "run.toml"
    config.write_text('recipe = ""\nepochs = 1\n')
    args = ["train", "--config", str(config), "--out", str(tmp_path / "run"), "--data-dir", str(idx_folder)]
    assert main([*args, "--dry-run", "--no-report", "--no-progress"]) == 2
    assert "unknown recipe ''" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_train_refuses_an_out_folder_it_cannot_write_before_training(idx_folder, monkeypatch, capsys):
    """`train --out /proc/foo` trained a whole epoch, then failed to write its checkpoint."""
    from digitrec import training

    if not Path("/proc/self").is_dir():
        pytest.skip("needs Linux's /proc")

    def no_training(*args, **kwargs):
        raise AssertionError("trained before checking --out")

    monkeypatch.setattr(training, "train_steps", no_training)
    args = ["train", "--recipe", "fast", "--data-dir", str(idx_folder), "--no-progress"]
    assert main([*args, "--out", "/proc/no-such-folder"]) == 2
    err = capsys.readouterr().err
    assert "cannot write into the run folder /proc/no-such-folder" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "command",
    [
        ["calibrate", "{run}", "--count", "5", "--out", "{tmp}/calibrated"],
        ["eval-real", "--sets", "mnist-photo,numbers", "--count", "3", "--backend", "numpy", "--json"],
        ["eval-real", "--sets", "mnist-photo", "--count", "2", "--write", "{tmp}/sets"],
    ],
    ids=["calibrate", "eval-real", "eval-real-write"],
)
def test_calibrate_and_eval_real_read_mnist_from_data_dir(
    command, tiny_fast_run, idx_folder, tmp_path, monkeypatch, capsys
):
    """README: every command that reads MNIST takes --data-dir; these two had none, and read the usual sources."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("DIGITREC_DATA", str(empty))  # any other source than --data-dir fails
    args = [a.replace("{run}", str(tiny_fast_run)).replace("{tmp}", str(tmp_path)) for a in command]
    assert main([*args, "--data-dir", str(idx_folder)]) == 0
    capsys.readouterr()
    assert main([*args, "--data-dir", str(empty)]) == 2
    assert f"{empty} does not hold the four MNIST files" in capsys.readouterr().err


def test_a_reader_that_stops_early_gets_no_traceback():
    """`digitrec recipes | head -1`: the pipe closes before the output is written."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "digitrec", "recipes"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert result.returncode == 141 and result.stderr == ""


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_output_to_a_full_disk_is_one_sentence():
    """`digitrec recipes > FILE` on a full disk printed a traceback (OSError, no file name: not ours to name)."""
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [sys.executable, "-m", "digitrec", "recipes", "--json"],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    assert result.returncode == 2
    assert result.stderr == (
        "digitrec: error: cannot write to standard output (No space left on device); send it to a file or terminal "
        "that can take it.\n"
    )


def test_a_command_started_with_its_output_closed_runs():
    """`digitrec recipes >&-` (cron, a daemon): sys.stdout is None, and the final flush raised AttributeError."""
    result = subprocess.run(
        ["sh", "-c", 'exec "$0" -m digitrec recipes >&-', sys.executable],
        stderr=subprocess.PIPE,
        text=True,
        timeout=120,
    )
    assert (result.returncode, result.stderr) == (0, "")


def test_not_our_checkpoint(tmp_path):
    bogus = tmp_path / "model.safetensors"
    bogus.write_bytes(b"\x80\x04K\x01.")  # a pickle
    result = run_cli("evaluate", str(bogus))
    assert (
        result.returncode == 2
        and "not a digitrec checkpoint" in result.stderr
        and "Traceback" not in result.stderr
    )


def test_bad_flag_type_is_rejected_by_argparse():
    result = run_cli("train", "--epochs", "three")
    assert result.returncode == 2 and "invalid float value" in result.stderr


@pytest.mark.parametrize("port", ["99999", "-1", "http"])
def test_a_port_out_of_range_is_refused_before_start_up(port):
    """uvicorn would take 99999 and listen on another port (99999 - 65536) while saying 99999."""
    result = run_cli("serve", "--port", port)
    assert result.returncode == 2 and "is not a port number; use 0-65535" in result.stderr


def test_a_busy_port_or_unknown_host_is_one_sentence_before_the_model_loads(tmp_path, monkeypatch, capsys):
    """uvicorn would load the model and start the workers, then log the bind error among its own lines."""
    from digitrec import server as server_module

    loaded = []

    def never_load(*args, **kwargs):  # the bind error must come before the model (and its workers) load
        loaded.append(args)
        raise AssertionError("serve loaded the model before it found the port busy")

    monkeypatch.setattr(server_module, "load_for_serving", never_load)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        code = main(["serve", "--port", port, "--feedback-db", str(tmp_path / "f.sqlite")])
    printed = capsys.readouterr()
    assert code == 2 and loaded == [] and "serving" not in printed.out
    assert f"port {port} on 127.0.0.1 is already in use; stop what is using it" in printed.err
    assert "Traceback" not in printed.err
    result = run_cli("serve", "--host", "no-such-host.invalid", "--port", "8000")
    assert result.returncode == 2 and "cannot listen on 'no-such-host.invalid': no such host" in result.stderr
    theirs = tmp_path / "theirs.db"  # another program's database: refused before the model loads (or exports)
    theirs.write_bytes(b"not an SQLite file, and not ours")
    result = run_cli("serve", "--port", "0", "--feedback-db", str(theirs), "--model", str(tmp_path / "none"))
    assert (
        result.returncode == 2 and "cannot open feedback database" in result.stderr
    )  # not the model's error


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["eval-real", "--count", "0"],
            "argument --count: '0' is not a count of images to generate; use 1 to 20000",
        ),
        (["bench", "infer", "--batch-sizes", "1,0"], "argument --batch-sizes: '0' is not a whole number"),
        (["bench", "train", "--seeds", "0"], "argument --seeds: '0' is not a whole number"),
        (["bench", "infer", "--seconds", "nan"], "argument --seconds: 'nan' is not a finite number above 0"),
        # it timed each backend for ever
        (["bench", "infer", "--seconds", "inf"], "argument --seconds: 'inf' is not a finite number above 0"),
        (["train", "--nproc", "0"], "argument --nproc: '0' is not a whole number"),
        (["robustness", "m", "--limit", "-1"], "argument --limit: '-1' is not a whole number"),
        (["tune", "--trials", "0"], "argument --trials: '0' is not a whole number of at least 1"),
        (["predict", "x.png", "--top-k", "11"], "argument --top-k: '11' is not a count of digits; use 1-10"),
        (
            ["predict", "x.png", "--reject-below", "1.5"],
            "argument --reject-below: '1.5' is not a probability",
        ),
        (["read", "x.png", "--reject-below", "nan"], "argument --reject-below: 'nan' is not a probability"),
    ],
)
def test_counts_and_durations_below_one_are_refused(args, message):
    """Each of these used to end in a traceback (an empty list stacked, a zero range step) or to be ignored. The
    error is README's one sentence, plus where the options are listed, without argparse's usage block above it."""
    result = run_cli(*args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert "usage:" not in result.stderr and len(result.stderr.strip().splitlines()) == 2
    command = " ".join(args[:2]) if args[0] == "bench" else args[0]  # the subcommand the error is about
    assert result.stderr.strip().splitlines()[1] == f"(`digitrec {command} -h` lists the options)"


@pytest.mark.parametrize(
    "args, command, unknown",
    [
        (["train", "--bogus"], "digitrec train", "--bogus"),
        (["bench", "train", "--recpies", "fast"], "digitrec bench train", "--recpies fast"),
        (["feedback", "export", "--bogus"], "digitrec feedback export", "--bogus"),
        (["predict", "x.png", "--topk", "3"], "digitrec predict", "--topk 3"),
    ],
)
def test_an_unknown_flag_names_the_command_whose_help_lists_the_options(args, command, unknown, capsys):
    """argparse reports a flag no parser knew from the top-level parser, so the hint said `digitrec -h`, whose
    help lists the commands, not the mistyped command's options."""
    with pytest.raises(SystemExit) as stopped:
        main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and len(err) == 2
    assert err[0] == f"{command}: error: unrecognized arguments: {unknown}"
    assert err[1] == f"(`{command} -h` lists the options)"


@pytest.mark.parametrize(
    "args",
    [
        ["eval-real", "--seed", "-1", "--count", "5", "--sets", "pen-photo"],
        ["eval-real", "--seed", "-1", "--count", "5", "--sets", "pen-photo", "--write", "{tmp}"],
        ["train-pairs", "--seed", "-1", "--count", "10", "--out", "{tmp}/pairs.safetensors"],
        ["tune", "--seed", "4294967296", "--trials", "1", "--out", "{tmp}"],
    ],
)
def test_a_seed_numpy_cannot_take_is_refused_while_parsing(args, tmp_path, capsys):
    """eval-real and train-pairs printed their header, then numpy's ValueError traceback (exit 1)."""
    with pytest.raises(SystemExit) as stopped:
        main([arg.replace("{tmp}", str(tmp_path / "out")) for arg in args])
    assert stopped.value.code == 2
    captured = capsys.readouterr()
    assert "is not a seed; use a whole number from 0 to 4294967295" in captured.err
    assert captured.out == "" and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "sets, message",
    [
        (
            "pen-photo,,font-photo",
            "unknown set ''; choose from mnist-photo",
        ),  # "" ran all five sets (argparse
        # now refuses a --sets that is all empty: test_an_empty_name_is_refused_not_read_as_the_current_folder...)
        ("pen-photo,pen-photo", "--sets names pen-photo more than once; give each once"),  # ran it twice
    ],
)
def test_eval_real_refuses_an_empty_or_repeated_set(sets, message, tmp_path, capsys):
    assert main(["eval-real", "--sets", sets, "--count", "1", "--write", str(tmp_path / "w")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "w").exists()


@pytest.mark.parametrize(
    "flags",
    [
        ["--misses", "3"],
        ["--speed"],
        ["--model", "runs/x"],
        ["--reject-below", "0.5"],
        ["--backend", "numpy"],
    ],
)
def test_eval_real_write_refuses_the_flags_that_score(flags, tmp_path, capsys):
    """`--write DIR --misses 3` (or --speed, --model...) wrote the images and silently scored nothing."""
    assert (
        main(["eval-real", "--sets", "pen-photo", "--count", "1", "--write", str(tmp_path / "w"), *flags])
        == 2
    )
    err = capsys.readouterr().err
    assert f"--write only writes the sets as images and reads none, so {flags[0]} would do nothing" in err
    assert not (tmp_path / "w").exists()


def test_eval_real_json_names_the_model_and_lists_what_write_wrote(tmp_path, capsys):
    """The JSON lacked the model, temperature and threshold the text header prints; --json --write printed text."""
    assert main(["eval-real", "--sets", "pen-photo", "--count", "2", "--backend", "numpy", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert {"count", "seed", "pen-photo"} <= results.keys() and results["pen-photo"]["n"] == 2
    assert results["model"]["name"] == "robust+finetune"
    assert 0 < results["model"]["temperature"] and 0 <= results["model"]["reject_below"] <= 1
    out = tmp_path / "w"
    assert (
        main(["eval-real", "--sets", "pen-photo,negatives", "--count", "2", "--write", str(out), "--json"])
        == 0
    )
    written = json.loads(capsys.readouterr().out)["written"]
    assert list(written) == ["pen-photo", "negatives"]
    images = sorted(str(p) for p in (out / "pen-photo").iterdir() if not p.name.startswith("."))
    assert sorted(written["pen-photo"]) == images and len(images) == 2


def test_train_and_evaluate_on_a_data_dir(idx_folder, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--recipe",
            "fast",
            "--epochs",
            "2",
            "--data-dir",
            str(idx_folder),
            "--out",
            str(out),
            "--no-progress",
            "--val-size",
            "200",
        ]
    )
    assert code == 0
    captured = capsys.readouterr()
    printed = captured.out + captured.err
    # each once: the report's writer said them too ("test accuracy 86.44% (1356 errors of 10000); report: ...")
    assert printed.count("test accuracy") == 1 and printed.count(str(out / "report.html")) == 1
    assert main(["evaluate", str(out), "--json", "--data-dir", str(idx_folder)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    saved = json.loads((out / "metrics.json").read_text())
    assert metrics["test_accuracy"] == pytest.approx(saved["test_accuracy"], abs=1e-6)
    assert len(metrics["confusion"]) == 10 and len(metrics["per_class"]) == 10


def test_train_without_a_report_writes_the_run_and_says_how_to_report_it(idx_folder, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--recipe", "fast", "--epochs", "1", "--data-dir", str(idx_folder), "--out", str(out)]
    assert main([*args, "--no-progress", "--no-report"]) == 0
    printed = capsys.readouterr().out
    assert "report: none (--no-report)" in printed and f"digitrec evaluate {out} --report DIR" in printed
    assert (out / "metrics.json").exists() and (out / "model.safetensors").exists()
    assert not (out / "report.html").exists() and not list(out.glob("*.png"))
    report = tmp_path / "report"
    assert main(["evaluate", str(out), "--report", str(report), "--data-dir", str(idx_folder)]) == 0
    assert (report / "report.html").exists() and (report / "MODEL_CARD.md").exists()
    assert (report / "curves.png").exists()  # the run's history.json is drawn too
    assert '<img alt="curves"' in (report / "report.html").read_text()


@pytest.mark.parametrize(
    "damage",
    [b'[{"epoch": 1, "train_lo', b"\xff\xfe", b'{"epoch": 1}', b'[{"epoch": 1, "train_loss": "low"}]'],
    ids=["truncated", "not-utf8", "not-a-list", "a-string-loss"],
)
def test_a_damaged_history_costs_the_report_its_curves_not_the_evaluation(
    tiny_fast_run, idx_folder, tmp_path, capsys, damage
):
    """A truncated history.json stopped `digitrec evaluate RUN` with a JSONDecodeError traceback, even with --json,
    which does not draw it."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_fast_run, run)
    (run / "history.json").write_bytes(damage)
    assert main(["evaluate", str(run), "--json", "--data-dir", str(idx_folder)]) == 0
    assert "test_accuracy" in json.loads(capsys.readouterr().out)
    report = tmp_path / "report"
    assert main(["evaluate", str(run), "--report", str(report), "--data-dir", str(idx_folder)]) == 0
    err = capsys.readouterr().err
    [note] = [line for line in err.splitlines() if line.startswith("note: ")]
    assert str(run / "history.json") in note and note.endswith(": the report leaves out the training curves.")
    assert (report / "report.html").exists() and not (report / "curves.png").exists()


def test_ensemble_of_one_model_twice_scores_as_the_model(tiny_fast_run, idx_folder, tmp_path, capsys):
    from digitrec.data import load_mnist
    from digitrec.evaluate import evaluate_ensemble

    assert main(["evaluate", str(tiny_fast_run), "--json", "--data-dir", str(idx_folder)]) == 0
    single = json.loads(capsys.readouterr().out)
    path = tiny_fast_run / "model.safetensors"
    ensemble = evaluate_ensemble([path, path], load_mnist(idx_folder, download=False))
    assert ensemble["test_accuracy"] == pytest.approx(single["test_accuracy"], abs=1e-6)
    assert [m["test_accuracy"] for m in ensemble["members"]] == pytest.approx([single["test_accuracy"]] * 2)
    # two models, one of them missing: past the count and sameness checks, to the missing file's own sentence
    missing = tmp_path / "missing-model.safetensors"
    assert main(["ensemble", str(path), str(missing), "--data-dir", str(idx_folder)]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {missing} does not exist; train one with `digitrec train`" in err
    assert len(err.strip().splitlines()) == 1
    # said before MNIST is loaded (it was looked for, or downloaded, first)
    empty = tmp_path / "no-mnist"
    empty.mkdir()
    assert main(["ensemble", str(path), str(missing), "--data-dir", str(empty)]) == 2
    assert f"checkpoint {missing} does not exist" in capsys.readouterr().err


def test_ensemble_refuses_one_model_or_the_same_model_twice(tiny_fast_run, idx_folder, tmp_path, capsys):
    run = str(tiny_fast_run)
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes((tiny_fast_run / "model.safetensors").read_bytes())
    for models, message in [
        ([run], f"an ensemble needs two or more models and got only {run}; name another"),
        ([run, run], f"{run} and {run} are the same model"),
        ([run, f"{run}/model.safetensors"], f"{run} and {run}/model.safetensors are the same model"),
        ([run, f"{run}/../{tiny_fast_run.name}"], "are the same model"),
        ([run, str(copy)], f"{run} and {copy} are the same model"),
    ]:
        assert main(["ensemble", *models, "--data-dir", str(idx_folder)]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1


def header_metadata(path: Path) -> dict:
    data = path.read_bytes()
    return json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])["__metadata__"]


def test_a_run_writes_checkpoints_that_carry_their_checksum(tiny_fast_run):
    for name in ("model.safetensors", "last.safetensors"):
        assert len(header_metadata(tiny_fast_run / name)["digitrec_sha256"]) == 64


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_a_lone_changed_checkpoint_is_one_sentence_and_exit_2(
    command, tiny_fast_run, idx_folder, tmp_path, capsys
):
    """A model.safetensors copied without its side file and then changed loaded silently (49.76% on MNIST)."""
    path = tmp_path / "model.safetensors"
    data = bytearray((tiny_fast_run / "model.safetensors").read_bytes())
    data[-2000:-1996] = b"\x7f\x7f\x7f\x7f"
    path.write_bytes(bytes(data))
    if command == "evaluate":  # in this process, where idx_folder's MD5s hold: it would evaluate the model
        code = main(["evaluate", str(path), "--data-dir", str(idx_folder)])
        out, err = capsys.readouterr()
    else:  # a process of its own, as a user runs it
        image = tmp_path / "digit.png"
        Image.fromarray(np.zeros((28, 28), np.uint8)).save(image)
        result = run_cli("predict", "--model", str(path), str(image))
        code, out, err = result.returncode, result.stdout, result.stderr
    assert code == 2 and out == ""
    assert err == (
        f"digitrec: error: checkpoint {path} does not match the checksum in its header: it is truncated or was "
        "modified; retrain or restore it.\n"
    )


def test_ensemble_out_saves_one_model_that_scores_as_the_ensemble(
    tiny_fast_run, tmp_path, idx_folder, capsys
):
    other = tmp_path / "other.safetensors"
    model, meta = load_model(tiny_fast_run / "model.safetensors")
    with torch.no_grad():
        model[1][-1].weight.mul_(-1)  # the last layer turned around: a member that disagrees
    save_model(other, model, meta | {"temperature": 2.0})
    out = tmp_path / "ensemble"  # a folder, as a run is
    args = ["ensemble", str(tiny_fast_run), str(other), "--out", str(out), "--json"]
    assert main([*args, "--data-dir", str(idx_folder)]) == 0
    ensemble = json.loads(capsys.readouterr().out)
    assert main(["evaluate", str(out), "--json", "--data-dir", str(idx_folder)]) == 0
    saved = json.loads(capsys.readouterr().out)
    assert saved["test_accuracy"] == pytest.approx(ensemble["test_accuracy"], abs=1e-6)
    assert saved["test_loss"] == pytest.approx(ensemble["test_loss"], rel=1e-4)
    assert main(["evaluate", str(tiny_fast_run), "--json", "--data-dir", str(idx_folder)]) == 0
    assert saved["test_loss"] > json.loads(capsys.readouterr().out)["test_loss"] + 0.01  # the dissent counts
    assert json.loads((out / "model.json").read_text())["arch"] == "ensemble"
    assert "digitrec_sha256" in header_metadata(out / "model.safetensors")


def test_ensemble_out_to_a_folder_named_like_a_file_writes_into_it(
    tiny_fast_run, tmp_path, idx_folder, capsys
):
    """`--out x.safetensors` where x.safetensors is a folder said "cannot use .x.safetensors.PID-....tmp: Is a
    directory", naming a temporary file; it is a folder to hold model.safetensors, as calibrate takes it."""
    other = _member(tiny_fast_run, tmp_path / "other.safetensors", 1, flip=True)
    out = tmp_path / "x.safetensors"
    out.mkdir()
    args = ["ensemble", str(tiny_fast_run), str(other), "--out", str(out)]
    assert main([*args, "--data-dir", str(idx_folder)]) == 0, capsys.readouterr().err
    assert json.loads((out / "model.json").read_text())["arch"] == "ensemble"


def _member(tiny_fast_run, path, tta_views, flip=False):
    """The tiny run saved again at `path` with other test-time views (and its last layer turned around)."""
    model, meta = load_model(tiny_fast_run / "model.safetensors")
    if flip:
        with torch.no_grad():
            model[1][-1].weight.mul_(-1)
    save_model(path, model, meta | {"config": meta["config"] | {"tta_views": tta_views}, "temperature": 2.0})
    return path


def test_ensemble_out_refuses_a_members_own_run_folder_or_file(tiny_fast_run, tmp_path, idx_folder, capsys):
    """`ensemble A B --out A` replaced A's model.safetensors and left its MODEL_CARD.md, report.html and
    metrics.json describing the old model."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("model.safetensors", "model.json"):
        (run / name).write_bytes((tiny_fast_run / name).read_bytes())
    (run / "MODEL_CARD.md").write_text("card of the member\n")
    other = _member(tiny_fast_run, tmp_path / "other.safetensors", 1, flip=True)
    before = {path: path.read_bytes() for path in (run / "model.safetensors", other)}
    for out, says in [
        (run, f"is in the run folder of the member {run}, whose model card"),
        (run / "model.safetensors", f"is in the run folder of the member {run}, whose model card"),
        (run / "ensemble.safetensors", f"is in the run folder of the member {run}, whose model card"),
        (other, f"--out {other} is the member {other} itself, which the ensemble would replace"),
        (tmp_path / "." / "other.safetensors", f"is the member {other} itself"),
    ]:
        code = main(["ensemble", str(run), str(other), "--out", str(out), "--data-dir", str(idx_folder)])
        err = capsys.readouterr().err
        assert code == 2 and says in err and len(err.strip().splitlines()) == 1, err
    assert {path: path.read_bytes() for path in before} == before
    assert sorted(p.name for p in run.iterdir()) == ["MODEL_CARD.md", "model.json", "model.safetensors"]


def test_ensemble_out_refuses_another_runs_folder_but_replaces_an_earlier_ensemble(
    tiny_fast_run, tmp_path, idx_folder, capsys
):
    """`ensemble A B --out C`, C another run's folder: C's model.safetensors became the ensemble while its metrics,
    history and last.safetensors described its run, and `train --resume C` then stopped with a traceback."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("model.safetensors", "model.json", "metrics.json"):
        (run / name).write_bytes((tiny_fast_run / name).read_bytes())
    before = (run / "model.safetensors").read_bytes()
    first = _member(tiny_fast_run, tmp_path / "a.safetensors", 1)
    second = _member(tiny_fast_run, tmp_path / "b.safetensors", 1, flip=True)
    data = ["--data-dir", str(idx_folder)]
    assert main(["ensemble", str(first), str(second), "--out", str(run), *data]) == 2
    err = capsys.readouterr().err
    assert f"is in the run folder {run}, whose model card, report and metrics describe its own run" in err
    assert (run / "model.safetensors").read_bytes() == before
    ensemble = tmp_path / "ensemble"

    def saved(*members: Path) -> None:
        assert main(["ensemble", *map(str, members), "--out", str(ensemble), *data]) == 0

    saved(first, second)
    assert main(["export", str(ensemble), *data]) == 0
    saved(second, first)  # another ensemble over the first one's folder: the export made from that one goes
    assert not (ensemble / "model.onnx").exists()
    assert main(["export", str(ensemble), *data]) == 0
    saved(second, first)  # the same ensemble again, the same file: its export stays
    assert (ensemble / "model.onnx").exists()
    assert load_model(ensemble / "model.safetensors")[1]["arch"] == "ensemble"
    removed = f"removed model.onnx from {ensemble}: exported from model.safetensors before this ensemble"
    assert capsys.readouterr().err.count(removed) == 1
    # its card and report, left by `evaluate --report`, described the ensemble replaced, with no word said
    assert main(["evaluate", str(ensemble), "--report", str(ensemble), *data]) == 0
    saved(second, first)  # the same ensemble: its card still holds
    assert "still describe" not in capsys.readouterr().err
    saved(first, second)
    assert (
        f"MODEL_CARD.md and report.html in {ensemble} still describe the ensemble it replaced; "
        f"`digitrec evaluate {ensemble} --report {ensemble}` rewrites them." in capsys.readouterr().err
    )


def test_eval_real_write_refuses_a_users_file_in_any_sets_folder_before_writing_any(tmp_path, capsys):
    """With --sets pen-photo,negatives and a file of the user's in negatives/, pen-photo's images were written
    before the refusal, though README says it stops before anything is written."""
    out = tmp_path / "w"
    (out / "negatives").mkdir(parents=True)
    (out / "negatives" / "00000_none.png").write_bytes(b"mine")
    args = ["eval-real", "--sets", "pen-photo,negatives", "--count", "2", "--write", str(out)]
    assert main(args) == 2
    assert "00000_none.png named like the images eval-real --write writes" in capsys.readouterr().err
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "negatives",
        "negatives/00000_none.png",
    ]


def test_evaluate_names_a_missing_model_before_any_report_folder(tiny_fast_run, tmp_path, capsys):
    """`evaluate nonexist --report RUN` said RUN "holds another model" instead of that nonexist does not exist."""
    assert main(["evaluate", str(tmp_path / "nonexist"), "--report", str(tiny_fast_run)]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "holds another model" not in err


def test_only_a_process_in_a_process_group_leaves_without_teardown(monkeypatch):
    """A `predict` in a shell that exports WORLD_SIZE=2 left through os._exit, skipping atexit handlers."""
    from digitrec.cli import _in_a_process_group

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not _in_a_process_group()


def test_no_model_is_written_over_a_runs_resume_checkpoint(tiny_fast_run, tmp_path, idx_folder, capsys):
    """`calibrate RUN --out RUN/last.safetensors` (and `ensemble --out` there) replaced the checkpoint that
    `train --resume` continues from: the run could no longer be finished."""
    other = _member(tiny_fast_run, tmp_path / "other.safetensors", 1, flip=True)
    last = tmp_path / "run" / "last.safetensors"
    last.parent.mkdir()
    data = ["--data-dir", str(idx_folder)]
    for command in (
        ["calibrate", str(tiny_fast_run), "--count", "10"],
        ["ensemble", str(tiny_fast_run), str(other)],
    ):
        with pytest.raises(SystemExit) as stopped:
            main([*command, "--out", str(last), *data])
        assert stopped.value.code == 2
        assert "is named as a run's resume checkpoint" in capsys.readouterr().err
    assert not last.exists()


def test_evaluate_report_refuses_a_folder_holding_another_model(tiny_fast_run, tmp_path, idx_folder, capsys):
    """`evaluate A --report B`, B another run: B's report.html and MODEL_CARD.md described A beside B's own
    model.safetensors and metrics.json."""
    import shutil

    other = tmp_path / "other"
    shutil.copytree(tiny_fast_run, other)
    (other / "model.safetensors").write_bytes(
        _member(tiny_fast_run, tmp_path / "b.safetensors", 1, True).read_bytes()
    )
    (other / "model.json").write_bytes((tmp_path / "b.json").read_bytes())
    (other / "MODEL_CARD.md").write_text("card of the other run\n")
    data = ["--data-dir", str(idx_folder)]
    assert main(["evaluate", str(tiny_fast_run), "--report", str(other), *data]) == 2
    assert f"--report {other} holds another model ({other / 'model.safetensors'})" in capsys.readouterr().err
    assert (other / "MODEL_CARD.md").read_text() == "card of the other run\n"
    # its own folder, and a new one, are fine; a reused folder loses the curves of the model reported before
    assert main(["evaluate", str(other), "--report", str(other), *data]) == 0
    report = tmp_path / "report"
    assert main(["evaluate", str(other), "--report", str(report), *data]) == 0
    assert (report / "curves.png").exists()  # its run's history.json
    assert main(["evaluate", str(tmp_path / "b.safetensors"), "--report", str(report), *data]) == 0
    assert not (report / "curves.png").exists() and (report / "report.html").exists()


def test_ensemble_out_refuses_members_on_different_test_time_views(
    tiny_fast_run, tmp_path, idx_folder, capsys
):
    """The saved model ran its first member's views for all members: 99.06% printed and stored, 98.97% from
    `digitrec evaluate` of the file."""
    other = _member(tiny_fast_run, tmp_path / "tta5.safetensors", 5)
    out = tmp_path / "ensemble.safetensors"
    args = ["ensemble", str(tiny_fast_run), str(other), "--out", str(out), "--data-dir", str(idx_folder)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "the members evaluate on different numbers of test-time views (" in err and f"{other} 5)" in err
    assert not out.exists()
    assert (
        main(args[:3] + ["--data-dir", str(idx_folder)]) == 0
    )  # scored without --out, each on its own views


def test_a_saved_ensemble_on_test_time_views_records_what_evaluating_it_gives(
    tiny_fast_run, tmp_path, idx_folder, capsys
):
    """Members on 5 views: the file recorded the members' vote (views averaged per member, then voted), which is
    not what the file computes (voted, then views averaged)."""
    first = _member(tiny_fast_run, tmp_path / "a.safetensors", 5)
    second = _member(tiny_fast_run, tmp_path / "b.safetensors", 5, flip=True)
    out = tmp_path / "ensemble.safetensors"
    data = ["--data-dir", str(idx_folder)]
    assert main(["ensemble", str(first), str(second), "--out", str(out), *data]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out), "--json", *data]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    recorded = load_model(out)[1]["metrics"]
    assert recorded["test_accuracy"] == evaluated["test_accuracy"]
    assert recorded["test_loss"] == pytest.approx(evaluated["test_loss"], rel=1e-6)


def test_an_ensemble_whose_saved_loss_differs_from_the_vote_says_why(
    tiny_fast_run, tmp_path, idx_folder, capsys
):
    """`ensemble A B --out C` printed the vote's test loss, and C (views averaged after the vote) evaluated to
    another: the note that explains it came only when the error counts differed."""
    first = _member(tiny_fast_run, tmp_path / "a.safetensors", 5)
    second = _member(tiny_fast_run, tmp_path / "b.safetensors", 5, flip=True)
    out = tmp_path / "ensemble.safetensors"
    data = ["--data-dir", str(idx_folder)]
    assert main(["ensemble", str(first), str(second), "--out", str(out), *data]) == 0
    printed = capsys.readouterr()
    vote = float(printed.out.split("test loss ")[1].split()[0])
    assert main(["evaluate", str(out), "--json", *data]) == 0
    saved = json.loads(capsys.readouterr().out)
    assert round(saved["test_loss"], 4) != vote  # this pair's vote and file differ in the loss
    assert (
        f"{out} as one model scores {saved['test_accuracy']:.2%} ({saved['errors']} errors, test loss "
        f"{saved['test_loss']:.4f}): it runs every member" in printed.err
    )


def test_evaluate_says_how_many_views_it_scored(tiny_fast_run, tmp_path, idx_folder, capsys):
    """`digitrec evaluate` of a 5-view model (`default`) and of the same with `--tta-views 1` printed alike."""
    five = _member(tiny_fast_run, tmp_path / "five.safetensors", 5)
    data = ["--data-dir", str(idx_folder)]
    assert main(["evaluate", str(five), *data]) == 0
    assert "  (5 views per image)\n" in capsys.readouterr().out
    assert main(["evaluate", str(five), "--tta-views", "1", *data]) == 0
    assert "views per image" not in capsys.readouterr().out
    assert main(["evaluate", str(five), "--json", *data]) == 0
    assert json.loads(capsys.readouterr().out)["tta_views"] == 5
    assert main(["evaluate", str(five), "--json", "--tta-views", "1", *data]) == 0
    assert json.loads(capsys.readouterr().out)["tta_views"] == 1


def test_calibrate_out_is_a_safetensors_file_as_named_or_else_a_run_folder(
    tiny_fast_run, idx_folder, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("DIGITREC_DATA", str(idx_folder))
    folder, named = tmp_path / "calibrated", tmp_path / "named.safetensors"
    for out, written in ((folder, folder / "model.safetensors"), (named, named)):
        assert main(["calibrate", str(tiny_fast_run), "--count", "10", "--out", str(out)]) == 0
        assert f"calibration written into {written}\n" in capsys.readouterr().out
        assert "temperature" in load_model(written)[1]
        assert "digitrec_sha256" in header_metadata(written)
    assert "temperature" not in load_model(tiny_fast_run / "model.safetensors")[1]  # the source is untouched


def test_an_ensemble_is_not_a_member_of_another_even_without_out(tiny_fast_run, tmp_path, idx_folder, capsys):
    """`ensemble E C` (E an ensemble of A and B) was scored with A and B a quarter of the vote each and C half;
    with --out it was refused."""
    data = ["--data-dir", str(idx_folder)]
    first = _member(tiny_fast_run, tmp_path / "a.safetensors", 1)
    second = _member(tiny_fast_run, tmp_path / "b.safetensors", 1, flip=True)
    ensemble = tmp_path / "e.safetensors"
    assert main(["ensemble", str(first), str(second), "--out", str(ensemble), *data]) == 0
    capsys.readouterr()
    assert main(["ensemble", str(ensemble), str(tiny_fast_run), *data]) == 2
    assert (
        f"{ensemble} is already an ensemble; pass its members' checkpoints instead."
        in capsys.readouterr().err
    )


def test_calibrating_the_checkpoint_of_an_unfinished_run_says_what_resuming_it_does(
    tiny_fast_run, idx_folder, tmp_path, monkeypatch, capsys
):
    """The calibration went with the model.safetensors a resumed run replaces, and nothing said so."""
    monkeypatch.setenv("DIGITREC_DATA", str(idx_folder))
    model, meta = load_model(tiny_fast_run / "model.safetensors")
    partial = tmp_path / "run" / "model.safetensors"
    partial.parent.mkdir()
    save_model(partial, model, meta | {"partial": True})
    assert main(["calibrate", str(partial), "--count", "10"]) == 0
    assert "a model the run writes when it goes on is not calibrated" in capsys.readouterr().out


def test_calibrating_a_run_in_place_says_its_card_is_stale_and_how_to_rewrite_it(
    tiny_fast_run, idx_folder, tmp_path, monkeypatch, capsys
):
    """The run's MODEL_CARD.md kept showing the uncalibrated model (no temperature, its T = 1 ECE)."""
    import shutil

    monkeypatch.setenv("DIGITREC_DATA", str(idx_folder))
    run = tmp_path / "run"
    shutil.copytree(tiny_fast_run, run)
    (run / "MODEL_CARD.md").write_text("# the card training wrote\n")
    assert main(["calibrate", str(run), "--count", "10"]) == 0
    said = capsys.readouterr().out
    rewrite = f"`digitrec evaluate {run} --report {run}` rewrites them."
    assert f"MODEL_CARD.md in {run} still describes the model before calibration; {rewrite}" in said
    assert main(["evaluate", str(run), "--report", str(run)]) == 0  # the command it gives does it
    assert "Calibrated by temperature scaling" in (run / "MODEL_CARD.md").read_text()


def test_an_unwritable_path_found_late_is_one_sentence(tmp_path, monkeypatch, capsys):
    """An OSError on a path the user named (here the cache, below a file) was a traceback with exit 1."""
    blocking = tmp_path / "afile"
    blocking.write_text("not a folder")
    monkeypatch.setenv("DIGITREC_CACHE", str(blocking))
    monkeypatch.setattr("digitrec.data._shared_dirs", lambda: [])
    monkeypatch.setattr("digitrec.data.MIRRORS", ())
    monkeypatch.delenv("DIGITREC_DATA", raising=False)
    assert main(["data"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1
    assert str(blocking) in err


def test_the_recipe_flag_wins_over_the_config_file(tmp_path):
    """README: the recipe, then the TOML file, then the flags; a TOML `recipe` silently beat --recipe."""
    from argparse import Namespace

    from digitrec.cli import training_config
    from digitrec.config import TRAIN_OVERRIDES

    toml = tmp_path / "c.toml"
    toml.write_text('recipe = "fast"\nepochs = 2\n')
    args = Namespace(config=str(toml), amp=None, compile=False, **dict.fromkeys(TRAIN_OVERRIDES))
    recipe, config = training_config(Namespace(**vars(args), recipe="default"))
    assert recipe == "default" and config.arch == "fast_cnn_24" and config.epochs == 2
    recipe, config = training_config(Namespace(**vars(args), recipe=None))
    assert recipe == "fast" and config.arch == "fast_cnn_crop"


def test_early_stopping_without_a_validation_split_is_refused():
    """It was accepted and never stopped anything: without a split no epoch is ever worse than the best."""
    result = run_cli("train", "--recipe", "fast", "--early-stopping-patience", "2", "--dry-run")
    assert result.returncode == 2 and "needs a validation split" in result.stderr
    assert "Traceback" not in result.stderr


def test_train_resume_with_nothing_to_resume_says_so_before_looking_for_mnist(tmp_path, monkeypatch, capsys):
    """MNIST was looked for (and, on a fresh machine, downloaded) before "no last.safetensors" was said."""
    from digitrec import data

    monkeypatch.setattr(data, "load_mnist", lambda *a, **k: pytest.fail("looked for MNIST first"))
    assert main(["train", "--resume", str(tmp_path / "no-run")]) == 2
    assert "has no last.safetensors to resume from" in capsys.readouterr().err


def test_an_interrupted_train_says_how_to_resume(tmp_path, monkeypatch, capsys, tiny_mnist):
    from digitrec import data, training

    def interrupted(config, out, **kwargs):
        (out / "last.safetensors").parent.mkdir(parents=True, exist_ok=True)
        (out / "last.safetensors").write_bytes(b"a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "load_mnist", lambda *a, **k: tiny_mnist)
    monkeypatch.setattr(training, "train", interrupted)
    assert main(["train", "--recipe", "fast", "--out", str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err
    assert f"`digitrec train --resume {tmp_path / 'run'}` continues" in err and "interrupted" in err


def test_a_terminated_train_stops_as_ctrl_c_does(tmp_path, monkeypatch, capsys, tiny_mnist):
    """`timeout` or a job scheduler's SIGTERM ended a run silently (exit 143), leaving a folder that held only
    its lock file; it now says how to resume, and the signal's handler is given back afterwards."""
    import signal

    from digitrec import data, training

    def terminated(config, out, **kwargs):
        (out / "last.safetensors").parent.mkdir(parents=True, exist_ok=True)
        (out / "last.safetensors").write_bytes(b"a checkpoint")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        raise AssertionError("SIGTERM was not turned into an interrupt")

    monkeypatch.setattr(data, "load_mnist", lambda *a, **k: tiny_mnist)
    monkeypatch.setattr(training, "train", terminated)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["train", "--recipe", "fast", "--out", str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err
    assert f"`digitrec train --resume {tmp_path / 'run'}` continues" in err and "interrupted" in err
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize(
    "args, missing, message",
    [
        (
            ["serve", "--port", "0"],
            "fastapi",
            'digitrec serve needs the web extra (fastapi is not installed): `pip install "digitrec[web]"`',
        ),
        (
            ["export", "m.safetensors"],
            "onnxscript",
            "digitrec export needs the export extra (onnxscript is not installed)",
        ),
        (["bench", "infer", "--model", "m"], "onnxruntime", "or leave the onnx rows out of --backends"),
        (
            ["explore"],
            "sklearn",
            'digitrec explore needs the explore extra (sklearn is not installed): `pip install "digitrec[explore]"`',
        ),
        (
            ["predict", "--backend", "onnx", "x.png"],
            "onnx",
            "the onnx backend needs the export extra (onnx is not installed)",
        ),
        (
            ["predict", "--model", "{tmp}/m.onnx", "x.png"],
            "onnxruntime",
            "running a model on ONNX Runtime needs the export extra (onnxruntime is not installed)",
        ),
    ],
)
def test_a_command_whose_extra_is_not_installed_names_it_in_one_sentence(
    args, missing, message, monkeypatch, capsys, tmp_path
):
    """A `pip install digitrec` without [web] or [export] ended `serve`, `export`, `bench infer` and `--backend
    onnx` in a ModuleNotFoundError traceback (exit 1); explore said so only after loading MNIST."""
    import importlib.util

    import digitrec.errors

    found = importlib.util.find_spec
    monkeypatch.setattr(digitrec.errors, "find_spec", lambda name: None if name == missing else found(name))

    def no_work(*args, **kwargs):
        raise AssertionError("MNIST was loaded before the missing extra was said")

    monkeypatch.setattr("digitrec.data.load_mnist", no_work)
    (tmp_path / "m.onnx").write_bytes(b"")  # an exported model's name; the extra is said before it is read
    assert main([arg.replace("{tmp}", str(tmp_path)) for arg in args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_bench_infer_without_onnx_rows_does_not_need_the_export_extra(monkeypatch, capsys):
    import importlib.util

    import digitrec.errors

    found = importlib.util.find_spec
    monkeypatch.setattr(
        digitrec.errors, "find_spec", lambda name: None if name == "onnxruntime" else found(name)
    )
    from digitrec.errors import DataError

    def past_the_check(*args, **kwargs):
        raise DataError("past the check")

    monkeypatch.setattr("digitrec.data.load_mnist", past_the_check)
    assert main(["bench", "infer", "--backends", "torch-fp32", "--model", "m"]) == 2
    assert "past the check" in capsys.readouterr().err


def test_finetune_says_to_calibrate_the_new_model_before_serving_it(
    tiny_fast_run, idx_folder, tmp_path, capsys
):
    """It said only "serve it: digitrec serve --model ...", and a fine-tuned model has no temperature or reject
    threshold of its own until `calibrate` gives it one."""
    out = tmp_path / "tuned"
    args = [
        "finetune",
        "--model",
        str(tiny_fast_run),
        "--no-corrections",
        "--epochs",
        "0.05",
        "--out",
        str(out),
    ]
    assert main([*args, "--no-report", "--no-progress", "--data-dir", str(idx_folder)]) == 0
    model = out / "model.safetensors"
    said = capsys.readouterr().out
    assert (
        f"calibrate it, then serve it: digitrec calibrate {model} && digitrec serve --model {model}\n" in said
    )
    assert "temperature" not in load_model(model)[1]


def test_finetune_refuses_to_write_over_the_model_it_starts_from(tiny_fast_run, idx_folder, tmp_path, capsys):
    """`finetune --model R --out R` replaced R's model, and the new card's "fine-tuned from R" then named itself."""
    run = tmp_path / "run"
    run.mkdir()
    for name in ("model.safetensors", "model.json"):
        (run / name).write_bytes((tiny_fast_run / name).read_bytes())
    before = (run / "model.safetensors").read_bytes()
    for model in (run, run / "model.safetensors"):
        args = ["finetune", "--model", str(model), "--no-corrections", "--epochs", "0.05", "--out", str(run)]
        assert main([*args, "--no-report", "--no-progress", "--data-dir", str(idx_folder)]) == 2
        assert capsys.readouterr().err == (
            f"digitrec: error: --out {run} holds the model the fine-tune starts from, which it would replace; "
            "name a new folder for the fine-tuned model.\n"
        )
    assert (run / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize("rank, world_size", [(0, 1), (0, 2), (1, 2)])
def test_ctrl_c_names_how_to_resume_once_with_the_process_count(
    rank, world_size, idx_folder, tmp_path, monkeypatch, capsys
):
    """Under `--nproc 2` every rank printed `digitrec train --resume DIR`, which a 2-process run refuses in one."""
    from digitrec import training

    out = tmp_path / "run"

    def interrupted(config, out_dir, **kwargs):
        Path(out_dir).mkdir()
        (Path(out_dir) / "last.safetensors").write_bytes(b"a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(training, "train", interrupted)
    if world_size > 1:  # what torchrun gives each worker
        monkeypatch.setenv("WORLD_SIZE", str(world_size))
        monkeypatch.setenv("RANK", str(rank))
    args = ["train", "--recipe", "fast", "--out", str(out), "--data-dir", str(idx_folder), "--no-progress"]
    assert main(args) == 130
    hints = [line for line in capsys.readouterr().err.splitlines() if "--resume" in line]
    if rank:
        assert hints == []  # rank 0 says it, once
    elif world_size == 1:
        assert hints == [f"stopped; `digitrec train --resume {out}` continues from the last checkpoint"]
    else:
        assert hints == [
            f"stopped; `digitrec train --resume {out} --nproc 2` (or torchrun with 2 processes) continues from "
            "the last checkpoint"
        ]


def test_two_trainings_in_one_folder_at_once_the_second_is_refused(idx_folder, tmp_path, monkeypatch, capsys):
    """`digitrec train --out DIR` twice at once: both exited 0, the second reporting the first's weights."""
    from digitrec import training

    out = tmp_path / "shared"
    args = ["train", "--recipe", "fast", "--epochs", "1", "--data-dir", str(idx_folder), "--no-progress"]
    args += ["--no-report", "--threads", "1"]
    codes: list[int] = []
    calls: list[Path] = []
    train = training.train

    def with_a_second_run(config, out_dir, **kwargs):  # the second command starts while the first trains
        calls.append(out_dir)
        if len(calls) > 1:  # the second command's own run
            return train(config, out_dir, **kwargs)

        def second(model, row):
            codes.append(main([*args, "--out", str(out), "--seed", "1"]))
            return False

        return train(config, out_dir, **kwargs, on_epoch=second)

    monkeypatch.setattr(training, "train", with_a_second_run)
    assert main([*args, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert codes == [2]
    assert f"digitrec: error: {out} is in use by another digitrec run (pid {os.getpid()}); wait for it" in err
    assert load_model(out / "model.safetensors")[1]["config"]["seed"] == 0


def test_default_run_folders_of_commands_started_in_the_same_second_differ(
    idx_folder, tmp_path, monkeypatch, capsys
):
    """Two `digitrec train --recipe fast` in one second both trained into runs/fast-<that second>."""
    from digitrec import folderlock

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(folderlock.time, "strftime", lambda fmt, *args: "20261207-101010")
    args = ["train", "--recipe", "fast", "--epochs", "0.2", "--data-dir", str(idx_folder), "--no-progress"]
    for seed in ("0", "1"):
        assert main([*args, "--no-report", "--threads", "1", "--seed", seed]) == 0
    said = capsys.readouterr().out
    first, second = tmp_path / "runs" / "fast-20261207-101010", tmp_path / "runs" / "fast-20261207-101010-2"
    assert f"model: {Path('runs/fast-20261207-101010/model.safetensors')}" in said
    assert f"model: {Path('runs/fast-20261207-101010-2/model.safetensors')}" in said
    assert load_model(first / "model.safetensors")[1]["config"]["seed"] == 0
    assert load_model(second / "model.safetensors")[1]["config"]["seed"] == 1


def test_a_default_run_folder_is_not_left_empty_by_a_refused_run(idx_folder, tmp_path, monkeypatch):
    """The default folder is made before train() runs (so that another run takes the next name): a run refused
    there removes it again."""
    monkeypatch.chdir(tmp_path)
    args = ["train", "--recipe", "fast", "--val-size", "0", "--early-stopping-patience", "2"]
    assert main([*args, "--data-dir", str(idx_folder)]) == 2
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


@pytest.mark.parametrize(
    "args",
    [
        ["evaluate", ""],
        ["calibrate", ""],
        ["export", ""],
        ["ensemble", "run", ""],
        ["robustness", "run", ""],
        ["explore", "--model", ""],
    ],
    ids=["evaluate", "calibrate", "export", "ensemble", "robustness", "explore"],
)
def test_an_empty_model_argument_is_refused_not_read_as_the_current_folder(
    args, tmp_path, monkeypatch, capsys
):
    """`digitrec evaluate "$RUN"` with $RUN unset evaluated ./model.safetensors (robustness too)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stopped:
        main(args)
    assert stopped.value.code == 2
    onnx = args[0] in ("robustness", "explore")  # they take an ONNX export as well
    what = "a run folder, .safetensors or .onnx file" if onnx else "a run folder or .safetensors file"
    assert f"is empty (an unset shell variable?); name {what}" in capsys.readouterr().err


def test_evaluate_draws_a_run_folders_history_only_for_its_own_checkpoint(
    tiny_fast_run, idx_folder, tmp_path, capsys
):
    """Another model copied into a run folder was reported with that run's curves and history table."""
    import shutil

    folder = tmp_path / "run"
    shutil.copytree(tiny_fast_run, folder)
    shutil.copy(folder / "model.safetensors", folder / "other.safetensors")
    for name, curves in (("model.safetensors", True), ("other.safetensors", False)):
        report = tmp_path / f"report-{name}"
        assert (
            main(["evaluate", str(folder / name), "--report", str(report), "--data-dir", str(idx_folder)])
            == 0
        )
        assert (report / "curves.png").exists() == curves and (
            "<h2>History</h2>" in (report / "report.html").read_text()
        ) == curves


def test_evaluate_says_when_a_checkpoint_is_from_a_run_that_has_not_finished(tmp_path, idx_folder, capsys):
    from digitrec.config import get_recipe
    from digitrec.data import load_mnist
    from digitrec.training import train

    def stop(model, row):
        if row["epoch"] == 2:  # after epoch 1's checkpoint (last.safetensors), from which --resume goes on
            raise KeyboardInterrupt
        return False

    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(
            get_recipe("seed-mlp").override(epochs=3, val_size=200),
            out,
            data=load_mnist(idx_folder, download=False),
            progress=False,
            report=False,
            log=lambda message: None,
            on_epoch=stop,
        )
    assert main(["evaluate", str(out), "--data-dir", str(idx_folder), "--report", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"of a run that had not finished; `digitrec train --resume {out}` finishes it" in err
    # the card gave the whole run's settings and how to train it again, and no word of it being unfinished
    card = (out / "MODEL_CARD.md").read_text()
    assert card.startswith("# Model card: custom, unfinished run (mlp_500_256)")
    assert "the best so far of a run that had not finished" in card
    # a copy elsewhere: no folder to resume (it named the copy's folder, which has no last.safetensors)
    copy = tmp_path / "elsewhere" / "copy.safetensors"
    copy.parent.mkdir()
    copy.write_bytes((out / "model.safetensors").read_bytes())
    assert main(["evaluate", str(copy), "--data-dir", str(idx_folder)]) == 0
    assert (
        f"note: {copy} is the best checkpoint so far of a run that had not finished."
        in capsys.readouterr().err
    )


@pytest.mark.parametrize("rank, said", [("0", True), ("1", False)])
def test_an_interrupt_is_said_by_torchruns_rank_0_only(rank, said, monkeypatch, capsys):
    """`train --nproc 2` stopped by Ctrl-C printed "digitrec: interrupted" once per process, three times."""
    import digitrec.cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(digitrec.cli, "cmd_models", interrupted)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", rank)
    assert main(["models"]) == 130
    assert ("digitrec: interrupted" in capsys.readouterr().err) == said


def test_a_run_folder_whose_name_is_not_utf8_gets_its_report_and_export(tiny_fast_run, idx_folder, tmp_path):
    """`train --out $'r\\xff'` trained, then failed writing report.html (UnicodeEncodeError, exit 1); `export` and
    `evaluate --report` of such a folder failed the same way."""
    odd = Path(os.fsdecode(os.fsencode(tmp_path) + b"/r\xff"))
    shutil.copytree(tiny_fast_run, odd)
    report = Path(os.fsdecode(os.fsencode(tmp_path) + b"/rep\xfe"))
    assert main(["evaluate", str(odd), "--report", str(report), "--data-dir", str(idx_folder)]) == 0
    html = (report / "report.html").read_bytes()
    assert str(tmp_path / "r\\xff").encode() in html and html.decode("utf-8")  # escaped, as ls shows it
    pytest.importorskip("onnxruntime")
    assert main(["export", str(odd), "--data-dir", str(idx_folder)]) == 0
    assert (odd / "model.onnx").stat().st_size > 0


@pytest.mark.parametrize(
    "flags, said",
    [
        (["--epochs", "0"], "--epochs must be above 0, got 0.0."),
        (["--lr-scale", "-1"], "--lr-scale must be above 0, got -1.0."),
        (["--lr-scale", "nan"], "--lr-scale must be above 0, got nan."),
    ],
)
def test_finetune_names_the_flag_out_of_range(flags, said, tiny_fast_run, idx_folder, tmp_path, capsys):
    """Each of the three said "--repeat must be at least 1, and --epochs and --lr-scale positive."."""
    args = [
        "finetune",
        "--model",
        str(tiny_fast_run),
        "--no-corrections",
        *flags,
        "--out",
        str(tmp_path / "ft"),
    ]
    assert main([*args, "--no-report", "--no-progress", "--data-dir", str(idx_folder)]) == 2
    assert capsys.readouterr().err == f"digitrec: error: {said}\n"


def test_a_dash_for_standard_input_says_how_to_give_it(tmp_path, monkeypatch, capsys):
    """`digitrec predict -` said "- does not exist; check the path"."""
    monkeypatch.chdir(tmp_path)
    assert main(["predict", "-"]) == 1
    said = "standard input is not read as -; redirect the image into /dev/stdin instead (digitrec predict /dev/stdin"
    assert said in capsys.readouterr().out
