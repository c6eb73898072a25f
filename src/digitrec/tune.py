"""Hyperparameter search with Optuna: TPE sampling, median pruning on validation accuracy, best config as TOML.

Trials are chosen on the validation split only; the test set never picks a configuration. With an RDB
storage URL (sqlite:///tune.db, postgresql://..., mysql://...) any number of processes or machines running
the same command with the same `--study` name share one study: Optuna hands each of them new trials. The
study records what its trials measure (recipe, epochs, validation split, data), and a process asking for other
settings is refused rather than mixing its trials in. Only such a storage makes a study resumable: interrupted,
a search without one writes what its finished trials found and ends.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write_text
from .config import TrainConfig, get_recipe, to_toml, with_flags
from .data import MNIST
from .errors import DataError, DigitrecError, TrainingDiverged, need_extra

DEFAULT_VAL_SIZE = 5000  # used when the recipe itself trains on all 60,000 images
# A process sharing a storage beats every HEARTBEAT_SECONDS while it trains a trial; a trial whose process
# went silent for GRACE_SECONDS (killed) is marked failed by the next process to start one, and tried again.
HEARTBEAT_SECONDS = 60
GRACE_SECONDS = 180
BATCH_SIZES = (64, 128, 192, 256)
AUGMENTATIONS = ("none", "rotate10", "affine")
# What tune sets for its trials apart from the searched settings; best.toml leaves these to the recipe.
_TRIAL_ONLY = ("epochs", "val_size", "early_stopping_patience")
# Optuna's logger that says a trial failed, with the exception's traceback: a Ctrl-C is not a failure to report.
_OPTIMIZE_LOGGER = "optuna.study._optimize"


def _optuna() -> Any:
    need_extra("tune", "digitrec tune")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def suggest(trial: Any, base_lr: float) -> dict[str, Any]:
    """The search space: the knobs that matter most on MNIST, around the recipe's own learning rate."""
    return {
        "lr": trial.suggest_float("lr", base_lr / 10, base_lr * 10, log=True),
        "batch_size": trial.suggest_categorical("batch_size", BATCH_SIZES),
        "weight_decay": trial.suggest_float("weight_decay", 1e-5, 0.1, log=True),
        "label_smoothing": trial.suggest_float("label_smoothing", 0.0, 0.2),
        "augment": trial.suggest_categorical("augment", AUGMENTATIONS),
    }


@dataclass
class TuneResult:
    """What a search leaves: the study, the best trial's values, and the files written."""

    study: Any
    best_params: dict[str, Any]
    best_value: float
    config_path: Path
    table: str
    plot_path: Path


def tune(
    recipe: str,
    trials: int,
    out_dir: str | Path,
    storage: str | None = None,
    study_name: str | None = None,
    data: MNIST | None = None,
    epochs: float | None = None,
    val_size: int | None = None,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> TuneResult:
    """Run `trials` trials of `recipe` (more join from other processes sharing `storage`) and write the results.

    Writes into out_dir: best.toml (for `digitrec train --config`), trials.csv, tuning.png and one run
    folder per trial. `epochs` shortens every trial; pruning stops a trial after an epoch whose
    validation accuracy is below the median of earlier trials at that epoch. A run folder is refused. Without a
    `storage` the folder is locked while the study runs (a second tune into it is refused) and an earlier
    study's files there are replaced; with one, the processes sharing the study share the folder.
    """
    optuna = _optuna()
    from .data import load_mnist
    from .folderlock import locked_run_folder
    from .runfolder import holds_a_run
    from .training import steps_in_epoch, train

    if trials < 1:
        raise DigitrecError(f"tuning needs at least 1 trial, got {trials}.")
    if not 0 <= seed < 2**32:
        raise DigitrecError(f"--seed must be between 0 and 2**32 - 1, got {seed}.")
    if val_size is not None and val_size < 1:
        raise DigitrecError(
            f"tuning picks settings on a validation split, so --val-size must be at least 1, got {val_size}."
        )
    out_dir = Path(out_dir)
    if holds_a_run(out_dir):  # best.toml, trials.csv and trial folders inside a trained run's folder
        raise DigitrecError(f"--out {out_dir} is a run folder (it holds a trained model); name a new folder.")
    base = get_recipe(recipe)
    base = with_flags(  # --epochs 0 is refused here, not taken for "the recipe's own"
        base,
        {"epochs": epochs} if epochs is not None else {},
        {
            "val_size": val_size if val_size is not None else base.val_size or DEFAULT_VAL_SIZE,
            "early_stopping_patience": 0,
        },
    )
    data = data or load_mnist(log=log)
    # a split that leaves no batch fails here, once, not as every trial's failure in Optuna's log
    if steps_in_epoch(len(data.train_images) - base.val_size, min(BATCH_SIZES)) <= 0:  # < 0: more than all
        raise DataError(
            f"--val-size {base.val_size} leaves {max(0, len(data.train_images) - base.val_size)} of "
            f"{len(data.train_images):,} training images; choose a smaller --val-size."
        )
    # Processes sharing a storage must not draw the same settings: each seeds its sampler with its process id too.
    sampler_seed = seed if storage is None else _process_seed(seed)
    name = study_name or f"digitrec-{recipe}"
    try:
        study_storage = storage if storage is None else _heartbeat_storage(optuna, storage)
        study = optuna.create_study(
            study_name=name,
            storage=study_storage,
            load_if_exists=True,
            direction="maximize",
            sampler=optuna.samplers.TPESampler(seed=sampler_seed),
            pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
        )
    except ImportError as exc:  # a storage URL whose database driver is missing
        raise DigitrecError(
            f"--storage {storage} needs a database driver that is not installed ({exc})."
        ) from None
    except Exception as exc:  # SQLAlchemy's errors: a URL it cannot parse, a database it cannot reach
        first_line = (str(exc).splitlines() or [type(exc).__name__])[0]
        if isinstance(exc, RuntimeError) and "optuna storage upgrade" in str(exc):
            # a study database an older (or newer) Optuna made: its schema, not ours
            raise DigitrecError(
                f"--storage {storage} holds studies in a schema this Optuna ({optuna.__version__}) cannot use; "
                f"run `optuna storage upgrade --storage {storage}` or give another database."
            ) from None
        # StorageInternalError: a database with tables of the same names that are not Optuna's
        if not (
            type(exc).__module__.startswith("sqlalchemy") or type(exc).__name__ == "StorageInternalError"
        ):
            raise
        raise DigitrecError(
            f"--storage {storage} is not a database digitrec can use ({first_line}); "
            "give an SQLAlchemy URL such as sqlite:///tune.db."
        ) from None

    # what a trial measures: a study shared through a storage holds trials of one such setting only
    _claim_study(
        study,
        {"recipe": recipe, "epochs": base.epochs, "val_size": base.val_size, "data_checksum": data.checksum},
        name,
        storage,
        log,
    )
    train_count = len(data.train_images) - base.val_size
    stopped = False  # by Ctrl-C or a DigitrecError: Optuna's warning about the trial is not said

    def objective(trial: Any) -> float:
        nonlocal stopped
        try:
            return run_trial(trial)
        # Optuna marks the trial failed, with a warning and a traceback, which are not said: a DigitrecError is one
        # sentence, which the command says once it stops
        except (KeyboardInterrupt, DigitrecError):
            stopped = True
            raise

    def run_trial(trial: Any) -> float:
        params = suggest(trial, get_recipe(recipe).lr)
        config = base.override(**params)
        steps = steps_in_epoch(train_count, config.batch_size)
        last_epoch = math.ceil(max(1, round(config.epochs * steps)) / steps)  # as train counts its epochs
        pruned = False

        def on_epoch(model: Any, row: dict[str, float]) -> bool:
            nonlocal pruned
            epoch = math.ceil(row["step"] / steps)  # a last part of an epoch (2.5) is the third
            trial.report(row["val_accuracy"], epoch)
            # after the last epoch there is nothing left to save: the trial ran in full and counts as finished
            pruned = epoch < last_epoch and trial.should_prune()
            return pruned  # True stops training after this epoch

        try:
            run = train(
                config,
                out_dir / f"trial-{trial.number:03d}",
                recipe=recipe,
                data=data,
                progress=False,
                report=False,
                log=lambda msg: None,
                on_epoch=on_epoch,
                overwrite=True,  # a trial's folder is scratch: a study run again reuses its numbers
            )
        except TrainingDiverged:  # a learning rate too high for its batch: the search goes on without it
            log(
                f"trial {trial.number:>3}  diverged (loss not finite)  "
                + "  ".join(f"{k} {_fmt(v)}" for k, v in params.items())
            )
            raise optuna.TrialPruned() from None
        value = float(run.history[-1]["val_accuracy"]) if pruned else float(run.metrics["val_accuracy"])
        log(
            f"trial {trial.number:>3}  val acc {value:.2%}  {'pruned ' if pruned else ''}"
            + "  ".join(f"{k} {_fmt(v)}" for k, v in params.items())
        )
        if pruned:
            raise optuna.TrialPruned()
        return value

    def quiet_when_stopped(record: logging.LogRecord) -> bool:
        return not stopped

    # processes sharing a study through a storage share its folder too (trial folders are numbered across the
    # study, each locked by its own run); a study in memory is this process's alone
    with locked_run_folder(out_dir, take=storage is None):
        # a study in memory starts at trial 0: an earlier one's files would mix with its own
        if storage is None:
            _remove_an_earlier_study(out_dir, log)
        optimize_logger = logging.getLogger(_OPTIMIZE_LOGGER)
        optimize_logger.addFilter(quiet_when_stopped)
        try:
            study.optimize(objective, n_trials=trials)
        except KeyboardInterrupt:
            # Ctrl-C: what the finished trials found is written, as at the end; a study in memory is gone after it
            _write_interrupted(study, recipe, base, out_dir, storage, log)
            raise
        finally:
            optimize_logger.removeFilter(quiet_when_stopped)
        if not _finished(study):
            raise DigitrecError("every trial was pruned or failed; run more trials or raise --epochs.")
        return _write_results(study, recipe, base, out_dir)


STUDY_FILES = ("best.toml", "trials.csv", "tuning.png")
TRIAL_FOLDER = re.compile(r"trial-\d{3,}")


def _remove_an_earlier_study(out_dir: Path, log: Callable[[str], None]) -> None:
    """Remove what an earlier study wrote into out_dir (STUDY_FILES and its trial-NNN run folders), saying so:
    run again into its folder, a study left the earlier best.toml beside its own trials.csv, and trial folders
    that no file listed."""
    import shutil

    from .runfolder import holds_a_run

    if not out_dir.is_dir():
        return
    files = [out_dir / name for name in STUDY_FILES if (out_dir / name).is_file()]
    folders = sorted(  # a link named like a trial folder leads elsewhere: not this study's to remove
        path
        for path in out_dir.iterdir()
        if TRIAL_FOLDER.fullmatch(path.name)
        and path.is_dir()
        and not path.is_symlink()
        and (holds_a_run(path) or not any(path.iterdir()))
    )
    if not files and not folders:
        return
    try:
        for path in folders:  # the folders first: study files left behind say a failure left the study there
            shutil.rmtree(path)
        for path in files:
            path.unlink()
    except OSError as exc:
        raise DigitrecError(
            f"could not remove the earlier study in {out_dir} ({exc.strerror or exc}: {exc.filename}); remove it "
            "yourself or choose another --out."
        ) from None
    log(f"replaced the earlier study in {out_dir} ({len(files)} file(s), {len(folders)} trial folder(s))")


def _finished(study: Any) -> list[Any]:
    return [t for t in study.trials if t.state.name == "COMPLETE"]


def _write_interrupted(
    study: Any, recipe: str, base: TrainConfig, out_dir: Path, storage: str | None, log: Callable[[str], None]
) -> None:
    """After a Ctrl-C: write the results of the trials that finished and say so, in one line."""
    finished = _finished(study)
    again = (
        "the same command continues the study"
        if storage is not None
        else "the study was in memory, so only its files remain (--storage makes a study resumable)"
    )
    if finished:
        result = _write_results(study, recipe, base, out_dir)
        log(
            f"stopped after {len(finished)} finished trial{'s' * (len(finished) != 1)}: "
            f"best validation accuracy {result.best_value:.2%}, results in {result.config_path}, "
            f"{out_dir / 'trials.csv'} and {result.plot_path}; {again}"
        )
    else:
        if study.trials:
            atomic_write_text(out_dir / "trials.csv", trials_csv(study))
        log(f"stopped before any trial finished, so there is no best.toml; {again}")


def _write_results(study: Any, recipe: str, base: TrainConfig, out_dir: Path) -> TuneResult:
    """best.toml, trials.csv and tuning.png from the study's finished trials (there must be one)."""
    finished = _finished(study)
    best = study.best_trial
    config_path = out_dir / "best.toml"
    header = (
        f"# digitrec tune: best of {len(finished)} finished trials of recipe {recipe!r}, "
        f"validation accuracy {best.value:.4%} (trial {best.number})\n"
        f"# train with it: digitrec train --config {config_path}\n"
    )
    # --epochs and the validation split are the trials', not the recipe's: the file leaves them to the recipe (as
    # the tutorial's tuned `fast` trained) and lists the trials' values, ready to uncomment
    own = get_recipe(recipe)
    trial_only = {k: getattr(base, k) for k in _TRIAL_ONLY if getattr(base, k) != getattr(own, k)}
    if trial_only:
        header += (
            "# the trials ran with these settings instead of the recipe's ("
            + ", ".join(f"{k} = {getattr(own, k)!r}" for k in trial_only)
            + "); uncomment them to train as a trial did:\n"
            + "".join(f"# {line}\n" for line in to_toml(trial_only).splitlines())
        )
    atomic_write_text(config_path, header + to_toml({"recipe": recipe, **best.params}))
    atomic_write_text(out_dir / "trials.csv", trials_csv(study))
    return TuneResult(
        study,
        dict(best.params),
        float(best.value),
        config_path,
        summary_table(study),
        plot(study, out_dir / "tuning.png"),
    )


def _claim_study(
    study: Any, settings: dict[str, Any], name: str, storage: str | None, log: Callable[[str], None]
) -> None:
    """Record what this study's trials measure, or refuse to add trials that measure something else.

    A study's trials are compared with each other: trials of another recipe, length, validation split or data
    (another `digitrec tune` with the same --storage and --study, or the default study name with other flags)
    made its best trial, and best.toml, meaningless. The settings are recorded once, as the study's user
    attributes; two processes that create one study at the same moment each read back what was kept."""
    recorded = {key: value for key, value in study.user_attrs.items() if key in settings}
    if not recorded:
        if study.trials:  # a study begun by a digitrec that did not record its settings
            log(
                f"study {name!r} does not say what its {len(study.trials)} earlier trials measured (an older "
                "digitrec began it); recording this run's settings"
            )
        for key, value in settings.items():
            study.set_user_attr(key, value)
        if storage is None:
            return
        recorded = study.user_attrs  # read back from the storage: another process may have recorded first
    # only what the study recorded: a setting a later digitrec adds must not refuse the studies begun before it
    differ = [key for key in settings if key in recorded and recorded[key] != settings[key]]
    if differ:
        where = f" in {storage}" if storage is not None else ""
        raise DigitrecError(
            f"study {name!r}{where} holds trials of {_said(recorded, differ)}, and this run asks for "
            f"{_said(settings, differ)}; give another --study name to start a new study, or run with the "
            "study's settings to add trials to it."
        )


def _said(settings: dict[str, Any], keys: list[str]) -> str:
    """Settings as the flags that give them: `--recipe fast --epochs 1.0`."""
    flags = {
        "recipe": "--recipe",
        "epochs": "--epochs",
        "val_size": "--val-size",
        "data_checksum": "data checksum",
    }
    return " ".join(f"{flags.get(key, key)} {settings.get(key, 'unrecorded')}" for key in keys)


def _heartbeat_storage(optuna: Any, url: str) -> Any:
    """An RDB storage whose trials beat a heartbeat, so that a killed process's trial is failed and retried
    (without one it stayed "running" for ever). Optuna calls this experimental; its warnings are not the user's."""
    import warnings

    storages = optuna.storages
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if hasattr(storages, "RetryHeartbeatStaleTrialCallback"):  # Optuna 4.9 renamed the callback
            retry = {"heartbeat_stale_trial_callback": storages.RetryHeartbeatStaleTrialCallback(max_retry=1)}
        else:
            retry = {"failed_trial_callback": storages.RetryFailedTrialCallback(max_retry=1)}
        return storages.RDBStorage(
            url, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS, **retry
        )


def _process_seed(seed: int) -> int:
    """--seed mixed with this process's id: the seed for a sampler that shares its study with other processes."""
    import numpy as np

    return int(np.random.SeedSequence([seed, os.getpid()]).generate_state(1)[0])


def _fmt(value: Any) -> str:
    """A trial's setting: 3 significant digits, enough to tell trials apart (evaluate._fmt: history cells, 4)."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _rows(study: Any) -> list[dict[str, Any]]:
    rows = []
    for t in study.trials:
        rows.append(
            {
                "trial": t.number,
                "state": t.state.name.lower(),
                "val_accuracy": t.value,
                "epochs_run": len(t.intermediate_values),
                **t.params,
            }
        )
    return rows


def trials_csv(study: Any) -> str:
    rows = _rows(study)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def summary_table(study: Any, top: int = 10) -> str:
    """The best finished trials first, then a count of the pruned and failed ones."""
    rows = _rows(study)
    done = sorted((r for r in rows if r["state"] == "complete"), key=lambda r: -r["val_accuracy"])
    names = list(study.best_trial.params)
    lines = [f"{'trial':>5}  {'val acc':>8}  " + "  ".join(f"{n:>15}" for n in names)]
    for r in done[:top]:
        lines.append(
            f"{r['trial']:>5}  {r['val_accuracy']:>8.2%}  "
            + "  ".join(f"{_fmt(r.get(n)):>15}" for n in names)
        )
    others = len(rows) - len(done)
    if others:
        lines.append(f"({others} trial{'s' * (others != 1)} pruned or failed)")
    return "\n".join(lines)


def plot(study: Any, path: Path) -> Path:
    """Validation accuracy per trial with the best so far, and against the learning rate."""
    from .plots import plt, save_figure

    rows = _rows(study)
    fig, (ax_trials, ax_lr) = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    for state, style in (
        ("complete", dict(marker="o", color="tab:blue")),
        ("pruned", dict(marker="x", color="gray")),
    ):
        # a pruned trial is drawn at its last reported validation accuracy
        points = [
            (
                r["trial"],
                t.intermediate_values[max(t.intermediate_values)] if state == "pruned" else r["val_accuracy"],
                r.get("lr"),
            )
            for r, t in zip(rows, study.trials, strict=True)
            if r["state"] == state and (state == "complete" or t.intermediate_values)
        ]
        if points:
            ax_trials.scatter([p[0] for p in points], [100 * p[1] for p in points], label=state, **style)
            ax_lr.scatter([p[2] for p in points], [100 * p[1] for p in points], label=state, **style)
    best, best_so_far = -1.0, []
    for r in rows:
        if r["state"] == "complete":
            best = max(best, r["val_accuracy"])
        best_so_far.append(100 * best if best >= 0 else None)
    ax_trials.step(
        [r["trial"] for r in rows], best_so_far, where="post", color="tab:green", label="best so far"
    )
    ax_trials.set(title="Trials", xlabel="trial", ylabel="validation accuracy (%)")
    ax_lr.set(title="Learning rate", xlabel="lr", ylabel="validation accuracy (%)", xscale="log")
    for ax in (ax_trials, ax_lr):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, path)
