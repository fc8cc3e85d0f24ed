"""Fuzzing the front end: random and mutated specs either compile (and then run) or fail with
a SpecError; no other exception may escape. Deterministic: fixed seeds."""
import random

import numpy as np
import pytest

import rnndsl
from rnndsl.language.errors import SpecError

from engines import long_checks

LSTM = (rnndsl.builtin_specs()["lstm"]).read_text()
HEAD, EQUATIONS = LSTM.split("equations: |\n")
TOKENS = [
    "+", "-", "*", "/", "@", "**", "(", ")", ",", "=", "\n", " ", "\t", "#", "\\\n", ".", ":",
    "'", '"', "[", "]", "{", "}", "|", ">", "&a", "*a", "---", "? ", "!!python/object:os.system",
    "__import__", "h_prev", "c_prev", "x", "h", "c", "i", "_prev", "W_ii", "input", "hidden",
    "sigmoid(", "tanh(", "max(", "min(", "softmax(", "mean(", "sum(", "sqrt(", "exp(", "log(",
    "abs(", "relu(", "1", "0", "-1", "0.5", "1e", "1e400", "**2", "0 ** -1", "(-8) ** 0.5",
    "10 ** 400", "((((", "))))", "max(h_prev, x)", "softmax(c)", "W @ ", "@ x", "é",
]


def mutate(text: str, rng: random.Random, n: int) -> str:
    s = list(text)
    for _ in range(n):
        kind, p = rng.randrange(4), rng.randrange(len(s) + 1)
        if kind == 0 and s:  # delete a character
            del s[min(p, len(s) - 1)]
        elif kind == 1:  # insert a token
            s[p:p] = rng.choice(TOKENS)
        elif kind == 2 and len(s) > 1:  # swap two characters
            p, q = min(p, len(s) - 1), rng.randrange(len(s))
            s[p], s[q] = s[q], s[p]
        else:  # insert a random printable character
            s[p:p] = chr(rng.randrange(32, 127))
    return "".join(s)


def cases(n: int, seed: int):
    rng = random.Random(seed)
    for _ in range(n):
        r = rng.random()
        if r < 0.5:  # mutated equations
            yield HEAD + "equations: |\n" + mutate(EQUATIONS, rng, rng.randint(1, 4))
        elif r < 0.7:  # mutated anywhere in the file
            yield mutate(LSTM, rng, rng.randint(1, 4))
        else:  # a random right-hand side
            rhs = "".join(rng.choice(TOKENS) for _ in range(rng.randint(1, 12)))
            yield HEAD + "equations: |\n  h = " + rhs.replace("\n", "\n  ") + "\n  c = c_prev\n"


def _run_tiny(cell):
    """A cell that compiled must also run forward and backward."""
    sizes = {s: 2 + k for k, s in enumerate(cell.sizes)}
    params = cell.init_params(dtype=np.float64, **sizes)
    xs = {x: np.ones((2, 2, sizes[n])) for x, n in cell.inputs.items()}
    state0 = {s: np.ones((2, sizes[n])) for s, n in cell.states.items()}
    with np.errstate(all="ignore"):  # log of a negative and the like are fine here
        fwd = cell.forward(params, xs, state0)
        cell.backward(params, fwd, {o: np.ones_like(v) for o, v in fwd.outputs.items()})


# Each spec that compiles costs seconds of Numba on the CPU target; the rest run on the
# reference engine (the front end is the same; the differential fuzzer covers the kernels).
CPU_KERNELS = None if long_checks() else 6


@pytest.mark.parametrize("seed", [0, 1, 2, 3] if long_checks() else [0])
def test_fuzz_only_spec_errors(seed):
    compiled = failed = 0
    for text in cases(200, seed):
        on_cpu = CPU_KERNELS is None or compiled < CPU_KERNELS
        try:
            cell = rnndsl.compile(text, target="cpu" if on_cpu else "reference")
        except SpecError as err:
            failed += 1
            assert err.message and err.render()
            if err.pos is not None:  # every position is inside the text
                assert 1 <= err.pos.line <= text.count("\n") + 1, (text, err)
            continue
        except Exception as exc:  # pragma: no cover - this is the failure being hunted
            pytest.fail(f"{type(exc).__name__}: {exc}\nfor spec:\n{text}")
        compiled += 1
        _run_tiny(cell)
    assert failed > 100 and compiled > 5  # both paths were exercised
