"""Hyperparameter search: Optuna trials, pruning on validation accuracy, a best.toml that `digitrec train` accepts, shared studies."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from contextlib import closing

import pytest

from digitrec import tune as tune_module
from digitrec.cli import main
from digitrec.errors import DigitrecError

pytest.importorskip("optuna")


@pytest.fixture
def optuna_warnings():
    """A list that holds, as they come, the messages Optuna logs at WARNING or above while the test runs."""
    import logging

    warnings: list[str] = []
    listener = logging.Handler(logging.WARNING)
    listener.emit = lambda record: warnings.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("optuna").addHandler(listener)
    yield warnings
    logging.getLogger("optuna").removeHandler(listener)


def test_tune_prunes_bad_trials_and_writes_a_config_train_accepts(
    tiny_mnist, idx_folder, tmp_path, monkeypatch, capsys
):
    # Two sound trials, then one whose learning rate cannot learn anything: the median pruner stops it after epoch 1.
    monkeypatch.setattr(tune_module, "suggest", fixed_suggest([{"lr": 4e-3}, {"lr": 3e-3}, {"lr": 1e-9}]))
    out = tmp_path / "tune"
    result = tune_module.tune("fast", 3, out, data=tiny_mnist, epochs=2, val_size=200, log=lambda msg: None)
    states = [t.state.name for t in result.study.trials]
    assert states == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert result.best_params["lr"] in (4e-3, 3e-3) and 0.5 < result.best_value <= 1
    assert "pruned" in (out / "trials.csv").read_text() and (out / "tuning.png").exists()
    assert (
        main(
            [
                "train",
                "--config",
                str(result.config_path),
                "--epochs",
                "1",
                "--data-dir",
                str(idx_folder),
                "--out",
                str(tmp_path / "run"),
                "--no-progress",
                "--val-size",
                "100",
            ]
        )
        == 0
    )
    saved = json.loads((tmp_path / "run" / "model.json").read_text())
    assert saved["recipe"] == "fast" and saved["config"]["lr"] == result.best_params["lr"]


def test_best_toml_says_which_trial_settings_it_leaves_to_the_recipe(tiny_mnist, tmp_path, monkeypatch):
    """best.toml held the recipe and the searched settings only: `train --config` trained the recipe's epochs and
    split (fast: 0.85 epoch on every image), not the trial's, and the file did not say so. Uncommented, the lines
    it now gives train the best trial's config."""
    from digitrec.cli import build_parser, training_config

    monkeypatch.setattr(tune_module, "suggest", fixed_suggest([{"lr": 4e-3}]))
    result = tune_module.tune(
        "fast", 1, tmp_path, data=tiny_mnist, epochs=2, val_size=200, log=lambda msg: None
    )
    text = result.config_path.read_text()
    assert "# epochs = 2.0\n# val_size = 200\n" in text and "early_stopping_patience" not in text
    as_trial = tmp_path / "as-trial.toml"
    as_trial.write_text(text.replace("# epochs", "epochs").replace("# val_size", "val_size"))
    _, config = training_config(build_parser().parse_args(["train", "--config", str(as_trial)]))
    trial = json.loads((tmp_path / f"trial-{result.study.best_trial.number:03d}" / "model.json").read_text())
    assert json.loads(json.dumps(config.to_dict())) == trial["config"]
    _, recipe_length = training_config(
        build_parser().parse_args(["train", "--config", str(result.config_path)])
    )
    assert recipe_length.epochs == 0.85 and recipe_length.val_size == 0 and recipe_length.lr == 4e-3


def test_trials_are_scored_on_validation_accuracy_never_on_the_test_set(tiny_mnist, tmp_path, monkeypatch):
    """A trial's value, and the study's best value, is the validation accuracy its run recorded. The test labels
    here are all wrong (each shifted by one), so a search scored on test accuracy (below 10%) cannot pass by
    the two figures happening to agree."""
    from dataclasses import replace

    monkeypatch.setattr(tune_module, "suggest", fixed_suggest([{"lr": 4e-3}, {"lr": 3e-3}]))
    mislabeled = replace(tiny_mnist, test_labels=(tiny_mnist.test_labels + 1) % 10)
    result = tune_module.tune(
        "fast", 2, tmp_path, data=mislabeled, epochs=2, val_size=200, log=lambda msg: None
    )
    recorded = {}
    for trial in result.study.trials:
        metrics = json.loads((tmp_path / f"trial-{trial.number:03d}" / "model.json").read_text())["metrics"]
        assert metrics["test_accuracy"] < 0.1 and metrics["val_accuracy"] > 0.5  # the two cannot be confused
        assert trial.value == metrics["val_accuracy"]
        recorded[trial.number] = metrics
    assert result.best_value == max(m["val_accuracy"] for m in recorded.values())
    assert result.best_value == recorded[result.study.best_trial.number]["val_accuracy"]
    assert result.best_value != recorded[result.study.best_trial.number]["test_accuracy"]


def test_a_trial_that_diverges_is_pruned_and_the_search_goes_on(tiny_mnist, tmp_path, monkeypatch):
    """A learning rate the search space allows can make the loss NaN; training now stops there with
    TrainingDiverged, which ended the whole study."""
    from digitrec import training
    from digitrec.errors import TrainingDiverged

    real_train = training.train

    def diverging_above_1(config, *args, **kwargs):
        if config.lr > 1:
            raise TrainingDiverged(
                "training diverged in epoch 1, between steps 1 and 3: the loss is nan; ..."
            )
        return real_train(config, *args, **kwargs)

    monkeypatch.setattr(training, "train", diverging_above_1)
    monkeypatch.setattr(tune_module, "suggest", fixed_suggest([{"lr": 4e-3}, {"lr": 500.0}, {"lr": 3e-3}]))
    logged: list[str] = []
    result = tune_module.tune("fast", 3, tmp_path, data=tiny_mnist, epochs=1, val_size=200, log=logged.append)
    assert [t.state.name for t in result.study.trials] == ["COMPLETE", "PRUNED", "COMPLETE"]
    assert result.best_params["lr"] in (4e-3, 3e-3)
    assert any(line.startswith("trial   1  diverged (loss not finite)  lr 500") for line in logged), logged


def fixed_suggest(plan):
    """A search space that proposes the planned parameters, one dict per trial."""
    planned = iter(plan)

    def suggest(trial, base_lr):
        return {name: trial.suggest_float(name, value, value) for name, value in next(planned).items()}

    return suggest


def test_processes_share_one_study_through_storage(idx_folder, tmp_path, capsys):
    storage = f"sqlite:///{tmp_path / 'tune.db'}"
    args = [
        "tune",
        "--recipe",
        "fast",
        "--trials",
        "1",
        "--epochs",
        "1",
        "--val-size",
        "200",
        "--storage",
        storage,
        "--study",
        "shared",
        "--data-dir",
        str(idx_folder),
    ]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert (
        main([*args, "--out", str(tmp_path / "b"), "--seed", "1"]) == 0
    )  # a second process joins the same study
    printed = capsys.readouterr().out
    assert "best validation accuracy" in printed and "digitrec train --config" in printed
    assert (tmp_path / "b" / "trials.csv").read_text().count("\n") == 3  # header + both processes' trials


def test_zero_trials_is_a_user_error(tmp_path):
    """The command line refuses `--trials 0` (tests/test_cli.py); the function refuses it too."""
    from digitrec.errors import DigitrecError

    with pytest.raises(DigitrecError, match="tuning needs at least 1 trial, got 0"):
        tune_module.tune("fast", 0, tmp_path)


@pytest.mark.parametrize(
    "storage, message",
    [
        ("notaurl", "is not a database digitrec can use"),
        ("postgresql://user:pass@127.0.0.1:1/db", "needs a database driver that is not installed"),
    ],
)
def test_a_storage_digitrec_cannot_use_is_one_sentence(tiny_mnist, tmp_path, storage, message):
    from digitrec.errors import DigitrecError

    if message.startswith("needs") and importlib.util.find_spec("psycopg2") is not None:
        pytest.skip("a PostgreSQL driver is installed here")
    with pytest.raises(DigitrecError, match=message):
        # a split the 1,200 tiny images leave a batch of (the default 5,000 is now refused before the storage)
        tune_module.tune("fast", 1, tmp_path, storage=storage, data=tiny_mnist, val_size=200)


@pytest.mark.parametrize("kind", ["another Optuna's schema", "tables of the same names"])
def test_a_study_database_optuna_cannot_open_is_one_sentence(tiny_mnist, tmp_path, kind):
    """A database an older Optuna made (RuntimeError: "no longer compatible with the table schema") or one with
    a table named `studies` that is not Optuna's (StorageInternalError) gave a 60-line traceback."""
    import sqlite3

    import optuna

    from digitrec.errors import DigitrecError

    path = tmp_path / "study.db"
    if kind == "another Optuna's schema":
        optuna.create_study(storage=f"sqlite:///{path}", study_name="older")
        with closing(sqlite3.connect(path)) as con, con:
            con.execute("UPDATE alembic_version SET version_num = 'v3.0.0.a'")
        said = f"holds studies in a schema this Optuna ({optuna.__version__}) cannot use; run `optuna storage"
    else:
        with closing(sqlite3.connect(path)) as con, con:
            con.execute("CREATE TABLE studies (x INTEGER)")
        said = "is not a database digitrec can use"
    with pytest.raises(DigitrecError, match=re.escape(f"--storage sqlite:///{path} {said}")):
        tune_module.tune("fast", 1, tmp_path, storage=f"sqlite:///{path}", data=tiny_mnist, val_size=200)


def test_processes_sharing_a_storage_seed_their_samplers_apart():
    assert tune_module._process_seed(0) != tune_module._process_seed(1)
    other = subprocess.run(
        [sys.executable, "-c", "from digitrec.tune import _process_seed; print(_process_seed(0))"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert int(other.stdout) != tune_module._process_seed(0)  # another process, another seed


@pytest.mark.parametrize(
    "kwargs, refused",
    [
        ({"seed": -1}, "--seed must be between 0 and 2\\*\\*32 - 1, got -1"),  # a ValueError traceback
        ({"epochs": 0}, "epochs must be a positive number"),  # silently the recipe's epochs
        ({"val_size": 0}, "--val-size must be at least 1, got 0"),  # silently 5,000
        ({"val_size": 1200}, "--val-size 1200 leaves 0 of 1,200 training images"),  # Optuna's log, then this
        # more than all: a negative count of steps passed the check, Optuna's traceback came first
        ({"val_size": 7000}, "--val-size 7000 leaves 0 of 1,200 training images"),
    ],
    ids=["negative-seed", "zero-epochs", "no-validation", "no-training-images", "more-than-all-images"],
)
def test_settings_tuning_cannot_use_are_one_sentence_before_any_trial(
    tiny_mnist, tmp_path, kwargs, refused, capfd
):
    from digitrec.errors import DigitrecError

    with pytest.raises(DigitrecError, match=refused):
        tune_module.tune("fast", 1, tmp_path, data=tiny_mnist, log=lambda msg: None, **kwargs)
    assert "Trial 0 failed" not in capfd.readouterr().err
    assert not (tmp_path / "trial-000").exists()


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # the test asks for the killed trial by hand
def test_a_trial_whose_process_was_killed_is_failed_and_tried_again(tiny_mnist, tmp_path, monkeypatch):
    """A kill -9'd trial in a shared study stayed "running" for ever, counted as pruned or failed."""
    import sqlite3

    import optuna

    url = f"sqlite:///{tmp_path / 'tune.db'}"
    storage = tune_module._heartbeat_storage(optuna, url)
    study = optuna.create_study(study_name="shared", storage=storage, direction="maximize")
    killed = study.ask()  # a process began this trial, beat its heartbeat, then died
    storage.record_heartbeat(killed._trial_id)
    with sqlite3.connect(tmp_path / "tune.db") as con:  # its last beat, an hour ago
        con.execute("UPDATE trial_heartbeats SET heartbeat = datetime('now', '-1 hour')")
    monkeypatch.setattr(tune_module, "suggest", fixed_suggest([{"lr": 4e-3}]))
    result = tune_module.tune(
        "fast",
        1,
        tmp_path,
        storage=url,
        study_name="shared",
        data=tiny_mnist,
        epochs=1,
        val_size=200,
        log=lambda msg: None,
    )
    states = [t.state.name for t in result.study.trials]
    assert states[0] == "FAIL" and "COMPLETE" in states[1:]
    assert "running" not in (tmp_path / "trials.csv").read_text()


def test_a_trial_trained_to_its_last_epoch_is_finished_not_pruned(tiny_mnist, tmp_path, monkeypatch):
    """With --epochs 1 the median pruner judged every trial after its only epoch: 31 of 50 fully trained trials
    were reported "pruned or failed" (and left out of best.toml) while pruning saved no time."""
    monkeypatch.setattr(tune_module, "suggest", fixed_suggest([{"lr": 4e-3}, {"lr": 3e-3}, {"lr": 1e-9}]))
    result = tune_module.tune(
        "fast", 3, tmp_path, data=tiny_mnist, epochs=1, val_size=200, log=lambda msg: None
    )
    assert [t.state.name for t in result.study.trials] == ["COMPLETE", "COMPLETE", "COMPLETE"]
    assert "pruned" not in (tmp_path / "trials.csv").read_text()


def test_a_shared_study_refuses_trials_that_measure_something_else(tiny_mnist, tmp_path, monkeypatch):
    """A second `tune` with the same --storage and --study but another recipe, --epochs or --val-size added its
    trials to the first's: best.toml named the second's recipe and epochs with the first's best trial."""
    from digitrec.errors import DigitrecError

    monkeypatch.setattr(tune_module, "suggest", fixed_suggest([{"lr": 4e-3}, {"lr": 3e-3}]))
    shared = {"storage": f"sqlite:///{tmp_path / 'tune.db'}", "study_name": "s1", "data": tiny_mnist}
    tune_module.tune("fast", 1, tmp_path / "a", epochs=1, val_size=200, log=lambda msg: None, **shared)
    for changed, said in (
        (
            {"recipe": "seed-lenet", "epochs": 1},
            "holds trials of --recipe fast, and this run asks for --recipe seed-lenet;",
        ),
        ({"epochs": 0.5}, "holds trials of --epochs 1.0, and this run asks for --epochs 0.5;"),
        (
            {"val_size": 100, "epochs": 1},
            "holds trials of --val-size 200, and this run asks for --val-size 100;",
        ),
    ):
        settings = {"recipe": "fast", "epochs": 1, "val_size": 200} | changed
        with pytest.raises(DigitrecError, match="give another --study name") as refused:
            tune_module.tune(
                settings.pop("recipe"), 1, tmp_path / "b", log=lambda msg: None, **settings, **shared
            )
        assert said in str(refused.value) and "study 's1' in sqlite:///" in str(refused.value)
        assert not (tmp_path / "b").exists()
    result = tune_module.tune(
        "fast", 1, tmp_path / "c", epochs=1, val_size=200, log=lambda msg: None, **shared
    )
    assert len(result.study.trials) == 2  # the same settings join the study


@pytest.mark.parametrize("stop", ["ctrl-c", "sigterm"])
def test_ctrl_c_writes_the_finished_trials_results_and_no_traceback(
    stop, idx_folder, tmp_path, monkeypatch, capfd, optuna_warnings
):
    """Ctrl-C during a study without --storage lost every finished trial (no trials.csv, best.toml or plot) and
    printed Optuna's 15-line KeyboardInterrupt traceback; SIGTERM (`timeout`, a job scheduler) ended it with no
    message and none of those files, and left the stopped trial's folder behind."""
    import os
    import signal

    from digitrec import training

    real_train, trained = training.train, []

    def interrupted_in_the_third_trial(*args, **kwargs):
        trained.append(1)
        if len(trained) == 3:
            if stop == "ctrl-c":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)  # tune's handler raises KeyboardInterrupt here
            raise AssertionError("SIGTERM did not stop the trial")
        return real_train(*args, **kwargs)

    monkeypatch.setattr(training, "train", interrupted_in_the_third_trial)
    monkeypatch.setattr(tune_module, "suggest", fixed_suggest([{"lr": 4e-3}, {"lr": 3e-3}, {"lr": 2e-3}]))
    out = tmp_path / "tune"
    args = ["tune", "--trials", "5", "--epochs", "1", "--val-size", "200", "--out", str(out)]
    assert main([*args, "--data-dir", str(idx_folder)]) == 130
    err = capfd.readouterr().err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert not optuna_warnings
    assert "stopped after 2 finished trials" in err and "--storage makes a study resumable" in err
    assert "lr = 0.00" in (out / "best.toml").read_text() and (out / "tuning.png").exists()
    rows = (out / "trials.csv").read_text().splitlines()
    assert [row.split(",")[1] for row in rows[1:]] == ["complete", "complete", "fail"]


def test_a_user_error_inside_a_trial_is_one_sentence_without_optunas_traceback(
    idx_folder, tmp_path, monkeypatch, capfd, optuna_warnings
):
    """`tune --out /proc/x`: the right sentence came last, after Optuna's "Trial 0 failed" warning with a whole
    traceback of the DigitrecError."""

    from digitrec import training
    from digitrec.errors import DigitrecError

    def unwritable(*args, **kwargs):
        raise DigitrecError(
            "cannot write into the run folder /proc/x/trial-000; name a folder you can write."
        )

    monkeypatch.setattr(training, "train", unwritable)
    args = ["tune", "--trials", "2", "--epochs", "1", "--val-size", "200", "--out", str(tmp_path / "tune")]
    assert main([*args, "--data-dir", str(idx_folder)]) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err and "failed" not in err, err
    assert err.strip().endswith(
        "cannot write into the run folder /proc/x/trial-000; name a folder you can write."
    )
    assert not optuna_warnings


def test_tune_refuses_a_run_folder_and_a_folder_in_use_and_replaces_an_earlier_study(
    tiny_mnist, tmp_path, monkeypatch
):
    """Run again into its folder a study left the earlier best.toml and trial folders beside its own files; two
    tunes into one folder overwrote each other's trials; a trained run's folder got a study inside it."""
    from digitrec.folderlock import RunFolderInUse, locked_run_folder

    monkeypatch.setattr(tune_module, "suggest", fixed_suggest([{"lr": 4e-3}, {"lr": 3e-3}, {"lr": 2e-3}]))
    out = tmp_path / "tune"
    quiet = {"data": tiny_mnist, "epochs": 1, "val_size": 200, "log": lambda msg: None}
    tune_module.tune("fast", 3, out, **quiet)
    assert sorted(p.name for p in out.glob("trial-*")) == ["trial-000", "trial-001", "trial-002"]
    said: list[str] = []
    monkeypatch.setattr(tune_module, "suggest", fixed_suggest([{"lr": 4e-3}]))
    tune_module.tune("fast", 1, out, **{**quiet, "log": said.append})
    assert sorted(p.name for p in out.glob("trial-*")) == ["trial-000"]
    assert f"replaced the earlier study in {out} (3 file(s), 3 trial folder(s))" in said
    assert "best of 1 finished trials" in (out / "best.toml").read_text()
    with locked_run_folder(out), pytest.raises(RunFolderInUse):
        tune_module.tune("fast", 1, out, **quiet)
    with pytest.raises(DigitrecError, match="is a run folder"):
        tune_module.tune("fast", 1, out / "trial-000", **quiet)
    # processes sharing a study through a storage share its folder: the one holding it does not refuse another
    monkeypatch.setattr(tune_module, "suggest", fixed_suggest([{"lr": 4e-3}]))
    with locked_run_folder(out):
        tune_module.tune("fast", 1, out, storage=f"sqlite:///{tmp_path / 'study.db'}", **quiet)
    # a link named like a trial folder leads to someone's run: left alone, and no traceback
    elsewhere = tmp_path / "elsewhere"
    (out / "trial-000").rename(elsewhere)
    (out / "trial-000").symlink_to(elsewhere)
    tune_module._remove_an_earlier_study(out, lambda msg: None)
    assert (out / "trial-000").is_symlink() and (elsewhere / "model.safetensors").exists()
