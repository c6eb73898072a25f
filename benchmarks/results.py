"""Train every recipe at full length, over several seeds where asked, and print the README results table.

    python benchmarks/results.py [--recipes a,b] [--seeds 0,1,2] [--spread a,b] [--runs-dir runs/results]
                                 [--retrain] [--table-only]

Seed 0 (each recipe's own seed) lives in RUNS/<recipe>; the other seeds of the `--spread` recipes in
RUNS/<recipe>-seed<k>. A run folder that already holds metrics.json is not trained again unless --retrain.
Where a document computes its accuracy its own way (seed 001 averages per-batch accuracies), the table also
gives our figure measured that way, from the saved model, next to the true accuracy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from digitrec.checkpoint import load_model
from digitrec.config import RECIPES
from digitrec.data import MNIST, load_mnist
from digitrec.errors import DigitrecError
from digitrec.evaluate import accuracy_as_reported, predict_logits
from digitrec.training import train

# Recipes short enough to repeat over seeds by default (seed-cnn and seed-cnn-bn take about an hour each here).
SPREAD = "seed-mlp,seed-mlp-bn,seed-mlp-dropout,seed-lenet,fast,default"


def run_dir(runs_dir: Path, name: str, seed: int) -> Path:
    return runs_dir / name if seed == RECIPES[name].seed else runs_dir / f"{name}-seed{seed}"


def check_run(folder: Path, name: str, seed: int) -> None:
    """Stop where a run folder holds another recipe's or seed's run: the table printed its figures as `name`'s."""
    try:
        meta = json.loads((folder / "model.json").read_text())
        found, found_seed = meta["recipe"], meta["config"]["seed"]
    except (OSError, ValueError, KeyError, TypeError):
        sys.exit(
            f"results.py: {folder} holds metrics.json but no readable model.json; move it away or --retrain."
        )
    if (found, found_seed) != (name, seed):
        sys.exit(
            f"results.py: {folder} holds a run of {found} (seed {found_seed}), not {name} (seed {seed}); move it "
            "away or pass --retrain."
        )


def as_reported(folder: Path, data: MNIST, metric: str) -> float:
    """The saved model's test accuracy computed the way its source document computes it."""
    model, meta = load_model(folder / "model.safetensors")
    logits = predict_logits(model, data.test_images, 1000)
    return accuracy_as_reported(logits.argmax(1) == data.test_labels.long(), metric)


def table(runs_dir: Path, recipes: list[str], seeds: dict[str, list[int]], data: MNIST | None = None) -> str:
    lines = [
        "| recipe | source | reported | digitrec test accuracy (seed 0) | over seeds: min / median / max (n) "
        "| params | epochs | train seconds |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in recipes:
        config = RECIPES[name]
        folders = [run_dir(runs_dir, name, s) for s in seeds.get(name, [config.seed])]
        for folder, seed in zip(folders, seeds.get(name, [config.seed])):
            if (folder / "metrics.json").exists():
                check_run(folder, name, seed)
        found = [
            json.loads((f / "metrics.json").read_text()) for f in folders if (f / "metrics.json").exists()
        ]
        if not (runs_dir / name / "metrics.json").exists():
            continue
        m = json.loads((runs_dir / name / "metrics.json").read_text())
        own = config.source == "digitrec"  # our recipes report what we measured, not a source document
        reported = f"{config.reported_accuracy:.2%}" if config.reported_accuracy and not own else "—"
        ours = f"**{m['test_accuracy']:.2%}**"
        spread = "—"
        if len(found) > 1:
            accs = sorted(x["test_accuracy"] for x in found)
            spread = f"{accs[0]:.2%} / {statistics.median(accs):.2%} / {accs[-1]:.2%} ({len(accs)})"
        if config.reported_metric != "accuracy" and data is not None:
            mine = [
                as_reported(f, data, config.reported_metric) for f in folders if (f / "metrics.json").exists()
            ]
            how = f"as the document measures ({config.reported_metric})"
            ours += f"; {how}: {mine[0]:.2%}"
            if len(mine) > 1:
                mine.sort()
                spread += f"; {how}: {mine[0]:.2%} / {statistics.median(mine):.2%} / {mine[-1]:.2%}"
        lines.append(
            f"| `{name}` | {config.source.split(':')[0]} | {reported} | {ours} | {spread} | {m['params']:,} | "
            # metrics.json counts a partly run epoch as a whole one; early stopping can end before config.epochs
            f"{min(m['epochs'], config.epochs):g} | {m['train_seconds']:.1f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default=",".join(r for r in RECIPES if r != "robust"))
    parser.add_argument("--seeds", default="0", help="comma-separated seeds for the --spread recipes")
    parser.add_argument("--spread", default=SPREAD, help="recipes to repeat over --seeds")
    parser.add_argument("--runs-dir", default="runs/results")
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--table-only", action="store_true", help="print the table from existing runs")
    args = parser.parse_args()
    runs_dir = Path(args.runs_dir)
    recipes = args.recipes.split(",")
    unknown = [name for name in recipes if name not in RECIPES]
    if unknown:
        parser.error(f"no recipe named {', '.join(unknown)}; `digitrec recipes` lists them")
    try:
        seed_list = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        parser.error(f"--seeds takes whole numbers separated by commas, got {args.seeds!r}")
    seeds = {name: seed_list for name in args.spread.split(",") if name in recipes}
    try:
        data = load_mnist(log=lambda msg: print(msg, file=sys.stderr))
    except DigitrecError as exc:
        sys.exit(f"results.py: {exc}")
    if not args.table_only:
        for name in recipes:
            for seed in seeds.get(name, [RECIPES[name].seed]):
                out = run_dir(runs_dir, name, seed)
                if (out / "metrics.json").exists() and not args.retrain:
                    check_run(out, name, seed)
                    continue
                print(f"== {name} seed {seed}", file=sys.stderr, flush=True)
                train(
                    RECIPES[name].override(seed=seed),
                    out,
                    recipe=name,
                    data=data,
                    progress=False,
                    log=lambda msg: print(msg, file=sys.stderr, flush=True),
                    overwrite=True,  # a run this script left unfinished is trained again from the start
                )
    with torch.no_grad():
        print(table(runs_dir, recipes, seeds, data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
