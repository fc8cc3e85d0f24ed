"""Stage 2, parse: equation text becomes an AST whose every node knows its place in the file.

The grammar (grammars/equations.lark, LALR) only says what is well formed; names, functions
and shapes are the checker's business. Lark's errors are turned into `SpecError`s here.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import math

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import (UnexpectedCharacters, UnexpectedEOF, UnexpectedInput,
                             UnexpectedToken, VisitError)

from rnndsl.language.errors import SourcePos, SpecError
from rnndsl.resources import grammar_path
from rnndsl.language.spec import Equation, TextOrigin


@dataclass(frozen=True)
class Num:
    value: float
    pos: SourcePos


@dataclass(frozen=True)
class Name:
    id: str
    pos: SourcePos


@dataclass(frozen=True)
class Call:
    func: str
    args: tuple
    pos: SourcePos


@dataclass(frozen=True)
class Concat:
    items: tuple  # vectors joined end to end, nested brackets flattened
    pos: SourcePos  # the '['


@dataclass(frozen=True)
class Index:
    operand: object
    index: int
    pos: SourcePos  # the index


@dataclass(frozen=True)
class Transpose:
    operand: object
    pos: SourcePos  # the '.T'


@dataclass(frozen=True)
class Binary:
    op: str  # one of + - * / @ **
    left: object
    right: object
    pos: SourcePos  # the operator


@dataclass(frozen=True)
class Neg:
    operand: object
    pos: SourcePos


@dataclass(frozen=True)
class Assign:
    target: str
    expr: object
    pos: SourcePos  # the target name
    part: tuple[int, int] | None = None  # (k, n): the k-th of n parts in `[a, b, c] = expr`


_READABLE = {
    "NAME": "a name", "NUMBER": "a number", "EQUALS": "'='", "PLUS": "'+'", "MINUS": "'-'",
    "STAR": "'*'", "SLASH": "'/'", "AT": "'@'", "POW": "'**'", "TRANSPOSE": "'.T'",
    "LPAR": "'('", "RPAR": "')'",
    "LSQB": "'['", "RSQB": "']'", "COMMA": "','", "_NL": "end of line", "$END": "end of equations",
}


# Deeper expressions are refused: the stages after parsing walk expressions recursively, and
# no cell a paper prints comes near this (a sum of 100 terms is 100 levels).
MAX_DEPTH = 100


@lru_cache(maxsize=1)
def _parser() -> Lark:
    return Lark(grammar_path().read_text(), parser="lalr", start="start", maybe_placeholders=False)


def parse_equations(eq: Equation) -> list[Assign]:
    """Parse one block of equation text into assignments, in source order."""
    try:
        tree = _parser().parse(eq.text)
    except UnexpectedInput as exc:
        raise _syntax_error(exc, eq.text, eq.origin) from None
    for assign in tree.children:
        _check_depth(assign, eq.origin)
    try:
        return _ToAst(eq.origin).transform(tree)
    except VisitError as exc:  # Lark wraps what the transformer raises
        if isinstance(exc.orig_exc, SpecError):
            raise exc.orig_exc from None
        raise


def _check_depth(assign: Tree, origin: TextOrigin):
    """Refuse an expression nested more than MAX_DEPTH levels (checked without recursion)."""
    stack = [(assign, 0)]
    while stack:
        t, depth = stack.pop()
        if depth > MAX_DEPTH:
            target = next(c for c in assign.children if getattr(c, "type", "") == "NAME")
            raise SpecError(f"the expression for '{target}' is nested more than {MAX_DEPTH} "
                            "levels deep; split it into several equations",
                            origin.pos(target.line, target.column))
        stack.extend((c, depth + 1) for c in t.children if isinstance(c, Tree))


def _syntax_error(exc: UnexpectedInput, text: str, origin: TextOrigin) -> SpecError:
    line, col = getattr(exc, "line", -1), getattr(exc, "column", -1)
    if line is None or line < 1:  # at end of input: point just past the last character
        lines = text.rstrip("\n").split("\n")
        line, col = len(lines), len(lines[-1]) + 1
    if isinstance(exc, UnexpectedCharacters):
        ch = text[exc.pos_in_stream] if exc.pos_in_stream < len(text) else "?"
        return SpecError(f"unexpected character '{ch}' in an equation", origin.pos(line, col))
    expected = sorted({_READABLE.get(t, t) for t in getattr(exc, "expected", ()) or ()
                       if not t.startswith("__")})
    if isinstance(exc, UnexpectedToken) and exc.token.type != "$END":
        tok = exc.token
        what = "end of line" if tok.type == "_NL" else f"'{tok}'"
        msg = f"unexpected {what}"
    else:
        msg = "unexpected end of equation"
    if "a name" in expected and "a number" in expected:
        msg += "; expected an expression"
    elif expected:
        msg += f"; expected {' or '.join(expected[:4])}"
    return SpecError(msg, origin.pos(line, col))


@v_args(inline=True)
class _ToAst(Transformer):
    def __init__(self, origin: TextOrigin):
        super().__init__()
        self.origin = origin

    def at(self, tok: Token) -> SourcePos:
        return self.origin.pos(tok.line, tok.column)

    def start(self, *assigns):
        return [a for item in assigns for a in (item if isinstance(item, list) else [item])]

    def assign(self, name, _eq, expr):
        return Assign(str(name), expr, self.at(name))

    def split(self, _lsqb, *rest):
        names = [t for t in rest[:-2] if t.type == "NAME"]
        expr = rest[-1]
        return [Assign(str(t), expr, self.at(t), (k, len(names))) for k, t in enumerate(names)]

    def index(self, operand, _lsqb, tok, _rsqb):
        value = float(tok)
        if value != int(value) or not tok.isdigit():
            raise SpecError(f"an index is a whole number (0, 1, 2, ...), not {tok}", self.at(tok))
        return Index(operand, int(tok), self.at(tok))

    def transpose(self, operand, tok):
        return Transpose(operand, self.at(tok))

    def binary(self, left, op, right):
        if str(op) == "@" and isinstance(left, Neg):
            # Unary minus binds tighter than '@', as in Python, but '-W @ x' means -(W @ x):
            # the sign moves off the matrix so that its left side stays a parameter name.
            signs = []
            while isinstance(left, Neg):
                signs.append(left.pos)
                left = left.operand
            out = Binary("@", left, right, self.at(op))
            for pos in reversed(signs):
                out = Neg(out, pos)
            return out
        return Binary(str(op), left, right, self.at(op))

    def neg(self, op, operand):
        if isinstance(operand, Num):  # a literal's sign belongs to the literal
            return Num(-operand.value, self.at(op))
        return Neg(operand, self.at(op))

    def pos(self, _op, operand):
        return operand

    def number(self, tok):
        value = float(tok)
        if not math.isfinite(value):
            raise SpecError(f"the number {tok} is too large for a float", self.at(tok))
        return Num(value, self.at(tok))

    def name(self, tok):
        return Name(str(tok), self.at(tok))

    def call(self, name, _lpar, *rest):
        args = tuple(a for a in rest[:-1] if not isinstance(a, Token))
        return Call(str(name), args, self.at(name))

    def group(self, _lpar, expr, _rpar):
        return expr

    def concat(self, lsqb, *rest):
        items = []
        for item in rest[:-1]:
            if isinstance(item, Concat):  # [[a, b], c] is [a, b, c]
                items.extend(item.items)
            elif not isinstance(item, Token):
                items.append(item)
        return Concat(tuple(items), self.at(lsqb))
