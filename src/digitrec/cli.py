"""The `digitrec` command line: parses arguments and calls the modules; `digitrec COMMAND --help` is the manual."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import DigitrecError


def _model_path(value: str | None) -> Path | None:
    """Accept a run folder or a .safetensors file for MODEL arguments."""
    if value is None:
        return None
    path = Path(value)
    return path / "model.safetensors" if path.is_dir() else path


# ---------------------------------------------------------------- data, models, recipes


def cmd_data(args: argparse.Namespace) -> int:
    from .data import load_mnist

    data = load_mnist(args.data_dir, log=lambda msg: print(msg, file=sys.stderr))
    print(f"MNIST verified (MD5 of every decompressed file) from {data.source}")
    print(f"  train {tuple(data.train_images.shape)}  test {tuple(data.test_images.shape)}  checksum {data.checksum}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models import MODELS, count_parameters, create_model

    rows = [(name, count_parameters(create_model(name)), (build.__doc__ or "").strip().splitlines()[0]) for name, build in MODELS.items()]
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
    print(f"{'recipe':<18} {'arch':<20} {'optimizer':<9} {'schedule':<20} {'epochs':>6} {'batch':>5} {'normalize':<15} {'augment':<9} reported")
    for name, c in RECIPES.items():
        reported = f"{c.reported_accuracy:.2%}" if c.reported_accuracy else "-"
        norm = f"({c.normalize[0]:g}, {c.normalize[1]:g})"
        print(f"{name:<18} {c.arch:<20} {c.optimizer:<9} {c.schedule:<20} {c.epochs:>6g} {c.batch_size:>5} {norm:<15} {c.augment:<9} {reported}")
    return 0


# ---------------------------------------------------------------- train, evaluate

TRAIN_OVERRIDES = ("epochs", "batch_size", "lr", "seed", "device", "optimizer", "schedule", "weight_decay",
                   "label_smoothing", "augment", "val_size", "early_stopping_patience", "checkpoint_every_steps", "threads")


def training_config(args: argparse.Namespace):
    """The recipe, then the TOML file, then the flags: later ones win."""
    from .config import get_recipe, load_toml

    values = load_toml(args.config) if args.config else {}
    recipe = values.pop("recipe", None) or args.recipe or "default"
    config = get_recipe(recipe).override(**values)
    flags = {key: getattr(args, key) for key in TRAIN_OVERRIDES}
    if args.amp is not None:
        flags["amp"] = args.amp
    if args.compile:
        flags["compile"] = True
    return recipe, config.override(**flags)


def cmd_train(args: argparse.Namespace) -> int:
    if getattr(args, "nproc", None):
        from .distributed import launch

        return launch(args)
    from .config import TrainConfig
    from .data import load_mnist
    from .train import train

    if args.resume:
        recipe, config, out = "resume", TrainConfig(), Path(args.resume)
    else:
        recipe, config = training_config(args)
        out = Path(args.out or f"runs/{recipe}-{time.strftime('%Y%m%d-%H%M%S')}")
    data = load_mnist(args.data_dir, log=lambda msg: print(msg, file=sys.stderr))
    run = train(config, out, recipe=recipe, data=data, resume=bool(args.resume), dry_run=args.dry_run,
                progress=not args.no_progress and sys.stderr.isatty(), tensorboard=args.tensorboard)
    if not run.metrics:  # a rank other than 0 of a distributed run: rank 0 prints the result
        return 0
    m = run.metrics
    print(f"test accuracy {m['test_accuracy']:.2%}  test loss {m['test_loss']:.4f}  "
          f"params {m['params']:,}  train {m['train_seconds']:.1f} s")
    print(f"model: {run.model_path}\nreport: {run.out_dir / 'report.html'}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .checkpoint import load_model
    from .config import TrainConfig
    from .data import load_mnist
    from .evaluate import evaluate_model, write_report

    model, meta = load_model(_model_path(args.model))
    config = TrainConfig.from_dict(meta.get("config", {}))
    data = load_mnist(args.data_dir, log=lambda msg: print(msg, file=sys.stderr))
    if args.report:
        metrics = write_report(args.report, model, data, config=config, title=f"digitrec evaluate {args.model}",
                               log=lambda msg: print(msg, file=sys.stderr))
    else:
        metrics, _ = evaluate_model(model, data, config)
    if args.json:
        print(json.dumps(metrics, indent=2))
        return 0
    print(f"test accuracy {metrics['test_accuracy']:.2%}  ({metrics['errors']} errors of {metrics['count']})  "
          f"test loss {metrics['test_loss']:.4f}  ECE {metrics['ece']:.4f}")
    print("digit  precision  recall      F1  support")
    for c in metrics["per_class"]:
        print(f"{c['digit']:>5}  {c['precision']:>9.4f}  {c['recall']:>6.4f}  {c['f1']:>6.4f}  {c['support']:>7}")
    print("confusion matrix (rows: true, columns: predicted)")
    for digit, row in enumerate(metrics["confusion"]):
        print(f"{digit:>3} " + " ".join(f"{v:>5}" for v in row))
    print("most confident mistakes (test index: true -> predicted, confidence)")
    for m in metrics["mistakes"][:10]:
        print(f"  #{m['index']:<5} {m['label']} -> {m['predicted']}  {m['confidence']:.1%}")
    return 0


# ---------------------------------------------------------------- web app, corrections, fine-tuning


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import serve

    serve(_model_path(args.model), host=args.host, port=args.port, feedback_db=args.feedback_db,
          access_log=args.access_log)
    return 0


def cmd_feedback_export(args: argparse.Namespace) -> int:
    from .feedback import FeedbackStore, export_idx, export_png

    store = FeedbackStore(args.feedback_db)
    if args.format == "idx":
        images, labels = export_idx(store, args.out)
        print(f"{store.count()} corrections from {store.path}\n  {images}\n  {labels}")
    else:
        count = export_png(store, args.out, originals=args.originals)
        print(f"{count} corrections from {store.path} -> {args.out}/<label>/<id>.png")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from .data import load_mnist
    from .feedback import finetune

    out = Path(args.out or f"runs/finetune-{time.strftime('%Y%m%d-%H%M%S')}")
    data = load_mnist(args.data_dir, log=lambda msg: print(msg, file=sys.stderr))
    run = finetune(_model_path(args.model), args.feedback, out, data=data, epochs=args.epochs, lr_scale=args.lr_scale,
                   repeat=args.repeat, progress=not args.no_progress and sys.stderr.isatty(), report=not args.no_report)
    m = run.metrics
    print(f"fine-tuned on MNIST + {m['feedback_corrections']} corrections: test accuracy {m['test_accuracy']:.2%}, "
          f"corrections now read right {m['feedback_accuracy']:.0%} (before {m['feedback_accuracy_before']:.0%})")
    print(f"model: {run.model_path}\nserve it: digitrec serve --model {run.model_path}")
    return 0


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="digitrec", description="Learn to read handwritten digits on MNIST, then read them for real.")
    parser.add_argument("--version", action="version", version=f"digitrec {__import__('digitrec').__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("data", help="find or download MNIST and verify it")
    p.add_argument("--data-dir", help="folder holding the four MNIST IDX files (.gz or raw)")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("models", help="list the registered architectures with parameter counts")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("recipes", help="list the named training recipes")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_recipes)

    p = sub.add_parser("train", help="train a recipe and write a run folder (model, history, metrics, plots, report)")
    p.add_argument("--recipe", help="named recipe (see `digitrec recipes`); default: default")
    p.add_argument("--config", help="TOML file of config overrides (may set `recipe`)")
    p.add_argument("--epochs", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="initial (or peak, for onecycle) learning rate")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--optimizer", choices=["sgd", "adam", "adamw"])
    p.add_argument("--schedule", choices=["constant", "step", "step_at_epoch_start", "cosine", "onecycle"])
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--label-smoothing", type=float)
    p.add_argument("--augment", choices=["none", "rotate10", "affine", "robust"])
    p.add_argument("--val-size", type=int, help="images held out of train for validation (default 5000)")
    p.add_argument("--early-stopping-patience", type=int, help="epochs without validation improvement before stopping")
    p.add_argument("--checkpoint-every-steps", type=int, help="also save last.safetensors every N steps")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bfloat16 autocast")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--out", help="run folder (default runs/<recipe>-<timestamp>)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    p.add_argument("--dry-run", action="store_true", help="a few batches end to end, for a quick check")
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard scalars")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="train with N processes on this machine (launches torchrun; see README, Scaling out)")
    p.add_argument("--data-dir")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="test-set metrics of a trained model")
    p.add_argument("model", help="a run folder or model.safetensors")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--report", metavar="DIR", help="also write plots and report.html into DIR")
    p.add_argument("--data-dir")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("serve", help="the web page and REST API (FastAPI on uvicorn); docs at /docs")
    p.add_argument("--model", help="a run folder or model.safetensors (default: the bundled model)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1; 0.0.0.0 for your network)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--feedback-db", help="SQLite file for corrections (default ~/.local/share/digitrec/feedback.sqlite)")
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("feedback", help="corrections users sent from the web page")
    feedback_sub = p.add_subparsers(dest="feedback_command", required=True, metavar="ACTION")
    q = feedback_sub.add_parser("export", help="write the corrections as MNIST IDX files or a PNG folder per label")
    q.add_argument("--feedback-db", help="SQLite file (default ~/.local/share/digitrec/feedback.sqlite)")
    q.add_argument("--format", choices=["idx", "png"], default="idx")
    q.add_argument("--out", default="feedback-export", help="output folder (default feedback-export)")
    q.add_argument("--originals", action="store_true", help="png: also write the images as users sent them")
    q.set_defaults(func=cmd_feedback_export)

    p = sub.add_parser("finetune", help="fine-tune a model on MNIST plus the corrections; writes a new run folder")
    p.add_argument("--model", required=True, help="the run folder or model.safetensors to start from")
    p.add_argument("--feedback", help="SQLite file of corrections (default ~/.local/share/digitrec/feedback.sqlite)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over MNIST + corrections (default 1)")
    p.add_argument("--lr-scale", type=float, default=0.1, help="learning rate as a fraction of the model's recipe (default 0.1)")
    p.add_argument("--repeat", type=int, default=20, help="times each correction is shown per epoch (default 20)")
    p.add_argument("--out", help="run folder (default runs/finetune-<timestamp>)")
    p.add_argument("--no-report", action="store_true", help="skip the plots and report.html")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--data-dir")
    p.set_defaults(func=cmd_finetune)

    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # `train --nproc` relaunches this command line
    try:
        return args.func(args)
    except DigitrecError as exc:
        print(f"digitrec: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("digitrec: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
