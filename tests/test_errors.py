"""errors.py: the extras a command asks for match pyproject.toml's."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from digitrec.errors import EXTRAS

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
# distributions whose module is not named by their name with - as _
MODULE_OF = {"scikit-learn": "sklearn"}
# what a command runs without: fastapi_offline (offline /docs) and uvloop (uvicorn's faster loop, not on Windows)
OPTIONAL = {"fastapi_offline", "uvloop"}
NO_COMMAND = {"docs", "dev"}  # extras for building the docs and for working on digitrec


def test_extras_name_the_modules_of_pyprojects_optional_dependencies():
    """need_extra checks EXTRAS: a module the extra installs and a command imports, missing from it, passed the
    check and died with a traceback (httptools, which serve's guards import)."""
    declared = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    expected = {}
    for extra, requirements in declared.items():
        if extra in NO_COMMAND:
            continue
        names = (re.split(r"[^A-Za-z0-9_.-]", requirement, maxsplit=1)[0] for requirement in requirements)
        expected[extra] = {MODULE_OF.get(name, name.replace("-", "_")) for name in names} - OPTIONAL
    assert {extra: set(modules) for extra, modules in EXTRAS.items()} == expected


def test_the_version_is_the_same_in_pyproject_and_the_package():
    """pyproject.toml and digitrec.__version__ each hold it, and nothing tied them."""
    import digitrec

    with PYPROJECT.open("rb") as f:
        assert tomllib.load(f)["project"]["version"] == digitrec.__version__


@pytest.mark.parametrize(
    "command",
    [
        ["train", "--recipe", "fast", "--dry-run", "--out", "{long}"],
        ["calibrate", "some-run", "--out", "{long}.safetensors"],
        ["train-pairs", "--out", "{long}.safetensors"],
        ["predict", "x.png", "--show-steps", "{long}"],
        ["eval-real", "--write", "{long}"],
    ],
    ids=lambda command: command[0],
)
def test_a_path_name_too_long_for_the_system_is_one_sentence(tmp_path, capsys, command):
    """The flags that name a place to write are looked at while the command line is read, before the errors a
    user can cause are caught: a name too long (ENAMETOOLONG) gave a 58-line traceback."""
    from digitrec.cli import main

    long = str(tmp_path / ("a" * 300))
    assert main([part.format(long=long) for part in command]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"digitrec: error: cannot use {long}") and "File name too long" in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "command, said",
    [
        (["eval-real", "--count", "99999999999"], "is not a count of images to generate; use 1 to 20000"),
        (
            ["calibrate", "run", "--count", "20001"],
            "is not a count of images to generate; use 1 to 20000",
        ),
        (["train-pairs", "--count", "2000001"], "is not a count of pieces to draw; use 1 to 2000000"),
        (["train-pairs", "--epochs", "1000000"], "is not a count of epochs; use 1 to 999999"),
    ],
    ids=["eval-real", "calibrate", "train-pairs-count", "train-pairs-epochs"],
)
def test_counts_of_generated_images_have_a_ceiling(capsys, command, said):
    """`calibrate --count 99999999999` generated photos until killed (370 MB after 22 s and growing)."""
    from digitrec.cli import main

    with pytest.raises(SystemExit) as exited:
        main(command)
    assert exited.value.code == 2 and said in capsys.readouterr().err


@pytest.mark.parametrize(
    "command", [["calibrate", "run"], ["ensemble", "a", "b"]], ids=["calibrate", "ensemble"]
)
def test_an_onnx_name_for_a_model_that_is_written_as_safetensors_is_refused(tmp_path, capsys, command):
    """`calibrate fast --out cal.onnx` made a folder cal.onnx/ holding model.safetensors, without a word."""
    from digitrec.cli import main

    with pytest.raises(SystemExit):
        main([*command, "--out", str(tmp_path / "cal.onnx")])
    assert "names an ONNX file" in capsys.readouterr().err and not (tmp_path / "cal.onnx").exists()
