"""Recipes, overrides from TOML and flags, and the learning-rate schedules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from digitrec.config import RECIPES, TrainConfig, get_recipe, load_toml, to_toml
from digitrec.errors import DigitrecError
from digitrec.models import MODELS, count_parameters, create_model
from digitrec.training import lr_at

SEEDS = ["seed-mlp", "seed-mlp-bn", "seed-mlp-dropout", "seed-lenet", "seed-cnn", "seed-cnn-bn"]


def test_every_seed_and_own_recipe_exists_and_names_a_real_model():
    for name in SEEDS + ["default", "fast", "robust"]:
        assert get_recipe(name).arch in MODELS


def test_seed_recipes_follow_their_documents():
    assert get_recipe("seed-mlp").batch_size == 64 and get_recipe("seed-mlp").momentum == 0.9
    bn = get_recipe("seed-mlp-bn")
    assert (bn.epochs, bn.momentum, bn.reported_accuracy, bn.normalize) == (20, 0.5, 0.956, (0.5, 0.5))
    assert get_recipe("seed-cnn").batch_size == 128 and get_recipe("seed-cnn").epochs == 100
    cnn_bn = get_recipe("seed-cnn-bn")
    assert (cnn_bn.augment, cnn_bn.schedule, cnn_bn.step_epochs, cnn_bn.gamma, cnn_bn.epochs) == (
        "rotate10",
        "step",
        5,
        0.5,
        15,
    )


def test_seed_001_quirk_decays_before_the_first_step():
    config = get_recipe("seed-mlp-bn")
    steps = 100
    assert lr_at(config, 0, steps, 2000) == pytest.approx(0.001)
    assert lr_at(config, 4 * steps + 99, steps, 2000) == pytest.approx(0.001)
    assert lr_at(config, 5 * steps, steps, 2000) == pytest.approx(0.0001)
    assert lr_at(config, 19 * steps, steps, 2000) == pytest.approx(1e-6)


def test_onecycle_warms_up_then_decays_to_zero():
    config = TrainConfig(schedule="onecycle", lr=0.004, warmup_fraction=0.25)
    values = [lr_at(config, s, 100, 400) for s in range(400)]
    assert max(values) == pytest.approx(0.004, rel=0.02)
    assert values.index(max(values)) == pytest.approx(100, abs=2)
    assert values[0] < 0.0002 and values[-1] < 0.0001


def test_cosine_and_step():
    assert lr_at(TrainConfig(schedule="cosine", lr=1.0), 50, 10, 100) == pytest.approx(0.5)
    assert lr_at(
        TrainConfig(schedule="step", lr=1.0, step_epochs=5, gamma=0.5), 10 * 10, 10, 1000
    ) == pytest.approx(0.25)


def test_cosine_runs_from_the_full_rate_down_to_zero():
    config = TrainConfig(schedule="cosine", lr=0.2)
    assert lr_at(config, 0, 10, 100) == pytest.approx(0.2)
    assert lr_at(config, 25, 10, 100) == pytest.approx(
        0.1 * (1 + 2**-0.5)
    )  # a quarter of the way: cos(pi / 4)
    assert lr_at(config, 75, 10, 100) == pytest.approx(0.1 * (1 - 2**-0.5))
    assert lr_at(config, 100, 10, 100) == pytest.approx(0.0, abs=1e-12)


def test_onecycle_starts_at_a_25th_peaks_at_the_warmup_and_falls_linearly():
    config = TrainConfig(schedule="onecycle", lr=0.5, warmup_fraction=0.2)
    assert lr_at(config, 0, 10, 100) == pytest.approx(0.5 / 25)
    assert lr_at(config, 10, 10, 100) == pytest.approx(0.5 * (0.04 + 0.96 / 2))  # half way up
    assert lr_at(config, 20, 10, 100) == pytest.approx(0.5)
    assert lr_at(config, 60, 10, 100) == pytest.approx(0.25)  # half way down
    assert lr_at(config, 100, 10, 100) == 0.0


def test_step_decays_at_each_period_boundary_and_not_before():
    config = TrainConfig(schedule="step", lr=1.0, step_epochs=2, gamma=0.1)
    rates = [lr_at(config, step, 10, 1000) for step in (0, 19, 20, 39, 40)]
    assert rates == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01])
    assert lr_at(config.override(schedule="constant"), 999, 10, 1000) == 1.0


def test_overrides_apply_and_validate():
    config = get_recipe("seed-lenet").override(epochs=3, lr=0.1, betas=[0.8, 0.9])
    assert (config.epochs, config.lr, config.betas) == (3.0, 0.1, (0.8, 0.9))
    assert get_recipe("seed-lenet").epochs == 20  # recipes are frozen, overrides copy
    assert (
        get_recipe("seed-lenet").override(epochs=0.5).epochs == 0.5
    )  # a whole-number recipe takes a fraction
    for bad in (
        {"epochs": -1},
        {"optimizer": "rmsprop"},
        {"colour": "red"},
        {"batch_size": 1.5},
        {"amp": "yes"},
        {"reported_metric": "batch_mean:0"},
        {"ema_decay": 1.0},
        {"ema_decay": -0.1},
        {"threads": -1},
        {"early_stopping_patience": -1},
        {"checkpoint_every_steps": -5},
        {"epochs": float("inf")},
        {"lr": float("inf")},
        {"lr": float("nan")},
        {"momentum": -1},
        {"momentum": 1.0},
        {"nesterov": True, "momentum": 0},
        {"betas": [0.9]},
        {"betas": [0.9, 1.0]},
        {"weight_decay": -1},
        {"step_epochs": 0},
        {"gamma": 0},
        {"warmup_fraction": 1.0},
        {"normalize": [0.5, 0.0]},
        {"normalize": [0.5]},
        {"eval_batch_size": 0},
        {"seed": 2**64},
        {"seed": -1},
    ):
        with pytest.raises(DigitrecError):
            TrainConfig().override(**bad)


def test_unknown_recipe_is_a_user_error():
    with pytest.raises(DigitrecError, match="digitrec recipes"):
        get_recipe("nope")


@pytest.mark.parametrize(
    "bad",
    [
        # overflowed in training (OverflowError, torch.randint), a traceback instead of one sentence
        {"negatives": float("inf")},
        {"negatives": 1e300},
        {"batch_size": 10**400},  # `--batch-size 1000...`: batch_size / world_size overflowed as a float
        {"eval_batch_size": 10**400},
        {"threads": 2**63 - 1},  # torch: "Overflow when unpacking long"
        {"gamma": 1e300, "schedule": "step", "step_epochs": 1, "epochs": 3},  # gamma ** epoch: OverflowError
        {"reported_accuracy": float("inf")},
        {"reported_accuracy": float("nan")},
    ],
    ids=lambda bad: ", ".join(f"{key}={str(value)[:8]}" for key, value in bad.items()),
)
def test_huge_or_non_finite_numbers_are_one_sentence(bad):
    with pytest.raises(DigitrecError, match="must be"):
        TrainConfig().override(**bad)


@pytest.mark.parametrize(
    "toml, message",
    [
        ('recipe = ["fast"]', "config key 'recipe' expects a recipe name (a string), got ['fast']"),
        ('[recipe]\nname = "fast"', "config key 'recipe' expects a recipe name (a string)"),
        ("negatives = inf", "negatives must be a number from 0 to 100"),
        ("negatives = 1e300", "negatives must be a number from 0 to 100"),
        # strings where numbers belong were taken as numbers; "expects a int" read badly
        ('lr = "0.01"', "config key 'lr' expects a number, got '0.01'"),
        ('batch_size = "64"', "config key 'batch_size' expects a whole number, got '64'"),
        ("batch_size = 64.5", "config key 'batch_size' expects a whole number, got 64.5"),
        ('betas = "0.9"', "config key 'betas' expects a list of numbers, got '0.9'"),
        ("amp = 1", "config key 'amp' expects true or false, got 1"),
        ("epoch = 3", "unknown config key 'epoch' (did you mean 'epochs'?)"),
        # a misspelt `recipe`: no suggestion, and the known keys left it out
        ('recpe = "fast"', "unknown config key 'recpe' (did you mean 'recipe'?); known keys: amp, arch,"),
        # an integer no float holds: OverflowError, a traceback
        ("lr = 1" + "0" * 400, "config key 'lr' expects a number, got 1000000"),
        ("betas = [1" + "0" * 400 + ", 0.9]", "config key 'betas' expects a list of numbers"),
        ('recipe = "seed-mpl"', "unknown recipe 'seed-mpl' (did you mean 'seed-mlp'?)"),
        ('recipe = "Default"', "unknown recipe 'Default' (did you mean 'default'?)"),
        # said as "--device cuda was asked for" though no flag was given
        pytest.param(
            'device = "cuda"',
            "device cuda was asked for (--device or a config file's device) but no CUDA GPU",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU"),
        ),
    ],
    ids=[
        "list",
        "table",
        "inf",
        "huge",
        "str-float",
        "str-int",
        "float-int",
        "str-tuple",
        "int-bool",
        "key",
        "recipe-key",
        "huge-int",
        "huge-int-in-list",
        "typo",
        "case",
        "device",
    ],
)
def test_a_malformed_toml_value_is_one_sentence(tmp_path, toml, message, capsys):
    """A TypeError (unhashable) or an OverflowError in training, with a traceback and exit 1."""
    from digitrec.cli import main

    path = tmp_path / "c.toml"
    path.write_text(toml + "\n")
    assert main(["train", "--config", str(path), "--dry-run", "--out", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_recipe_key_is_among_the_known_keys_a_toml_file_may_hold(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('recpe = "fast"\n')
    with pytest.raises(DigitrecError) as raised:
        load_toml(path)
    assert "reported_metric, schedule" in str(raised.value) and " recipe, " in str(raised.value)


def test_flags_and_a_toml_file_are_checked_together(tmp_path, capsys, monkeypatch):
    """`--epochs 10` beside a file's `clean_epochs = 5` was refused: the file's values were checked against the
    recipe's 3 epochs before the flag's came in. The Python API had the same two steps."""
    from digitrec import api
    from digitrec.cli import build_parser, training_config

    path = tmp_path / "c.toml"
    path.write_text("clean_epochs = 5\nbatch-size = 32\n")
    args = build_parser().parse_args(["train", "--config", str(path), "--epochs", "10"])
    recipe, config = training_config(args)
    assert (recipe, config.epochs, config.clean_epochs, config.batch_size) == ("default", 10, 5, 32)
    args = build_parser().parse_args(["train", "--config", str(path), "--epochs", "10", "--batch-size", "64"])
    assert training_config(args)[1].batch_size == 64  # the flag wins over the file's dashed key
    assert api.resolve_config(path, epochs=10)[1].clean_epochs == 5
    # a file's compile = true: --no-compile turns it off (there was no such flag), --compile still turns it on
    path.write_text("compile = true\n")
    assert training_config(build_parser().parse_args(["train", "--config", str(path)]))[1].compile
    args = build_parser().parse_args(["train", "--config", str(path), "--no-compile"])
    assert not training_config(args)[1].compile
    assert training_config(build_parser().parse_args(["train", "--compile"]))[1].compile


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--ema-decay", "2"], "--ema-decay must be in [0, 1), got 2.0."),
        (["--lr", "-1"], "--lr must be above 0 and below 1000, got -1.0."),
        (
            ["--epochs", "3", "--clean-epochs", "9"],
            "--clean-epochs must be between 0 and epochs (3), got 9.0.",
        ),
        (["--early-stopping-patience", "-1"], "--early-stopping-patience must not be negative"),
    ],
)
def test_a_flags_refused_value_is_said_with_the_flag(tmp_path, capsys, flags, message):
    """`--ema-decay 2` was refused as "ema_decay must be ...", `--lr -1` as "learning rate must ...": words the
    user had not typed."""
    from digitrec.cli import main

    out = tmp_path / "run"
    assert main(["train", "--recipe", "fast", *flags, "--dry-run", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"error: {message}" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_a_config_files_refused_value_keeps_its_key_beside_a_flag(tmp_path, capsys):
    """The file's clean_epochs is what --epochs 3 makes wrong: the sentence names the file's key, not a flag the
    user did not give; a value the file and a flag both set is said with the flag (the flag's value won)."""
    from digitrec.cli import main

    path = tmp_path / "c.toml"
    path.write_text("clean_epochs = 5\nlr = 0.5\n")
    assert (
        main(["train", "--config", str(path), "--epochs", "3", "--dry-run", "--out", str(tmp_path / "r")])
        == 2
    )
    assert "error: clean_epochs must be between 0 and epochs (3), got 5.0." in capsys.readouterr().err
    path.write_text("lr = 0.5\n")
    assert main(["train", "--config", str(path), "--lr", "0", "--dry-run", "--out", str(tmp_path / "r")]) == 2
    assert "error: --lr must be above 0" in capsys.readouterr().err
    with pytest.raises(DigitrecError, match="^learning rate must be above 0"):  # the library's words stay
        TrainConfig().override(lr=0)


def test_tune_bench_and_resume_say_their_flags_too(tmp_path, capsys):
    from digitrec.cli import main
    from digitrec.config import with_flags
    from digitrec.tune import tune

    run = tmp_path / "run"
    assert (
        main(["train", "--recipe", "fast", "--dry-run", "--no-report", "--no-progress", "--out", str(run)])
        == 0
    )
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--threads", "5000"]) == 2
    assert "error: --threads must be a whole number from 0" in capsys.readouterr().err

    with pytest.raises(DigitrecError, match="^--epochs must be a positive number"):
        tune("fast", trials=1, epochs=0, out_dir=tmp_path / "t")
    with pytest.raises(DigitrecError, match="^--threads must be a whole number"):
        with_flags(RECIPES["fast"], {"threads": -1})
    with pytest.raises(DigitrecError, match="^momentum must be in"):  # a setting not among the flags
        with_flags(RECIPES["fast"], {"threads": 1}, {"momentum": 1.5})


def test_a_config_file_that_sets_one_setting_in_both_spellings_is_refused(tmp_path):
    """`batch-size = 32` beside `batch_size = 64` kept one of them without a word."""
    path = tmp_path / "c.toml"
    path.write_text("batch-size = 32\nbatch_size = 64\n")
    with pytest.raises(
        DigitrecError, match="sets 'batch-size' and 'batch_size', one setting twice; keep one"
    ):
        load_toml(path)


def test_range_errors_say_the_range():
    """lr 1000 was refused as "must be positive and finite", weight decay 5000 as "must not be negative"."""
    with pytest.raises(DigitrecError, match="learning rate must be above 0 and below 1000, got 1000.0"):
        TrainConfig(lr=1000.0)
    with pytest.raises(DigitrecError, match="weight decay must be from 0 to below 1000, got 5000.0"):
        TrainConfig(weight_decay=5000.0)


def test_get_recipe_refuses_a_name_that_is_not_a_string():
    with pytest.raises(DigitrecError, match="expects a recipe name"):
        get_recipe(["fast"])  # type: ignore[arg-type]


def test_toml_round_trip(tmp_path):
    config = RECIPES["default"].override(epochs=2, label_smoothing=0.05, betas=(0.9, 0.99))
    path = tmp_path / "c.toml"
    path.write_text(
        to_toml({"recipe": "default", "epochs": 2.0, "label_smoothing": 0.05, "betas": (0.9, 0.99)})
    )
    values = load_toml(path)
    assert values.pop("recipe") == "default"
    assert get_recipe("default").override(**values) == config


def test_bad_toml_is_one_sentence(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("epochs = = 3")
    with pytest.raises(DigitrecError, match="not valid TOML"):
        load_toml(path)
    with pytest.raises(DigitrecError, match="does not exist"):
        load_toml(tmp_path / "missing.toml")
    with pytest.raises(DigitrecError, match="cannot read config file"):
        load_toml(tmp_path)  # a folder


def test_a_config_file_larger_than_any_config_is_refused_unread(tmp_path):
    """`--config /dev/zero` was read until memory ran out (a MemoryError traceback under a memory limit)."""
    big = tmp_path / "big.toml"
    big.write_text("# " + "x" * 2_000_000 + "\nlr = 0.01\n")
    for path in [big] + ([Path("/dev/zero")] if Path("/dev/zero").exists() else []):
        with pytest.raises(
            DigitrecError, match=f"config file {path} is larger than 1 MB, more than any config"
        ):
            load_toml(path)


def test_every_recipe_passes_the_checks():
    for name, config in RECIPES.items():
        assert TrainConfig.from_dict(config.to_dict()) == config, name


def test_a_checkpoint_config_digitrec_cannot_use_is_a_checkpoint_error():
    from digitrec.errors import CheckpointError

    assert TrainConfig.from_checkpoint({}) == TrainConfig()
    for meta in ({"config": ["x"]}, {"config": {"eval_batch_size": 0}}, {"config": {"colour": "red"}}):
        with pytest.raises(
            CheckpointError, match="m.safetensors records a training config digitrec cannot use"
        ):
            TrainConfig.from_checkpoint(meta, "m.safetensors")


def test_the_readme_results_table_shows_each_recipes_source_reported_figure_parameters_and_epochs():
    """README's Results table is written by hand: its source, reported accuracy (for our own recipes the median
    over seeds), parameter count and epochs must be the recipes' own (one changed without the other fails here)."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    header = "| recipe | source | reported | digitrec test accuracy (seed 0) |"
    lines = readme[readme.index(header) :].splitlines()[2:]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[: lines.index("")]]
    assert len(rows) >= 9
    for name, source, reported, _, seeds, params, epochs, _ in rows:
        config = get_recipe(name.strip("`"))
        assert config.source.startswith(source), name
        if source == "digitrec":  # our own recipes record their measured median over seeds
            reported = seeds.split(" / ")[1]
        shown = None if reported == "\u2014" else round(float(reported.rstrip("%")) / 100, 6)
        assert shown == config.reported_accuracy, name
        assert int(params.replace(",", "")) == count_parameters(create_model(config.arch)), name
        assert float(epochs) == config.epochs, name


def test_a_gamma_above_1_that_does_not_overflow_is_still_a_config():
    """An older checkpoint may record a gamma above 1 (a one-cycle run, which does not use it): evaluating it must
    not be refused; only a gamma whose power over the run overflows is."""
    assert TrainConfig(gamma=1.01).gamma == 1.01
    assert TrainConfig(schedule="step", gamma=2.0, epochs=20, step_epochs=5).gamma == 2.0
    with pytest.raises(DigitrecError, match="gamma"):
        TrainConfig(gamma=10.0, epochs=1000, step_epochs=1)
