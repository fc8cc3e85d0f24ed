"""The README's Python example runs as written, and its layer-norm expression is valid."""
import contextlib
import io
import re
from pathlib import Path

import rnndsl

README = (Path(__file__).parent.parent / "README.md").read_text()


def test_python_api_example_runs():
    code = re.search(r"## Python API\n\n```python\n(.*?)```", README, re.S).group(1)
    with contextlib.redirect_stdout(io.StringIO()) as out:
        exec(compile(code, "README.md", "exec"), {})
    assert "('hidden', 'hidden')" in out.getvalue()


def test_layer_norm_expression_compiles():
    expr = re.search(r"Layer norm is\n`(.*?)`", README, re.S).group(1)
    cell = rnndsl.compile("name: t\nsizes: [input, hidden]\ninputs: {x: input}\n"
                          f"states: {{h: hidden}}\nequations: |\n  v = W @ x\n  h = {expr}\n")
    assert set(cell.params) == {"W", "a", "b"}
