"""A run folder's life: what a finished run leaves in it, how a stopped run resumes from its last.safetensors
(the optimizer and generator states saved beside the weights, and the checks that a checkpoint is one this
version wrote), and when a new run may replace an old one. training.train() calls these; the loop itself is
in training.py.
"""

from __future__ import annotations

import contextlib
import math
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch

from .checkpoint import finish_interrupted_save, load_tensors, read_checkpoint, remove_stale_temporaries
from .config import TrainConfig
from .errors import CheckpointError, DigitrecError
from .feedback import is_finetune
from .folderlock import make_writable_folder
from .optim import Optimizer


def optimizer_tensors(optimizer: Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (for safetensors) and plain values (for JSON)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    groups = [
        {k: v for k, v in g.items() if k != "params"} | {"params": g["params"]} for g in state["param_groups"]
    ]
    return tensors, {"param_groups": groups, "scalars": scalars}


@contextlib.contextmanager
def refusing_damage(path: Path, config: TrainConfig) -> Iterator[None]:
    """Turn what a damaged or other-version checkpoint raises while it is loaded into one sentence."""
    try:
        yield
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError):
        raise CheckpointError(
            f"{path} does not fit a {config.arch} run (its weights, optimizer or generator states are "
            "missing or of the wrong shape); it is damaged or from another version, so start a new run."
        ) from None


def load_optimizer(
    optimizer: Optimizer, tensors: dict[str, torch.Tensor], info: dict[str, Any], trained: bool = True
) -> None:
    """Put a checkpoint's optimizer state (its `optimizer.` tensors and `info`'s scalars and groups) back into
    `optimizer`; ValueError when a `trained` stateful optimizer lacks some parameter's state."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".", 2)
            state.setdefault(int(index), {})[key] = value
    for name, value in info["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    groups = [dict(g) for g in info["param_groups"]]
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    # after a step, Adam, AdamW and SGD with momentum hold state for every parameter: none is a lost state
    stateful = not isinstance(optimizer, torch.optim.SGD) or any(g.get("momentum") for g in groups)
    count = sum(len(g["params"]) for g in groups)
    if trained and stateful and sorted(state) != list(range(count)):
        raise ValueError(f"optimizer state for {len(state)} of {count} parameters")
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    # Checkpoints hold tensors contiguous, but a channels_last parameter's moments must share its layout: the
    # fused and foreach optimizers walk a parameter and its state in storage order, element by element.
    for parameter, values in optimizer.state.items():
        for key, value in values.items():
            if (
                torch.is_tensor(value)
                and value.shape == parameter.shape
                and value.stride() != parameter.stride()
            ):
                values[key] = torch.empty_like(parameter, dtype=value.dtype).copy_(value)


def section(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint whose names start with `prefix`, named without it (a state dict)."""
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The Python, NumPy, torch and CUDA generator states: arrays as tensors for safetensors, scalars for JSON.

    Training reseeds what it uses at every step, so these only matter to code that draws random numbers
    outside that seeding; saving them costs a few kilobytes. Under DDP they are rank 0's.
    """
    python_version, python_internal, python_gauss = random.getstate()
    _, numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = cast(
        tuple[str, np.ndarray, int, int, float], np.random.get_state()
    )
    tensors = {
        "rng.torch": torch.get_rng_state(),
        "rng.python": torch.tensor(python_internal, dtype=torch.int64),
        "rng.numpy": torch.from_numpy(numpy_keys.astype(np.int64)),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors |= {f"rng.cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    return tensors, {
        "python": [python_version, python_gauss],
        "numpy": [numpy_pos, numpy_has_gauss, numpy_gauss],
    }


def restore_rng(tensors: dict[str, torch.Tensor], info: dict[str, Any] | None) -> None:
    """Set the torch, CUDA, Python and NumPy generators to the states rng_state() saved (nothing for a checkpoint
    without them)."""
    if not info or "rng.torch" not in tensors:  # a checkpoint from before they were saved
        return
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors.get(f"rng.cuda.{i}") for i in range(torch.cuda.device_count())]
    if cuda and all(state is not None for state in cuda):
        torch.cuda.set_rng_state_all(cast(list[torch.Tensor], cuda))
    python_version, python_gauss = info["python"]
    random.setstate((python_version, tuple(tensors["rng.python"].tolist()), python_gauss))
    np.random.set_state(("MT19937", tensors["rng.numpy"].numpy().astype(np.uint32), *info["numpy"]))


def resume_checkpoint(out_dir: Path) -> Path:
    """`out_dir`'s last.safetensors, or one sentence when there is none to resume from."""
    last_path = out_dir / "last.safetensors"
    if not last_path.exists():
        raise CheckpointError(
            f"{out_dir} has no last.safetensors to resume from; start a new run without --resume."
        )
    return last_path


def read_resume(out_dir: Path) -> tuple[dict[str, torch.Tensor], TrainConfig, str, dict[str, Any]]:
    """The tensors, config, recipe and state of `out_dir`'s last.safetensors, for `train(resume=True)`."""
    last_path = resume_checkpoint(out_dir)
    recover_run_folder(out_dir)
    tensors, meta = load_tensors(last_path)
    try:
        config, recipe, state = TrainConfig.from_dict(meta["config"]), meta["recipe"], meta["state"]
        resumable = {"step", "history", "optimizer"} <= state.keys() and _valid_state(state)
    except (KeyError, TypeError, AttributeError, DigitrecError):
        resumable = False
    if not resumable:
        raise CheckpointError(
            f"{last_path} is not a digitrec training checkpoint; start a new run without --resume."
        )
    if is_finetune(meta):
        extra = meta.get("extra")
        source = (
            f" of {extra['finetuned_from']}" if isinstance(extra, dict) and "finetuned_from" in extra else ""
        )
        raise CheckpointError(
            f"{out_dir} holds a fine-tune{source}, which `digitrec train --resume` cannot continue (the "
            f"checkpoint does not hold the corrections); run {finetune_again(out_dir)}."
        )
    return tensors, config, recipe, state


# What a run folder holds once a run, its report, a calibration or an export wrote there (checkpoints with their
# JSON side files). A new run in a finished run's folder removes them first, so that none of them describes the
# old model; other files in the folder are the user's and stay, and so does every file of a folder that holds no
# run (holds_a_run).
RUN_OUTPUTS = (
    "model.safetensors",
    "model.json",
    "last.safetensors",
    "last.json",
    "history.json",
    "metrics.json",
    "evaluation.json",
    "report.html",
    "MODEL_CARD.md",
    "curves.png",
    "samples.png",
    "confusion.png",
    "mistakes.png",
    "robustness.png",
    "model.onnx",
    "model.int8.onnx",
)


def finetune_again(out_dir: Path) -> str:
    """How an unfinished fine-tune in `out_dir` is finished: run over, since its checkpoint lacks the corrections."""
    return f"the same `digitrec finetune` again with --out {out_dir}"


def resume_command(out_dir: Path, world_size: Any = 1) -> str:
    """The command that continues the run in `out_dir`, begun on `world_size` processes (as its state records)."""
    if isinstance(world_size, int) and world_size > 1:
        return f"`digitrec train --resume {out_dir} --nproc {world_size}` (or torchrun with {world_size} processes)"
    return f"`digitrec train --resume {out_dir}`"


def refuse_another_process_count(out_dir: Path, state: dict[str, Any], world_size: int) -> None:
    """A run resumes on as many processes as it began on: each step's dropout and augmentation seeds, and each
    process's share of a batch, depend on the count. A finished run is only evaluated again, on one process, so
    any count does; checkpoints from before the count was recorded resume as before."""
    began = state.get("world_size")
    if began is None or began == world_size or state.get("finished"):
        return
    if began == 1:
        how = f"resume it in one process, with {resume_command(out_dir)} (without --nproc or torchrun)"
    else:
        how = f"resume it with {resume_command(out_dir, began)}"
    now = "1 process" if world_size == 1 else f"{world_size} processes"
    raise CheckpointError(
        f"{out_dir} began on {began} process{'es' if began != 1 else ''}, and on {now} it would not continue "
        f"exactly (the per-step seeds depend on the count); {how}."
    )


def holds_a_run(out_dir: Path) -> bool:
    """Does `out_dir` hold a run, finished or not: the last.safetensors every run writes, or a model.safetensors
    whose metadata records the recipe and config it was trained with? Only then are RUN_OUTPUTS the run's files;
    in a folder that holds none, a report.html or metrics.json is the user's."""
    if (out_dir / "last.safetensors").exists():
        return True
    try:
        _, meta = read_checkpoint(out_dir / "model.safetensors")
    except (CheckpointError, OSError):
        return False
    return "recipe" in meta and isinstance(meta.get("config"), dict)


def make_run_folder(out_dir: Path) -> None:
    """Create `out_dir` and check that a file can be written there, before training: a folder under /proc, or
    one without write permission, is then one sentence, not a traceback after the first epoch."""
    try:
        make_writable_folder(out_dir)
    except OSError as exc:
        raise DigitrecError(
            f"cannot write into the run folder {out_dir} ({exc.strerror or exc}); choose another --out."
        ) from None


def remove_run_outputs(out_dir: Path) -> None:
    """Delete the files a run writes (RUN_OUTPUTS) and its tensorboard/ folder from `out_dir`, so an earlier run's
    outputs do not stay beside a new one's."""
    for name in RUN_OUTPUTS:
        (out_dir / name).unlink(missing_ok=True)
    # --tensorboard's event files: the old run's curves
    shutil.rmtree(out_dir / "tensorboard", ignore_errors=True)


def recover_run_folder(out_dir: Path) -> None:
    """Finish a save of model.safetensors or last.safetensors that a crash cut between its two renames, and remove
    the stale temporaries of every file a run writes (a younger one may be a live run's write in progress)."""
    for name in ("last.safetensors", "model.safetensors"):
        finish_interrupted_save(out_dir / name)
    remove_stale_temporaries(out_dir, RUN_OUTPUTS)


def refuse_unfinished_run(out_dir: Path, finetune: bool) -> None:
    """A new run must not replace one that `--resume` could finish; replacing a finished one is fine (`make run`).

    A fine-tune may replace an unfinished fine-tune: starting it over is how one is continued."""
    recover_run_folder(out_dir)
    last = out_dir / "last.safetensors"
    damaged_side_file = None
    try:
        try:
            _, meta = read_checkpoint(last)
        except CheckpointError as exc:
            # a run --resume continues once its side file is deleted (as that sentence says) is a run still
            _, meta = read_checkpoint(last, side_file=False)
            damaged_side_file = str(exc)
        config, state = TrainConfig.from_dict(meta["config"]), meta["state"]
        step = state["step"]
        finished = (
            state["finished"]
            if "finished" in state  # older checkpoints: a run that finished wrote metrics.json at its end
            else run_is_finished(state, config) or (out_dir / "metrics.json").exists()
        )
    except (CheckpointError, KeyError, TypeError, AttributeError, DigitrecError, FileNotFoundError):
        # no checkpoint, or one no --resume could continue from (or gone while read: under torchrun, rank 0
        # removes a finished run's files as the other ranks look)
        return
    if finished:
        return
    if is_finetune(meta):
        if finetune:
            return
        raise CheckpointError(
            f"{out_dir} holds an unfinished fine-tune; run its `digitrec finetune` again, or choose another --out."
        )
    if finetune:  # `digitrec finetune` has no --overwrite: the run is the user's to finish or move
        raise CheckpointError(
            f"{out_dir} holds an unfinished training run (stopped at step {step}), which a fine-tune would replace; "
            f"continue it with {resume_command(out_dir, state.get('world_size'))}, or choose another --out."
        )
    if damaged_side_file:
        raise CheckpointError(
            f"{out_dir} holds an unfinished run (stopped at step {step}) whose checkpoint does not load as it is "
            f"({damaged_side_file.rstrip('.')}); start it over with --overwrite, or choose another --out."
        )
    raise UnfinishedRun(
        f"{out_dir} holds an unfinished run (stopped at step {step}); continue it with "
        f"{resume_command(out_dir, state.get('world_size'))}, start it over with --overwrite, or choose another --out.",
        f"{out_dir} holds an unfinished run (stopped at step {step}); continue it with "
        f"digitrec.train(out_dir={str(out_dir)!r}, resume=True), start it over with overwrite=True, or choose "
        "another out_dir.",
    )


class UnfinishedRun(CheckpointError):
    """A new run refused where one that could be resumed lies: said with the command line's flags, and
    `in_python` with digitrec.train()'s arguments."""

    def __init__(self, message: str, in_python: str) -> None:
        super().__init__(message)
        self.in_python = in_python

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        """Pickled whole, as a process pool's worker that raises it sends it back."""
        return type(self), (str(self), self.in_python)


def refuse_replacing_with_a_dry_run(out_dir: Path) -> None:
    """A dry run is a check that the pipeline runs: it must not replace a trained model (a finished run's, or one
    `ensemble --out` or `calibrate --out` wrote into the folder) unless `overwrite`."""
    if not (out_dir / "model.safetensors").exists():
        return
    try:
        _, meta = read_checkpoint(out_dir / "model.safetensors")
    except CheckpointError:
        return  # a damaged file is no trained model to keep
    metrics = meta.get("metrics")
    if not (isinstance(metrics, dict) and metrics.get("dry_run") is True) and not meta.get("partial"):
        raise DigitrecError(
            f"{out_dir} holds a trained model, which a --dry-run would replace; choose another --out, or pass "
            "--overwrite to replace it."
        )


def _valid_state(state: dict[str, Any]) -> bool:
    """Does a checkpoint's state have the shape this version writes? (Its metadata may come from anyone.)"""

    def whole(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    def sums(value: Any) -> bool:  # [loss sum, correct, images]
        return isinstance(value, list) and len(value) == 3 and all(number(v) for v in value)

    so_far = state.get("epoch_so_far", [0.0, 0, 0])
    per_rank = state.get("epoch_so_far_ranks")  # each rank's sums (since 2026-12-06), one per process
    threads = state.get("threads", 1)  # the intra-op threads it trained on (since 2026-12-06)
    return (
        whole(state["step"])
        and isinstance(state["history"], list)
        and all(isinstance(row, dict) for row in state["history"])
        and isinstance(state["optimizer"], dict)
        and isinstance(state["optimizer"].get("scalars"), dict)
        and isinstance(state["optimizer"].get("param_groups"), list)
        and number(state.get("best_val_accuracy", -1.0))
        and number(state.get("train_seconds", 0.0))
        and whole(state.get("bad_epochs", 0))
        and sums(so_far)
        and isinstance(state.get("rng") or {}, dict)
        and whole(state.get("world_size", 1))
        and state.get("world_size", 1) >= 1
        and (
            per_rank is None
            or (isinstance(per_rank, list) and len(per_rank) == state.get("world_size", 1))
            and all(sums(v) for v in per_rank)
        )
        and whole(threads)
        and threads >= 1
    )


def refuse_finished_without_model(
    out_dir: Path, state: dict[str, Any], config: TrainConfig, recipe: str
) -> None:
    """A finished run is resumed by evaluating its model.safetensors again: gone, that is one sentence, before any
    process starts (it said "evaluating it again", then that the checkpoint does not exist, once per process)."""
    if run_is_finished(state, config) and not (out_dir / "model.safetensors").exists():
        raise DigitrecError(
            f"{out_dir} holds a finished {recipe} run whose model.safetensors is gone, so there is nothing to "
            "evaluate again; train the run again with --overwrite, or into a new --out."
        )


def run_is_finished(state: dict[str, Any], config: TrainConfig) -> bool:
    """Did the run whose state this is end (all its steps, early stopping, or on_epoch's word)?

    Checkpoints from before `finished` was saved tell early stopping by the counter it left."""
    patience = config.early_stopping_patience
    return bool(state.get("finished")) or bool(patience and state.get("bad_epochs", 0) >= patience)
