"""`digitrec sweep`: recipes x seeds, one process each, summarized in one table."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from digitrec.errors import DigitrecError
from digitrec.sweep import summary_table, sweep

REAL_POPEN = subprocess.Popen


def test_unknown_recipe_fails_before_any_run(tmp_path):
    with pytest.raises(DigitrecError, match="unknown recipe"):
        sweep(["fast", "nope"], [0], tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "recipes, seeds, flags, refused",
    [
        (["fast"], [0, 0], [], "--seeds names 0 more than once"),  # two trainings into one folder at once
        (["fast", "fast"], [0], [], "--recipes names fast more than once"),  # each job ran twice
        (["fast"], [0], ["--epochs", "0"], "--epochs must be a positive number"),  # every job started, failed
        (["fast"], [0], ["--epochs", "-1"], "--epochs must be a positive number"),
        (["fast"], [-1], [], "--seeds must be whole numbers from 0 to 2**63 - 1, got -1."),  # it said --seed
    ],
    ids=["seed-twice", "recipe-twice", "zero-epochs", "negative-epochs", "negative-seed"],
)
def test_a_sweep_train_would_refuse_fails_before_any_run(
    tmp_path, monkeypatch, recipes, seeds, flags, refused
):
    monkeypatch.setattr(subprocess, "Popen", None)  # no job may start
    with pytest.raises(DigitrecError, match=re.escape(refused)):
        sweep(recipes, seeds, tmp_path, parallel=2, train_flags=flags)
    assert not any(tmp_path.iterdir())


def test_a_device_this_machine_lacks_fails_once_before_any_run(tmp_path, monkeypatch):
    """`--device cuda` without a GPU started every job, and each failed with train's sentence in its log."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(subprocess, "Popen", None)  # no job may start
    with pytest.raises(
        DigitrecError,
        match="device cuda was asked for \\(--device or a config file's device\\) but no CUDA GPU is available",
    ):
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


def test_a_second_sweep_into_a_sweeps_folder_is_refused_and_leaves_its_logs(tmp_path, monkeypatch, capsys):
    """A second sweep with the same --out truncated the running sweep's train.log files and wrote a summary of
    failed rows over its folder."""
    from digitrec.cli import main
    from digitrec.folderlock import locked_run_folder

    monkeypatch.setattr(subprocess, "Popen", None)  # no job may start
    out = tmp_path / "s"
    (out / "fast-seed0").mkdir(parents=True)
    (out / "fast-seed0" / "train.log").write_text("epoch 1 ...")
    with locked_run_folder(out):  # the first sweep, still running
        assert main(["sweep", "--seeds", "0", "--out", str(out)]) == 2
    assert f"{out} is in use by another digitrec run (pid {os.getpid()})" in capsys.readouterr().err
    assert (out / "fast-seed0" / "train.log").read_text() == "epoch 1 ..." and not (
        out / "summary.json"
    ).exists()


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


# A sweep whose jobs sleep instead of training: each writes its process id to PID in its folder, and the job named
# by argv[2] ignores SIGINT and SIGTERM, as a job stuck in native code would; the job named by argv[3], if any,
# writes its metrics.json and ends at once, as a job that finished would. argv[4]: --parallel.
SLEEPING_SWEEP = """
import json, signal, subprocess, sys
from pathlib import Path

from digitrec import data, sweep

signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even if pytest was started with &
real_popen = subprocess.Popen


def sleeping_job(command, **kwargs):
    out = Path(command[command.index("--out") + 1])
    deaf = "signal.signal(signal.SIGINT, signal.SIG_IGN); signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    code = "import os, signal, time; " + (deaf if out.name == sys.argv[2] else "")
    code += f"open({str(out / 'PID')!r}, 'w').write(str(os.getpid())); "
    if out.name in sys.argv[3:4]:
        metrics = {"test_accuracy": 0.99, "test_loss": 0.05, "train_seconds": 1.0}
        code += f"open({str(out / 'metrics.json')!r}, 'w').write({json.dumps(metrics)!r})"
    else:
        code += "time.sleep(60)"
    return real_popen([sys.executable, "-c", code], **kwargs)


subprocess.Popen = sleeping_job
sweep._check_train_flags = lambda job, flags: None
sweep.STOP_GRACE_SECONDS = 0.5
data.load_mnist = lambda *args, **kwargs: None
from digitrec.cli import main

parallel = sys.argv[4] if len(sys.argv) > 4 else "2"
sys.exit(main(["sweep", "--recipes", "fast", "--seeds", "0", "1", "--parallel", parallel, "--out", sys.argv[1]]))
"""


@pytest.mark.skipif(os.name != "posix", reason="signals to a process alone")
@pytest.mark.parametrize(
    "signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"]
)
def test_a_sweep_stopped_by_a_signal_stops_its_jobs(tmp_path, signum, code):
    """Interrupting the sweep alone (`kill -INT`, or the SIGTERM of `timeout` or a job scheduler) ended it but
    left its `digitrec train` jobs running, adopted by PID 1."""
    out = tmp_path / "sweep"
    parent = subprocess.Popen(
        [sys.executable, "-c", SLEEPING_SWEEP, str(out), "fast-seed1"], stderr=subprocess.PIPE, text=True
    )
    pid_files = [out / "fast-seed0" / "PID", out / "fast-seed1" / "PID"]
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 30
        while not all(path.exists() and path.read_text() for path in pid_files):
            assert parent.poll() is None and time.monotonic() < deadline, parent.stderr.read()
            time.sleep(0.05)
        pids = [int(path.read_text()) for path in pid_files]
        parent.send_signal(signum)
        assert parent.wait(timeout=30) == code
        for pid in pids:
            with pytest.raises(ProcessLookupError):  # ended and waited for, the deaf job too
                os.kill(pid, 0)
        err = parent.stderr.read()
        assert "Traceback" not in err, err
        assert "stopped 2 running jobs: fast-seed0 had no checkpoint yet; fast-seed1 had no" in err, err
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()
        parent.wait()
        parent.stderr.close()


@pytest.mark.skipif(os.name != "posix", reason="signals to a process alone")
def test_a_stopped_sweep_keeps_the_summary_of_the_jobs_that_finished(tmp_path):
    """A sweep stopped after some jobs had finished wrote no summary.json: their results were left for the user to
    collect from each folder. An earlier sweep's summary.json is not left to describe runs started over."""
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "summary.json").write_text("[]")  # a previous sweep's
    parent = subprocess.Popen(
        [sys.executable, "-c", SLEEPING_SWEEP, str(out), "none", "fast-seed0", "1"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (out / "fast-seed1" / "PID").exists() or not (out / "fast-seed1" / "PID").read_text():
            assert parent.poll() is None and time.monotonic() < deadline, parent.stderr.read()
            time.sleep(0.05)
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=30) == 143
        err = parent.stderr.read()
    finally:
        if parent.poll() is None:
            parent.kill()
        parent.wait()
        parent.stderr.close()
    rows = json.loads((out / "summary.json").read_text())
    assert [(row["seed"], row["ok"], row.get("stopped", False)) for row in rows] == [
        (0, True, False),
        (1, False, True),
    ]
    assert rows[0]["test_accuracy"] == 0.99
    assert (
        "fast                   1   stopped" in err and f"summary of the jobs that finished: {out}" in err
    ), err


@pytest.mark.skipif(os.name != "posix", reason="signals to a process alone")
def test_a_sweep_stopped_before_any_job_finished_leaves_no_summary(tmp_path):
    out = tmp_path / "sweep"
    out.mkdir()
    (out / "summary.json").write_text("[]")  # a previous sweep's, about runs this one started over
    _stop_once_both_jobs_started([SLEEPING_SWEEP, str(out), "none"], out)
    assert not (out / "summary.json").exists()


def _stop_once_both_jobs_started(script: list[str], out: Path) -> None:
    """Run `python -c SCRIPT ARGS...` (a sweep of fast-seed0 and fast-seed1 into `out` whose jobs write their
    PID), send it SIGTERM once both jobs have, and check it ends with 143."""
    parent = subprocess.Popen([sys.executable, "-c", *script], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not all((out / name / "PID").exists() for name in ("fast-seed0", "fast-seed1")):
            assert parent.poll() is None and time.monotonic() < deadline, parent.stderr.read()
            time.sleep(0.05)
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(timeout=30) == 143
    finally:
        if parent.poll() is None:
            parent.kill()
        parent.wait()
        parent.stderr.close()


def test_a_file_where_a_job_folder_goes_is_refused_before_any_job_starts(tmp_path, monkeypatch):
    """The second job's start failed on it (mkdir: File exists), the first one already running."""
    (tmp_path / "fast-seed1").write_text("x")
    monkeypatch.setattr(subprocess, "Popen", None)  # no job may start
    with pytest.raises(DigitrecError, match=r"fast-seed1 is a file, not a folder"):
        sweep(["fast"], [0, 1], tmp_path, parallel=2, train_flags=["--epochs", "1"])


def test_a_summary_json_of_the_users_or_a_run_folder_as_out_is_refused_before_any_job(tmp_path, monkeypatch):
    """A summary.json the user wrote was deleted before the first job started, and a trained run's folder got
    the jobs' folders inside it."""
    monkeypatch.setattr(subprocess, "Popen", None)  # no job may start
    (tmp_path / "summary.json").write_text('{"my": "important results"}')
    with pytest.raises(DigitrecError, match=r"holds a summary.json that no sweep wrote"):
        sweep(["fast"], [0], tmp_path, train_flags=["--epochs", "1"])
    assert (tmp_path / "summary.json").read_text() == '{"my": "important results"}'
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.safetensors").write_bytes(b"x")  # what every run writes
    (run / "model.safetensors").write_bytes(b"x")
    with pytest.raises(DigitrecError, match=r"is a run folder \(it holds a trained model\)"):
        sweep(["fast"], [0], run, train_flags=["--epochs", "1"])
    assert sorted(p.name for p in run.iterdir()) == ["last.safetensors", "model.safetensors"]


def test_a_job_folder_in_use_by_a_run_is_refused_before_its_train_log_is_touched(tmp_path, monkeypatch):
    """The job was refused by the run's lock, but only after the sweep had opened its train.log with "w"."""
    from digitrec.folderlock import RunFolderInUse, locked_run_folder

    monkeypatch.setattr(subprocess, "Popen", None)  # no job may start
    job = tmp_path / "fast-seed0"
    job.mkdir()
    (job / "train.log").write_text("the log of the run in there")
    with locked_run_folder(job), pytest.raises(RunFolderInUse):
        sweep(["fast"], [0, 1], tmp_path, train_flags=["--epochs", "1"])
    assert (job / "train.log").read_text() == "the log of the run in there"
    assert not (tmp_path / "fast-seed1").exists()


def test_one_seeds_mean_shows_no_spread():
    """It printed "+- 0.00% over 1 seeds"."""
    row = {
        "recipe": "fast",
        "seed": 0,
        "ok": True,
        "test_accuracy": 0.99,
        "test_loss": 0.1,
        "train_seconds": 1.0,
    }
    assert summary_table([{**row, "out": "x"}]).splitlines()[-1].split() == [
        "fast",
        "all",
        "99.00%",
        "over",
        "1",
        "seed",
    ]


def test_a_job_that_cannot_start_stops_and_waits_for_the_running_ones(tmp_path, monkeypatch):
    """An error while starting a job ended the sweep (exit 2, its folder's lock released) while the jobs already
    started went on running, each in a session of its own."""
    started: list[subprocess.Popen] = []

    def popen(command, **kwargs):
        if started:
            raise PermissionError(13, "Permission denied", "train.log")
        started.append(REAL_POPEN([sys.executable, "-c", "import time; time.sleep(60)"], **kwargs))
        return started[-1]

    monkeypatch.setattr(subprocess, "Popen", popen)
    monkeypatch.setattr("digitrec.sweep.STOP_GRACE_SECONDS", 0.5)
    try:
        with pytest.raises(PermissionError):
            sweep(["fast"], [0, 1], tmp_path, parallel=2, train_flags=["--epochs", "1"], log=lambda m: None)
        assert started and started[0].poll() is not None  # stopped and waited for
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait()


def test_a_job_that_cannot_start_keeps_the_summary_of_those_that_finished(tmp_path, monkeypatch):
    """The error's way out stopped the running jobs but wrote no summary: the finished jobs' figures were lost
    (the sweep removes the previous summary.json as it starts)."""

    class Finished:
        returncode = 0

        def __init__(self, command, **kwargs):
            if (tmp_path / "fast-seed0" / "metrics.json").exists():
                raise PermissionError(13, "Permission denied", "train.log")
            metrics = {"test_accuracy": 0.99, "test_loss": 0.05, "train_seconds": 1.0}
            (tmp_path / "fast-seed0" / "metrics.json").write_text(json.dumps(metrics))

        def poll(self):
            return 0

        def wait(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", Finished)
    with pytest.raises(PermissionError):
        sweep(["fast"], [0, 1], tmp_path, parallel=1, train_flags=["--epochs", "1"], log=lambda m: None)
    rows = json.loads((tmp_path / "summary.json").read_text())
    assert [(row["seed"], row["ok"], row["test_accuracy"]) for row in rows] == [(0, True, 0.99)]


def test_a_job_that_ended_well_before_the_stop_is_a_finished_row(tmp_path, monkeypatch):
    """Stopped before its exit was seen, a job that had finished was reported stopped, with a --resume hint."""
    from digitrec import sweep as sweep_module

    class Finished:
        returncode = 0

        def __init__(self, command, **kwargs):
            out = Path(command[command.index("--out") + 1])
            metrics = {"test_accuracy": 0.99, "test_loss": 0.05, "train_seconds": 1.0}
            (out / "metrics.json").write_text(json.dumps(metrics))

        def poll(self):
            return 0

        def wait(self):
            return 0

    def stop(seconds):
        raise KeyboardInterrupt  # the stop arrives before the loop polls the jobs

    lines: list[str] = []
    monkeypatch.setattr(subprocess, "Popen", Finished)
    monkeypatch.setattr(time, "sleep", stop)
    with pytest.raises(sweep_module.SweepStopped):
        sweep(["fast"], [0, 1], tmp_path, parallel=2, train_flags=["--epochs", "1"], log=lines.append)
    rows = json.loads((tmp_path / "summary.json").read_text())
    assert [(row["seed"], row["ok"], row.get("stopped", False)) for row in rows] == [
        (0, True, False),
        (1, True, False),
    ]
    assert "finished fast-seed0: 99.00%" in lines and not any("stopped" in line for line in lines)


def test_a_job_that_ends_well_while_it_is_being_stopped_is_a_finished_row(tmp_path):
    """A job that finished in the moments the sweep was stopping it (or that did not hear the interrupt) was put
    among the stopped ones, with a --resume hint, and no summary.json was written for it."""
    from digitrec import sweep as sweep_module

    job = sweep_module.Job("fast", 0, tmp_path / "fast-seed0")
    job.out.mkdir()

    class EndsWell:
        returncode: int | None = None

        def poll(self):
            return self.returncode

        def send_signal(self, signum):  # it was writing its metrics as the interrupt came
            (job.out / "metrics.json").write_text(
                json.dumps({"test_accuracy": 0.99, "test_loss": 0.05, "train_seconds": 1.0})
            )
            self.returncode = 0

        terminate = kill = send_signal

        def wait(self):
            return self.returncode

    lines: list[str] = []
    stopped = sweep_module._stop_keeping_the_finished(
        {job.name: (job, EndsWell())}, sweep_module._Signals(), [], tmp_path, ["fast"], lines.append
    )
    assert stopped == [] and lines == ["finished fast-seed0: 99.00%"]
    rows = json.loads((tmp_path / "summary.json").read_text())
    assert [(row["seed"], row["ok"], row.get("stopped", False)) for row in rows] == [(0, True, False)]


@pytest.mark.skipif(os.name != "posix", reason="signals to a process alone")
def test_the_jobs_of_a_sweep_started_in_the_background_by_a_script_hear_its_interrupt(tmp_path):
    """A script's `digitrec sweep ... &` ignores SIGINT, and its jobs inherited that: the interrupt that stops a
    job as Ctrl-C would (resumable, its log saying how) went unheard, and the job trained on until terminated."""
    job = tmp_path / "job.py"  # each job: its PID, then a sleep that an interrupt ends, said in its folder
    job.write_text(
        "import os, sys, time\n"
        "from pathlib import Path\n"
        "out = Path(sys.argv[1])\n"
        "try:\n"
        "    (out / 'PID').write_text(str(os.getpid()))\n"
        "    time.sleep(60)\n"
        "except KeyboardInterrupt:\n"
        "    (out / 'INTERRUPTED').write_text('')\n"
    )
    script = f"""
import signal, subprocess, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)  # as `digitrec sweep ... &` in a script starts
from digitrec import data, sweep
real_popen = subprocess.Popen
subprocess.Popen = lambda command, **kw: real_popen(
    [sys.executable, {str(job)!r}, command[command.index("--out") + 1]], **kw
)
sweep._check_train_flags = lambda job, flags: None
sweep.STOP_GRACE_SECONDS = 5
data.load_mnist = lambda *args, **kwargs: None
from digitrec.cli import main
sys.exit(main(["sweep", "--recipes", "fast", "--seeds", "0", "1", "--parallel", "2", "--out", sys.argv[1]]))
"""
    out = tmp_path / "sweep"
    _stop_once_both_jobs_started([script, str(out)], out)
    for name in ("fast-seed0", "fast-seed1"):  # each heard the interrupt, not the SIGTERM after it
        assert (out / name / "INTERRUPTED").exists(), name
