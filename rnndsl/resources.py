"""Where the grammar and the built-in specs live, in a checkout and in an installed wheel."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parent.parent


def _dir(package: str, folder: str) -> Path:
    try:
        found = Path(str(resources.files(package)))
        if found.is_dir():
            return found
    except (ModuleNotFoundError, TypeError):
        pass
    return _CHECKOUT / folder


def grammar_path() -> Path:
    return _dir("rnndsl.grammars", "grammars") / "equations.lark"


def specs_dir() -> Path:
    return _dir("rnndsl.specs", "specs")


def checkout_path() -> Path:
    """The repository root when running from a checkout (benchmarks/ lives there)."""
    return _CHECKOUT
