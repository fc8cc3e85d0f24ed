"""The errors a user can cause, rendered in one place.

`SpecError` is a problem in a spec, located at its file, line and column; `UserError` is any
other bad input (an option, a checkpoint, the kernel cache), its message naming what and where.
The CLI prints either as one message and exits with status 2. Text that came from the user
(paths, names, spec lines, summaries) is passed through `printable` wherever it is shown, so
no control character or escape sequence reaches the terminal.
"""
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
            return f"error: {printable(self.message)}"
        head = printable(f"{self.pos}: {self.message}")
        if not self.pos.text:
            return head
        line = self.pos.text.rstrip("\n").expandtabs(1)
        before = printable(line[:self.pos.column - 1])  # the caret stays under its character
        return f"{head}\n    {printable(line)}\n    {' ' * len(before)}^"

    def __str__(self) -> str:
        return self.render()


def suggest(word: str, candidates, cutoff: float = 0.7) -> str:
    """' (did you mean 'x'?)' naming the closest candidate, or '' when none is close."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=cutoff)
    return f" (did you mean '{close[0]}'?)" if close else ""


class UserError(ValueError):
    """Bad input other than a spec: an option, a checkpoint, the kernel cache. The message
    names what was wrong and where (the option, the file)."""


def printable(text: str) -> str:
    """`text` with every non-printable character (ANSI escapes, carriage returns, line and
    paragraph separators, NUL, ...) written as a Python escape such as \\x1b."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))
