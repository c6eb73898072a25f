"""Commands import only what they use, so they start fast (a test of imports, not of timing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

HEAVY = ("torch", "scipy", "matplotlib", "onnxruntime", "pandas", "fastapi")


def modules_after(*argv: str) -> dict[str, bool]:
    """Run `digitrec ARGV` in a fresh interpreter; which of HEAVY it imported."""
    code = (
        "import contextlib, io, json, sys\n"
        "from digitrec.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    code = main({list(argv)!r})\n"
        f"print(json.dumps([code, {{m: m in sys.modules for m in {HEAVY!r}}}]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    status, imported = json.loads(done.stdout.splitlines()[-1])
    assert status == 0
    return imported


@pytest.mark.parametrize("command", ["predict", "read"])
def test_reading_with_the_bundled_model_imports_neither_torch_nor_matplotlib(command: str, tmp_path: Path):
    image = np.full((60, 40), 255, np.uint8)
    image[10:50, 18:23] = 0  # a "1"
    Image.fromarray(image).save(tmp_path / "one.png")
    imported = modules_after(command, str(tmp_path / "one.png"))
    # scipy stays: preprocessing's filters and connected components need it
    assert not imported["torch"] and not imported["matplotlib"] and not imported["onnxruntime"]


def test_listing_commands_import_nothing_heavy():
    for argv in (["recipes"], ["recipes", "--json"]):
        assert not any(modules_after(*argv).values()), argv


def test_help_imports_nothing_heavy():
    code = (
        "import sys\n"
        "from digitrec.cli import build_parser\n"
        "build_parser()\n"
        f"print([m for m in sys.modules if m.split('.')[0] in {HEAVY!r}])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_the_servers_image_workers_import_no_web_framework(tmp_path: Path):
    """Each `serve` worker process imports the module of what it runs: that was server.py, which brought FastAPI
    and pydantic into every worker (30 MB and 0.3 s of start-up each) for code that needs none of them."""
    image = np.full((60, 40), 255, np.uint8)
    image[10:50, 18:23] = 0  # a "1"
    Image.fromarray(image).save(tmp_path / "one.png")
    code = (
        "import os, sys\n"
        "from digitrec.imageworkers import _start_worker, to_model_inputs\n"
        "_start_worker(os.getppid())\n"  # what each worker runs as it starts, then an upload as a worker reads it
        f"[out] = to_model_inputs([open({str(tmp_path / 'one.png')!r}, 'rb').read()])\n"
        "assert out.shape == (28, 28), out\n"
        "print([m for m in ('fastapi', 'pydantic', 'starlette', 'uvicorn', 'torch') if m in sys.modules])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_servers_image_workers_run_one_blas_thread_each():
    """There is one worker per core: OpenBLAS's thread per core in each of them spun against the others, and a
    read of a number cost 180 ms of CPU instead of 37 (digitrec serve, 2 cores, 2 reading workers)."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("with one core OpenBLAS starts one thread anyway: nothing to check")
    code = (
        "import os\n"
        "from threadpoolctl import threadpool_info\n"
        "from digitrec.imageworkers import _start_worker\n"
        "_start_worker(os.getppid())\n"
        "print(sorted({pool['num_threads'] for pool in threadpool_info()}))\n"
    )
    # the environment `digitrec serve` starts in, with no thread counts set
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[1]"
