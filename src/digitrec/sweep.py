"""`digitrec sweep`: train several recipes x seeds, one `digitrec train` process each, and print a summary table."""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import atomic_write_json
from .config import get_recipe
from .errors import DigitrecError, refuse_repeats


@dataclass
class Job:
    recipe: str
    seed: int
    out: Path

    @property
    def name(self) -> str:
        return f"{self.recipe}-seed{self.seed}"


def sweep(
    recipes: list[str],
    seeds: list[int],
    out: Path,
    parallel: int = 1,
    train_flags: list[str] | None = None,
    log=print,
    check_data: Callable[[], object] | None = None,
) -> list[dict]:
    """Run every (recipe, seed) as its own process, `parallel` at a time; one summary row per run.

    `check_data` (the CLI's: find and verify MNIST) runs after the arguments are checked and before any job, so a
    bad recipe, seed or flag is said at once rather than after MNIST is downloaded or refused."""
    for recipe in recipes:
        get_recipe(recipe)  # an unknown name fails now, not after the first runs
    if parallel < 1:
        raise DigitrecError(f"--parallel must be at least 1, got {parallel}.")
    # a name given twice ran its jobs twice, into the same folder, at the same time
    refuse_repeats("--recipes", recipes)
    refuse_repeats("--seeds", [str(seed) for seed in seeds])
    jobs = [Job(r, s, out / f"{r}-seed{s}") for r, s in itertools.product(recipes, seeds)]
    for job in jobs:  # what `digitrec train` would refuse (--epochs 0, --seeds -1) fails now, once
        _check_train_flags(job, train_flags or [])
    if check_data is not None:
        check_data()
    threads = max(1, (os.cpu_count() or 1) // parallel)  # share the cores instead of oversubscribing them
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    pending, rows = list(jobs), []
    running: dict[str, tuple[Job, subprocess.Popen[bytes]]] = {}
    while pending or running:
        while pending and len(running) < parallel:
            job = pending.pop(0)
            job.out.mkdir(parents=True, exist_ok=True)
            command = [
                sys.executable,
                "-m",
                "digitrec",
                "train",
                "--recipe",
                job.recipe,
                "--seed",
                str(job.seed),
                "--out",
                str(job.out),
                "--threads",
                str(threads),
                "--no-progress",
                "--overwrite",  # a sweep run again retrains its jobs, an interrupted one's too
                *(train_flags or []),
            ]
            with open(job.out / "train.log", "w") as log_file:
                running[job.name] = (
                    job,
                    subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env),
                )
            log(f"started {job.name}")
        time.sleep(0.2)
        for name, (job, process) in list(running.items()):
            if process.poll() is not None:
                del running[name]
                rows.append(_row(job, process.returncode))
                log(
                    f"finished {job.name}: "
                    + (
                        f"{rows[-1]['test_accuracy']:.2%}"
                        if rows[-1]["ok"]
                        else f"failed, see {job.out / 'train.log'}"
                    )
                )
    rows.sort(key=lambda row: (recipes.index(row["recipe"]), row["seed"]))
    atomic_write_json(out / "summary.json", rows)
    return rows


def _check_train_flags(job: Job, train_flags: list[str]) -> None:
    from .cli import build_parser, training_config
    from .training import resolve_device

    args = build_parser().parse_args(["train", "--recipe", job.recipe, "--seed", str(job.seed), *train_flags])
    resolve_device(training_config(args)[1].device)  # --device cuda without a GPU: once, not once per job


def _row(job: Job, returncode: int) -> dict:
    metrics_path = job.out / "metrics.json"
    if returncode != 0 or not metrics_path.exists():
        return {"recipe": job.recipe, "seed": job.seed, "ok": False, "out": str(job.out)}
    metrics = json.loads(metrics_path.read_text())
    return {
        "recipe": job.recipe,
        "seed": job.seed,
        "ok": True,
        "out": str(job.out),
        "test_accuracy": metrics["test_accuracy"],
        "test_loss": metrics["test_loss"],
        "train_seconds": metrics["train_seconds"],
    }


def summary_table(rows: list[dict]) -> str:
    """One line per run, then mean and standard deviation per recipe."""
    lines = [f"{'recipe':<18} {'seed':>5} {'test acc':>9} {'test loss':>9} {'train s':>8}"]
    for row in rows:
        if row["ok"]:
            lines.append(
                f"{row['recipe']:<18} {row['seed']:>5} {row['test_accuracy']:>9.2%} {row['test_loss']:>9.4f} "
                f"{row['train_seconds']:>8.1f}"
            )
        else:
            lines.append(f"{row['recipe']:<18} {row['seed']:>5} {'failed':>9}  see {row['out']}/train.log")
    for recipe, group in itertools.groupby(rows, key=lambda row: row["recipe"]):
        accuracies = [row["test_accuracy"] for row in group if row["ok"]]
        if accuracies:
            spread = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
            lines.append(
                f"{recipe:<18} {'all':>5} {statistics.mean(accuracies):>9.2%} +- {spread:.2%} over {len(accuracies)} seeds"
            )
    return "\n".join(lines)
