"""Stage 1, load: a YAML spec file becomes a `Spec`, every value keeping its source position.

YAML is composed with the safe loader into nodes (which carry marks) and read from the node
tree directly, so every later error can point at the file, line and column of the text.

Hostile text gets a located error too: bytes that are not UTF-8 and characters YAML refuses
(NUL, most control characters) are reported at their line and column, YAML nested deeper than
MAX_YAML_DEPTH is refused before it is composed (composing recurses), names are at most
MAX_NAME characters (the spec's name becomes part of a file name), and numbers must be finite.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rnndsl.language.errors import SourcePos, SpecError, suggest

NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
MAX_NAME = 64
MAX_YAML_DEPTH = 32  # a spec needs 4 levels (params: W: shape: [...])
TOP_KEYS = ("name", "summary", "structure", "arity", "sizes", "inputs", "states", "outputs",
            "params", "constants", "equations")
# What a cell runs over: a sequence (a state's previous value is `h_prev`) or trees (a node
# reads its children's states: `h_left`, `h_right` for `arity: 2`, `h_child1` ... for another
# fixed arity, `h_k` inside `sum_k(...)` for `arity: any`; see language/tree.py).
STRUCTURES = ("sequence", "tree")
MAX_ARITY = 16
ANY_ARITY = "any"
PARAM_KEYS = ("shape", "init", "blocks")
INITS = ("uniform", "zeros", "ones", "orthogonal", "constant")
# A matrix that multiplies a concatenation, W @ [h_prev, x], has as many columns as the parts
# together: its shape is written [hidden, hidden + input], the sizes in the order of the parts;
# a parameter cut into parts, [a, b] = W @ x, as many rows: [hidden + hidden, input].
SUM = " + "
# A size may be a number (`shape: [3, hidden]`): such a vector is that many per-row scalars.
MAX_NUMBER_SIZE = 64


def state_shape(size: str | tuple[str, ...]) -> tuple[str, ...]:
    """A state's shape from its declaration: `h: hidden` is (hidden,), a matrix-valued state
    `M: [key, value]` is (key, value), a per-sequence scalar `m: []` is ()."""
    return size if isinstance(size, tuple) else (size,)
# The only YAML tags a spec may carry (those plain YAML resolves to); anything else, above all
# `!!python/...`, is refused before any value is read.
_PLAIN_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "seq",
                                                   "map")}


@dataclass(frozen=True)
class ParamDecl:
    name: str
    shape: tuple[str, ...] | None  # None: infer from use
    init: str  # one of INITS
    value: float  # for init == "constant"
    pos: SourcePos
    # `blocks: 4` or `blocks: heads` (a constant): a square matrix that is block-diagonal, that
    # many blocks of equal size on its diagonal and zeros elsewhere (xLSTM's head-wise
    # recurrent weights); "" for a full matrix
    blocks: str = ""
    blocks_pos: SourcePos | None = None


@dataclass(frozen=True)
class Constant:
    """A named number from the `constants:` section: folded into the code, never trained."""

    name: str
    value: float
    pos: SourcePos


@dataclass(frozen=True)
class Equation:
    """The raw text of one equation block, and how to map its offsets back to the file."""

    text: str
    origin: "TextOrigin"


@dataclass(frozen=True)
class TextOrigin:
    """Maps (line, column) inside a YAML scalar's string value to a position in the file."""

    file: str
    lines: tuple[str, ...]  # the file's lines
    first_line: int  # 0-based file line of the string's first line
    first_col: int  # 0-based file column of the string's first character
    indent: int  # 0-based column of continuation lines (block scalars)

    def pos(self, line: int, col: int) -> SourcePos:
        """line, col are 1-based inside the string."""
        fline = self.first_line + line - 1
        fcol = (self.first_col if line == 1 else self.indent) + col - 1
        text = self.lines[fline] if 0 <= fline < len(self.lines) else ""
        return SourcePos(self.file, fline + 1, fcol + 1, text)


@dataclass(frozen=True)
class Spec:
    name: str
    summary: str
    sizes: tuple[str, ...]
    inputs: dict[str, str]  # name -> size
    states: dict[str, str | tuple[str, str]]  # name -> size, or (rows, columns): state_shape
    outputs: tuple[str, ...]
    params: dict[str, ParamDecl]
    equations: tuple[Equation, ...]
    file: str
    constants: dict[str, Constant] = field(default_factory=dict)
    structure: str = "sequence"  # one of STRUCTURES
    arity: int | None = None  # trees: children per node at most; None for `arity: any`
    positions: dict[str, SourcePos] = field(default_factory=dict, compare=False)
    source: str = field(default="", compare=False)

    def where(self, key: str) -> SourcePos | None:
        """Position of a declared name (`inputs.x`, `states.h`, `outputs.h`, `sizes.input`)."""
        return self.positions.get(key)


def load_spec(source: str | Path, text: str | None = None) -> Spec:
    """Load a spec from a path, or from YAML text (then `source` names it in messages)."""
    if text is None:
        try:
            data = Path(source).read_bytes()
        except (OSError, ValueError) as exc:  # ValueError: a NUL in the path
            reason = getattr(exc, "strerror", None) or exc
            raise SpecError(f"cannot read spec '{source}': {reason}") from None
        text = _decode(str(source), data)
    return _SpecReader(str(source), text).read()


def with_constants(spec: Spec, values: dict | None) -> Spec:
    """`spec` with some of its constants given other values (`compile(..., constants=...)`,
    `rnndsl compile --set lam=0.9`)."""
    if not values:
        return spec
    constants = dict(spec.constants)
    for name, value in values.items():
        if name not in constants:
            known = ", ".join(constants) or "none"
            raise SpecError(f"cannot set constant '{name}': the spec '{spec.name}' has no such "
                            f"constant{suggest(str(name), constants)}; its constants: {known}")
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or \
                not math.isfinite(value):
            raise SpecError(f"cannot set constant '{name}' to {value!r}: a constant is a finite "
                            "number")
        constants[name] = Constant(name, float(value), constants[name].pos)
    return dataclasses.replace(spec, constants=constants)


def _decode(file: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = data[:exc.start].decode("utf-8")
        line = before.count("\n")
        column = len(before) - (before.rfind("\n") + 1)
        text = data.decode("utf-8", errors="replace").split("\n")[line]
        raise SpecError(f"byte 0x{data[exc.start]:02x} is not UTF-8 text (a spec is UTF-8)",
                        SourcePos(file, line + 1, column + 1, text)) from None


class _SpecReader:
    def __init__(self, file: str, text: str):
        self.file = file
        self.text = text
        self.lines = tuple(text.splitlines())
        self.positions: dict[str, SourcePos] = {}

    # -- positions -----------------------------------------------------------------------
    def at(self, mark) -> SourcePos:
        line = self.lines[mark.line] if mark.line < len(self.lines) else ""
        return SourcePos(self.file, mark.line + 1, mark.column + 1, line)

    def fail(self, message: str, node=None, mark=None) -> SpecError:
        if node is not None:
            mark = node.start_mark
        return SpecError(message, self.at(mark) if mark is not None else None)

    # -- reading -------------------------------------------------------------------------
    def at_offset(self, offset: int) -> SourcePos:
        """The position of the `offset`-th character of the text."""
        start = 0
        for i, line in enumerate(self.text.splitlines(True)):
            if offset < start + len(line):
                return SourcePos(self.file, i + 1, offset - start + 1, self.lines[i])
            start += len(line)
        return SourcePos(self.file, len(self.lines) + 1, 1)

    def shallow_enough(self) -> None:
        """Refuse YAML nested deeper than MAX_YAML_DEPTH, scanning tokens (no recursion)."""
        depth = 0
        tokens = yaml.scan(self.text, Loader=yaml.SafeLoader)
        while True:
            try:
                token = next(tokens)
            except (StopIteration, yaml.YAMLError):  # syntax errors: composing reports them
                return
            if isinstance(token, (yaml.BlockMappingStartToken, yaml.BlockSequenceStartToken,
                                  yaml.FlowMappingStartToken, yaml.FlowSequenceStartToken)):
                depth += 1
                if depth > MAX_YAML_DEPTH:
                    raise self.fail(f"YAML nested more than {MAX_YAML_DEPTH} levels deep "
                                    "(a spec needs 4)", mark=token.start_mark)
            elif isinstance(token, (yaml.BlockEndToken, yaml.FlowMappingEndToken,
                                    yaml.FlowSequenceEndToken)):
                depth -= 1

    def read(self) -> Spec:
        try:
            self.shallow_enough()
            root = yaml.compose(self.text, Loader=yaml.SafeLoader)
        except yaml.reader.ReaderError as exc:  # a character YAML refuses, such as NUL
            raise SpecError(f"character {repr(chr(exc.character))} (U+{exc.character:04X}) is "
                            "not allowed in a spec", self.at_offset(exc.position)) from None
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            problem = exc.problem or exc.context or "malformed YAML"
            if exc.context and exc.problem and exc.context_mark is not None and \
                    exc.context_mark is not mark:  # e.g. where an unclosed '[' was opened
                c = exc.context_mark
                problem += f" ({exc.context} at line {c.line + 1}, column {c.column + 1})"
            raise self.fail(f"YAML syntax error: {problem}", mark=mark) from None
        except yaml.YAMLError as exc:  # pragma: no cover - unmarked YAML errors are rare
            raise SpecError(f"{self.file}: YAML error: {exc}") from None
        if root is None:
            raise SpecError("empty spec: expected a mapping with name, sizes, inputs, states, "
                            "outputs and equations",
                            SourcePos(self.file, 1, 1, self.lines[0] if self.lines else ""))
        self.plain_tags_only(root)
        top = self.mapping(root, "the spec")
        for key, (knode, _) in top.items():
            if key not in TOP_KEYS:
                raise self.fail(f"unknown key '{key}'{suggest(key, TOP_KEYS)}", knode)
        for key in ("name", "sizes", "states", "equations"):
            if key not in top:
                raise self.fail(f"missing required key '{key}'", root)

        name = self.scalar_str(top["name"][1], "name")
        if not NAME_RE.match(name) or len(name) > MAX_NAME:
            raise self.fail(f"spec name '{name}' must be a name (letters, digits, _) of at most "
                            f"{MAX_NAME} characters", top["name"][1])
        summary = self.scalar_str(top["summary"][1], "summary") if "summary" in top else ""
        sizes = self.names_list(top["sizes"][1], "sizes", "sizes")
        if not sizes:
            raise self.fail("'sizes' must name at least one size", top["sizes"][1])
        inputs = self.sized_names(top["inputs"][1], "inputs", sizes) if "inputs" in top else {}
        states = self.sized_names(top["states"][1], "states", sizes, matrices=True)
        if not states:
            raise self.fail("a recurrent cell needs at least one state", top["states"][1])
        for n in inputs:
            if n in states:
                raise SpecError(f"'{n}' is declared both as an input and as a state",
                                self.positions[f"states.{n}"])
        if "outputs" in top:
            onode = top["outputs"][1]
            if isinstance(onode, yaml.ScalarNode):
                outputs = (self.name_of(onode, "outputs"),)
                self.positions[f"outputs.{outputs[0]}"] = self.at(onode.start_mark)
            else:
                outputs = tuple(self.names_list(onode, "outputs", "outputs"))
        else:
            outputs = tuple(states)
        if not outputs:
            raise self.fail("'outputs' must name at least one value", top["outputs"][1])
        params = self.params(top["params"][1], sizes) if "params" in top else {}
        constants = self.constants(top["constants"][1]) if "constants" in top else {}
        equations = self.equations(top["equations"][1])
        structure, arity = self.structure(top)
        return Spec(name=name, summary=summary, sizes=tuple(sizes), inputs=inputs, states=states,
                    outputs=outputs, params=params, equations=equations, file=self.file,
                    constants=constants, structure=structure, arity=arity,
                    positions=self.positions, source=self.text)

    def structure(self, top) -> tuple[str, int | None]:
        """`structure: tree` with `arity: N` (children per node at most) or `arity: any`."""
        structure = self.scalar_str(top["structure"][1], "structure") if "structure" in top \
            else "sequence"
        if structure not in STRUCTURES:
            raise self.fail(f"unknown structure '{structure}'{suggest(structure, STRUCTURES)}; "
                            f"a cell runs over a sequence or a tree", top["structure"][1])
        if structure == "sequence":
            if "arity" in top:
                raise self.fail("'arity' is the number of children of a tree's nodes; a "
                                "sequence cell has none (add 'structure: tree')", top["arity"][0])
            return structure, None
        if "arity" not in top:
            raise self.fail("a tree cell needs 'arity': 2 (or another number) for nodes with "
                            "at most that many ordered children, or 'any' for any number "
                            "of children summed with sum_k(...)", top["structure"][0])
        node = top["arity"][1]
        text = self.scalar_str(node, "arity")
        if text == ANY_ARITY:
            return structure, None
        if not text.isdigit() or not 1 <= int(text) <= MAX_ARITY:
            raise self.fail(f"'arity' is a number of children from 1 to {MAX_ARITY}, or "
                            f"'{ANY_ARITY}'; not '{text}'", node)
        return structure, int(text)

    def plain_tags_only(self, root):
        """Refuse explicit tags (`!!python/object`, `!foo`): a spec is plain data."""
        seen, stack = set(), [root]
        while stack:
            node = stack.pop()
            if id(node) in seen:  # aliases share nodes; visit each once
                continue
            seen.add(id(node))
            if node.tag not in _PLAIN_TAGS:
                tag = node.tag.replace("tag:yaml.org,2002:", "!!")
                raise self.fail(f"YAML tag '{tag}' is not allowed in a spec (specs are plain "
                                "data: names, lists, mappings and text)", node)
            if isinstance(node, yaml.MappingNode):
                stack.extend(n for kv in node.value for n in kv)
            elif isinstance(node, yaml.SequenceNode):
                stack.extend(node.value)

    def mapping(self, node, what: str) -> dict[str, tuple]:
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(f"{what} must be a mapping (key: value lines)", node)
        out: dict[str, tuple] = {}
        for knode, vnode in node.value:
            key = self.name_of(knode, what) if isinstance(knode, yaml.ScalarNode) else None
            if key is None:
                raise self.fail(f"keys of {what} must be names", knode)
            if key in out:
                raise self.fail(f"'{key}' appears twice in {what}", knode)
            out[key] = (knode, vnode)
        return out

    def scalar_str(self, node, what: str) -> str:
        if not isinstance(node, yaml.ScalarNode):
            raise self.fail(f"'{what}' must be a single value", node)
        return node.value

    def name_of(self, node, what: str) -> str:
        value = self.scalar_str(node, what)
        if not NAME_RE.match(value):
            raise self.fail(f"'{value}' in {what} is not a valid name "
                            "(letters, digits and _, not starting with a digit)", node)
        return value

    def names_list(self, node, what: str, key: str, repeats: bool = False) -> list[str]:
        if not isinstance(node, yaml.SequenceNode):
            raise self.fail(f"'{what}' must be a list, e.g. [input, hidden]", node)
        names: list[str] = []
        for item in node.value:
            n = self.name_of(item, what)
            if n in names and not repeats:
                raise self.fail(f"'{n}' appears twice in {what}", item)
            self.positions[f"{key}.{n}"] = self.at(item.start_mark)
            names.append(n)
        return names

    def sized_names(self, node, what: str, sizes: list[str], matrices: bool = False) -> dict:
        """`{x: input}`; with `matrices`, also `{M: [key, value]}`, a matrix of two sizes, and
        `{m: []}`, one number per sequence (xLSTM's stabiliser)."""
        out = {}
        for n, (knode, vnode) in self.mapping(node, what).items():
            if matrices and isinstance(vnode, yaml.SequenceNode):
                if len(vnode.value) not in (0, 2):
                    count = f"{len(vnode.value)} size{'' if len(vnode.value) == 1 else 's'}"
                    raise self.fail(f"'{n}' has {count}; a state is a vector "
                                    f"({n}: hidden), a matrix of two sizes ({n}: [key, value]) "
                                    f"or one number per sequence ({n}: [])", vnode)
                dims = tuple(self.known_size(item, n, what, sizes) for item in vnode.value)
            else:
                dims = self.known_size(vnode, n, what, sizes)
            self.positions[f"{what}.{n}"] = self.at(knode.start_mark)
            out[n] = dims
        return out

    def known_size(self, node, n: str, what: str, sizes: list[str]) -> str:
        size = self.name_of(node, what)
        if size not in sizes:
            raise self.fail(f"unknown size '{size}' for '{n}'{suggest(size, sizes)}"
                            f"; sizes are declared in 'sizes'", node)
        return size

    def params(self, node, sizes: list[str]) -> dict[str, ParamDecl]:
        out = {}
        for n, (knode, vnode) in self.mapping(node, "params").items():
            pos = self.at(knode.start_mark)
            self.positions[f"params.{n}"] = pos
            shape, init, value = None, "uniform", 0.0
            if isinstance(vnode, yaml.ScalarNode) and vnode.value in ("", "~", "null"):
                fields = {}
            else:
                fields = self.mapping(vnode, f"params.{n}")
            for key, (fk, fv) in fields.items():
                if key not in PARAM_KEYS:
                    raise self.fail(f"unknown key '{key}' for parameter '{n}'"
                                    f"{suggest(key, PARAM_KEYS)}", fk)
            if "shape" in fields:
                shape = self.shape(fields["shape"][1], n, sizes)
            if "init" in fields:
                init, value = self.init(fields["init"][1], n)
            blocks, blocks_pos = "", None
            if "blocks" in fields:
                bnode = fields["blocks"][1]
                blocks, blocks_pos = self.scalar_str(bnode, f"params.{n}.blocks"), \
                    self.at(bnode.start_mark)
                if not (NAME_RE.match(blocks) or (blocks.isdigit() and int(blocks) >= 1)):
                    raise self.fail(f"'blocks' of '{n}' is the number of blocks on its "
                                    "diagonal, a whole number or a constant's name, e.g. "
                                    "blocks: 4", bnode)
            out[n] = ParamDecl(n, shape, init, value, pos, blocks, blocks_pos)
        return out

    def shape(self, node, pname: str, sizes: list[str]) -> tuple[str, ...]:
        """`hidden`, `[]`, `[hidden]`, `[3, hidden]`, `[hidden, input]`, `[hidden, hidden + input]`."""
        what = f"the shape of '{pname}'"
        if isinstance(node, yaml.ScalarNode) and node.value in sizes:
            return (node.value,)
        if not isinstance(node, yaml.SequenceNode):
            raise self.fail(f"'{what}' must be a list, e.g. [input, hidden]", node)
        if len(node.value) > 2:
            raise self.fail(f"parameter '{pname}' has {len(node.value)} dimensions; "
                            "at most 2 (a matrix) are supported", node)
        dims = []
        for item in node.value:
            terms = [t.strip() for t in self.scalar_str(item, what).split("+")]
            for k, t in enumerate(terms):
                if t.isdigit() and 1 <= int(t) <= MAX_NUMBER_SIZE:
                    terms[k] = str(int(t))
                elif t.isdigit():
                    raise self.fail(f"a size that is a number is 1 to {MAX_NUMBER_SIZE} (each "
                                    f"element is its own value in the kernels), not {t}", item)
                elif not NAME_RE.match(t):
                    raise self.fail(f"'{t}' in {what} is not a size name or a number", item)
                elif t not in sizes:
                    raise self.fail(f"unknown size '{t}'{suggest(t, sizes)}", item)
            dims.append(SUM.join(terms))
        return tuple(dims)

    def constants(self, node) -> dict[str, Constant]:
        out = {}
        for n, (knode, vnode) in self.mapping(node, "constants").items():
            try:
                value = float(self.scalar_str(vnode, f"constants.{n}"))
            except ValueError:  # a word, true/false, .inf (YAML's spelling of infinity)
                value = math.nan
            if not math.isfinite(value):
                raise self.fail(f"constant '{n}' must be a finite number, e.g. {n}: 0.5", vnode)
            out[n] = Constant(n, value, self.at(knode.start_mark))
        return out

    def init(self, node, pname: str) -> tuple[str, float]:
        if isinstance(node, yaml.ScalarNode):
            try:
                return "constant", self.finite(float(node.value), pname, node)
            except ValueError:
                pass
            if node.value in INITS and node.value != "constant":
                return node.value, 0.0
            raise self.fail(f"unknown init '{node.value}' for '{pname}'{suggest(node.value, INITS)}; "
                            "use uniform, zeros, ones, orthogonal or a number", node)
        fields = self.mapping(node, f"the init of '{pname}'")
        if list(fields) != ["constant"]:
            raise self.fail("an init mapping must be {constant: VALUE}", node)
        vnode = fields["constant"][1]
        try:
            value = float(self.scalar_str(vnode, "constant"))
        except ValueError:
            raise self.fail("constant init needs a number", vnode) from None
        return "constant", self.finite(value, pname, vnode)

    def finite(self, value: float, pname: str, node) -> float:
        if not math.isfinite(value):
            raise self.fail(f"the init of '{pname}' must be a finite number, not {value}", node)
        return value

    def equations(self, node) -> tuple[Equation, ...]:
        if isinstance(node, yaml.ScalarNode):
            if node.style == ">":
                raise self.fail("'equations: >' folds the equations into one line; write "
                                "'equations: |' to keep one equation per line", node)
            blocks = [node]
        elif isinstance(node, yaml.SequenceNode):
            blocks = node.value
            for item in blocks:
                if not isinstance(item, yaml.ScalarNode):
                    raise self.fail("each equation must be a string", item)
        else:
            raise self.fail("'equations' must be a block of text (use 'equations: |') "
                            "or a list of strings", node)
        out = tuple(Equation(b.value, self.origin(b)) for b in blocks)
        if not any(e.text.strip() for e in out):
            raise self.fail("'equations' is empty", node)
        return out

    def origin(self, node) -> TextOrigin:
        start = node.start_mark
        if node.style in ("|", ">"):
            # Block scalar: content starts on the next line, at the block's indentation.
            first = start.line + 1
            while first < len(self.lines) and not self.lines[first].strip():
                first += 1
            line = self.lines[first] if first < len(self.lines) else ""
            indent = len(line) - len(line.lstrip(" "))
            # Blank leading lines are kept by '|' in the value, so count from the mark.
            return TextOrigin(self.file, self.lines, start.line + 1, indent, indent)
        quote = 1 if node.style in ("'", '"') else 0
        return TextOrigin(self.file, self.lines, start.line, start.column + quote,
                          start.column + quote)
