"""Train every recipe at full length and print the README results table (markdown) from the runs' metrics.

    python benchmarks/results.py [--recipes a,b] [--runs-dir runs/results] [--retrain]

A recipe whose run folder already holds metrics.json is not trained again unless --retrain is given.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from digitrec.config import RECIPES
from digitrec.data import load_mnist
from digitrec.training import train


def table(runs_dir: Path, recipes: list[str]) -> str:
    lines = [
        "| recipe | source | reported | digitrec test accuracy | params | epochs | train seconds |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name in recipes:
        config = RECIPES[name]
        metrics_path = runs_dir / name / "metrics.json"
        if not metrics_path.exists():
            continue
        m = json.loads(metrics_path.read_text())
        own = config.source == "digitrec"  # our recipes report what we measured, not a source document
        reported = f"{config.reported_accuracy:.2%}" if config.reported_accuracy and not own else "—"
        source = config.source.split(":")[0]
        lines.append(
            f"| `{name}` | {source} | {reported} | **{m['test_accuracy']:.2%}** | {m['params']:,} | "
            f"{m['epochs']:g} | {m['train_seconds']:.1f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default=",".join(r for r in RECIPES if r not in ("robust", "best")))
    parser.add_argument("--runs-dir", default="runs/results")
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--table-only", action="store_true", help="print the table from existing runs")
    args = parser.parse_args()
    runs_dir = Path(args.runs_dir)
    recipes = args.recipes.split(",")
    if not args.table_only:
        data = load_mnist(log=lambda msg: print(msg, file=sys.stderr))
        for name in recipes:
            if (runs_dir / name / "metrics.json").exists() and not args.retrain:
                continue
            print(f"== {name}", file=sys.stderr, flush=True)
            train(
                RECIPES[name],
                runs_dir / name,
                recipe=name,
                data=data,
                progress=False,
                log=lambda msg: print(msg, file=sys.stderr, flush=True),
            )
    print(table(runs_dir, recipes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
