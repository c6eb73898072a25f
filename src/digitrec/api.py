"""The friendly `digitrec.train()`: a recipe name, a TrainConfig or a TOML file in, a finished Run out."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig, get_recipe, load_toml
from .data import MNIST, load_mnist
from .errors import DigitrecError
from .folderlock import reserved_out_dir
from .runfolder import UnfinishedRun
from .training import Run
from .training import train as train_loop


def resolve_config(config: TrainConfig | str | Path, **overrides: Any) -> tuple[str, TrainConfig]:
    """(recipe name, config) from a recipe name, a TOML file (which may name its `recipe`) or a TrainConfig."""
    if isinstance(config, TrainConfig):
        return "custom", config.override(**overrides)
    if str(config).lower().endswith(".toml"):  # "c.TOML" was "unknown recipe 'c.TOML'"
        values = load_toml(config)
        recipe = values.pop("recipe", "default")
        # merged, then checked once (a TOML's clean_epochs beside epochs=10 was checked against the recipe's)
        values.update({key: v for key, v in overrides.items() if v is not None or key == "reported_accuracy"})
        return recipe, get_recipe(recipe).override(**values)
    return str(config), get_recipe(str(config)).override(**overrides)


def train(
    config: TrainConfig | str | Path = "default",
    out_dir: str | Path | None = None,
    *,
    data: MNIST | None = None,
    data_dir: str | Path | None = None,
    report: bool = True,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    **overrides: Any,
) -> Run:
    """Train a model and write its run folder; returns the Run with its metrics, history and paths.

    `config` is a recipe name (see `digitrec recipes`), a TOML file as `digitrec train --config` reads,
    or a TrainConfig; keyword `overrides` change single settings (`epochs=2`, `lr=1e-3`, ...). The run folder
    is `out_dir`, else `runs/<recipe>-<timestamp>` (`runs/custom-...` for a TrainConfig). MNIST is found or
    downloaded (looking in `data_dir` first) unless `data` is given; `log=print` shows the epochs as they
    finish, `progress=True` a progress bar, and `report=False` skips the figures, model card and report.html.
    `resume=True` continues the run stopped in `out_dir` from its last checkpoint (with its own settings: give
    no `config` or `overrides`); `overwrite=True` starts over in an `out_dir` that holds such a run, which is
    refused otherwise (`KeyboardInterrupt` in a notebook leaves one).

    >>> import digitrec
    >>> run = digitrec.train("fast", "runs/quick", epochs=1)
    >>> sorted(path.name for path in run.out_dir.glob("*.md"))
    ['MODEL_CARD.md']
    >>> run.model_path.name, run.config == digitrec.RECIPES["fast"].override(epochs=1)
    ('model.safetensors', True)
    >>> 0.0 <= run.metrics["test_accuracy"] <= 1.0
    True
    """
    if data is not None and not isinstance(data, MNIST):  # was an AttributeError deep inside training
        raise DigitrecError(
            f"data must be the MNIST that digitrec.load_mnist() returns, got a {type(data).__name__}; or leave it "
            "out and digitrec finds MNIST itself."
        )
    if resume and out_dir is None:
        raise DigitrecError("resume=True continues the run in out_dir; name the folder it was training in.")
    if resume and (config != "default" or overrides or overwrite):
        raise DigitrecError(
            "a resumed run goes on with its own settings; pass only out_dir and resume=True (and data, log, ...)."
        )
    recipe, resolved = ("resume", TrainConfig()) if resume else resolve_config(config, **overrides)
    quiet: Callable[[str], None] = log or (lambda message: None)
    data = data or load_mnist(data_dir, log=quiet)
    with contextlib.ExitStack() as stack:
        # a folder of its own, made now: a run started in the same second takes the next name
        out = Path(out_dir) if out_dir is not None else stack.enter_context(reserved_out_dir(recipe))
        # Training needs autograd, also when the caller has it off (torch.no_grad(), set_grad_enabled(False)).
        with torch.enable_grad():
            try:
                return train_loop(
                    resolved,
                    out,
                    recipe=recipe,  # a resumed run's own, from its checkpoint
                    data=data,
                    progress=progress,
                    report=report,
                    log=quiet,
                    resume=resume,
                    overwrite=overwrite,
                )
            except UnfinishedRun as exc:  # said with this function's arguments, not the command line's flags
                raise UnfinishedRun(exc.in_python, exc.in_python) from None
