"""Crash safety: a run killed with SIGKILL in the middle of an epoch resumes to bit-identical weights and metrics."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import runkit
import torch

from digitrec.checkpoint import load_tensors

# Dropout, batch norm, augmentation, fused AdamW with weight decay, a one-cycle schedule, channels_last,
# bfloat16 autocast and a weight average: every source of randomness and every piece of state that a resume
# has to restore.
CONFIG = {
    "arch": "bn_cnn",
    "epochs": 2,
    "batch_size": 32,
    "lr": 3e-3,
    "schedule": "onecycle",
    "augment": "affine",
    "weight_decay": 0.01,
    "label_smoothing": 0.1,
    "val_size": 200,
    "checkpoint_every_steps": 3,
    "threads": 1,
    "channels_last": True,
    "amp": True,
    "ema_decay": 0.9,  # the moving average of the weights is state too, and it is what the run keeps
}
TRAIN_IMAGES = 600
STEPS_PER_EPOCH = 13  # 400 training images in batches of 32: 12 full ones and one of 16


def last_step(out: Path) -> int | None:
    try:
        return json.loads((out / "last.json").read_text())["state"]["step"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return None


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants, from /proc (torchrun starts each worker in a session of its own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    return tree


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants, as a power cut would."""
    members = process_tree(pid)
    for member in members:
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(member) for member in members):
        time.sleep(0.01)


def alive(pid: int) -> bool:
    """Running or dying: not yet a zombie (a killed process finishes the system call it is in)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def kill_mid_epoch(
    command: list[str], out: Path, after_step: int, steps_per_epoch: int, timeout: float = 600
) -> int:
    """Start `command`, SIGKILL it (and any workers it started) as soon as a mid-epoch checkpoint past `after_step`
    appears; returns the checkpoint's step."""
    child = subprocess.Popen(
        command, env=runkit.child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and child.poll() is None:
            step = last_step(out)
            if step is not None and step > after_step and step % steps_per_epoch:
                kill_tree(child.pid)
                break
            time.sleep(0.005)
    finally:
        kill_tree(child.pid)
        _, stderr = child.communicate()
    assert child.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {stderr[-2000:]!r}"
    step = last_step(out)
    assert step % steps_per_epoch, (
        "the last checkpoint is at an epoch end; the test wants one inside an epoch"
    )
    return step


def assert_same_run(a: Path, b: Path) -> None:
    """Bit-identical weights, metrics and history; only the wall-clock times may differ. (Under DDP too: a
    mid-epoch checkpoint holds each rank's running loss and accuracy, which that rank goes on from; with the
    global sums on rank 0, epoch 1's train_loss differed in the seventh digit.)"""
    weights_a, _ = load_tensors(a / "model.safetensors")
    weights_b, _ = load_tensors(b / "model.safetensors")
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)
    clock = {"train_seconds", "eval_seconds", "seconds"}
    metrics_a, metrics_b = (json.loads((run / "metrics.json").read_text()) for run in (a, b))
    assert {k: v for k, v in metrics_a.items() if k not in clock} == {
        k: v for k, v in metrics_b.items() if k not in clock
    }
    history_a, history_b = (json.loads((run / "history.json").read_text()) for run in (a, b))
    rows_a, rows_b = (
        [{k: v for k, v in row.items() if k not in clock} for row in history]
        for history in (history_a, history_b)
    )
    assert rows_a == rows_b


@pytest.mark.parametrize("nproc", [0, pytest.param(2, marks=pytest.mark.slow, id="torchrun-2")])
def test_kill_9_mid_epoch_then_resume_is_bit_identical(tmp_path, nproc):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    uninterrupted = subprocess.Popen(
        runkit.command({"config": CONFIG, "out": str(whole), "train_images": TRAIN_IMAGES}, nproc),
        env=runkit.child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    step = kill_mid_epoch(
        runkit.command({"config": CONFIG, "out": str(killed), "train_images": TRAIN_IMAGES}, nproc),
        killed,
        after_step=STEPS_PER_EPOCH,
        steps_per_epoch=STEPS_PER_EPOCH,
    )
    assert STEPS_PER_EPOCH < step < 2 * STEPS_PER_EPOCH
    assert not (killed / "metrics.json").exists()
    # each rank's own sums of the epoch so far, which it goes on from (rank 0 went on from the global sum rounded
    # to float32 and the others from 0: `fast` under --nproc 2 ended epoch 1 at 0.6403557 against 0.6403559)
    so_far = load_tensors(killed / "last.safetensors")[1]["state"]["epoch_so_far_ranks"]
    assert len(so_far) == max(1, nproc)
    assert sum(seen for _, _, seen in so_far) == (step - STEPS_PER_EPOCH) * CONFIG["batch_size"]

    resumed = runkit.run({"out": str(killed), "resume": True, "train_images": TRAIN_IMAGES}, nproc)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming synthetic from step {step}" in resumed.stdout
    _, stderr = uninterrupted.communicate(timeout=600)
    assert uninterrupted.returncode == 0, stderr[-3000:]
    assert_same_run(whole, killed)
    # the kept model is the weight average, not the last trained weights
    kept, _ = load_tensors(whole / "model.safetensors")
    last, _ = load_tensors(whole / "last.safetensors")
    assert all(torch.equal(kept[k], last[f"average.{k}"]) for k in kept)
    assert not all(torch.equal(kept[k], last[f"model.{k}"]) for k in kept)


def test_a_run_resumes_on_the_thread_count_it_began_on(tiny_mnist, tmp_path):
    """Resumed where torch's default is another thread count (OMP_NUM_THREADS, more cores), a run trained on
    that count: other weights (up to 2.07 apart for `fast`), and metrics and its card said the new count."""
    from digitrec.config import TrainConfig
    from digitrec.training import train

    config = TrainConfig().override(
        **(CONFIG | {"threads": 0})
    )  # threads 0: torch's default, the environment's
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    quiet = {"data": tiny_mnist, "progress": False, "report": False}

    def stop(model, row):
        raise KeyboardInterrupt  # after the mid-epoch checkpoints of epoch 1, before its end's

    lines: list[str] = []
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        train(config, whole, log=lambda message: None, **quiet)
        with pytest.raises(KeyboardInterrupt):
            train(config, killed, on_epoch=stop, log=lambda message: None, **quiet)
        step = last_step(killed)
        assert step and step % 3 == 0
        torch.set_num_threads(2)
        train(config, killed, resume=True, log=lines.append, **quiet)
        assert torch.get_num_threads() == 2  # the environment's count again after the run
    finally:
        torch.set_num_threads(before)
    assert (
        f"resuming custom from step {step} in {killed}, on 1 thread as it began (this environment's default is 2)"
        in lines
    )
    assert_same_run(whole, killed)
    assert json.loads((killed / "metrics.json").read_text())["threads"] == 1
    assert load_tensors(killed / "last.safetensors")[1]["state"]["threads"] == 1


def test_a_run_resumed_on_fewer_cores_than_its_threads_or_on_another_device_keeps_the_environments_count(
    tiny_mnist, tmp_path, monkeypatch
):
    """Begun on 16 threads and resumed on 2 cores, a run was put back on 16: a step took 150 times as long, and
    --threads could not say otherwise. Where the cores are too few, or the run goes on on another device (whose
    weights differ anyway), it trains on the environment's count and says so where that matters."""
    import os

    from digitrec.config import TrainConfig
    from digitrec.training import train

    config = TrainConfig().override(**(CONFIG | {"threads": 0}))
    run = tmp_path / "run"
    quiet = {"data": tiny_mnist, "progress": False, "report": False}

    def stop(model, row):
        raise KeyboardInterrupt

    before = torch.get_num_threads()
    lines: list[str] = []
    try:
        torch.set_num_threads(2)
        with pytest.raises(KeyboardInterrupt):
            train(config, run, on_epoch=stop, log=lambda message: None, **quiet)
        torch.set_num_threads(1)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)  # one core here
        seen = []
        monkeypatch.setattr(torch, "set_num_threads", lambda n: seen.append(n))
        with pytest.raises(KeyboardInterrupt):
            train(config, run, resume=True, on_epoch=stop, log=lines.append, **quiet)
        assert 2 not in seen  # never put back on 2 threads
        with pytest.raises(KeyboardInterrupt):
            train(config, run, resume=True, resume_device="cpu", on_epoch=stop, log=lines.append, **quiet)
        assert 2 not in seen
        # or the count asked for by hand (digitrec train --resume RUN --threads 1), which the line names
        train(config, run, resume=True, resume_threads=1, log=lines.append, **quiet)
        assert seen[-1] == 1 and 2 not in seen
    finally:
        monkeypatch.undo()
        torch.set_num_threads(before)
    step = [line for line in lines if line.startswith("resuming")]
    assert step[0].endswith(
        ", on 1 thread: it began on 2, more than this machine's 1 cores take, so its weights will differ from those "
        "of a run never stopped"
    )
    assert step[1].endswith(str(run))  # on another device: nothing to say of threads
    assert step[2].endswith(
        ", on 1 thread as asked: it began on 2, so its weights will differ from those of a run never stopped"
    )


@pytest.mark.slow
def test_cli_kill_9_then_resume_on_mnist(tmp_path):
    """`digitrec train` on real MNIST, killed mid-epoch, then `digitrec train --resume DIR`."""
    flags = [
        "--recipe",
        "fast",
        "--epochs",
        "0.4",
        "--checkpoint-every-steps",
        "10",
        "--threads",
        "1",
        "--no-progress",
    ]
    train = [sys.executable, "-m", "digitrec", "train", *flags]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    env = runkit.child_env()
    subprocess.run(train + ["--out", str(whole)], check=True, capture_output=True, timeout=1200, env=env)
    kill_mid_epoch(train + ["--out", str(killed)], killed, after_step=30, steps_per_epoch=313)  # 60,000 / 192
    subprocess.run(
        [sys.executable, "-m", "digitrec", "train", "--resume", str(killed), "--no-progress"],
        check=True,
        capture_output=True,
        timeout=1200,
        env=env,
    )
    assert_same_run(whole, killed)


# ---------------------------------------------------------------- what a resume may and may not do

QUIET = {"progress": False, "report": False, "log": lambda message: None}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _edit_last(out: Path, edit, edit_tensors=None) -> None:
    """Rewrite the metadata of `out`'s last.safetensors (keeping its checksum valid), as another version might."""
    from digitrec.checkpoint import save_tensors

    tensors, meta = load_tensors(out / "last.safetensors")
    meta.pop("format_version", None)
    edit(meta)
    if edit_tensors is not None:
        tensors = edit_tensors(tensors)
    save_tensors(out / "last.safetensors", tensors, meta)


def _set(path: str, value):
    """An edit that sets meta[a][b]... = value (or deletes the key when value is DELETE)."""

    def edit(meta):
        *parents, key = path.split(".")
        for name in parents:
            meta = meta[name]
        if value is DELETE:
            del meta[key]
        else:
            meta[key] = value

    return edit


DELETE = object()


@pytest.mark.parametrize(
    "edit, edit_tensors",
    [
        (_set("config.arch", "lenet"), None),
        (_set("config.arch", DELETE), None),
        (_set("config", "fast"), None),
        (_set("config.epochs", "many"), None),
        (_set("state.optimizer", {}), None),
        (_set("state.optimizer.scalars", []), None),
        (_set("state.step", "abc"), None),
        (_set("state.step", -5), None),
        (_set("state.step", 10**6), None),
        (_set("state.history", {"epoch": 1}), None),
        (_set("state.epoch_so_far", [1.0]), None),
        (_set("state.epoch_so_far_ranks", [[1.0, 2, 3], [1.0, 2, 3]]), None),
        (_set("state.epoch_so_far_ranks", [[1.0, "x", 3]]), None),
        (_set("state.threads", 0), None),
        (_set("state.threads", "many"), None),
        (_set("state.rng", {"python": [1]}), None),
        (_set("state.optimizer.param_groups", [{"lr": 0.1}]), None),
        (lambda meta: None, lambda t: {k: v for k, v in t.items() if not k.startswith("optimizer.")}),
        (lambda meta: None, lambda t: {k: v for k, v in t.items() if not k.startswith("model.0")}),
    ],
    ids=[
        "other-arch",
        "no-arch",
        "config-not-a-table",
        "bad-config-value",
        "no-optimizer-record",
        "scalars-not-a-table",
        "step-not-a-number",
        "negative-step",
        "step-past-the-end",
        "history-not-a-list",
        "short-epoch-sums",
        "epoch-sums-of-two-ranks",
        "epoch-sums-not-numbers",
        "no-threads",
        "threads-not-a-number",
        "short-rng-record",
        "param-groups-of-another-model",
        "optimizer-tensors-missing",
        "weights-missing",
    ],
)
def test_damaged_or_foreign_resume_metadata_is_one_sentence(tiny_mnist, tmp_path_factory, edit, edit_tensors):
    """Each used to raise a traceback (RuntimeError, KeyError, TypeError, ValueError) or resume from nonsense."""
    from digitrec.config import TrainConfig
    from digitrec.errors import CheckpointError
    from digitrec.training import train

    out = tmp_path_factory.mktemp("damaged")
    config = TrainConfig(arch="mlp_500_256", epochs=2, batch_size=64, val_size=0, device="cpu")
    train(config.override(epochs=1), out, data=tiny_mnist, **QUIET)
    _edit_last(out, lambda meta: (meta["config"].update(epochs=2.0), meta["state"].update(finished=False)))
    _edit_last(out, edit, edit_tensors)
    with pytest.raises(CheckpointError, match="damaged or from another version|not a digitrec training"):
        train(TrainConfig(), out, data=tiny_mnist, resume=True, **QUIET)


def test_a_finished_run_whose_model_was_replaced_by_another_architecture_is_one_sentence(
    tiny_mnist, tmp_path
):
    """`--resume` on a finished run whose model.safetensors another model took the place of (copied in, or an
    ensemble's) printed load_state_dict's RuntimeError traceback."""
    from digitrec.checkpoint import save_model
    from digitrec.config import TrainConfig
    from digitrec.errors import CheckpointError
    from digitrec.models import create_model
    from digitrec.training import train

    train(
        TrainConfig(arch="mlp_500_256", epochs=1, batch_size=64, val_size=0, device="cpu"),
        tmp_path,
        data=tiny_mnist,
        **QUIET,
    )
    save_model(
        tmp_path / "model.safetensors",
        create_model("lenet"),
        {"recipe": "other", "config": {"arch": "lenet"}},
    )
    with pytest.raises(CheckpointError, match="model.safetensors is not this run's mlp_500_256 model"):
        train(TrainConfig(), tmp_path, data=tiny_mnist, resume=True, **QUIET)


def test_resuming_an_early_stopped_run_only_evaluates_it(tiny_mnist, tmp_path):
    from digitrec.config import TrainConfig
    from digitrec.training import train

    config = TrainConfig(
        arch="mlp_500_256", epochs=8, batch_size=64, lr=1e-12, schedule="constant", val_size=200
    ).override(early_stopping_patience=1, device="cpu")
    stopped = train(config, tmp_path, data=tiny_mnist, **QUIET)
    assert len(stopped.history) < 8
    weights, _ = load_tensors(tmp_path / "model.safetensors")
    for _ in range(2):  # every --resume used to train one more epoch
        resumed = train(TrainConfig(), tmp_path, data=tiny_mnist, resume=True, **QUIET)
        assert resumed.history == stopped.history
        assert resumed.metrics["steps"] == stopped.metrics["steps"]
        assert resumed.metrics["test_accuracy"] == stopped.metrics["test_accuracy"]
        kept, _ = load_tensors(tmp_path / "model.safetensors")
        assert all(torch.equal(kept[k], weights[k]) for k in weights)


def test_a_dry_run_resumes_as_a_dry_run(tiny_mnist, tmp_path):
    from digitrec.config import TrainConfig
    from digitrec.training import train

    config = TrainConfig(arch="mlp_500_256", epochs=3, batch_size=64, val_size=0, device="cpu")
    done = train(config, tmp_path, data=tiny_mnist, dry_run=True, **QUIET)
    assert done.metrics["steps"] == 8  # 8 batches of 64
    again = train(TrainConfig(), tmp_path, data=tiny_mnist, resume=True, **QUIET)
    assert again.history == done.history and again.metrics["steps"] == 8

    def interrupted(meta):  # as if killed after step 4 of its 8
        meta["state"].update(step=4, finished=False, history=[])

    _edit_last(tmp_path, interrupted)
    resumed = train(TrainConfig(), tmp_path, data=tiny_mnist, resume=True, **QUIET)
    assert resumed.metrics["steps"] == 8  # not an epoch of the whole data set (18 steps)


def test_a_fine_tune_is_not_resumed_without_its_corrections(tmp_path):
    """`train --resume` of a fine-tune folder trained on MNIST alone and rewrote a finished one's files."""
    from digitrec.checkpoint import save_model
    from digitrec.config import TrainConfig
    from digitrec.data import MNIST
    from digitrec.errors import CheckpointError
    from digitrec.feedback import FeedbackStore, finetune
    from digitrec.models import create_model
    from digitrec.training import train

    torch.manual_seed(0)
    config = {"arch": "mlp_500_256", "batch_size": 64, "lr": 0.002, "device": "cpu", "augment": "none"}
    save_model(
        tmp_path / "base.safetensors", create_model("mlp_500_256"), {"recipe": "tiny", "config": config}
    )
    store = FeedbackStore(tmp_path / "f.sqlite")
    for label in range(3):
        store.add(
            label=label, image=b"png", input28=torch.full((28, 28), 40 * label, dtype=torch.uint8).numpy()
        )
    images = torch.randint(
        0, 256, (128, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )
    labels = torch.arange(128, dtype=torch.uint8) % 10
    data = MNIST(images, labels, images[:32], labels[:32], source="synthetic", checksum="0" * 32)
    finetune(tmp_path / "base.safetensors", store.path, tmp_path / "tuned", data=data, repeat=2, **QUIET)
    before = _files(tmp_path / "tuned")
    refused = "holds a fine-tune of .*base.safetensors.*run the same `digitrec finetune` again"
    with pytest.raises(CheckpointError, match=refused):
        train(TrainConfig(), tmp_path / "tuned", data=data, resume=True, **QUIET)
    assert _files(tmp_path / "tuned") == before

    _edit_last(tmp_path / "tuned", lambda meta: meta["state"].update(step=1, finished=False))  # interrupted
    with pytest.raises(CheckpointError, match=refused):
        train(TrainConfig(), tmp_path / "tuned", data=data, resume=True, **QUIET)
    # evaluate's note on its best checkpoint so far gave `digitrec train --resume`, which refuses a fine-tune
    from digitrec.cli import _finish_of

    assert _finish_of(tmp_path / "tuned") == (
        f"the same `digitrec finetune` again with --out {tmp_path / 'tuned'} finishes it"
    )
    # and a fine-tune over an unfinished training run advised --overwrite, which `digitrec finetune` lacks
    train(TrainConfig(**config, epochs=1, val_size=0), tmp_path / "trained", data=data, **QUIET)
    _edit_last(tmp_path / "trained", lambda meta: meta["state"].update(step=1, finished=False))
    with pytest.raises(CheckpointError) as over_a_run:
        finetune(tmp_path / "base.safetensors", store.path, tmp_path / "trained", data=data, **QUIET)
    assert str(over_a_run.value) == (
        f"{tmp_path / 'trained'} holds an unfinished training run (stopped at step 1), which a fine-tune would "
        f"replace; continue it with `digitrec train --resume {tmp_path / 'trained'}`, or choose another --out."
    )
    with pytest.raises(
        CheckpointError, match="holds an unfinished fine-tune; run its `digitrec finetune` again"
    ):
        train(TrainConfig(arch="mlp_500_256", device="cpu"), tmp_path / "tuned", data=data, **QUIET)
    # what both sentences advise: the same fine-tune again, which starts the folder over
    run = finetune(
        tmp_path / "base.safetensors", store.path, tmp_path / "tuned", data=data, repeat=2, **QUIET
    )
    assert run.metrics["feedback_corrections"] == 3


def test_a_new_run_does_not_replace_an_unfinished_one(tiny_mnist, tmp_path):
    """It silently overwrote last.safetensors; a finished run may still be replaced (`make run` does that)."""
    from digitrec.config import TrainConfig
    from digitrec.errors import CheckpointError
    from digitrec.training import train

    config = TrainConfig(arch="mlp_500_256", epochs=1, batch_size=64, val_size=0, device="cpu")
    train(config, tmp_path, data=tiny_mnist, **QUIET)
    train(config.override(seed=1), tmp_path, data=tiny_mnist, **QUIET)  # over a finished run: fine

    _edit_last(tmp_path, lambda meta: meta["state"].update(step=5, finished=False))  # as if killed
    kept = _files(tmp_path)
    with pytest.raises(CheckpointError, match="unfinished run \\(stopped at step 5\\).*train --resume"):
        train(config, tmp_path, data=tiny_mnist, dry_run=True, **QUIET)
    assert _files(tmp_path) == kept
    train(config, tmp_path, data=tiny_mnist, overwrite=True, **QUIET)

    # a checkpoint from before `finished` was saved: metrics.json tells a finished run
    _edit_last(tmp_path, lambda meta: meta["state"].pop("finished"))
    train(config, tmp_path, data=tiny_mnist, **QUIET)
    _edit_last(tmp_path, lambda meta: meta["state"].pop("finished"))
    (tmp_path / "metrics.json").unlink()
    with pytest.raises(CheckpointError, match="unfinished run"):
        train(config, tmp_path, data=tiny_mnist, **QUIET)


@pytest.mark.parametrize("damage", ["not JSON", "another checksum"])
def test_a_new_run_does_not_replace_an_unfinished_one_whose_side_file_is_damaged(
    tiny_mnist, tmp_path, damage
):
    """last.json damaged: --resume says to delete it and load last.safetensors alone, but a new run took the
    folder for one without a run and deleted the intact last.safetensors."""
    import json as json_module

    from digitrec.config import TrainConfig
    from digitrec.errors import CheckpointError
    from digitrec.training import train

    config = TrainConfig(arch="mlp_500_256", epochs=1, batch_size=64, val_size=0, device="cpu")
    train(config, tmp_path, data=tiny_mnist, **QUIET)
    _edit_last(tmp_path, lambda meta: meta["state"].update(step=5, finished=False))  # as if killed
    side = tmp_path / "last.json"
    if damage == "not JSON":
        side.write_text("{not json")
    else:
        side.write_text(json_module.dumps(json_module.loads(side.read_text()) | {"sha256": "0" * 64}))
    kept = _files(tmp_path)
    with pytest.raises(
        CheckpointError, match="unfinished run \\(stopped at step 5\\) whose checkpoint does not load"
    ):
        train(config, tmp_path, data=tiny_mnist, **QUIET)
    assert _files(tmp_path) == kept
    train(config, tmp_path, data=tiny_mnist, overwrite=True, **QUIET)


def test_a_crash_between_the_two_renames_is_recovered(tiny_mnist, tmp_path):
    """The new checkpoint was in place beside the old last.json, the new one left as a temporary: resume said
    the checkpoint did not match its checksum, and the temporaries stayed forever."""
    from digitrec.config import TrainConfig
    from digitrec.training import train

    config = TrainConfig(arch="mlp_500_256", epochs=1, batch_size=64, val_size=0, device="cpu")
    train(config, tmp_path, data=tiny_mnist, **QUIET)
    old_side = (tmp_path / "last.json").read_bytes()
    _edit_last(
        tmp_path, lambda meta: (meta["config"].update(epochs=2.0), meta["state"].update(finished=False))
    )
    (tmp_path / "last.json").rename(tmp_path / ".last.json.k3j2x9.tmp")  # renamed second: not yet
    (tmp_path / "last.json").write_bytes(old_side)
    (tmp_path / ".last.json.0ld0ne.tmp").write_bytes(old_side)  # an older crash's leftovers
    (tmp_path / ".last.safetensors.0ld0ne.tmp").write_bytes(b"half a checkpoint")
    for stale in tmp_path.glob(".*.0ld0ne.tmp"):
        os.utime(stale, (time.time() - 600, time.time() - 600))
    resumed = train(TrainConfig(), tmp_path, data=tiny_mnist, resume=True, **QUIET)
    assert resumed.metrics["epochs"] == 2
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_crash_between_the_two_renames_of_the_model_loads_and_is_recovered(tiny_mnist, tmp_path):
    """The same crash in the final save of model.safetensors left evaluate, predict and --resume saying the model
    did not match its checksum for good: only last.safetensors was ever recovered."""
    from digitrec.checkpoint import load_model, save_model
    from digitrec.config import TrainConfig
    from digitrec.training import train

    config = TrainConfig(arch="mlp_500_256", epochs=1, batch_size=64, val_size=0, device="cpu")
    train(config, tmp_path, data=tiny_mnist, **QUIET)
    old_side = (tmp_path / "model.json").read_bytes()
    model, meta = load_model(tmp_path / "model.safetensors")
    meta.pop("format_version", None)
    save_model(tmp_path / "model.safetensors", model, meta | {"note": "saved again"})
    (tmp_path / "model.json").rename(tmp_path / ".model.json.k3j2x9.tmp")  # renamed second: not yet
    (tmp_path / "model.json").write_bytes(old_side)
    assert load_model(tmp_path / "model.safetensors")[1]["note"] == "saved again"
    train(TrainConfig(), tmp_path, data=tiny_mnist, resume=True, **QUIET)  # a finished run: evaluated again
    assert not list(tmp_path.glob(".*.tmp"))
    assert json.loads((tmp_path / "model.json").read_text())["note"] == "saved again"


def test_stale_temporaries_of_every_run_output_are_removed(tiny_mnist, tmp_path):
    """A run killed while writing metrics.json, history.json or the report left its temporary there for good."""
    from digitrec.config import TrainConfig
    from digitrec.training import train

    config = TrainConfig(arch="mlp_500_256", epochs=1, batch_size=64, val_size=0, device="cpu")
    train(config, tmp_path, data=tiny_mnist, **QUIET)
    names = ["model.safetensors", "metrics.json", "history.json", "report.html"]
    stale = [tmp_path / f".{name}.99999-0123456789abcdef.tmp" for name in names]
    young = tmp_path / ".metrics.json.1-fedcba9876543210.tmp"  # a live write, perhaps: left alone
    users = tmp_path / ".notes.txt.1-0123456789abcdef.tmp"  # not a run's file
    for path in [*stale, young, users]:
        path.write_bytes(b"half written")
    for path in [*stale, users]:
        os.utime(path, (time.time() - 600, time.time() - 600))
    train(TrainConfig(), tmp_path, data=tiny_mnist, resume=True, **QUIET)
    assert not any(path.exists() for path in stale) and young.exists() and users.exists()
    young.unlink()
    for path in stale:
        path.write_bytes(b"half written")
        os.utime(path, (time.time() - 600, time.time() - 600))
    train(config, tmp_path, data=tiny_mnist, **QUIET)  # a new run over the finished one
    assert not any(path.exists() for path in stale)


def test_a_finished_run_evaluated_on_another_thread_count_keeps_the_one_it_trained_on(tiny_mnist, tmp_path):
    """`train --resume RUN --threads 2` of a run trained on one thread wrote threads 2 into metrics.json, and the
    model card told the reader to reproduce the run with --threads 2 (other weights)."""
    from digitrec.config import TrainConfig
    from digitrec.training import train

    config = TrainConfig(arch="mlp_500_256", epochs=1, batch_size=64, val_size=0, device="cpu")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        train(config, tmp_path, data=tiny_mnist, **QUIET)
        train(TrainConfig(), tmp_path, data=tiny_mnist, resume=True, resume_threads=2, **QUIET)
    finally:
        torch.set_num_threads(before)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["threads"] == 1 == load_tensors(tmp_path / "model.safetensors")[1]["metrics"]["threads"]


def test_a_new_command_on_a_live_runs_folder_leaves_its_writes_alone(tiny_mnist, tmp_path):
    """A second `train --out DIR` on a folder where a run is training removed that run's temporary files
    mid-write (the run then failed to rename them into place)."""
    from digitrec.config import TrainConfig
    from digitrec.errors import CheckpointError
    from digitrec.training import train

    config = TrainConfig(arch="mlp_500_256", epochs=1, batch_size=64, val_size=0, device="cpu")
    train(config, tmp_path, data=tiny_mnist, **QUIET)
    _edit_last(tmp_path, lambda meta: meta["state"].update(step=5, finished=False))  # still training
    writing = [tmp_path / ".last.safetensors.l1ve01.tmp", tmp_path / ".last.json.l1ve01.tmp"]
    for temporary in writing:
        temporary.write_bytes(b"a write in progress")
    with pytest.raises(CheckpointError, match="unfinished run"):
        train(config, tmp_path, data=tiny_mnist, **QUIET)
    assert all(temporary.exists() for temporary in writing)


def test_resuming_a_finished_calibrated_run_keeps_its_checkpoint(tiny_mnist, tmp_path):
    """`digitrec calibrate RUN` then `train --resume RUN` rewrote model.safetensors without the calibration."""
    from digitrec.checkpoint import save_tensors
    from digitrec.config import TrainConfig
    from digitrec.training import train

    config = TrainConfig(arch="mlp_500_256", epochs=1, batch_size=64, val_size=0, device="cpu")
    train(config, tmp_path, data=tiny_mnist, **QUIET)
    tensors, meta = load_tensors(tmp_path / "model.safetensors")
    save_tensors(tmp_path / "model.safetensors", tensors, meta | {"temperature": 0.5, "reject_below": 0.6})
    calibrated = _files(tmp_path)
    train(TrainConfig(), tmp_path, data=tiny_mnist, resume=True, **QUIET)
    _, kept = load_tensors(tmp_path / "model.safetensors")
    assert kept["temperature"] == 0.5 and kept["reject_below"] == 0.6
    for name in ("model.safetensors", "model.json"):
        assert _files(tmp_path)[name] == calibrated[name]


def test_a_new_run_over_a_finished_one_leaves_none_of_its_files(tiny_mnist, tmp_path):
    """With --no-report the old run's report, card, evaluation and export stayed, describing another model."""
    from digitrec.config import TrainConfig
    from digitrec.runfolder import RUN_OUTPUTS
    from digitrec.training import train

    config = TrainConfig(arch="mlp_500_256", epochs=1, batch_size=64, val_size=0, device="cpu")
    train(config, tmp_path, data=tiny_mnist, **QUIET)
    for name in ("report.html", "MODEL_CARD.md", "evaluation.json", "confusion.png", "model.onnx"):
        assert name in RUN_OUTPUTS
        (tmp_path / name).write_text("the old run's")
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "tensorboard" / "events.out.tfevents.1").write_text("the old run's curves")
    (tmp_path / "notes.txt").write_text("the user's")
    train(config.override(seed=1), tmp_path, data=tiny_mnist, **QUIET)
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {"model.safetensors", "model.json", "last.safetensors", "last.json"} | {
        "history.json",
        "metrics.json",
        "notes.txt",
    }


def test_loading_the_resume_checkpoint_as_a_model_says_what_it_is(tiny_mnist, tmp_path):
    """`digitrec evaluate RUN/last.safetensors` said the file was damaged or from another version."""
    from digitrec.checkpoint import load_model
    from digitrec.config import TrainConfig
    from digitrec.errors import CheckpointError
    from digitrec.training import train

    config = TrainConfig(arch="mlp_500_256", epochs=1, batch_size=64, val_size=0, device="cpu")
    train(config, tmp_path, data=tiny_mnist, **QUIET)
    with pytest.raises(
        CheckpointError, match="resume checkpoint .*use .*model.safetensors or the run folder"
    ):
        load_model(tmp_path / "last.safetensors")
    from digitrec.predict import Predictor

    for backend in ("numpy", "auto", "torch"):  # `predict --model` runs on NumPy, which said "does not fit"
        with pytest.raises(CheckpointError, match="resume checkpoint"):
            Predictor.load(tmp_path / "last.safetensors", backend=backend)


def test_a_dry_run_does_not_replace_a_finished_run_without_overwrite(tiny_mnist, tmp_path):
    """`train --dry-run --out runs/fast` replaced the finished run there without a word."""
    from digitrec.config import TrainConfig
    from digitrec.errors import DigitrecError
    from digitrec.training import train

    config = TrainConfig(arch="mlp_500_256", epochs=1, batch_size=64, val_size=0, device="cpu")
    train(config, tmp_path, data=tiny_mnist, **QUIET)
    (tmp_path / "metrics.json").unlink()  # as in a folder `ensemble --out` or `calibrate --out` wrote
    kept = _files(tmp_path)
    with pytest.raises(DigitrecError, match="holds a trained model, which a --dry-run would replace"):
        train(config, tmp_path, data=tiny_mnist, dry_run=True, **QUIET)
    assert _files(tmp_path) == kept
    train(config, tmp_path, data=tiny_mnist, dry_run=True, overwrite=True, **QUIET)
    train(config, tmp_path, data=tiny_mnist, dry_run=True, **QUIET)  # a dry run may replace a dry run
    train(config, tmp_path, data=tiny_mnist, **QUIET)  # and a real run may replace it


def test_a_checkpoint_with_patience_and_no_split_still_loads(tiny_mnist, tmp_path):
    """Runs the previous version trained with early stopping and no validation split stay usable; new ones are
    refused (the patience would never stop anything)."""
    from digitrec.checkpoint import load_model, save_tensors
    from digitrec.config import TrainConfig
    from digitrec.errors import DigitrecError
    from digitrec.training import train

    config = TrainConfig(arch="mlp_500_256", epochs=1, batch_size=64, val_size=0, device="cpu")
    with pytest.raises(DigitrecError, match="needs a validation split"):
        train(config.override(early_stopping_patience=2), tmp_path / "new", data=tiny_mnist, **QUIET)
    train(config, tmp_path, data=tiny_mnist, **QUIET)
    tensors, meta = load_tensors(tmp_path / "model.safetensors")
    meta["config"]["early_stopping_patience"] = 2
    save_tensors(tmp_path / "model.safetensors", tensors, meta)
    _, loaded = load_model(tmp_path / "model.safetensors")
    assert loaded["config"]["early_stopping_patience"] == 2
    _edit_last(tmp_path, lambda meta: meta["config"].update(early_stopping_patience=2))
    train(TrainConfig(), tmp_path, data=tiny_mnist, resume=True, **QUIET)  # a finished run: evaluated again


def test_files_removed_while_a_rank_reads_them_count_as_no_run(tmp_path, monkeypatch):
    """Under torchrun rank 0 removes a finished run's files while other ranks look at them: that was a
    FileNotFoundError, which ended every rank."""
    import digitrec.runfolder as runfolder

    def vanished(path):
        raise FileNotFoundError(2, "No such file or directory", str(path))

    monkeypatch.setattr(runfolder, "read_checkpoint", vanished)
    runfolder.refuse_unfinished_run(tmp_path, finetune=False)


def test_a_run_killed_before_its_last_history_write_resumes_to_the_whole_history(
    tiny_mnist, tmp_path, monkeypatch
):
    """The last epoch's checkpoint (finished) is written before history.json: a kill between the two left a
    history.json without the last epoch, and `--resume`, which only evaluates a finished run, never wrote it."""
    from digitrec import training
    from digitrec.config import TrainConfig

    config = TrainConfig(arch="mlp_500_256", epochs=2, batch_size=64, val_size=200, device="cpu")
    whole = training.train(config, tmp_path / "whole", data=tiny_mnist, **QUIET)
    assert len(whole.history) == 2
    write = training.atomic_write_json

    def killed_before_the_last_history(path, value):
        if path.name == "history.json" and len(value) == 2:
            raise KeyboardInterrupt  # as if killed right after last.safetensors recorded the finished run
        write(path, value)

    monkeypatch.setattr(training, "atomic_write_json", killed_before_the_last_history)
    with pytest.raises(KeyboardInterrupt):
        training.train(config, tmp_path / "killed", data=tiny_mnist, **QUIET)
    monkeypatch.setattr(training, "atomic_write_json", write)
    assert len(json.loads((tmp_path / "killed" / "history.json").read_text())) == 1

    training.train(TrainConfig(), tmp_path / "killed", data=tiny_mnist, resume=True, **QUIET)
    assert_same_run(tmp_path / "whole", tmp_path / "killed")


@pytest.mark.parametrize(
    "change, tensorboard, refused",
    [
        ({"val_size": 60000}, False, "validation size 60000 leaves no training images"),
        ({"val_size": 1199}, False, "too few for one batch"),
        ({"arch": "nope"}, False, "nope"),
        ({"arch": "mlp_bn_300_100", "batch_size": 1}, False, "batch norm needs at least two"),
        ({}, True, "--tensorboard needs the tensorboard extra"),
    ],
    ids=["val-size", "no-batch-left", "arch", "batch-size", "tensorboard"],
)
def test_a_run_that_is_refused_leaves_the_finished_run_in_its_folder(
    tiny_mnist, tmp_path, change, tensorboard, refused
):
    """The finished run's files were removed first, then the new run was refused: the folder was left empty."""
    import importlib.util

    from digitrec.config import TrainConfig
    from digitrec.errors import DigitrecError
    from digitrec.training import train

    if tensorboard and importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed here")
    config = TrainConfig(arch="mlp_500_256", epochs=1, batch_size=64, val_size=0, device="cpu")
    train(config, tmp_path, data=tiny_mnist, **QUIET)
    (tmp_path / "report.html").write_text("the finished run's report")
    kept = _files(tmp_path)
    with pytest.raises(DigitrecError, match=refused):
        train(config.override(**change), tmp_path, data=tiny_mnist, tensorboard=tensorboard, **QUIET)
    assert _files(tmp_path) == kept


def test_a_new_run_in_a_folder_without_a_run_keeps_the_users_files(tiny_mnist, tmp_path):
    """README: a finished run is replaced, the files it left removed first; in a folder that held no run, the
    user's own report.html, MODEL_CARD.md, evaluation.json and tensorboard/ were removed too."""
    from digitrec.config import TrainConfig
    from digitrec.runfolder import holds_a_run
    from digitrec.training import train

    users = {"report.html": "mine", "MODEL_CARD.md": "mine", "evaluation.json": "{}", "notes.txt": "mine"}
    for name, text in users.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "tensorboard" / "events.out.tfevents.1").write_text("my curves")
    assert not holds_a_run(tmp_path)
    config = TrainConfig(arch="mlp_500_256", epochs=1, batch_size=64, val_size=0, device="cpu")
    train(config, tmp_path, data=tiny_mnist, **QUIET)
    for name, text in users.items():
        assert (tmp_path / name).read_text() == text, name
    assert (tmp_path / "tensorboard" / "events.out.tfevents.1").read_text() == "my curves"
    assert holds_a_run(tmp_path)
    (tmp_path / "last.safetensors").unlink()  # the run's model.safetensors alone still marks it
    (tmp_path / "last.json").unlink()
    assert holds_a_run(tmp_path)


def test_a_run_resumes_only_on_as_many_processes_as_it_began_on(tiny_mnist, tmp_path):
    """A run begun on 2 processes resumed in one with other per-step seeds (they depend on the count), and its
    metrics.json said world_size 1; README says --resume continues exactly."""
    from digitrec.config import TrainConfig
    from digitrec.errors import CheckpointError
    from digitrec.training import train

    config = TrainConfig(arch="mlp_500_256", epochs=2, batch_size=64, val_size=0, device="cpu", threads=1)
    train(config, tmp_path, data=tiny_mnist, **QUIET)
    assert load_tensors(tmp_path / "last.safetensors")[1]["state"]["world_size"] == 1

    # finished on 2 processes, it is only evaluated again: one process does (a review found it refused)
    two = {"world_size": 2, "epoch_so_far_ranks": [[0.0, 0, 0]] * 2}  # as a 2-process run writes them
    _edit_last(tmp_path, lambda meta: meta["state"].update(two))
    again = train(TrainConfig(), tmp_path, data=tiny_mnist, resume=True, **QUIET)
    assert again.metrics["epochs"] == 2

    _edit_last(tmp_path, lambda meta: meta["state"].update(two, step=5, finished=False))
    kept = _files(tmp_path)
    refused = (
        f"{tmp_path} began on 2 processes, and on 1 process it would not continue exactly .*; resume it with "
        f"`digitrec train --resume {tmp_path} --nproc 2` \\(or torchrun with 2 processes\\)\\.$"
    )
    with pytest.raises(CheckpointError, match=refused):
        train(TrainConfig(), tmp_path, data=tiny_mnist, resume=True, **QUIET)
    assert _files(tmp_path) == kept

    # a checkpoint from before the count was recorded resumes as it did
    _edit_last(
        tmp_path, lambda meta: [meta["state"].pop(key) for key in ("world_size", "epoch_so_far_ranks")]
    )
    resumed = train(TrainConfig(), tmp_path, data=tiny_mnist, resume=True, **QUIET)
    assert resumed.metrics["world_size"] == 1 and resumed.metrics["epochs"] == 2


@pytest.mark.parametrize("val_size", [200, 0], ids=["validation", "no-split"])
def test_a_run_ending_inside_an_epoch_checkpoints_its_last_step_only_with_its_row(
    tiny_mnist, tmp_path, monkeypatch, val_size
):
    """A run that ends inside an epoch (`fast`'s 0.85) wrote a mid-epoch checkpoint at its last step, before the
    epoch's row: stopped between the two, `--resume` trained no step, so it skipped the row, its validation and
    the checkpoint it chooses (history one row short, another model kept; without a split, "model.safetensors does
    not exist"). No such checkpoint is written now, and one an earlier version wrote gets its row on resume."""
    import shutil

    from digitrec import training
    from digitrec.config import TrainConfig

    # 1,000 training images (or 1,200) in batches of 64: 16 (or 19) steps an epoch, 40 (or 48) in all, a
    # checkpoint every 8: the last step is one of them, inside the third epoch
    config = TrainConfig(
        arch="mlp_500_256",
        epochs=2.5,
        batch_size=64,
        val_size=val_size,
        checkpoint_every_steps=8,
        device="cpu",
    )
    saves: list[tuple[int, bool]] = []
    sums: list[list[float]] = []
    save_last, train_steps = training._save_last, training.train_steps

    def recording_save(path, step, epoch_so_far, model, average, optimizer, recipe, config, state, extra):
        saves.append((step, bool(state.get("finished"))))
        save_last(path, step, epoch_so_far, model, average, optimizer, recipe, config, state, extra)

    def recording_steps(*args, on_step=None, **kwargs):
        def step_and_record(step, step_sums):
            sums[:] = [[float(step_sums[0]), int(step_sums[1]), int(step_sums[2])]]  # the epoch's so far
            if on_step is not None:
                on_step(step, step_sums)

        return train_steps(*args, on_step=step_and_record, **kwargs)

    monkeypatch.setattr(training, "_save_last", recording_save)
    monkeypatch.setattr(training, "train_steps", recording_steps)
    whole = training.train(config, tmp_path / "whole", data=tiny_mnist, **QUIET)
    total = whole.metrics["steps"]
    assert total % 8 == 0 and whole.metrics["epochs"] % 1 and len(whole.history) == 3
    assert (total, False) not in saves and saves[-1] == (total, True)

    # what an earlier version left when stopped at that moment: the last step's checkpoint, not finished, its
    # epoch's sums, and the history (and, without a split, the model) of the epochs before
    earlier = tmp_path / "earlier"
    shutil.copytree(tmp_path / "whole", earlier)

    def before_the_row(meta):
        meta["state"].update(
            finished=False,
            history=meta["state"]["history"][:-1],
            epoch_so_far=sums[0],
            epoch_so_far_ranks=sums,
        )

    _edit_last(earlier, before_the_row)
    (earlier / "history.json").write_text(json.dumps(whole.history[:-1]))
    (earlier / "metrics.json").unlink()
    if not val_size:
        for name in ("model.safetensors", "model.json"):
            (earlier / name).unlink()
    monkeypatch.setattr(training, "train_steps", train_steps)
    training.train(TrainConfig(), earlier, data=tiny_mnist, resume=True, **QUIET)
    assert_same_run(tmp_path / "whole", earlier)


def test_writing_a_mid_epoch_checkpoint_is_no_training_time(tiny_mnist, tmp_path, monkeypatch):
    """The clock was stopped for a mid-epoch checkpoint but not started again after it, so train_seconds counted
    its writing (epoch-end checkpoints were not counted)."""
    import time

    from digitrec import training
    from digitrec.config import TrainConfig

    config = TrainConfig(arch="mlp_500_256", epochs=1, batch_size=64, val_size=0, checkpoint_every_steps=4)
    offset = [0.0]
    perf_counter, save_last = time.perf_counter, training._save_last

    def slow_save(path, step, epoch_so_far, *args):  # each checkpoint takes 100 s of the clock
        save_last(path, step, epoch_so_far, *args)
        offset[0] += 100.0

    monkeypatch.setattr(training.time, "perf_counter", lambda: perf_counter() + offset[0])
    monkeypatch.setattr(training, "_save_last", slow_save)
    run = training.train(config, tmp_path, data=tiny_mnist, **QUIET)
    assert offset[0] >= 400  # mid-epoch checkpoints and the epoch's own
    assert run.metrics["train_seconds"] < 100
