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



def test_network_example_runs():
    api = re.search(r"## Python API\n\n```python\n(.*?)```(.*?)```python\n(.*?)```", README, re.S)
    with contextlib.redirect_stdout(io.StringIO()):
        scope = {}
        exec(compile(api.group(1) + api.group(3), "README.md", "exec"), scope)
    assert scope["y"].shape == (5, 3, 16) and scope["dx"].shape == (5, 3, 4)

def test_layer_norm_expression_compiles():
    expr = re.search(r"Layer norm is\n`(.*?)`", README, re.S).group(1)
    cell = rnndsl.compile("name: t\nsizes: [input, hidden]\ninputs: {x: input}\n"
                          f"states: {{h: hidden}}\nequations: |\n  v = W @ x\n  h = {expr}\n")
    assert set(cell.params) == {"W", "a", "b"}
