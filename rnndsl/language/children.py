"""How a tree cell names its children's states (language/tree.py), and the messages for those
names where they do not belong. Kept apart from tree.py so that the checker can use them."""
from __future__ import annotations

import re

from rnndsl.language.spec import Spec

PREV = "_prev"
SUM_K = "sum_k"
PER_CHILD = "_k"
_CHILD_RE = re.compile(r"(?P<state>.+)_(?P<which>left|right|k|child[0-9]+)\Z")


def child_names(spec: Spec) -> dict[str, tuple[str, int | None]]:
    """A child's state as the spec names it -> (state, child slot; None for `_k`)."""
    if spec.structure != "tree":
        return {}
    if spec.arity is None:
        return {f"{s}{PER_CHILD}": (s, None) for s in spec.states}
    slots = ("left", "right") if spec.arity == 2 else \
        tuple(f"child{j + 1}" for j in range(spec.arity))
    return {f"{s}_{slot}": (s, k) for s in spec.states for k, slot in enumerate(slots)}


def spelling(spec: Spec) -> str:
    """How this spec names its children's states, for messages."""
    s = next(iter(spec.states))
    if spec.arity is None:
        return f"'{s}_k' inside sum_k(...)"
    if spec.arity == 2:
        return f"'{s}_left' and '{s}_right'"
    return f"'{s}_child1' to '{s}_child{spec.arity}'"


def misuse(spec: Spec, name: str) -> str | None:
    """Why `name`, which reads like a child's state, is not one in this spec (None if it does
    not read like one, or is one)."""
    m = _CHILD_RE.match(name)
    if m is None or m["state"] not in spec.states or name in child_names(spec):
        return None
    if spec.structure != "tree":
        return (f"'{name}' is a child's state, and only a tree cell has children (add "
                "'structure: tree' and 'arity: ...'); a sequence cell reads "
                f"'{m['state']}{PREV}'")
    return f"'{name}' is no child's state with arity {spec.arity or 'any'}: use {spelling(spec)}"


def sum_k_misuse(spec: Spec) -> str:
    """Why `sum_k(...)` may not stand in this spec (the checker's message for it)."""
    if spec.structure != "tree":
        return (f"{SUM_K}(...) sums over a tree node's children; only a tree cell has children "
                "(add 'structure: tree' and 'arity: any')")
    if spec.arity is not None:
        return (f"{SUM_K}(...) sums over any number of children ('arity: any'); with arity "
                f"{spec.arity} the children's states are {spelling(spec)}")
    return f"{SUM_K}(...) may not stand inside a per-child value or another {SUM_K}(...)"
