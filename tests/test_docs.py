"""The tutorial's commands: every one parses as written; the slow test runs them all, in order, on tiny data."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from digitrec.cli import build_parser, main
from digitrec.config import RECIPES

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = [DOCS / "index.md", *sorted((DOCS / "tutorial").glob("*.md"))]
# Small settings: later flags override earlier ones, so these shrink each command without editing it.
SMALL = {
    "train": ["--epochs", "1", "--val-size", "100", "--no-progress"],
    "tune": ["--trials", "2", "--epochs", "1", "--val-size", "100"],
    "robustness": ["--limit", "50"],
    "explore": ["--samples", "100"],
    "eval-real": ["--count", "2"],
}
NOT_RUN = {"serve"}  # blocks until stopped; tests/test_server.py covers it


def commands() -> list[list[str]]:
    """Every `digitrec ...` line inside a ```bash block of the tutorial, in reading order."""
    found = []
    for page in PAGES:
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
            for line in block.splitlines():
                line = line.split("  #")[0].strip()
                if line.startswith("digitrec "):
                    found.append(shlex.split(line)[1:])
    return found


def test_the_tutorial_has_commands_and_every_one_parses():
    found = commands()
    assert len(found) >= 15
    parser = build_parser()
    for argv in found:
        args = parser.parse_args(argv)
        if getattr(args, "recipe", None):
            assert args.recipe in RECIPES, argv
    assert {"train", "robustness", "tune", "explore", "predict", "serve"} <= {argv[0] for argv in found}


def test_every_figure_the_tutorial_shows_is_written_by_one_of_its_commands():
    written = " ".join(" ".join(argv) for argv in commands())
    for page in PAGES:
        for image in re.findall(r"!\[[^]]*\]\(\.\./images/([^)]+)\)", page.read_text()):
            folder, name = str(Path("docs/images") / image).rsplit("/", 1)
            assert f"--out {folder}" in written, image


@pytest.mark.slow
def test_every_tutorial_command_runs(idx_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("DIGITREC_DATA", str(idx_folder))
    monkeypatch.chdir(tmp_path)
    for argv in commands():
        if argv[0] in NOT_RUN:
            continue
        assert main([*argv, *SMALL.get(argv[0], [])]) == 0, argv
