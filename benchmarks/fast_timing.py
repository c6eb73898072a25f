"""`digitrec train --recipe fast` as a user runs it, seed after seed, round after round: seconds and accuracy.

    python benchmarks/fast_timing.py                           # seeds 0-4, three rounds, in runs/fast-timing
    python benchmarks/fast_timing.py --seeds 0,1 --rounds 5 --recipe default --runs-dir /tmp/timing
    python benchmarks/fast_timing.py --variant "" --variant "--epochs 0.85"   # two settings side by side
    python benchmarks/fast_timing.py --variant "" --variant=--no-amp          # one flag alone needs the `=`

Every run is a whole `digitrec train` process (import, data, training, test evaluation, report). The rounds
interleave the seeds (0, 1, ..., 4, then 0, 1, ... again), so a slow minute of a shared machine falls on
several seeds instead of all rounds of one. For each seed it prints the test accuracy (the same in every round:
runs are deterministic), training plus final evaluation as metrics.json records them, and the process's wall
time, every round and the median. Each `--variant` adds flags to `digitrec train` (the empty one is the
recipe as it is); variants alternate run by run, so they are timed side by side on the same minutes of the
machine. The figures are the machine's; nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGET_SECONDS = {"fast": 1.2, "default": 10.0}  # issue 7: training plus final evaluation


def run_once(recipe: str, seed: int, out: Path, extra: list[str]) -> dict[str, float]:
    """One `digitrec train` process: its metrics.json figures and its wall time."""
    command = [sys.executable, "-m", "digitrec", "train", "--recipe", recipe, "--seed", str(seed), *extra]
    start = time.perf_counter()
    if subprocess.run([*command, "--out", str(out)], stdout=subprocess.DEVNULL).returncode:
        sys.exit(f"fast_timing.py: `digitrec {' '.join(command[3:])}` failed, as it says above")
    wall = time.perf_counter() - start
    metrics = json.loads((out / "metrics.json").read_text())
    return {
        "test_accuracy": metrics["test_accuracy"],
        "train_eval": metrics["train_seconds"] + metrics["eval_seconds"],
        "wall": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="fast")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--runs-dir", default="runs/fast-timing")
    parser.add_argument(
        "--budget",
        type=float,
        help="seconds of training + evaluation to count runs against (default: issue 7's target for the "
        "recipe, 1.2 for fast and 10 for default; none for other recipes)",
    )
    parser.add_argument(
        "--variant",
        action="append",
        help='flags added to `digitrec train`, e.g. "--epochs 0.85"; repeat to compare settings side by side',
    )
    args = parser.parse_args()
    if args.budget is None:
        args.budget = TARGET_SECONDS.get(args.recipe)
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = args.variant or [""]
    # by the variant's place, not its text: the same variant twice (an A/A check of the machine's noise) is two
    runs: list[dict[int, list[dict[str, float]]]] = [{seed: [] for seed in seeds} for _ in variants]
    for round_ in range(args.rounds):
        for seed in seeds:
            for number, variant in enumerate(variants):
                out = Path(args.runs_dir) / f"variant{number}-seed{seed}-round{round_}"
                result = run_once(args.recipe, seed, out, shlex.split(variant))
                runs[number][seed].append(result)
                print(
                    f"round {round_} seed {seed} {variant or args.recipe}: {result['test_accuracy']:.2%}  "
                    f"train+eval {result['train_eval']:.3f} s  process {result['wall']:.2f} s",
                    flush=True,
                )
    for number, (variant, by_seed) in enumerate(zip(variants, runs)):
        repeated = f" (variant {number + 1})" if variants.count(variant) > 1 else ""
        summarize(
            f"{args.recipe} {variant}".strip() + repeated, by_seed, args.rounds, args.seeds, args.budget
        )


def summarize(
    name: str, runs: dict[int, list[dict[str, float]]], rounds: int, seeds: str, budget: float | None
) -> None:
    """One variant's table: accuracy, training + evaluation and whole-process seconds per seed."""

    def cells(values: list[float], digits: int) -> str:
        return (
            " / ".join(f"{v:.{digits}f}" for v in values)
            + f" (median {statistics.median(values):.{digits}f})"
        )

    print(f"\n{name}: {rounds} rounds over seeds {seeds}")
    print("| seed | test accuracy | training + evaluation, s | whole process, s |\n|---:|---:|---|---|")
    for seed, results in runs.items():
        accuracies = sorted({round(r["test_accuracy"], 6) for r in results})
        print(
            f"| {seed} | {' / '.join(f'{a:.2%}' for a in accuracies)} "
            f"| {cells([r['train_eval'] for r in results], 3)} | {cells([r['wall'] for r in results], 2)} |"
        )
    every = [r for results in runs.values() for r in results]
    medians = [statistics.median(r["train_eval"] for r in results) for results in runs.values()]
    within = (
        f"runs at or under {budget} s: {sum(r['train_eval'] <= budget for r in every)} of {len(every)}; "
        if budget is not None
        else ""
    )
    print(
        f"\nper-seed medians of training + evaluation: highest {max(medians):.3f} s; {within}"
        f"whole process: median {statistics.median(r['wall'] for r in every):.2f} s, "
        f"highest {max(r['wall'] for r in every):.2f} s"
    )


if __name__ == "__main__":
    main()
