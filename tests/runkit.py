"""Run `digitrec.training.train()` on the tests' synthetic data in a child process (for torchrun and kill -9 tests).

Usage: python tests/runkit.py '{"config": {...}, "out": "DIR", "resume": false, "train_images": 1200}'
(or the same under `python -m torch.distributed.run ...`). It prints the run's metrics as JSON on rank 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import make_images

from digitrec.config import TrainConfig
from digitrec.data import MNIST
from digitrec.errors import DigitrecError
from digitrec.training import train

HERE = Path(__file__).resolve().parent


def synthetic_mnist(train_count: int = 1200, test_count: int = 300) -> MNIST:
    train_images, train_labels = make_images(train_count, seed=1)
    test_images, test_labels = make_images(test_count, seed=2)
    return MNIST(
        train_images, train_labels, test_images, test_labels, source="synthetic", checksum="synthetic"
    )


def command(spec: dict, nproc: int = 0) -> list[str]:
    """The command line that runs `spec`, under torchrun with `nproc` processes when nproc > 0."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc else []
    return [sys.executable, *launcher, str(HERE / "runkit.py"), json.dumps(spec)]


def child_env() -> dict[str, str]:
    """One thread per process: 2 shared cores, and results that do not depend on the thread count."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run(spec: dict, nproc: int = 0, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        command(spec, nproc), env=child_env(), capture_output=True, text=True, timeout=timeout
    )


def main(spec: dict) -> None:
    config = TrainConfig().override(**spec.get("config", {}))
    try:
        result = train(
            config,
            spec["out"],
            recipe="synthetic",
            data=synthetic_mnist(spec.get("train_images", 1200)),
            resume=spec.get("resume", False),
            progress=False,
            report=False,
        )
    except DigitrecError as exc:  # as the CLI says it (cli.main): one sentence, rank 0's only when quiet
        if not getattr(exc, "quiet", False):
            print(f"digitrec: error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    if result.metrics:
        print("METRICS " + json.dumps(result.metrics), flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
