"""`digitrec sweep`: train several recipes x seeds, one `digitrec train` process each, and print a summary table."""

from __future__ import annotations

import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import atomic_write_json
from .config import get_recipe
from .errors import DigitrecError, refuse_repeats
from .folderlock import refuse_a_file_in_the_way, refuse_a_folder_in_use

# Stopped, a sweep interrupts each running job as Ctrl-C would, then terminates and at last kills a job that is
# still running after this many seconds each time.
STOP_GRACE_SECONDS = 10.0
# The signals that stop a sweep and its jobs: Ctrl-C, `kill`, `timeout` or a job scheduler, a closed terminal.
STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)


class SweepStopped(KeyboardInterrupt):
    """A signal stopped the sweep; its running jobs were stopped too. `signum`: which one."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


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
    for seed in seeds:  # said with the flag the user typed (each job's `train --seed` would say --seed)
        if not 0 <= seed < 2**63:
            raise DigitrecError(f"--seeds must be whole numbers from 0 to 2**63 - 1, got {seed}.")
    jobs = [Job(r, s, out / f"{r}-seed{s}") for r, s in itertools.product(recipes, seeds)]
    for job in jobs:  # what `digitrec train` would refuse (--epochs 0, --seeds -1) fails now, once
        _check_train_flags(job, train_flags or [])
    for job in jobs:  # a file where a job's folder goes failed that job's start, with earlier jobs running
        refuse_a_file_in_the_way(job.out)
        # a run training in a job's folder: its lock refused the job, after the sweep had emptied its train.log
        refuse_a_folder_in_use(job.out)
    _refuse_an_out_that_is_not_a_sweeps(out)
    if check_data is not None:
        check_data()
    threads = max(1, (os.cpu_count() or 1) // parallel)  # share the cores instead of oversubscribing them
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    pending, rows = list(jobs), []
    (out / "summary.json").unlink(missing_ok=True)  # an earlier sweep's, about runs this one starts over
    running: dict[str, tuple[Job, subprocess.Popen[bytes]]] = {}
    with _stop_signals() as signals:
        try:
            while pending or running:
                while pending and len(running) < parallel:
                    job = pending.pop(0)
                    # a job started is a job known, so a signal cannot leave one running unseen
                    with signals.held():
                        process = _start(job, threads, train_flags or [], env, signals.installed)
                        running[job.name] = (job, process)
                    log(f"started {job.name}")
                time.sleep(0.2)
                for name, (job, process) in list(running.items()):
                    if process.poll() is not None:
                        del running[name]
                        rows.append(_row(job, finished=process.returncode == 0))
                        log(f"finished {job.name}: " + _outcome(rows[-1], job))
        except KeyboardInterrupt as exc:
            # a job that ended well before the signal, not yet seen, finished: its row, not a --resume hint
            for name, (job, process) in list(running.items()):
                if process.poll() == 0:
                    del running[name]
                    rows.append(_row(job, finished=True))
                    log(f"finished {job.name}: " + _outcome(rows[-1], job))
            stopped = _stop_keeping_the_finished(running, signals, rows, out, recipes, log)
            if stopped:
                log(
                    f"stopped {len(stopped)} running job{'s' * (len(stopped) != 1)}: "
                    + "; ".join(_resume_hint(job) for job in stopped)
                )
            if rows:
                log(summary_table(rows))
                log(f"summary of the jobs that finished: {out / 'summary.json'}")
            raise exc if isinstance(exc, SweepStopped) else SweepStopped(signal.SIGINT) from None
        except BaseException:  # a job that could not start (a folder not writable, say): none is left running
            _stop_keeping_the_finished(running, signals, rows, out, recipes, log)
            raise
    _write_summary(out, rows, recipes)
    return rows


def _stop_keeping_the_finished(
    running: dict[str, tuple[Job, subprocess.Popen[bytes]]],
    signals: _Signals,
    rows: list[dict],
    out: Path,
    recipes: list[str],
    log: Callable[[str], None],
) -> list[Job]:
    """Stop the running jobs and wait for them (a second signal meanwhile hurries their end instead of abandoning
    them); where some finished, keep their summary with the stopped ones marked so. Returns the stopped jobs."""
    signals.stopping = True
    _stop_jobs([process for _, process in running.values()], signals)
    # one that ended well while it was being stopped (in its last moments, or one that ignored the interrupt)
    for job, process in running.values():
        if process.returncode == 0:
            rows.append(_row(job, finished=True))
            log(f"finished {job.name}: " + _outcome(rows[-1], job))
    stopped = [job for job, process in running.values() if process.returncode != 0]
    if rows:
        rows += [{**_row(job, finished=False), "stopped": True} for job in stopped]
        _write_summary(out, rows, recipes)
    return stopped


def _refuse_an_out_that_is_not_a_sweeps(out: Path) -> None:
    """A sweep's --out holds its jobs' run folders and its summary.json, which it replaces: a run folder there
    got the jobs inside it, and a summary.json of the user's own was deleted before the first job."""
    from .runfolder import holds_a_run

    if holds_a_run(out):
        raise DigitrecError(
            f"--out {out} is a run folder (it holds a trained model); name a new folder for the sweep's runs."
        )
    summary = out / "summary.json"
    if not summary.exists():
        return
    try:
        rows = json.loads(summary.read_text())
        ours = isinstance(rows, list) and all(
            isinstance(row, dict) and {"recipe", "seed", "ok", "out"} <= row.keys() for row in rows
        )
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise DigitrecError(
            f"--out {out} holds a summary.json that no sweep wrote, which the sweep would replace; name another "
            "folder or move the file."
        )


def _outcome(row: dict, job: Job) -> str:
    return f"{row['test_accuracy']:.2%}" if row["ok"] else f"failed, see {job.out / 'train.log'}"


def _write_summary(out: Path, rows: list[dict], recipes: list[str]) -> None:
    rows.sort(key=lambda row: (recipes.index(row["recipe"]), row["seed"]))
    atomic_write_json(out / "summary.json", rows)


def _start(
    job: Job, threads: int, train_flags: list[str], env: dict[str, str], own_session: bool
) -> subprocess.Popen[bytes]:
    """Start `digitrec train` for one job, its output into train.log in its folder. `own_session`: the job is out
    of the terminal's process group, so that a Ctrl-C there reaches it from the sweep, once, as a signal sent to
    the sweep alone does."""
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
        *train_flags,
    ]
    # A sweep started with & by a script ignores SIGINT, and its jobs inherited that: the interrupt that stops
    # them as Ctrl-C would went unheard, and they trained on. In their own session no terminal's Ctrl-C reaches
    # them but the sweep's, so they take SIGINT again.
    restore = own_session and os.name == "posix" and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    with open(job.out / "train.log", "w") as log_file:
        return subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=own_session,
            preexec_fn=_default_sigint if restore else None,
        )


def _default_sigint() -> None:
    """In a job's process before it runs digitrec: SIGINT back to its default, so that Python turns it into
    KeyboardInterrupt (a process that starts with SIGINT ignored keeps it ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class _Signals:
    """The sweep's handler of STOP_SIGNALS: raise SweepStopped, except while a job is being started (then at the
    end of that) or while the jobs are being stopped (then it only hurries that on)."""

    def __init__(self) -> None:
        self.installed = False
        self.holding = False
        self.stopping = False
        self.received: int | None = None
        self.hurry = False

    def __call__(self, signum: int, frame: object) -> None:
        if self.stopping:
            self.hurry = True
        elif self.holding:
            self.received = signum
        else:
            raise SweepStopped(signum)

    @contextmanager
    def held(self) -> Iterator[None]:
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
        if self.received is not None and not self.stopping:
            raise SweepStopped(self.received)


@contextmanager
def _stop_signals() -> Iterator[_Signals]:
    """Handle STOP_SIGNALS for the sweep's lifetime (from the main thread; elsewhere only Ctrl-C's
    KeyboardInterrupt reaches it), and put back the handlers it found. A signal ignored (SIGINT for a command
    started with & by a script) stays ignored."""
    signals = _Signals()
    previous: dict[int, object] = {}
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            if signal.getsignal(signum) is not signal.SIG_IGN:
                previous[signum] = signal.signal(signum, signals)
        signals.installed = bool(previous)
    try:
        yield signals
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]  # getsignal's None never reaches here


def _stop_jobs(processes: list[subprocess.Popen[bytes]], signals: _Signals) -> None:
    """Interrupt each job as Ctrl-C would (train stops where it is, its folder resumable, and its log says how),
    terminate those still running after STOP_GRACE_SECONDS, kill those still running after as many again, and
    wait for every one: none is left running without the sweep."""
    steps: list[Callable[[subprocess.Popen[bytes]], None]] = [
        lambda process: process.terminate(),
        lambda process: process.kill(),
    ]
    if os.name == "posix":  # elsewhere Popen can send no SIGINT
        steps.insert(0, lambda process: process.send_signal(signal.SIGINT))
    for step in steps:
        for process in processes:
            if process.poll() is None:
                try:
                    step(process)
                except ProcessLookupError:  # ended between the poll and the signal
                    pass
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while any(process.poll() is None for process in processes) and time.monotonic() < deadline:
            if signals.hurry:  # stopped again: on to the next step at once
                signals.hurry = False
                break
            time.sleep(0.05)
    for process in processes:
        process.wait()


def _resume_hint(job: Job) -> str:
    if (job.out / "last.safetensors").exists():
        return f"`digitrec train --resume {job.out}` continues {job.name}"
    return f"{job.name} had no checkpoint yet"


def _check_train_flags(job: Job, train_flags: list[str]) -> None:
    from .cli import build_parser, training_config
    from .training import resolve_device

    args = build_parser().parse_args(["train", "--recipe", job.recipe, "--seed", str(job.seed), *train_flags])
    resolve_device(training_config(args)[1].device)  # --device cuda without a GPU: once, not once per job


def _row(job: Job, finished: bool) -> dict:
    """The summary's row of a job: its test figures if it `finished` (exit status 0) and wrote them."""
    metrics_path = job.out / "metrics.json"
    if not finished or not metrics_path.exists():
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
        elif row.get("stopped"):
            lines.append(f"{row['recipe']:<18} {row['seed']:>5} {'stopped':>9}  see {row['out']}/train.log")
        else:
            lines.append(f"{row['recipe']:<18} {row['seed']:>5} {'failed':>9}  see {row['out']}/train.log")
    for recipe, group in itertools.groupby(rows, key=lambda row: row["recipe"]):
        accuracies = [row["test_accuracy"] for row in group if row["ok"]]
        if len(accuracies) > 1:
            lines.append(
                f"{recipe:<18} {'all':>5} {statistics.mean(accuracies):>9.2%} +- {statistics.stdev(accuracies):.2%} "
                f"over {len(accuracies)} seeds"
            )
        elif accuracies:  # one seed has no spread to show
            lines.append(f"{recipe:<18} {'all':>5} {accuracies[0]:>9.2%} over 1 seed")
    return "\n".join(lines)
