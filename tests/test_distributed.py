"""Distributed training: 2 gloo processes on loopback train like one process, with identical weights on every rank."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import runkit

from digitrec.checkpoint import load_model, load_tensors
from digitrec.cli import main
from digitrec.distributed import weights_fingerprint

# No batch norm and no dropout, and SGD (linear in the gradient): then splitting each batch over two ranks
# and averaging their gradients changes nothing but the rounding.
EQUIVALENT = {
    "arch": "lenet",
    "epochs": 1,
    "batch_size": 64,
    "optimizer": "sgd",
    "lr": 0.05,
    "momentum": 0.9,
    "val_size": 0,
    "threads": 1,
}


def metrics_of(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return json.loads(result.stdout.split("METRICS ", 1)[1])


def test_two_processes_train_like_one(tmp_path):
    # 1157 = 18 x 64 + 5: a last batch of 5 splits 3 + 2 over the ranks, and each rank's gradient must weigh
    # by its share (averaged equally, the two processes ended 7e-3 apart)
    specs = {
        n: {"config": EQUIVALENT, "out": str(tmp_path / f"nproc{n}"), "train_images": 1157} for n in (0, 2)
    }
    children = {
        n: subprocess.Popen(
            runkit.command(spec, n),
            env=runkit.child_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n, spec in specs.items()
    }
    results = {
        n: subprocess.CompletedProcess(child.args, child.wait(timeout=300), *child.communicate())
        for n, child in children.items()
    }
    single, double = metrics_of(results[0]), metrics_of(results[2])
    assert double["world_size"] == 2 and double["steps"] == single["steps"]

    # rank 0 compared every rank's weights before saving; what it saved is what every rank holds
    logged = re.search(r"weights identical on all 2 ranks \(sha256 ([0-9a-f]{64})\)", results[2].stdout)
    assert logged, results[2].stdout
    saved, _ = load_model(tmp_path / "nproc2" / "model.safetensors")
    assert weights_fingerprint(saved) == logged.group(1)

    a, _ = load_tensors(tmp_path / "nproc0" / "model.safetensors")
    b, _ = load_tensors(tmp_path / "nproc2" / "model.safetensors")
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-4
    assert double["test_accuracy"] == pytest.approx(single["test_accuracy"], abs=1 / 300)
    # only rank 0 writes: one line per event in the log, files only in rank 0's folder
    assert results[2].stdout.count("epoch   1/1") == 1

    # the checkpoint records the process count (test_resume: a resume on another count is refused, as it would
    # not continue exactly); a finished run is only evaluated again, which one process does alike
    assert load_tensors(tmp_path / "nproc2" / "last.safetensors")[1]["state"]["world_size"] == 2
    resumed = runkit.run({"out": str(tmp_path / "nproc2"), "resume": True, "train_images": 1157})
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert "holds a finished synthetic run: evaluating it again, without training" in resumed.stdout
    again = json.loads(resumed.stdout.split("METRICS ")[1])
    assert again["test_accuracy"] == double["test_accuracy"]


@pytest.mark.parametrize(
    "arch, batch_size, processes, refused",
    [
        ("lenet", 3, 2, "--batch-size 3 does not split evenly over 2 processes.*multiple of 2"),
        ("lenet", 1, 2, "--batch-size 1 does not split evenly over 2 processes"),
        ("bn_cnn", 2, 2, "one image per step for each of 2 processes.*choose --batch-size 4 or more"),
        ("bn_cnn", 1, 1, "--batch-size 1 leaves one image per step, and bn_cnn's batch norm needs at least"),
    ],
    ids=["uneven", "empty-rank", "batch-norm-one-per-rank", "batch-norm-one-image"],
)
def test_batch_sizes_that_change_training_are_refused(
    tiny_mnist, tmp_path, monkeypatch, arch, batch_size, processes, refused
):
    """An uneven split trained differently from one process, an empty share gave a NaN loss, and batch norm
    with one image raised a ValueError traceback. (The world size is faked: the check comes before training.)"""
    from digitrec import distributed
    from digitrec.config import TrainConfig
    from digitrec.errors import DigitrecError
    from digitrec.training import train

    monkeypatch.setattr(distributed, "world_size", lambda: processes)
    config = TrainConfig(arch=arch, batch_size=batch_size, epochs=1, val_size=0, device="cpu")
    with pytest.raises(DigitrecError, match=refused):
        train(config, tmp_path, data=tiny_mnist, dry_run=True, progress=False, log=lambda m: None)
    assert not (tmp_path / "last.safetensors").exists()


@pytest.mark.parametrize(
    "flags, refused",
    [
        (
            ["--device", "cuda"],
            "device cuda was asked for (--device or a config file's device) but no CUDA GPU is available",
        ),
        (["--data-dir", "/no/such/folder"], "/no/such/folder does not hold the four MNIST files"),
        (["--batch-size", "3"], "--batch-size 3 does not split evenly over 2 processes"),
        (["--out", "UNFINISHED"], "holds an unfinished run"),
        (["--resume", "UNFINISHED", "--device", "cuda"], "device cuda was asked for"),
        # these three rank 0 alone refused, once the workers had joined: its sentence, then rank 1's gloo traceback
        # (or the sentence twice) and torchrun's log lines
        (["--out", "/proc/digitrec-run"], "cannot write into the run folder /proc/digitrec-run"),
        (["--tensorboard"], "--tensorboard needs the tensorboard extra"),
        (["--dry-run", "--out", "TRAINED"], "holds a trained model, which a --dry-run would replace"),
        (
            ["--early-stopping-patience", "2", "--val-size", "0"],
            "early stopping watches the validation accuracy",
        ),
        (
            ["--val-size", "60000"],
            "validation size 60000 leaves no training images; choose fewer than 60000.",
        ),
        (
            ["--val-size", "59999"],
            "1 training image(s) left after the validation split of 59999: too few for one",
        ),
    ],
    ids=[
        "no-gpu",
        "no-data",
        "uneven-batch",
        "unfinished-folder",
        "resume-no-gpu",
        "unwritable-folder",
        "no-tensorboard",
        "dry-run-over-a-trained-model",
        "patience-without-split",
        "no-training-images",
        "no-batch-per-process",
    ],
)
def test_nproc_refuses_once_what_every_worker_would(tmp_path, monkeypatch, capsys, flags, refused):
    """These started torchrun, printed the sentence once per worker, then torchrun's 43-line traceback (exit 1)."""
    import torch

    from digitrec.checkpoint import save_model, save_tensors
    from digitrec.models import create_model

    if "cuda" in flags and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    if "--tensorboard" in flags:
        monkeypatch.setattr(
            "digitrec.errors.find_spec", lambda name: None
        )  # as where the extra is not installed
    trained = tmp_path / "trained"
    save_model(
        trained / "model.safetensors",
        create_model("fast_cnn"),
        {"recipe": "fast", "config": {"arch": "fast_cnn"}, "metrics": {"test_accuracy": 0.99}},
    )
    flags = [str(trained) if flag == "TRAINED" else flag for flag in flags]
    unfinished = tmp_path / "run"
    save_tensors(
        unfinished / "last.safetensors",
        {"model.w": torch.zeros(1)},
        {
            "recipe": "fast",
            "config": {"arch": "fast_cnn"},
            "state": {"step": 7, "history": [], "optimizer": {"scalars": {}, "param_groups": []}},
        },
    )
    flags = [str(unfinished) if flag == "UNFINISHED" else flag for flag in flags]
    monkeypatch.setattr("subprocess.Popen", None)  # torchrun must not start
    recipe = [] if "--resume" in flags else ["--recipe", "fast"]
    assert main(["train", "--nproc", "2", *recipe, *flags]) == 2
    err = capsys.readouterr().err
    assert refused in err and "Traceback" not in err and err.count("digitrec: error:") == 1


def test_the_advice_for_an_unfinished_run_of_two_processes_resumes_it_on_two(tmp_path, capsys, idx_folder):
    """It said `digitrec train --resume RUN`, which that run refuses ("began on 2 processes ... --nproc 2"): a new
    run into its folder, and evaluate's note on its best checkpoint so far, gave the command without --nproc."""
    import torch

    from digitrec.checkpoint import save_model, save_tensors
    from digitrec.models import create_model

    run = tmp_path / "run"
    state = {"step": 7, "history": [], "optimizer": {"scalars": {}, "param_groups": []}, "world_size": 2}
    config = {"arch": "fast_cnn"}
    save_tensors(
        run / "last.safetensors",
        {"model.w": torch.zeros(1)},
        {"recipe": "fast", "config": config, "state": state},
    )
    assert main(["train", "--recipe", "fast", "--out", str(run), "--data-dir", str(idx_folder)]) == 2
    said = f"continue it with `digitrec train --resume {run} --nproc 2` (or torchrun with 2 processes)"
    assert said in capsys.readouterr().err
    save_model(
        run / "model.safetensors",
        create_model("fast_cnn"),
        {"recipe": "fast", "config": config, "partial": True},
    )
    assert main(["evaluate", str(run), "--json", "--data-dir", str(idx_folder)]) == 0
    assert (
        f"`digitrec train --resume {run} --nproc 2` (or torchrun with 2 processes) finishes it"
        in capsys.readouterr().err
    )


def test_a_failing_worker_ends_torchrun_with_its_exit_status_and_no_traceback(tmp_path):
    from digitrec.distributed import torchrun_command

    script = tmp_path / "fail.py"
    script.write_text("import sys\nprint('digitrec: error: one sentence.', file=sys.stderr)\nsys.exit(2)\n")
    command = torchrun_command(2, [])
    command = command[: command.index("-m")] + [str(script)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=runkit.child_env())
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("digitrec: error: one sentence.") == 2


def test_a_refusal_of_rank_0_after_the_workers_joined_is_one_sentence(tmp_path):
    """Rank 0 alone makes the run folder: refused there (under /proc here), it said its sentence, rank 1 printed
    a 40-line gloo traceback ("Connection closed by peer") and torchrun its E and W log lines. Now every rank
    stops together, only rank 0 speaks, and run_torchrun quiets torchrun's lines as `--nproc` does."""
    import os

    from digitrec.distributed import torchrun_command

    spec = {"out": "/proc/digitrec-run", "config": EQUIVALENT | {"epochs": 0.05}, "train_images": 600}
    command = torchrun_command(2, [])
    command = command[: command.index("-m")] + [runkit.command(spec)[1], json.dumps(spec)]
    env = runkit.child_env() | {"LOGLEVEL": "CRITICAL", "TORCH_CPP_LOG_LEVEL": "ERROR"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 2
    assert result.stderr == (
        "digitrec: error: cannot write into the run folder /proc/digitrec-run (No such file or directory); "
        "choose another --out.\n"
    ), result.stderr[-3000:]
    assert not os.path.exists("/proc/digitrec-run")


@pytest.mark.skipif(not hasattr(signal, "SIGHUP"), reason="POSIX signals")
@pytest.mark.parametrize(
    "signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=["SIGINT", "SIGTERM", "SIGHUP"]
)
def test_a_signal_to_the_nproc_launcher_goes_on_to_torchrun(tmp_path, monkeypatch, signum):
    """`kill` of `digitrec train --nproc 2` (or a wrapper's Popen.terminate()) ended the launcher alone: torchrun
    and every worker trained on, orphaned, and wrote the run after the command had "ended"; `kill -INT` of a
    launcher run by a script or with & left it waiting on a run that trained on."""
    from digitrec import distributed

    monkeypatch.setattr(distributed, "_in_the_terminals_foreground", lambda: False)

    class Torchrun:  # the signal arrives while the launcher waits for it
        def __init__(self, command, env):
            self.signals: list[int] = []
            started.append(self)

        def send_signal(self, sent):
            self.signals.append(sent)

        def wait(self):
            if not self.signals:
                os.kill(os.getpid(), signum)  # to the launcher alone, as `kill PID` sends it
            return 128 + signum if self.signals else 0

    started: list[Torchrun] = []
    heard: list[int] = []

    def ours(sent, frame):  # where the launcher does not pass it on (the old code's fate: the process ended)
        heard.append(sent)

    previous = signal.signal(signum, ours)
    try:
        monkeypatch.setattr(distributed, "_check_before_launch", lambda args: "fast")
        monkeypatch.setattr(distributed.subprocess, "Popen", Torchrun)
        code = main(["train", "--nproc", "2", "--recipe", "fast", "--out", str(tmp_path / "run")])
        assert signal.getsignal(signum) is ours  # the handler it found put back
    finally:
        signal.signal(signum, previous)
    assert heard == [] and started[0].signals == [signum] and code == 128 + signum


def test_ctrl_c_at_the_terminal_is_not_passed_on_twice(tmp_path, monkeypatch, capsys):
    """In the terminal's foreground, a SIGINT is Ctrl-C, which the terminal sent torchrun too (in the launcher's
    process group, as Ctrl-Z, Ctrl-\\ and a kill of the job reach it): the launcher sends no second one, waits
    for torchrun's exit and says nothing more (rank 0 says "interrupted")."""
    from digitrec import distributed

    monkeypatch.setattr(distributed, "_in_the_terminals_foreground", lambda: True)
    sent: list[int] = []

    class Torchrun:
        def __init__(self, command, env):
            pass

        def send_signal(self, signum):
            sent.append(signum)

        def wait(self):
            os.kill(os.getpid(), signal.SIGINT)
            return 130

    monkeypatch.setattr(distributed, "_check_before_launch", lambda args: "fast")
    monkeypatch.setattr(distributed.subprocess, "Popen", Torchrun)
    assert main(["train", "--nproc", "2", "--recipe", "fast", "--out", str(tmp_path / "run")]) == 130
    assert sent == [] and capsys.readouterr().err.count("interrupted") == 0


def test_nproc_inside_torchrun_is_refused(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["train", "--nproc", "2", "--recipe", "fast"]) == 2
    assert "drop it" in capsys.readouterr().err


@pytest.mark.slow
def test_nproc_2_reaches_single_process_accuracy_on_mnist(tmp_path):
    """The `fast` recipe for one epoch of real MNIST, launched by `digitrec train --nproc 2`, within 0.3 points."""
    accuracy, seconds = {}, {}
    for nproc in (1, 2):
        out = tmp_path / f"nproc{nproc}"
        command = [
            sys.executable,
            "-m",
            "digitrec",
            "train",
            "--recipe",
            "fast",
            "--epochs",
            "1",
            "--out",
            str(out),
            "--no-progress",
        ] + (["--nproc", "2"] if nproc == 2 else [])
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, timeout=1200)
        seconds[nproc] = time.perf_counter() - start
        assert result.returncode == 0, result.stderr[-4000:]
        accuracy[nproc] = json.loads((out / "metrics.json").read_text())["test_accuracy"]
    print(
        f"\nfast, 1 epoch: 1 process {accuracy[1]:.2%} in {seconds[1]:.0f} s, "
        f"2 processes {accuracy[2]:.2%} in {seconds[2]:.0f} s"
    )
    assert abs(accuracy[2] - accuracy[1]) <= 0.003


def test_the_workers_command_line_drops_nproc_in_both_spellings_and_nothing_else():
    from digitrec.distributed import torchrun_command, without_nproc

    argv = [
        "train",
        "--nproc",
        "2",
        "--recipe",
        "fast",
        "--nproc=4",
        "--epochs",
        "2",
        "--out",
        "runs/nproc-2",
    ]
    assert without_nproc(argv) == ["train", "--recipe", "fast", "--epochs", "2", "--out", "runs/nproc-2"]
    command = torchrun_command(3, ["train", "--recipe", "fast"])
    assert "--nproc-per-node=3" in command and command[-5:] == ["-m", "digitrec", "train", "--recipe", "fast"]


def test_the_writability_check_before_launch_leaves_no_folder_it_made(tmp_path, monkeypatch):
    """It made the run folder and its missing parents to try a write, and took back only the run folder."""
    from digitrec import runfolder
    from digitrec.distributed import _check_writable
    from digitrec.errors import DigitrecError

    _check_writable(tmp_path / "a" / "b" / "run")
    assert list(tmp_path.iterdir()) == []

    def made_then_refused(out):  # a folder that could be made but not written into (a full disk)
        out.mkdir(parents=True)
        raise DigitrecError(f"cannot write into the run folder {out}")

    monkeypatch.setattr(runfolder, "make_run_folder", made_then_refused)
    with pytest.raises(DigitrecError):
        _check_writable(tmp_path / "a" / "b" / "run")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    (tmp_path / "kept").mkdir()
    _check_writable(tmp_path / "kept" / "run")
    assert [p.name for p in tmp_path.iterdir()] == ["kept"] and list((tmp_path / "kept").iterdir()) == []


def test_train_takes_no_abbreviated_flags(monkeypatch, capsys):
    """`--npro 2`, a prefix argparse took for --nproc, stayed on the workers' command line (without_nproc strips
    --nproc only), and torchrun printed its usage."""
    monkeypatch.setattr("subprocess.Popen", None)  # torchrun must not start
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--npro", "2", "--recipe", "fast", "--dry-run"])
    assert exit_.value.code == 2
    assert "unrecognized arguments: --npro 2" in capsys.readouterr().err


def test_each_rank_takes_its_own_gpu_only_under_torchrun(monkeypatch):
    import torch

    from digitrec.distributed import launched_by_torchrun, rank_device

    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not launched_by_torchrun() and rank_device(torch.device("cuda")) == torch.device("cuda")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert launched_by_torchrun() and rank_device(torch.device("cuda")) == torch.device("cuda", 3)
    assert rank_device(torch.device("cpu")) == torch.device("cpu")


def test_the_weights_fingerprint_changes_with_any_parameter_bit():
    import torch

    from digitrec.models import create_model

    torch.manual_seed(0)
    model = create_model("lenet")
    first = weights_fingerprint(model)
    assert first == weights_fingerprint(model) and len(first) == 64
    for parameter in model.parameters():
        with torch.no_grad():
            flat = parameter.view(-1)
            old = flat[-1].clone()
            flat[-1] = torch.nextafter(old, old + 1)  # the smallest step, one bit of one weight
        assert weights_fingerprint(model) != first
        with torch.no_grad():
            flat[-1] = old
    assert weights_fingerprint(model) == first


def test_a_run_that_diverges_stops_every_rank_together_with_one_sentence(tmp_path):
    """Both ranks see the loss summed over the ranks, so both stop after the same step; rank 0 says why."""
    spec = {"config": EQUIVALENT | {"lr": 100.0}, "out": str(tmp_path / "run"), "train_images": 1157}
    from digitrec.distributed import torchrun_command

    command = torchrun_command(2, [])  # digitrec's torchrun: the workers' exit status, not its traceback
    command = command[: command.index("-m")] + runkit.command(spec)[1:]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=runkit.child_env())
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-4000:]
    assert "Traceback" not in result.stderr and "METRICS" not in result.stdout
    assert result.stderr.count("digitrec: error: ") == 1
    assert (
        "digitrec: error: training diverged in epoch 1, between steps 1 and 19: the loss is nan; lower the "
        "learning rate (--lr, now 100) and train again." in result.stderr
    )
    assert not (tmp_path / "run").exists()  # nothing written: the folder the run made goes with its lock


def test_nproc_refuses_to_resume_a_run_on_another_process_count(tiny_mnist, tmp_path, monkeypatch, capsys):
    """A 1-process run with --batch-size 99 resumed with --nproc 2 was told to choose a multiple of 2, which
    --resume refuses to change; the process count is what is wrong."""
    from digitrec.config import TrainConfig
    from digitrec.training import train

    def stop_in_epoch_2(
        model, row
    ):  # an unfinished run: a finished one is only evaluated again, on any count
        if row["epoch"] == 2:
            raise KeyboardInterrupt
        return False

    config = TrainConfig(arch="mlp_500_256", epochs=2, batch_size=99, val_size=0, device="cpu", threads=1)
    with pytest.raises(KeyboardInterrupt):
        train(
            config,
            tmp_path,
            data=tiny_mnist,
            progress=False,
            report=False,
            log=print,
            on_epoch=stop_in_epoch_2,
        )
    monkeypatch.setattr("subprocess.Popen", None)  # torchrun must not start
    assert main(["train", "--resume", str(tmp_path), "--nproc", "2"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path} began on 1 process, and on 2 processes it would not continue exactly" in err
    assert f"resume it in one process, with `digitrec train --resume {tmp_path}`" in err
    assert "multiple of 2" not in err and err.count("digitrec: error:") == 1


def test_nproc_refuses_a_folder_another_run_trains_in_before_torchrun_starts(tmp_path, monkeypatch, capsys):
    import fcntl
    import os

    from digitrec.folderlock import LOCK_FILE

    out = tmp_path / "run"
    out.mkdir()
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, b"4242\n")
        monkeypatch.setattr("subprocess.Popen", None)  # torchrun must not start
        assert main(["train", "--nproc", "2", "--recipe", "fast", "--out", str(out)]) == 2
    finally:
        os.close(fd)
    err = capsys.readouterr().err
    assert f"{out} is in use by another digitrec run (pid 4242); wait for it to finish" in err
    assert err.count("digitrec: error:") == 1


def test_a_killed_worker_is_one_line_per_process_and_the_launcher_gives_the_resume_command(
    tmp_path, monkeypatch, capsys
):
    """kill -9 of one process of a `--nproc 2` run: the other printed gloo's 25-line "Connection reset by peer"
    traceback, and the launcher's sentence said no way on. (Measured by hand with a real kill; here each half.)"""
    import argparse

    import torch

    from digitrec.checkpoint import save_tensors
    from digitrec.cli import _run
    from digitrec.distributed import _continued_by

    def lost(args):
        raise RuntimeError(
            "[gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:3462: Connection reset by peer."
        )

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert _run(argparse.Namespace(func=lost)) == 1
    assert (
        capsys.readouterr().err
        == "digitrec: training process 0 lost its connection to the others; stopping.\n"
    )
    monkeypatch.setenv("WORLD_SIZE", "1")  # in one process it is no lost peer: the error is raised as it is
    with pytest.raises(RuntimeError):
        _run(argparse.Namespace(func=lost))

    run = tmp_path / "run"
    argv = [
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "digitrec",
        "train",
        "--recipe",
        "fast",
        "--out",
        str(run),
    ]
    assert _continued_by(argv) == ""  # no checkpoint yet: nothing to continue
    save_tensors(run / "last.safetensors", {"model.w": torch.zeros(1)}, {"recipe": "fast"})
    said = f", and `digitrec train --resume {run} --nproc 2` (or torchrun with 2 processes) continues it"
    assert _continued_by(argv).startswith(said)
    assert _continued_by([*argv[:-2], f"--out={run}"]).startswith(said)  # argparse's other spelling
