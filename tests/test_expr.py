"""The expression task (`--task expr`): expressions and their values, a tree cell that learns
from them, a sequence cell on the same expressions, and the CLI."""
import numpy as np
import pytest
from typer.testing import CliRunner

import rnndsl
from rnndsl.cli import app
from rnndsl.training.expr import TOKENS, expression, train_expr


@pytest.mark.parametrize("depth", [0, 1, 2, 5])
def test_expressions_have_their_depth_and_value(depth):
    rng = np.random.default_rng(depth)
    for _ in range(50):
        e = expression(rng, depth)
        # reducing mod 10 at every operation is reducing the whole value mod 10
        assert e.value == eval(e.text) % 10  # noqa: S307 - the text is made of digits, + - * ( )
        assert "".join(TOKENS[t] for t in e.tokens) == e.text.replace("(", "").replace(")", "") \
            or depth > 0
        height = [0] * len(e.parent)
        for i in reversed(range(1, len(e.parent))):  # pre-order: a child after its parent
            height[e.parent[i]] = max(height[e.parent[i]], height[i] + 1)
        assert height[0] == depth
        assert all(len([j for j in e.parent if j == i]) in (0, 2) for i in range(len(e.parent)))


def test_a_tree_cell_learns_shallow_expressions():
    result = train_expr(rnndsl.compile("binary_tree_lstm"), steps=600, hidden=32, depth=1,
                        lr=1e-2)
    assert result.reads == "tree" and sorted(result.accuracy) == [1, 2, 3]
    assert result.accuracy[1] > 0.8  # chance is 0.1; the most frequent value about 0.2


def test_a_sequence_cell_reads_the_written_expression():
    result = train_expr(rnndsl.compile("gru"), steps=5, hidden=8, depth=2)
    assert result.reads == "sequence" and np.isfinite(result.loss)


def test_cli_trains_and_refuses_options_it_does_not_use(tmp_path, monkeypatch):
    monkeypatch.setenv("RNNDSL_CACHE_DIR", str(tmp_path))
    runner = CliRunner()
    out = runner.invoke(app, ["compare", "recursive_nn", "elman", "--task", "expr",
                              "--steps", "3", "--hidden", "8"])
    assert out.exit_code == 0, out.output
    assert "| recursive_nn | tree |" in out.output and "| elman | sequence |" in out.output
    refused = runner.invoke(app, ["train", "recursive_nn", "--task", "expr", "--layers", "2"])
    assert refused.exit_code == 2
    assert "--task expr does not take --layers" in refused.output
