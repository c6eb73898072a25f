"""Training on several processes or machines under torchrun: the process group, rank helpers, DDP, `--nproc`.

A run started by torchrun (`torchrun --nproc-per-node N -m digitrec train ...`) finds WORLD_SIZE, RANK,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT in its environment; `train()` then joins the process group (gloo on
CPU, NCCL on CUDA) and every rank trains on its share of each batch. Outside torchrun every helper here
answers as for a single process, so the single-process path needs no special cases.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .errors import DigitrecError, need_extra

# Below this many images per rank a batch's own statistics are noisy enough to cost accuracy, so batch norm
# is synchronized across ranks (ImageNet-scale training keeps 32 per GPU unsynchronized).
SYNC_BATCHNORM_BELOW = 32
# How long a rank waits for the others in a collective (rank 0 writes checkpoints and evaluates meanwhile).
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def launched_rank() -> int:
    """This process's global rank before it joins the process group too: torchrun's RANK (0 outside torchrun)."""
    if active():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0")) if launched_by_torchrun() else 0


def launched_world_size() -> int:
    """How many processes train this run, before the process group is joined too: torchrun's WORLD_SIZE."""
    if active():
        return dist.get_world_size()
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def is_main() -> bool:
    """True on rank 0, the only rank that logs and writes files (and in every single-process run)."""
    return rank() == 0


def rank_device(device: torch.device) -> torch.device:
    """The device this rank trains on: its own GPU (LOCAL_RANK) under torchrun, else `device` unchanged."""
    if device.type == "cuda" and launched_by_torchrun():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def init_distributed(device: torch.device) -> bool:
    """Join torchrun's process group if this process was started by torchrun; True if this call created it."""
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise DigitrecError(
            "this PyTorch build has no torch.distributed; install the standard PyTorch wheel to train on several processes."
        )
    if device.type == "mps":
        raise DigitrecError(
            "distributed training does not run on Apple's MPS; use --device cpu with torchrun."
        )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    return True


def shutdown() -> None:
    """Leave the process group together: a rank that tears gloo down while another still holds its connections
    can abort at exit ("terminate called without an active exception"), so every rank waits for the last one."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def prepare_model(
    model: nn.Module, device: torch.device, rank_batch_size: int, log: Callable[[str], None]
) -> nn.Module:
    """Synchronize batch norm when each rank's share of a batch is small (call before building the optimizer)."""
    has_batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    if not active() or not has_batchnorm or rank_batch_size >= SYNC_BATCHNORM_BELOW:
        return model
    if device.type == "cuda":
        log(f"batch norm synchronized across {world_size()} ranks ({rank_batch_size} images per rank)")
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    log(
        f"warning: batch norm sees only {rank_batch_size} images per rank; PyTorch synchronizes it on GPUs only, "
        "so use fewer processes or a larger --batch-size on CPU"
    )
    return model


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel: copies rank 0's weights to every rank now, averages gradients in backward()."""
    if not active():
        return model
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


def _collective_device() -> torch.device:
    """NCCL moves CUDA tensors only; gloo moves CPU tensors."""
    return (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )


def sum_across_ranks(values: list[torch.Tensor | float]) -> list[float]:
    """Sum scalars over all ranks (in float64, so counts stay exact) and return them as Python floats."""
    totals = [float(v) for v in values]
    if not active():
        return totals
    stacked = torch.tensor(totals, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(stacked)
    return stacked.tolist()


def gather_across_ranks(values: list[torch.Tensor | float]) -> list[list[float]]:
    """Each rank's scalars (in float64, so that a float32 sum and a count come back exactly), in rank order."""
    mine = [float(v) for v in values]
    if not active():
        return [mine]
    tensor = torch.tensor(mine, dtype=torch.float64, device=_collective_device())
    gathered = [torch.zeros_like(tensor) for _ in range(world_size())]
    dist.all_gather(gathered, tensor)
    return [t.tolist() for t in gathered]


def broadcast_flag(flag: bool) -> bool:
    """Rank 0's decision (to stop early, say), so that every rank leaves the loop at the same step."""
    if not active():
        return flag
    value = torch.tensor([int(flag)], device=_collective_device())
    dist.broadcast(value, src=0)
    return bool(value.item())


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 over every parameter's name and bytes: equal fingerprints mean bit-identical weights."""
    digest = hashlib.sha256()
    for name, parameter in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(parameter.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_replicas(model: nn.Module) -> str:
    """Compare the weights of every rank; a difference is a bug (DDP keeps replicas bit-identical), so raise."""
    fingerprint = weights_fingerprint(model)
    if active():
        mine = torch.tensor(list(bytes.fromhex(fingerprint)), dtype=torch.uint8, device=_collective_device())
        gathered = [torch.zeros_like(mine) for _ in range(world_size())]
        dist.all_gather(gathered, mine)
        fingerprints = [bytes(t.tolist()).hex() for t in gathered]
        if len(set(fingerprints)) > 1:
            raise RuntimeError(f"DDP replicas diverged: weight fingerprints per rank {fingerprints}")
    return fingerprint


# ---------------------------------------------------------------- digitrec train --nproc N


TORCHRUN = "import sys; from digitrec.distributed import run_torchrun; sys.exit(run_torchrun(sys.argv[1:]))"


def torchrun_command(nproc: int, train_argv: list[str]) -> list[str]:
    """The torchrun command line that runs `digitrec train ARGV` as `nproc` processes on this machine
    (torchrun's own main, through run_torchrun)."""
    return [
        sys.executable,
        "-c",
        TORCHRUN,
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "digitrec",
        *train_argv,
    ]


def without_nproc(argv: list[str]) -> list[str]:
    """`argv` minus `--nproc N` / `--nproc=N`, so that the workers train instead of launching again."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def run_torchrun(argv: list[str]) -> int:
    """torchrun with `argv`, ending with the workers' exit status rather than torchrun's traceback.

    When a worker fails (it has printed its one sentence) torchrun raises ChildFailedError, and on Ctrl-C
    SignalException; uncaught, each printed a traceback of 27 to 43 lines and exited 1."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main

    # LOGLEVEL sets the level of torchrun's loggers made by elastic's get_logger only; the others (a worker's exit
    # status, the SIGTERM sent to the rest) log through torch's handler at WARNING unless their parent says less
    with contextlib.suppress(ValueError):
        logging.getLogger("torch.distributed.elastic").setLevel(os.environ.get("LOGLEVEL", "WARNING").upper())
    try:
        main(argv)
    except ChildFailedError as exc:
        failed_rank, failure = exc.get_first_failure()
        if failure.exitcode > 0:  # the worker said why (its sentence, or its traceback)
            return failure.exitcode
        # killed by a signal (out of memory, say): nothing said it, since torchrun's own log lines are quiet
        print(
            f"digitrec: error: training process {failed_rank} was killed by {failure.signal_name()}; the run "
            f"stopped there{_continued_by(argv)} (see README, Scaling out).",
            file=sys.stderr,
        )
        return 1
    except SignalException as exc:
        return 128 + int(exc.sigval)
    return 0


def _continued_by(argv: list[str]) -> str:
    """ ", and `digitrec train --resume RUN --nproc N` continues it" for the run folder torchrun's `argv` trains in,
    where a checkpoint was written; else ""."""
    from .runfolder import resume_command

    nproc = next((arg.split("=", 1)[1] for arg in argv if arg.startswith("--nproc-per-node=")), "1")
    for flag in ("--out", "--resume"):
        given = [arg.split("=", 1)[1] for arg in argv if arg.startswith(flag + "=")]  # --out=RUN
        given += [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg == flag]  # --out RUN
        for run in map(Path, given):
            if (run / "last.safetensors").exists() and nproc.isdigit():
                return f", and {resume_command(run, int(nproc))} continues it from its last checkpoint"
    return ""


def launch(args: argparse.Namespace) -> int:
    """`digitrec train --nproc N ...`: run the same command under torchrun as N processes; their exit status."""
    if args.nproc < 1:
        raise DigitrecError(f"--nproc must be at least 1, got {args.nproc}.")
    if launched_by_torchrun():
        raise DigitrecError("--nproc starts torchrun itself; drop it when you launch digitrec with torchrun.")
    argv = without_nproc(getattr(args, "argv", None) or sys.argv[1:])
    recipe = _check_before_launch(args)
    env = dict(os.environ)
    # torchrun sets one thread per process when OMP_NUM_THREADS is unset; share the cores out instead.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    # torchrun's own log lines (a worker's exit status, the SIGTERM it sends the others) and c10d's warnings
    # repeat what a worker's sentence said; run_torchrun says what no worker could (one killed by a signal)
    env.setdefault("LOGLEVEL", "CRITICAL")
    env.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    with contextlib.ExitStack() as stack:
        if not args.resume and not args.out:
            # one folder for all ranks, named now rather than by each worker's clock, and made now, so that another
            # run started in the same second picks another name; gone again if the run leaves it empty
            from .folderlock import reserved_out_dir

            argv += ["--out", str(stack.enter_context(reserved_out_dir(recipe)))]
        command = torchrun_command(args.nproc, argv)
        print("running: torchrun " + shlex.join(command[3:]), file=sys.stderr)
        # torchrun in this process's group, as the job's: Ctrl-C, Ctrl-Z, Ctrl-\ and a kill of the group reach it
        process = subprocess.Popen(command, env=env)
        with _passing_on(process):
            return process.wait()


@contextlib.contextmanager
def handling_signals(names: tuple[str, ...], handler: Callable[[int, object], None]) -> Iterator[None]:
    """`handler` for the signals `names` (those this platform has) while the block runs, and the handlers found
    put back after it; nothing is set from a thread other than the main one, which alone may set them."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signums = [getattr(signal, name) for name in names if hasattr(signal, name)]
    before = {signum: signal.signal(signum, handler) for signum in signums}
    try:
        yield
    finally:
        for signum, previous in before.items():
            signal.signal(signum, previous)


def _passing_on(process: subprocess.Popen[bytes]) -> contextlib.AbstractContextManager[None]:
    """While waiting for torchrun: SIGTERM and SIGHUP sent to this process (`kill`, a wrapper's Popen.terminate(), a
    supervisor) go on to torchrun, which stops its workers as Ctrl-C does (resumable), and so does a SIGINT unless
    this process is in its terminal's foreground (Ctrl-C reached torchrun already). SIGTERM and SIGHUP ended this
    process and left torchrun and every worker training, orphaned, writing the run after it "ended"; `kill -INT`
    of this process alone (run with &, or by a script) left it waiting on a run that trained on."""

    import signal

    def pass_on(signum: int, frame: object) -> None:
        if signum == signal.SIGINT and _in_the_terminals_foreground():
            return  # Ctrl-C: the terminal sent it to torchrun too (once is how it stops its workers); its code says it
        with contextlib.suppress(ProcessLookupError):  # torchrun ended meanwhile
            process.send_signal(signum)

    return handling_signals(("SIGINT", "SIGTERM", "SIGHUP"), pass_on)


def _in_the_terminals_foreground() -> bool:
    """Is this process in its terminal's foreground process group, where a SIGINT is most likely Ctrl-C, which the
    terminal sends the whole group, torchrun with it? Not when there is no terminal (a script, a supervisor, a
    job run with &): a SIGINT then came from `kill`, to this process alone."""
    try:
        terminal = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:
        return False
    try:
        return os.tcgetpgrp(terminal) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(terminal)


def _check_before_launch(args: argparse.Namespace) -> str:
    """What would fail in every worker (recipe, flags, device, data, run folder, batch size) fails here, once,
    as one sentence; returns the recipe's name. The data is found (or downloaded) once, before the workers."""
    from . import folderlock, runfolder, training
    from .cli import training_config
    from .data import locate
    from .models import create_model

    if args.resume:
        folderlock.refuse_a_folder_in_use(Path(args.resume))
        _, config, recipe, state = runfolder.read_resume(Path(args.resume))
        runfolder.refuse_another_process_count(Path(args.resume), state, args.nproc)
        runfolder.refuse_finished_without_model(Path(args.resume), state, config, recipe)
        config = config.override(device=args.device)
    else:
        recipe, config = training_config(args)
        if args.out:
            folderlock.refuse_a_folder_in_use(Path(args.out))
        out = Path(args.out) if args.out else None  # None: a new folder of its own
        training.refuse_new_run(config, out, args.dry_run, args.overwrite, finetune=False)
    training.resolve_device(config.device)
    training.check_batch_size(config, create_model(config.arch), args.nproc)
    # what rank 0 alone would refuse once the workers have joined: said here, before they start
    if args.tensorboard:
        need_extra("tensorboard", "--tensorboard")
    out = args.resume or args.out
    if out:
        _check_writable(Path(out))
    _, contents = locate(args.data_dir, log=lambda message: print(message, file=sys.stderr))
    # the labels file's item count (its header: magic, then the count, big-endian), verified by its MD5 above
    training.check_split(int.from_bytes(contents["train_labels"][4:8], "big"), config, args.nproc)
    return recipe


def _check_writable(out: Path) -> None:
    """Refuse a run folder no file can be written into (under /proc, read-only); the folders made for the check
    only go again (the workers make them)."""
    from .runfolder import make_run_folder

    made = [folder for folder in (out, *out.parents) if not folder.exists()]  # the leaf first
    try:
        make_run_folder(out)
    finally:  # refused or not: the folders the check made, and those above it that it had to make
        for folder in made:
            with contextlib.suppress(OSError):
                folder.rmdir()
