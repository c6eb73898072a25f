"""The tutorial's commands and figures, and README's command-line reference.

Every `digitrec` command in a ```bash block parses as written; the slow test runs them all, in reading order,
on tiny data. Every figure is a small PNG under docs/images, and the line after it names the digitrec command
that made it ("Made by `digitrec ...`"). README's *Command line* section names every option of every command,
and no page names an option that its command lacks; docs/api.md names every public name and field.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

from digitrec.cli import build_parser, main
from digitrec.config import RECIPES

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [DOCS / "index.md", *sorted((DOCS / "tutorial").glob("*.md"))]
README = ROOT / "README.md"
# The pages that tell a user what to type today (performance.md, realworld.md and the like keep history too).
USER_PAGES = [README, ROOT / "DEVELOPERS.md", DOCS / "api.md", *PAGES]
# Small settings: later flags override earlier ones, so these shrink each command without editing it.
SMALL = {
    "train": ["--epochs", "1", "--val-size", "100", "--no-progress"],
    "tune": ["--trials", "2", "--epochs", "1", "--val-size", "100"],
    "robustness": ["--limit", "50"],
    "explore": ["--samples", "100"],
    "eval-real": ["--count", "2"],
    "finetune": ["--repeat", "2", "--no-report", "--no-progress"],
    "calibrate": ["--count", "20"],
}
NOT_RUN = {"serve"}  # blocks until stopped; tests/test_server.py covers it
FIGURE = re.compile(r"^!\[[^]]*\]\(\.\./images/([^)]+)\)", flags=re.M)
MADE_BY = re.compile(r"Made by `(digitrec [^`]+)`")
OUTPUT_FLAGS = ("out", "report", "show_steps")  # where a command writes its figures
MAX_FIGURE_BYTES = 300_000
MAX_IMAGES_BYTES = 3_000_000


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


def figures() -> list[tuple[str, str, str]]:
    """(page name, image path relative to docs/images, the text from the image to the next figure or heading)."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for match in FIGURE.finditer(text):
            after = text[match.end() :]
            stop = re.search(r"^(!\[|#)", after, flags=re.M)
            found.append((page.name, match.group(1), after[: stop.start() if stop else len(after)]))
    return found


def output_folders(argv: list[str]) -> set[str]:
    args = build_parser().parse_args(argv)
    return {str(Path(getattr(args, flag))) for flag in OUTPUT_FLAGS if getattr(args, flag, None)}


def test_the_tutorial_has_commands_and_every_one_parses():
    found = commands()
    assert len(found) >= 15
    parser = build_parser()
    for argv in found:
        args = parser.parse_args(argv)
        if getattr(args, "recipe", None):
            assert args.recipe in RECIPES, argv
    assert {"train", "robustness", "tune", "explore", "predict", "serve"} <= {argv[0] for argv in found}


def test_every_figure_exists_and_is_small():
    shown = figures()
    assert len(shown) >= 10
    for page, image, _ in shown:
        path = DOCS / "images" / image
        assert path.is_file(), f"{page}: {image} is missing"
        assert path.stat().st_size < MAX_FIGURE_BYTES, f"{image}: {path.stat().st_size:,} bytes"
    total = sum(p.stat().st_size for p in (DOCS / "images").rglob("*") if p.is_file())
    assert total < MAX_IMAGES_BYTES, f"docs/images holds {total:,} bytes"


def test_every_figure_names_the_command_that_made_it():
    """The text after a figure names its command: one that writes the figure's folder (the maintainers'; the
    tutorial runs the same subcommand into a folder of the reader's), or one that writes a run folder the figure
    was copied from (the caption then names that file, and the tutorial runs the same subcommand on the same
    recipe)."""
    for page, image, caption in figures():
        made_by = MADE_BY.search(caption)
        assert made_by, f"{page}: no 'Made by `digitrec ...`' line after {image}"
        argv = shlex.split(made_by.group(1))[1:]
        folder, name = str(Path("docs/images") / image).rsplit("/", 1)
        written = output_folders(argv)
        if folder in written:
            assert any(
                argv[0] == tutorial_argv[0] and output_folders(tutorial_argv) for tutorial_argv in commands()
            ), (
                f"{page}: no tutorial command runs `digitrec {argv[0]}` into a folder, as {made_by.group(1)} does"
            )
        else:
            assert len(written) == 1, f"{page}: {made_by.group(1)} writes no folder {image} could come from"
            [run] = written
            assert f"{run}/{name}" in caption, f"{page}: {image} is neither written nor copied from {run}"
            assert any(argv[:3] == tutorial_argv[:3] for tutorial_argv in commands()), (
                f"{page}: no tutorial command starts like `{made_by.group(1)}`, which made {image}"
            )


def test_no_tutorial_command_writes_into_the_docs():
    """A reader's commands write into folders of their own: `explore --out docs/images/explore` overwrote the
    site's figures and, without --model, deleted the tracked docs/images/explore/ambiguous.png."""
    for argv in commands():
        for folder in output_folders(argv):
            assert not (ROOT / folder).resolve().is_relative_to(DOCS), (
                f"`digitrec {shlex.join(argv)}` writes {folder}"
            )


@pytest.mark.slow
def test_every_tutorial_command_runs(idx_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("DIGITREC_DATA", str(idx_folder))
    monkeypatch.chdir(tmp_path)
    # `serve` does not run here; a few corrections stand in for what the user would send from its page.
    from digitrec.feedback import FeedbackStore

    store = FeedbackStore(tmp_path / "feedback.sqlite")
    for label in (1, 7, 1):
        store.add(label=label, image=b"", input28=np.eye(28, dtype=np.float32))
    for argv in commands():
        if argv[0] in NOT_RUN:
            continue
        assert main([*argv, *SMALL.get(argv[0], [])]) == 0, argv


def subcommands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    """(command words, parser) of every `digitrec` command, `feedback export` and `bench train` included."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name), sub
                yield from subcommands(sub, (*prefix, name))


def usages(text: str) -> list[str]:
    """Every `digitrec ...` in inline code or on a line of a code block (its indented or backslashed
    continuation lines joined to it), without a trailing comment."""
    found = []
    for block in re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.S | re.M):
        for line in re.sub(r"\\\n\s*|\n\s+(?=[\[-])", " ", block).splitlines():
            line = line.strip().removeprefix("$ ")
            if line.startswith("digitrec "):
                found.append(line)
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    found += [" ".join(span.split()) for span in re.findall(r"`(digitrec [^`]+)`", prose)]
    return [usage.split("  #")[0] for usage in found]


def command_of(usage: str, commands: dict) -> tuple[str, ...]:
    words = usage.split()[1:]
    matching = [words_ for words_ in commands if list(words_) == words[: len(words_)]]
    assert matching, f"no digitrec command in `{usage}`"
    return max(matching, key=len)


def options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {
        name: action for action in parser._actions for name in action.option_strings if name.startswith("--")
    }


def test_readmes_command_line_reference_names_every_option():
    """Each option that `digitrec X -h` lists (one of its spellings) appears in a usage of X in README's
    *Command line* section: a heading, a line of a code block or inline code that starts `digitrec X`."""
    text = README.read_text()
    start = text.index("\n## Command line")
    section = text[start : text.index("\n## ", start + 1)]
    commands = dict(subcommands(build_parser()))
    named: dict[tuple[str, ...], set[str]] = {words: set() for words in commands}
    for usage in usages(section):
        named[command_of(usage, commands)] |= set(re.findall(r"(?<![\w-])--[a-z][\w-]*", usage))
    missing = [
        f"digitrec {' '.join(words)} {action.option_strings[-1]}"
        for words, parser in commands.items()
        for action in parser._actions
        if action.option_strings and action.dest != "help" and not named[words] & set(action.option_strings)
    ]
    assert not missing, f"README's Command line does not name {missing}"


def test_every_option_the_docs_name_exists_with_its_choices_and_defaults():
    """No `digitrec X --option` on a user's page names an option X lacks; `--opt a|b|c` lists exactly its
    choices, and `[--opt value]` in lower case gives its default."""
    commands = dict(subcommands(build_parser()))
    for page in USER_PAGES:
        for usage in usages(page.read_text()):
            words = command_of(usage, commands)
            known = options(commands[words])
            where = f"{page.name}: `{usage}`"
            for name in re.findall(r"(?<![\w-])--[a-z][\w-]*", usage):
                assert name in known, f"{where}: digitrec {' '.join(words)} has no {name}"
            for name, value in re.findall(r"(?<![\w-])(--[a-z][\w-]*) ([^\s\[\]]+)", usage):
                action = known[name]
                if "|" in value and action.choices:
                    assert set(value.split("|")) == set(map(str, action.choices)), where
            for name, value in re.findall(r"\[(--[a-z][\w-]*) ([^\s\[\]|A-Z]+)\]", usage):
                if known[name].default is not None:
                    assert value == str(known[name].default), (
                        f"{where}: {name} defaults to {known[name].default}"
                    )


def test_the_api_page_names_every_public_name_and_field():
    import digitrec

    text = (DOCS / "api.md").read_text()
    for name in digitrec.__all__:
        assert f"`{name}" in text or f"digitrec.{name}" in text or f"-> {name}`" in text, name
    for cls in (digitrec.Prediction, digitrec.ReadResult, digitrec.DigitBox, digitrec.Run, digitrec.MNIST):
        fields = [field.name for field in dataclasses.fields(cls)]
        fields += [name for name, value in vars(cls).items() if isinstance(value, property)]
        for field in fields:
            assert f"`{field}`" in text, f"docs/api.md: {cls.__name__}.{field}"
    for function in (
        digitrec.train,
        digitrec.Predictor.pretrained,
        digitrec.Predictor.load,
        digitrec.load_mnist,
    ):
        row = re.search(rf"{function.__name__}\(([^`]*)\)", text)
        assert row, function.__name__
        for parameter in inspect.signature(function).parameters.values():
            assert parameter.name in row.group(1), f"docs/api.md: {function.__qualname__}'s {parameter.name}"


def test_the_api_page_names_every_parameter_of_create_app():
    """Library users who run the web app in their own ASGI server set its Host allow-list there."""
    pytest.importorskip("fastapi")
    from digitrec.server import create_app

    row = re.search(r"create_app\(([^`]*)\)", (DOCS / "api.md").read_text())
    assert row, "docs/api.md names no create_app"
    for parameter in inspect.signature(create_app).parameters.values():
        assert parameter.name in row.group(1), f"docs/api.md: create_app's {parameter.name}"


def table_rows(text: str, heading: str) -> list[list[str]]:
    """The cells of the first Markdown table after `heading`, header and rule left out."""
    lines = text[text.index(heading) :].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows[2:]


def percent(cell: str) -> float:
    return float(re.search(r"([\d.]+)%", cell).group(1)) / 100


def test_the_results_figures_agree_wherever_they_are_quoted():
    """README's results table, the tutorial's copy of it, performance.md's spreads over seeds, `digitrec recipes`
    (each source's figure, and the median of our own recipes) and `digitrec models`'s parameter counts agree."""
    from digitrec.models import count_parameters, create_model

    results = {
        row[0].strip("`"): row for row in table_rows(README.read_text(), "## Results")
    }  # recipe, source, reported, seed 0, over seeds, params, epochs, seconds
    assert set(results) == set(RECIPES) - {"robust"}
    for name, row in results.items():
        recipe = RECIPES[name]
        assert int(row[5].replace(",", "")) == count_parameters(create_model(recipe.arch)), name
        assert float(row[6]) == recipe.epochs, name
        if row[1] == "digitrec":  # our own recipes report the median over seeds
            assert round(percent(row[4].split("/")[1]), 4) == recipe.reported_accuracy, name
        elif recipe.reported_accuracy is None:
            assert row[2] == "—", name
        else:
            assert round(percent(row[2]), 4) == recipe.reported_accuracy, name
    spread = re.compile(r"(\d+\.\d+)%? / (\d+\.\d+)%? / (\d+\.\d+)%")
    performance = table_rows((DOCS / "performance.md").read_text(), "## Recipes")
    for row in performance:
        name = row[0].strip("`")
        if name in results:  # the rows of today's recipes, not those "until 2026-12-04"
            assert spread.search(row[3]).groups() == spread.search(results[name][4]).groups(), name
    assert {row[0].strip("`") for row in performance} >= {"fast", "default", "best"}
    tutorial = table_rows((DOCS / "tutorial" / "02-recipes.md").read_text(), "# 2. The seed recipes")
    assert len(tutorial) == 8
    for name, accuracy, params, epochs in tutorial:
        row = results[name.strip("`")]
        assert (accuracy, params, epochs) == (row[3].split()[0].strip("*;"), row[5], row[6]), name
