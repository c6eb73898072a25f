"""The training loop: one train_steps(), evaluate.py's evaluate(), checkpoints every epoch, resume from the last one.

Determinism: the data order of epoch e is a function of (seed, e) and every step reseeds the augmentation
and dropout generators from (seed, step), so a run resumed at any saved step continues exactly as if it had
never stopped, with nothing but the step count to restore. (Checkpoints still carry the Python, NumPy, torch
and CUDA generator states, for any future code that draws random numbers outside that per-step seeding.)

Distributed: under torchrun every rank holds the whole data set, walks the same epoch order and trains on
its interleaved share of each batch, so `batch_size` is the global batch and a recipe means the same thing
on any number of processes. DDP averages the gradients; only rank 0 logs, evaluates and writes files.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from . import __version__, distributed
from .augment import augment_batch
from .augment_real import OUTLIER_WEIGHT, make_negatives, outlier_loss
from .checkpoint import (
    atomic_write_json,
    load_tensors,
    save_model,
    save_tensors,
)
from .config import DRY_RUN_BATCHES, DRY_RUN_MAX_EPOCHS, DRY_RUN_ROBUSTNESS_IMAGES, TrainConfig, with_flags
from .data import MNIST, as_input, check_val_size, load_mnist, split_validation
from .errors import CheckpointError, DataError, DigitrecError, TrainingDiverged, need_extra
from .evaluate import evaluate, loss_and_accuracy, recipe_logits, write_report
from .folderlock import locked_run_folder, refuse_a_file_in_the_way
from .models import count_parameters, create_model
from .optim import AdamW, Optimizer, WeightAverage
from .precision import autocast, native_bfloat16
from .runfolder import (
    holds_a_run,
    load_optimizer,
    make_run_folder,
    optimizer_tensors,
    read_resume,
    refuse_another_process_count,
    refuse_finished_without_model,
    refuse_replacing_with_a_dry_run,
    refuse_unfinished_run,
    refusing_damage,
    remove_run_outputs,
    restore_rng,
    rng_state,
    run_is_finished,
    section,
)


@dataclass
class Run:
    """What a finished run leaves behind."""

    out_dir: Path
    config: TrainConfig
    metrics: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def model_path(self) -> Path:
        """The run's checkpoint: the best weights by validation accuracy (the last ones without a split)."""
        return self.out_dir / "model.safetensors"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DigitrecError(
            "device cuda was asked for (--device or a config file's device) but no CUDA GPU is available; "
            "use --device cpu or auto."
        )
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DigitrecError(
            "device mps was asked for (--device or a config file's device) but Apple's MPS is not available; "
            "use --device cpu or auto."
        )
    return torch.device(name)


def lr_at(config: TrainConfig, step: int, steps_per_epoch: int, total_steps: int) -> float:
    """The learning rate for `step` under the recipe's schedule (a pure function, so resuming needs no state)."""
    epoch = step // steps_per_epoch
    if config.schedule == "constant":
        return config.lr
    if config.schedule == "step":
        return config.lr * config.gamma ** (epoch // config.step_epochs)
    if config.schedule == "step_at_epoch_start":  # seed 001 multiplies by gamma before epoch 0's first step
        return config.lr * config.gamma ** (epoch // config.step_epochs + 1)
    progress = step / max(1, total_steps)
    if config.schedule == "cosine":
        return config.lr * 0.5 * (1 + math.cos(math.pi * progress))
    # onecycle: linear warm-up from lr/25 to lr, then linear decay to zero (airbench's)
    if config.schedule == "onecycle":
        warmup = config.warmup_fraction
        if progress < warmup:
            return config.lr * (0.04 + 0.96 * progress / warmup)
        return config.lr * max(0.0, (1 - progress) / (1 - warmup))
    raise ValueError(f"unknown schedule {config.schedule!r}")  # TrainConfig refuses it before it gets here


def make_optimizer(model: nn.Module, config: TrainConfig) -> Optimizer:
    """SGD, Adam or AdamW; weight decay applies to weight matrices and kernels only, not to biases or norms.

    SGD and Adam are torch.optim's, as the seed documents used them; AdamW, which our own recipes use, is
    digitrec.optim's, the same update without torch.optim's 1.4 s import of the compiler stack.
    """
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov)
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=config.lr, betas=config.betas)
    if config.optimizer == "adamw":
        return AdamW(groups, lr=config.lr, betas=config.betas)
    raise ValueError(f"unknown optimizer {config.optimizer!r}")  # TrainConfig refuses it before it gets here


def generator_seed(value: int) -> int:
    """`value` as a seed torch takes (0 to 2**64 - 1). A large --seed (TrainConfig takes up to 2**63 - 1) times
    the mixers below went past it (an overflow traceback); values inside the range, and so the seed of every
    run that trained before, are kept as they are."""
    return value % 2**64


def epoch_order(n: int, seed: int, epoch: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(generator_seed(seed * 100_003 + epoch))
    return torch.randperm(n, generator=generator).to(device)


def steps_in_epoch(n: int, batch_size: int, world_size: int = 1) -> int:
    """Batches per epoch, keeping a final partial batch unless a rank's share would be one image (BatchNorm needs two)."""
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= 2 * world_size else 0)


def check_batch_size(config: TrainConfig, model: nn.Module, world_size: int) -> None:
    """Refuse a batch that does not split evenly over the processes, or leaves batch norm one image."""
    if config.batch_size % world_size:
        raise DigitrecError(
            f"--batch-size {config.batch_size} does not split evenly over {world_size} processes (each trains "
            f"on its share of every batch); choose a multiple of {world_size}."
        )
    share = config.batch_size // world_size
    if share < 2 and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        processes = f" for each of {world_size} processes" if world_size > 1 else ""
        raise DigitrecError(
            f"--batch-size {config.batch_size} leaves one image per step{processes}, and {config.arch}'s batch "
            f"norm needs at least two; choose --batch-size {2 * world_size} or more."
        )


def seed_device_generator(device: torch.device, seed: int) -> None:
    """Seed the default generator of `device` only (the one dropout draws from there).

    torch.manual_seed also queues a seed for every lazily initialized device type and records a stack trace
    each time: about 0.5 ms, a tenth of a `fast` training step on two cores.
    """
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)
    elif device.type == "mps":
        torch.mps.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)


def train_steps(
    model: nn.Module,
    optimizer: Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: TrainConfig,
    steps: range,
    steps_per_epoch: int,
    total_steps: int,
    on_step: Callable[[int, tuple[torch.Tensor, torch.Tensor, int]], None] | None = None,
    epoch_so_far: tuple[float, int, int] = (0.0, 0, 0),
    average: WeightAverage | None = None,
) -> tuple[float, float]:
    """Train on `steps` (all inside one epoch); returns (mean loss, accuracy) over the epoch's images seen.

    `average` (a moving average of the weights, with ema_decay) folds in the weights after every step.
    `epoch_so_far` carries (loss sum, correct, images) of the part of the epoch before a resume, and `on_step`
    gets the running sums after every step, so that a mid-epoch checkpoint can save them.
    """
    model.train()
    device = images.device
    rank, world_size = distributed.rank(), distributed.world_size()
    epoch = steps.start // steps_per_epoch
    order = epoch_order(len(images), config.seed, epoch, device)
    aug_generator = torch.Generator(device=device)
    # the last config.clean_epochs epochs see the images as they are
    clean_from = total_steps - round(config.clean_epochs * steps_per_epoch)
    loss_sum = torch.full((), epoch_so_far[0], device=device)
    correct = torch.full((), int(epoch_so_far[1]), device=device, dtype=torch.long)
    seen = int(epoch_so_far[2])
    for step in steps:
        i = step - epoch * steps_per_epoch
        batch = order[i * config.batch_size : (i + 1) * config.batch_size]
        index = batch[rank::world_size]  # this rank's share
        # index_select, not images[index]: the same rows, 10x faster on a CPU (8 against 89 us for 320 images)
        x, y = as_input(images.index_select(0, index)), labels.index_select(0, index).long()
        # dropout draws from the global generator; under DDP each rank gets its own draws
        seed_device_generator(device, generator_seed((config.seed * 1_000_003 + step) * world_size + rank))
        aug_generator.manual_seed(generator_seed((config.seed * 1_000_033 + step) * world_size + rank))
        # outlier exposure (augment_real.py): non-digits join the batch, their loss pulls them to uniform
        outliers = round(config.negatives * len(y)) if config.negatives else 0
        if outliers:
            x = torch.cat([x, make_negatives(x, outliers, aug_generator)])
        x = augment_batch(x, config.augment if step < clean_from else "none", aug_generator)
        if config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(config, step, steps_per_epoch, total_steps)
        with autocast(device, config.amp):
            logits = model(x)
        loss, logits = _loss(logits, y, outliers, config)
        optimizer.zero_grad(set_to_none=True)
        if len(y) * world_size == len(batch):
            loss.backward()
        else:  # DDP averages the ranks' gradients: weigh each by its share of an uneven last batch
            (loss * (len(y) * world_size / len(batch))).backward()
        optimizer.step()
        if average is not None:
            average.update(step)
        loss_sum += loss.detach() * len(y)
        correct += (logits.argmax(1) == y).sum()
        seen += len(y)
        if on_step is not None:
            on_step(step, (loss_sum, correct, seen))
    loss_total, correct_total, seen_total = distributed.sum_across_ranks([loss_sum, correct, seen])
    return loss_total / max(1, seen_total), correct_total / max(1, seen_total)


def _loss(
    logits: torch.Tensor, y: torch.Tensor, outliers: int, config: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, the digits' logits) of a batch whose last `outliers` rows are non-digits: the digits' cross-entropy,
    plus OUTLIER_WEIGHT x the non-digits' outlier loss."""
    digit_logits = logits[: len(y)] if outliers else logits
    loss = F.cross_entropy(digit_logits.float(), y, label_smoothing=config.label_smoothing)
    if outliers:
        loss = loss + OUTLIER_WEIGHT * outlier_loss(logits[len(y) :])
    return loss, digit_logits


def versions() -> dict[str, str]:
    return {"digitrec": __version__, "torch": torch.__version__, "python": platform.python_version()}


def model_metadata(
    config: TrainConfig, recipe: str, model: nn.Module, data: MNIST, metrics: dict[str, Any]
) -> dict[str, Any]:
    return {
        "recipe": recipe,
        "arch": config.arch,
        "config": config.to_dict(),
        "params": count_parameters(model),
        "metrics": metrics,
        "data_checksum": data.checksum,
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


@contextlib.contextmanager
def torch_threads_kept() -> Iterator[None]:
    """Put torch's thread count back as it was: a run with `threads` set left it set, so the next run in the
    process with `threads = 0` (torch's default) trained on that count, not on the default its card implies."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def train(
    config: TrainConfig,
    out_dir: str | Path,
    recipe: str = "custom",
    data: MNIST | None = None,
    resume: bool = False,
    dry_run: bool = False,
    progress: bool = True,
    report: bool = True,
    log: Callable[[str], None] = print,
    tensorboard: bool = False,
    on_epoch: Callable[[nn.Module, dict[str, float]], bool] | None = None,
    init_weights: dict[str, torch.Tensor] | None = None,
    extra_metadata: dict[str, Any] | None = None,
    more_metrics: Callable[[nn.Module], dict[str, Any]] | None = None,
    resume_device: str | None = None,
    resume_threads: int | None = None,
    overwrite: bool = False,
    lr_flag: str | None = None,
) -> Run:
    """Train `config`, keep the best checkpoint by validation accuracy, evaluate it on the test set, write the run folder.

    `on_epoch(model, history_row)` runs after each epoch with the clock stopped (`digitrec bench train` measures
    test accuracy there); returning True ends training early. `init_weights` starts from a trained state dict
    instead of a fresh initialization (fine-tuning); `extra_metadata` is merged into the checkpoint's metadata,
    and `more_metrics(best_model)`, after the test evaluation, into its metrics and metrics.json (`finetune`: how
    many corrections the model reads right), while the run still holds its folder.
    `resume_device` continues a resumed run on another device than the one it started on (a run begun on a GPU
    machine, finished on a CPU); the data order, schedule and seeds do not depend on the device. `resume_threads`
    sets its thread count by hand (0: torch's default), instead of the one it began on.
    A new run may replace a finished one in `out_dir` but not one that could be resumed, unless `overwrite`.
    The run holds a lock on `out_dir` to its end: a second run into it meanwhile is refused (RunFolderInUse).
    A resumed run must run on as many processes as it began on. A run whose loss turns NaN or infinite stops
    with TrainingDiverged, its folder as its last checkpoint left it
    (no model of NaN weights, no metrics); the sentence names the learning rate to lower as `lr_flag` (default
    "--lr, now X").
    """
    out_dir = Path(out_dir)
    last_path = out_dir / "last.safetensors"
    refuse_a_file_in_the_way(out_dir)
    # The process that writes the folder (rank 0 under torchrun, before it joins the others) takes its lock before
    # anything there is read, removed or written: a second run into it is refused and leaves this one's files alone.
    with torch_threads_kept(), locked_run_folder(out_dir, take=distributed.launched_rank() == 0):
        config, recipe, state, resume_tensors = _start_or_resume(
            config,
            out_dir,
            recipe,
            resume,
            dry_run,
            overwrite,
            init_weights is not None,
            resume_device,
            resume_threads,
        )
        dry_run = state["dry_run"]  # a dry run resumes as one

        # -- set-up: device and processes, data, model, steps
        threads_note = _resume_threads(config, state, resume_device, resume_threads) if resume else ""
        device = _set_up_device(config)
        joined = distributed.init_distributed(device)  # under torchrun; False in a single process
        main, world_size = distributed.is_main(), distributed.world_size()
        if not main:
            log, progress, tensorboard = _quiet, False, False
        if oversubscribed := _oversubscribed(config):
            log(oversubscribed)
        if resume:
            refuse_finished_without_model(out_dir, state, config, recipe)
        evaluate_only = resume and run_is_finished(state, config)
        if evaluate_only:
            log(f"{out_dir} holds a finished {recipe} run: evaluating it again, without training")
        elif resume:
            log(f"resuming {recipe} from step {state['step']} in {out_dir}{threads_note}")
        data = data or load_mnist(log=log)
        train_images, train_labels, validation = _split(data, config, dry_run, device)
        if dry_run:  # the clean epochs too: a config's clean_epochs may not pass its epochs
            epochs = min(config.epochs, DRY_RUN_MAX_EPOCHS)
            config = config.override(epochs=epochs, clean_epochs=min(config.clean_epochs, epochs))

        model, optimizer, average = _model_and_optimizer(
            config, device, world_size, log, init_weights, resume, resume_tensors, state, last_path
        )
        # With ema_decay, the moving average of the weights is what gets validated, saved and tested.
        scored_model = average.model if average is not None else model
        forward_model = cast(nn.Module, torch.compile(model)) if config.compile else model
        validated_model = average.model if average is not None else forward_model
        # validation in one view: it chooses the epoch to keep, and test-time views (tta_views) cost five or nine
        # passes for the same choice (`default`: the same epoch in 20 runs of 20, 1.4 s more each)
        val_config = config.override(tta_views=1)
        train_model = distributed.wrap(forward_model, device)  # forward_model itself in a single process
        steps_per_epoch, total_steps = _count_steps(
            len(train_images), config, world_size, state["step"], last_path
        )

        params = count_parameters(model)
        processes = f" x {world_size} processes" if world_size > 1 else ""
        bfloat16 = config.amp and native_bfloat16(device.type)
        if not evaluate_only:  # a finished run said above that it is only evaluated
            log(
                f"training {recipe}: {config.arch} ({params:,} parameters) on {device}{processes}"
                f"{' in bfloat16' if bfloat16 else ''}, {len(train_images):,} images, "
                f"{total_steps} step{'s' * (total_steps != 1)} of {config.batch_size}"
                + (f", weights averaged with decay {config.ema_decay}" if average is not None else "")
            )
        if config.amp and not bfloat16 and not evaluate_only:
            log(
                f"bfloat16 autocast off: this {device.type} has no native bfloat16, so {recipe} runs in float32 (faster here)"
            )
        # Every check that can refuse the run is behind us: only now is the folder touched (by rank 0, which alone
        # can be refused here: every rank stops with it, and it says why).
        writer = None
        refused: DigitrecError | OSError | None = None
        if main:
            try:
                if tensorboard:
                    need_extra("tensorboard", "--tensorboard")
                # under /proc or read-only: one sentence now, not after the first epoch
                make_run_folder(out_dir)
                # a finished run replaced (or any run, with overwrite): its files go with it; a folder without a
                # run keeps the user's files
                if not resume and holds_a_run(out_dir):
                    remove_run_outputs(out_dir)
                writer = _tensorboard_writer(out_dir) if tensorboard else None
            except (DigitrecError, OSError) as exc:
                refused = exc
        if distributed.broadcast_flag(refused is not None):
            if joined:
                del train_model  # as below: DDP holds the process group
                gc.collect()
                distributed.shutdown()
            if refused is not None:
                raise refused
            # the others end as after a run, quietly: a rank that failed first would have torchrun kill rank 0
            # before it said why
            return Run(out_dir, config, {}, [])

        # -- what runs during training: the clock, checkpoints, the divergence check, the per-step work
        clock_started = time.perf_counter()  # the clock stops for checkpoints, history.json and on_epoch
        # The loss is checked where the loop already brings it to the host (an epoch's end, a mid-epoch
        # checkpoint): its running sum turns NaN or infinite with the first step whose loss does, at no cost per step.
        finite_at = state["step"]  # the last step at which the loss and weights were found finite
        # the step of the last checkpoint this run wrote or resumed
        saved_at = state["step"] if resume else None

        def count_train_time() -> None:
            """Add the time since the clock last started to train_seconds, and start it again."""
            nonlocal clock_started
            now = time.perf_counter()
            state["train_seconds"] += now - clock_started
            clock_started = now

        def save_last(step: int, epoch_so_far: list[list[float]] | None = None) -> None:
            nonlocal saved_at
            _save_last(
                last_path,
                step,
                epoch_so_far,
                model,
                average,
                optimizer,
                recipe,
                config,
                state,
                extra_metadata,
            )
            saved_at = step

        def stop_if_diverged(done: int, loss_sum: float) -> None:
            """Raise TrainingDiverged, before anything of step `done` is written, if the loss summed since the epoch
            began or the weights are no longer finite. Every rank decides alike (the sum is over all ranks, the
            weights are DDP's identical replicas), so all stop together."""
            nonlocal finite_at
            if math.isfinite(loss_sum) and weights_are_finite(model):
                finite_at = done
                return
            kept = (
                f"{out_dir} keeps the last checkpoint before it, of step {saved_at}, which --resume would take the "
                "same way"
                if saved_at is not None
                else None
            )
            epoch = (done - 1) // steps_per_epoch + 1
            lr = lr_flag or f"--lr, now {config.lr:g}"
            sentence = divergence_sentence(epoch, finite_at + 1, done, loss_sum, lr, kept)
            raise TrainingDiverged(sentence, quiet=not main)

        def on_step(step: int, sums: tuple[torch.Tensor, torch.Tensor, int]) -> None:
            nonlocal clock_started
            if bar is not None:
                bar.update(1)
            every = config.checkpoint_every_steps
            # A mid-epoch checkpoint. The epoch's last step has its own, after the epoch's row, and so has the run's
            # last step where it ends inside an epoch (`fast`'s 0.85): one before its row, resumed, skipped the row,
            # its validation and the checkpoint it chooses.
            if every and (step + 1) % every == 0 and (step + 1) % steps_per_epoch and step + 1 < total_steps:
                # every rank takes part; rank 0 writes each rank's own sums, which a resumed rank goes on from
                per_rank = distributed.gather_across_ranks(list(sums))
                stop_if_diverged(step + 1, math.fsum(sums[0] for sums in per_rank))
                if main:
                    count_train_time()
                    save_last(step + 1, per_rank)
                    clock_started = time.perf_counter()  # the checkpoint's writing is no training time

        # -- the epoch loop
        bar = None
        step = state["step"]
        # what the progress bar and the epoch lines count to
        epochs_in_all = _epochs(total_steps, steps_per_epoch)
        # the sums of an epoch interrupted after a mid-epoch checkpoint: each rank goes on from its own, so that the
        # epoch's loss and accuracy add up as in a run that never stopped
        # (a finished run trains no more: evaluated again on any number of processes)
        epoch_so_far = (0.0, 0, 0) if evaluate_only else _epoch_so_far(state, distributed.rank())
        try:
            # A checkpoint at the run's last step that is not finished, written inside an epoch by versions before
            # 7 December, still owes that epoch's row: one pass makes it from the epoch's sums, training no step.
            # Decided once, from the checkpoint every rank read: only rank 0 keeps the history, so asked after each
            # epoch the other ranks went round again, into an all-reduce rank 0 never joined.
            owed = step >= total_steps and _row_owed(state, step)
            while not run_is_finished(state, config) and (step < total_steps or owed):
                owed = False
                epoch = step // steps_per_epoch
                end = min(total_steps, (epoch + 1) * steps_per_epoch)
                steps = range(step, end)
                bar = _progress(steps, _epochs(end, steps_per_epoch), epochs_in_all) if progress else None
                train_loss, train_accuracy = train_steps(
                    train_model,
                    optimizer,
                    train_images,
                    train_labels,
                    config,
                    steps,
                    steps_per_epoch,
                    total_steps,
                    on_step=on_step,
                    epoch_so_far=epoch_so_far,
                    average=average,
                )
                epoch_so_far = (0.0, 0, 0)
                if bar:
                    bar.close()
                stop_if_diverged(end, train_loss)  # before the epoch's row, checkpoints and evaluation
                step = end
                stop = False
                if main:
                    row: dict[str, float] = {
                        # epochs done: whole, or a run's last part of one (fast: 0.85), as the epoch line says
                        "epoch": float(_epochs(step, steps_per_epoch))
                        if step % steps_per_epoch
                        else epoch + 1,
                        "step": step,
                        "train_loss": train_loss,
                        "train_accuracy": train_accuracy,
                        "lr": lr_at(config, step - 1, steps_per_epoch, total_steps),
                    }
                    if validation is not None:
                        row["val_loss"], row["val_accuracy"] = evaluate(
                            validated_model, *validation, val_config
                        )
                    count_train_time()  # validation counts as training time
                    row["seconds"] = state["train_seconds"]
                    state["history"].append(row)
                    log(_epoch_line(row, _epochs(step, steps_per_epoch), epochs_in_all))
                    if writer:
                        for key, value in row.items():
                            writer.add_scalar(key, value, step)
                    stop = _end_epoch(row, state, config, recipe, out_dir, scored_model, on_epoch, log)
                    # a finished run, resumed, is only evaluated again: it never trains past where it stopped
                    state["finished"] = stop or step >= total_steps
                    save_last(step)
                    atomic_write_json(out_dir / "history.json", state["history"])
                if distributed.broadcast_flag(stop):
                    break
                clock_started = time.perf_counter()
        except TrainingDiverged:  # on every rank at once: stop as a finished run does, then say so
            if joined:
                del train_model  # as below: DDP holds the process group
                gc.collect()
                distributed.shutdown()
            raise
        finally:  # on Ctrl-C too, or a full disk: the bar goes before the caller's sentence, not under its line
            if bar is not None:
                bar.close()
            if writer:
                writer.close()
        if world_size > 1:
            fingerprint = distributed.check_replicas(model)
            log(f"weights identical on all {world_size} ranks (sha256 {fingerprint})")
            # DistributedDataParallel holds the process group and sits in reference cycles: free it now, so gloo's
            # threads are not torn down during interpreter shutdown (an abort at exit, seen on loaded machines).
            del train_model
            gc.collect()
        if joined and not main:
            distributed.shutdown()
        if not main:
            return Run(out_dir, config, {}, [])  # rank 0 evaluates and reports

        # -- the best checkpoint on the test set
        metrics = _test_and_write(
            model,
            data,
            config,
            recipe,
            state,
            out_dir,
            device=device,
            steps=step,
            steps_per_epoch=steps_per_epoch,
            evaluate_only=evaluate_only,
            report=report,
            more_metrics=more_metrics,
            extra_metadata=extra_metadata,
        )
        if joined:
            distributed.shutdown()
        return Run(out_dir, config, metrics, state["history"])


def refuse_new_run(
    config: TrainConfig, out_dir: Path | None, dry_run: bool, overwrite: bool, finetune: bool
) -> None:
    """What refuses a new run into `out_dir` (None: a folder of its own), also checked by `--nproc` before
    torchrun starts."""
    # checked for new runs only: checkpoints of older versions may hold a patience without a split
    if config.early_stopping_patience and not config.val_size:
        raise DigitrecError(
            "early stopping watches the validation accuracy, so it needs a validation split: add --val-size N "
            "(val_size) or drop the patience."
        )
    if out_dir is not None and not overwrite:
        refuse_unfinished_run(out_dir, finetune=finetune)
        if dry_run:
            refuse_replacing_with_a_dry_run(out_dir)


def _start_or_resume(
    config: TrainConfig,
    out_dir: Path,
    recipe: str,
    resume: bool,
    dry_run: bool,
    overwrite: bool,
    finetune: bool,
    resume_device: str | None,
    resume_threads: int | None,
) -> tuple[TrainConfig, str, dict[str, Any], dict[str, torch.Tensor]]:
    """(config, recipe, state, tensors) to train from: those of out_dir's last checkpoint for a resumed run (with
    the device and thread count asked for instead of its own), a fresh state and no tensors for a new one, once
    the checks that may refuse it have passed."""
    if resume:
        tensors, config, recipe, state = read_resume(out_dir)
        refuse_another_process_count(out_dir, state, distributed.launched_world_size())
        state["dry_run"] = bool(state.get("dry_run", False))  # a dry run resumes on its own few images
        flags: dict[str, Any] = {"device": resume_device} if resume_device else {}
        if resume_threads is not None:  # 0: torch's default
            flags["threads"] = resume_threads
        config = with_flags(config, flags)
        return config, recipe, state, tensors
    refuse_new_run(config, out_dir, dry_run, overwrite, finetune)
    state = {
        "step": 0,
        "history": [],
        "best_val_accuracy": -1.0,
        "train_seconds": 0.0,
        "bad_epochs": 0,
        "finished": False,
        "dry_run": dry_run,
    }
    return config, recipe, state, {}


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _oversubscribed(config: TrainConfig) -> str:
    """A note for --threads above the cores this process may use (`--threads 1000` on 2 cores had not finished a
    dry run in two minutes); such a count is allowed, as the one way to reproduce a bigger machine's weights."""
    processes = distributed.launched_world_size()
    cores = usable_cores()
    if config.threads * processes <= cores or resolve_device(config.device).type != "cpu":
        return ""
    return (
        f"note: {config.threads} threads{' per process' * (processes > 1)} on {cores} cores: each step will take "
        f"longer than on {max(1, cores // processes)} (so many only reproduce the weights of a machine that has them)"
    )


def _set_up_device(config: TrainConfig) -> torch.device:
    """This process's device, with torch's thread count as `config` asks (its default with `threads = 0`)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    device = distributed.rank_device(resolve_device(config.device))
    if device.type == "cuda":
        # cuDNN may otherwise pick kernels that sum in a different order from run to run: same seed, other weights
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    return device


def _split(
    data: MNIST, config: TrainConfig, dry_run: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """(train images, train labels, validation images and labels), the training ones on `device`: no validation
    set without `val_size`, and only the first DRY_RUN_BATCHES batches in a dry run."""
    if config.val_size:
        train_images, train_labels, val_images, val_labels = split_validation(
            data.train_images, data.train_labels, config.val_size, seed=0
        )
        validation = (val_images, val_labels)
    else:
        train_images, train_labels, validation = data.train_images, data.train_labels, None
    if dry_run:
        dry_run_images = DRY_RUN_BATCHES * config.batch_size
        train_images, train_labels = train_images[:dry_run_images], train_labels[:dry_run_images]
    return train_images.to(device), train_labels.to(device), validation


def _model_and_optimizer(
    config: TrainConfig,
    device: torch.device,
    world_size: int,
    log: Callable[[str], None],
    init_weights: dict[str, torch.Tensor] | None,
    resume: bool,
    resume_tensors: dict[str, torch.Tensor],
    state: dict[str, Any],
    last_path: Path,
) -> tuple[nn.Module, Optimizer, WeightAverage | None]:
    """The model (seeded, or `init_weights`), its optimizer and, with ema_decay, the moving average of its
    weights, all as `resume_tensors` left them for a resumed run."""
    torch.manual_seed(config.seed)
    model: nn.Module = create_model(config.arch, config.normalize).to(device)
    check_batch_size(config, model, world_size)
    if init_weights is not None and not resume:
        model.load_state_dict(init_weights)
    model = distributed.prepare_model(model, device, math.ceil(config.batch_size / world_size), log)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # stub lacks memory_format
    optimizer = make_optimizer(model, config)
    if resume:
        with refusing_damage(last_path, config):
            model.load_state_dict(section(resume_tensors, "model."))
            load_optimizer(optimizer, resume_tensors, state["optimizer"], trained=state["step"] > 0)
            restore_rng(resume_tensors, state.get("rng"))
    average = WeightAverage(model, config.ema_decay) if config.ema_decay else None
    if average is not None and resume:
        with refusing_damage(last_path, config):
            average.model.load_state_dict(section(resume_tensors, "average."))
    return model, optimizer, average


def check_split(train_images: int, config: TrainConfig, world_size: int) -> None:
    """Refuse a validation split of `train_images` that leaves no training images, or too few for one batch of
    two per process (also before `--nproc` starts torchrun, which printed it once per worker)."""
    check_val_size(config.val_size, train_images)
    _steps_per_epoch(train_images - config.val_size, config, world_size)


def _steps_per_epoch(images: int, config: TrainConfig, world_size: int) -> int:
    """Steps in an epoch of `images` training images; one sentence when they make no batch."""
    steps = steps_in_epoch(images, config.batch_size, world_size)
    if steps == 0 and config.val_size:
        raise DataError(
            f"{images} training image(s) left after the validation split of {config.val_size}: "
            f"too few for one batch of two per process; choose a smaller --val-size."
        )
    if steps == 0:  # a --data-dir of a handful of images, or more processes than they make batches for
        raise DataError(
            f"{images} training image(s), too few for one batch of two per process; train on more images."
        )
    return steps


def _count_steps(
    images: int, config: TrainConfig, world_size: int, step: int, last_path: Path
) -> tuple[int, int]:
    """(steps per epoch, total steps) of the run, refusing a split that leaves no batch and a checkpoint at
    `step` past the end."""
    steps_per_epoch = _steps_per_epoch(images, config, world_size)
    total_steps = max(1, round(config.epochs * steps_per_epoch))
    if step > total_steps:
        raise CheckpointError(
            f"{last_path} is at step {step} of a run of {total_steps} steps; it is damaged or from "
            "another version, so start a new run."
        )
    return steps_per_epoch, total_steps


def _epoch_so_far(state: dict[str, Any], rank: int) -> tuple[float, int, int]:
    """(loss sum, correct, images) of `rank`'s part of the epoch before the checkpoint `state` is from (checked by
    runfolder.read_resume). Checkpoints from before the sums were saved per rank hold the global ones, which rank
    0 carries."""
    per_rank = state.get("epoch_so_far_ranks")
    if per_rank is None:
        return tuple(state.get("epoch_so_far", (0.0, 0, 0))) if rank == 0 else (0.0, 0, 0)  # type: ignore[return-value]
    loss, correct, seen = per_rank[rank]
    return float(loss), int(correct), int(seen)


def _resume_threads(
    config: TrainConfig, state: dict[str, Any], resume_device: str | None, asked: int | None = None
) -> str:
    """Train a resumed run on the intra-op thread count it began on (a float sum's order, and so the weights,
    depend on it), whatever this environment's default; the note the resume line adds where they differ.

    Not where `config.threads` sets the count anyway (or `asked`, --threads given with --resume, which the note
    then names), nor on another device (`resume_device`: the weights differ anyway), nor where the count would
    oversubscribe this machine's cores (a run begun on 16 threads, resumed on 2 cores, took 150 times as long a
    step): it then trains on the environment's count, and says so."""
    recorded = state.get("threads")  # checked by runfolder.read_resume; older checkpoints do not say
    environment = torch.get_num_threads()
    if asked is not None:
        now = asked or environment
        if recorded is None or recorded == now:
            return ""
        return (
            f", on {now} thread{'s' * (now != 1)} as asked: it began on {recorded}, so its weights will differ "
            "from those of a run never stopped"
        )
    if recorded is None or config.threads or resume_device or recorded == environment:
        return ""
    processes = distributed.launched_world_size()
    per_process = " per process" if processes > 1 else ""
    cores = usable_cores()
    if recorded * processes > cores:
        return (
            f", on {environment} thread{'s' * (environment != 1)}{per_process}: it began on {recorded}, more than "
            f"this machine's {cores} cores take, so its weights will differ from those of a run never stopped"
        )
    torch.set_num_threads(recorded)
    return (
        f", on {recorded} thread{'s' * (recorded != 1)}{per_process} as it began (this environment's default is "
        f"{environment})"
    )


def _save_last(
    path: Path,
    step: int,
    epoch_so_far: list[list[float]] | None,
    model: nn.Module,
    average: WeightAverage | None,
    optimizer: Optimizer,
    recipe: str,
    config: TrainConfig,
    state: dict[str, Any],
    extra_metadata: dict[str, Any] | None,
) -> None:
    """last.safetensors: model, optimizer and RNG tensors; its metadata holds the step, which fixes the data
    position, the learning rate (a function of the step) and the per-step seeds, each rank's sums of the epoch so
    far (`epoch_so_far`: one [loss, correct, images] per rank) and the thread count. No GradScaler: autocast runs
    in bfloat16, which needs no loss scaling."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    if average is not None:
        tensors |= {f"average.{k}": v for k, v in average.model.state_dict().items()}
    optimizer_arrays, optimizer_info = optimizer_tensors(optimizer)
    rng_arrays, rng_info = rng_state()
    per_rank = epoch_so_far or [[0.0, 0, 0] for _ in range(distributed.world_size())]
    position = {
        "step": step,
        # the epoch's global sums (what versions before the per-rank ones read), and each rank's
        "epoch_so_far": [math.fsum(sums[i] for sums in per_rank) for i in range(3)],
        "epoch_so_far_ranks": per_rank,
        # intra-op threads per process: a resume sets them again (a float sum's order depends on them)
        "threads": torch.get_num_threads(),
        "optimizer": optimizer_info,
        "rng": rng_info,
        "world_size": distributed.world_size(),  # a resume on another count would not continue exactly
    }
    save_tensors(
        path,
        tensors | optimizer_arrays | rng_arrays,
        {"recipe": recipe, "config": config.to_dict(), "state": state | position}
        | ({"extra": extra_metadata} if extra_metadata else {}),
    )


def _end_epoch(
    row: dict[str, float],
    state: dict[str, Any],
    config: TrainConfig,
    recipe: str,
    out_dir: Path,
    scored_model: nn.Module,
    on_epoch: Callable[[nn.Module, dict[str, float]], bool] | None,
    log: Callable[[str], None],
) -> bool:
    """Save `scored_model` as model.safetensors if its validation accuracy is the best yet (after every epoch,
    without a split); True if training stops here (early stopping's patience ran out, or on_epoch said so)."""
    if "val_accuracy" not in row or row["val_accuracy"] > state["best_val_accuracy"]:
        state["best_val_accuracy"] = row.get("val_accuracy", -1.0)
        state["bad_epochs"] = 0
        save_model(
            out_dir / "model.safetensors",
            scored_model,
            {"recipe": recipe, "config": config.to_dict(), "partial": True},
        )
    else:
        state["bad_epochs"] += 1
    stop = False
    if config.early_stopping_patience and state["bad_epochs"] >= config.early_stopping_patience:
        log(f"early stopping: no better validation accuracy for {state['bad_epochs']} epochs")
        stop = True
    if on_epoch is not None and on_epoch(scored_model, row):
        stop = True
    return stop


def _test_and_write(
    model: nn.Module,
    data: MNIST,
    config: TrainConfig,
    recipe: str,
    state: dict[str, Any],
    out_dir: Path,
    *,
    device: torch.device,
    steps: int,
    steps_per_epoch: int,
    evaluate_only: bool,
    report: bool,
    more_metrics: Callable[[nn.Module], dict[str, Any]] | None,
    extra_metadata: dict[str, Any] | None,
) -> dict[str, Any]:
    """Load the best checkpoint into `model`, evaluate it on the test set, write model.safetensors (with its
    metrics), metrics.json and, with `report`, the report; returns the metrics."""
    if evaluate_only:  # killed after the last checkpoint said finished, history.json may lack the last epoch
        atomic_write_json(out_dir / "history.json", state["history"])
    best, best_meta = load_tensors(out_dir / "model.safetensors")
    try:
        model.load_state_dict(best)
    except (KeyError, TypeError, ValueError, RuntimeError):  # copied in, or replaced by an ensemble
        raise CheckpointError(
            f"{out_dir / 'model.safetensors'} is not this run's {config.arch} model (another model was put in "
            f"its place); put the run's own back, or train again with --overwrite."
        ) from None
    eval_start = time.perf_counter()
    test_logits = recipe_logits(model, data.test_images.to(device), config)
    test_loss, test_accuracy = loss_and_accuracy(test_logits, data.test_labels)
    metrics = {
        "test_accuracy": test_accuracy,
        "test_loss": test_loss,
        "val_accuracy": state["best_val_accuracy"] if config.val_size else None,
        "params": count_parameters(model),
        "train_seconds": round(state["train_seconds"], 3),
        "eval_seconds": round(time.perf_counter() - eval_start, 3),
        # as trained and as the epoch lines say: 0.85 for fast
        "epochs": float(_epochs(steps, steps_per_epoch)),
        "steps": steps,
        "device": str(device),
        "world_size": distributed.world_size(),
        "threads": torch.get_num_threads(),  # intra-op threads per process: a float sum's order depends on it
        "bfloat16": config.amp and native_bfloat16(device.type),  # autocast as it ran (see native_bfloat16)
        "dry_run": state["dry_run"],  # trained on the first DRY_RUN_BATCHES batches only (--dry-run)
    }
    if evaluate_only and "metrics" in best_meta:
        # a finished run evaluated again (`--resume` of a finished run, perhaps with another --threads or
        # --device): the run as it trained, which the model card's command reproduces, not this evaluation
        trained = best_meta["metrics"]
        metrics |= {k: trained[k] for k in ("device", "world_size", "threads", "bfloat16") if k in trained}
    if more_metrics is not None:
        metrics |= more_metrics(model)
    model.cpu()  # saved and reported from the CPU, whatever it trained on (the report scores it with CPU labels)
    if not (evaluate_only and "metrics" in best_meta):
        # A finished run that is only evaluated again keeps its checkpoint as it is: same weights, and a
        # calibration `digitrec calibrate` wrote into it stays (unless the run stopped before writing it).
        save_model(
            out_dir / "model.safetensors",
            model,
            model_metadata(config, recipe, model, data, metrics) | (extra_metadata or {}),
        )
    atomic_write_json(out_dir / "metrics.json", metrics)
    if report:
        write_report(
            out_dir,
            model,
            data,
            history=state["history"],
            config=config,
            logits=test_logits.cpu(),
            robustness_images=DRY_RUN_ROBUSTNESS_IMAGES if state["dry_run"] else None,
        )
    return metrics


def _row_owed(state: dict[str, Any], step: int) -> bool:
    """Whether the history lacks the row of the epoch that ended at `step`."""
    history = state["history"]
    return not history or int(history[-1].get("step", 0)) < step


def _quiet(message: str) -> None:
    """The log of ranks other than 0."""


def _epochs(step: int, steps_per_epoch: int) -> str:
    """Epochs done at `step`, as the epoch lines count them: whole numbers, or two decimals for a run that ends
    in part of an epoch (`fast`: "epoch 0.85/0.85", not "1/1"), more where two would round it to a whole one."""
    whole, rest = divmod(step, steps_per_epoch)
    if rest == 0:
        return str(whole)
    for decimals in (2, 4, 6, 8):
        text = f"{step / steps_per_epoch:.{decimals}f}"
        if float(text) not in (whole, whole + 1):
            break
    return text.rstrip("0")


def _epoch_line(row: dict[str, float], done: str, total: str) -> str:
    text = f"epoch {done:>3}/{total}  train loss {row['train_loss']:.4f} acc {row['train_accuracy']:.2%}"
    if "val_accuracy" in row:
        text += f"  val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.2%}"
    return text + f"  lr {row['lr']:.2e}  {row['seconds']:.1f} s"


def _progress(steps: range, done: str, total: str):
    from tqdm.auto import tqdm

    return tqdm(
        total=len(steps),
        desc=f"epoch {done}/{total}",
        leave=False,
        unit="batch",
        dynamic_ncols=True,
    )


def _tensorboard_writer(out_dir: Path):
    """The run's TensorBoard writer; train() has checked the extra is installed before it touched the folder."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out_dir / "tensorboard"))


def weights_are_finite(model: nn.Module) -> bool:
    """Do the model's floating-point weights and buffers hold finite numbers only? Their total norm, in fused
    calls and one host sync (about 0.1 ms for `fast`), is finite if they are; a norm that is not is looked at
    closely, since the norm of huge finite weights overflows too."""
    tensors = [t.detach() for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    if not tensors or bool(torch.nn.utils.get_total_norm(tensors).isfinite()):
        return True
    return all(bool(t.isfinite().all()) for t in tensors)


def divergence_sentence(
    epoch: int, first_step: int, last_step: int, loss: float, lr_flag: str, checkpoint: str | None
) -> str:
    """What a run that diverged says: where (steps `first_step` to `last_step`, counted from 1, lie after the
    last check that found the loss finite), what (a non-finite loss, or weights with a finite loss), what to do."""
    where = (
        f"at step {last_step}" if first_step == last_step else f"between steps {first_step} and {last_step}"
    )
    what = f"the loss is {loss}" if not math.isfinite(loss) else "the weights are no longer finite numbers"
    again = f"train again with --overwrite ({checkpoint})" if checkpoint is not None else "train again"
    return f"training diverged in epoch {epoch}, {where}: {what}; lower the learning rate ({lr_flag}) and {again}."


def load_history(out_dir: str | Path) -> list[dict[str, float]]:
    """The run's per-epoch history.json; [] when there is none, a sentence when it is not one `train` wrote."""
    path = Path(out_dir) / "history.json"
    if not path.exists():
        return []
    try:
        history = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise DigitrecError(f"cannot read {path} ({exc}); it was changed or damaged.") from None
    if not isinstance(history, list) or not all(_history_row(row) for row in history):
        raise DigitrecError(
            f"{path} is not the list of epochs `digitrec train` writes; it was changed or damaged."
        )
    return history


def _history_row(row: Any) -> bool:
    """Is `row` an epoch as train writes it: a number for each of the curves' keys (val ones may be missing)?"""
    if not isinstance(row, dict):
        return False
    number = (int, float)
    needed = all(isinstance(row.get(key), number) for key in ("epoch", "train_loss", "train_accuracy"))
    others = ("val_loss", "val_accuracy", "lr", "seconds")
    return needed and all(isinstance(row.get(key, 0), number) or row.get(key) is None for key in others)
