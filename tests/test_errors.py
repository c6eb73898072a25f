"""errors.py: the extras a command asks for match pyproject.toml's."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

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
