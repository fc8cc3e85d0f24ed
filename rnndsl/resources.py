"""Where the grammar and the built-in specs live, in a checkout and in an installed wheel.

The repository keeps them at its top level (`grammars/`, `specs/`); a wheel carries them
inside the package (`rnndsl/grammars`, `rnndsl/specs`, mapped in pyproject.toml). They are
data folders, not packages, so they are looked up beside this file first and in the
checkout second (an editable install imports the package from the checkout).
"""
from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_CHECKOUT = _PACKAGE.parent


def _data_dir(folder: str) -> Path:
    installed = _PACKAGE / folder
    return installed if installed.is_dir() else _CHECKOUT / folder


def grammar_path() -> Path:
    return _data_dir("grammars") / "equations.lark"


def specs_dir() -> Path:
    return _data_dir("specs")
