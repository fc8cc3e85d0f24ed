"""One error type for everything a user can get wrong, rendered in one place."""
from __future__ import annotations

import difflib
from dataclasses import dataclass


@dataclass(frozen=True)
class SourcePos:
    """A position in a spec file: 1-based line and column, plus that line's text."""

    file: str
    line: int
    column: int
    text: str = ""

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


class SpecError(Exception):
    """A problem in a spec, located at the offending text in the YAML file."""

    def __init__(self, message: str, pos: SourcePos | None = None):
        super().__init__(message)
        self.message = message
        self.pos = pos

    def render(self) -> str:
        """`file:line:col: message`, then the source line and a caret under the column."""
        if self.pos is None:
            return f"error: {self.message}"
        head = f"{self.pos}: {self.message}"
        if not self.pos.text:
            return head
        line = self.pos.text.rstrip("\n").expandtabs(1)
        return f"{head}\n    {line}\n    {' ' * (self.pos.column - 1)}^"

    def __str__(self) -> str:
        return self.render()


def suggest(word: str, candidates, cutoff: float = 0.7) -> str:
    """' (did you mean 'x'?)' naming the closest candidate, or '' when none is close."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=cutoff)
    return f" (did you mean '{close[0]}'?)" if close else ""
