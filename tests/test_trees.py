"""Tree cells: the built-in ones against recursive PyTorch implementations
(tree_references.py; float64, every node's output and every gradient to 1e-10), located errors
for misused tree syntax, bad tree batches named by tree and node, the CLI and the PyTorch
module."""
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import rnndsl
from rnndsl.cli import app
from rnndsl.engines.gradcheck import tree_gradcheck
from rnndsl.engines.tree import TreeBatch, TreeError
from tree_references import REFERENCES

I, H = 3, 4
TARGETS = ("reference", "cpu")


def random_trees(rng, count: int, arity: int, most: int = 9):
    """Parent arrays of random trees of 1 to `most` nodes, no node above `arity` children."""
    trees = []
    for _ in range(count):
        n = int(rng.integers(1, most + 1))
        parent = [-1]
        for i in range(1, n):
            open_ = [j for j in range(i) if parent.count(j) < arity]
            parent.append(int(rng.choice(open_)))
        trees.append(parent)
    return trees


def node_h(fn, p, x, kids, i):
    out = fn(p, x, kids, i)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_builtin_tree_cells_match_recursive_pytorch(name, target):
    fn, arity = REFERENCES[name]
    rng = np.random.default_rng(7)
    parents = random_trees(rng, 6, arity) + [[-1]]
    inputs = [rng.standard_normal((len(p), I)) for p in parents]  # internal nodes too
    batch = TreeBatch.from_parents(parents, inputs)
    cell = rnndsl.compile(name, target=target)
    params = cell.init_params(input=I, hidden=H, seed=3, dtype=np.float64)
    params = {k: v + 0.3 * rng.standard_normal(v.shape) for k, v in params.items()}
    fwd = cell.forward(params, batch)
    seed = rng.standard_normal(fwd.output.shape)
    grads = cell.backward(params, fwd, seed)

    tp = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    loss, rows = 0, []
    for t, (parent, x) in enumerate(zip(parents, inputs)):
        kids = [[j for j, q in enumerate(parent) if q == i] for i in range(len(parent))]
        tx = torch.tensor(x, requires_grad=True)
        hs = torch.stack([node_h(fn, tp, tx, kids, i) for i in range(len(parent))])
        first = int(np.flatnonzero(batch.tree == t)[0])
        loss = loss + (hs * torch.tensor(seed[first:first + len(parent)])).sum()
        rows.append((tx, hs))
    loss.backward()
    expected_h = np.concatenate([hs.detach().numpy() for _, hs in rows])
    np.testing.assert_allclose(fwd.output, expected_h, rtol=0, atol=1e-10)
    assert set(grads.params) == set(tp)
    for k, v in tp.items():
        np.testing.assert_allclose(grads.params[k], v.grad.numpy(), rtol=0, atol=1e-10,
                                   err_msg=k)
    expected_dx = np.concatenate([tx.grad.numpy() for tx, _ in rows])
    np.testing.assert_allclose(grads.inputs["x"], expected_dx, rtol=0, atol=1e-10)
    np.testing.assert_array_equal(fwd.at_roots(), fwd.output[batch.roots])


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_derived_gradients_pass_finite_differences(name):
    result = tree_gradcheck(rnndsl.compile(name, target="cpu"))
    assert result.worst[1] < 1e-7, result.errors


def test_float32_runs_and_agrees_with_float64():
    rng = np.random.default_rng(1)
    parents = random_trees(rng, 5, 4)
    inputs = [rng.standard_normal((len(p), I)) for p in parents]
    cell = rnndsl.compile("child_sum_tree_lstm")
    p64 = cell.init_params(input=I, hidden=H, dtype=np.float64)
    p32 = {k: v.astype(np.float32) for k, v in p64.items()}
    out64 = cell.forward(p64, TreeBatch.from_parents(parents, inputs)).output
    out32 = cell.forward(p32, TreeBatch.from_parents(
        parents, [x.astype(np.float32) for x in inputs])).output
    assert out32.dtype == np.float32
    np.testing.assert_allclose(out32, out64, atol=1e-5)


def test_nested_tuples_are_the_same_trees_as_parent_indices():
    rng = np.random.default_rng(2)
    a, b, c, d = (rng.standard_normal(I) for _ in range(4))
    nested = TreeBatch.from_nested([((a, b), c), d])
    # pre-order: root 0, (a, b) 1, a 2, b 3, c 4; zero input at internal nodes
    parents = TreeBatch.from_parents(
        [[-1, 0, 1, 1, 0], [-1]],
        [{2: a, 3: b, 4: c}, {0: d}])
    np.testing.assert_array_equal(nested.parent, parents.parent)
    np.testing.assert_array_equal(nested.inputs, parents.inputs)
    cell = rnndsl.compile("binary_tree_lstm")
    params = cell.init_params(input=I, hidden=H, dtype=np.float64)
    np.testing.assert_array_equal(cell.forward(params, nested).output,
                                  cell.forward(params, parents).output)
    assert [list(level.ids) for level in nested.levels] == [[2, 3, 4, 5], [1], [0]]


# -- bad tree batches -------------------------------------------------------------------------
X3 = np.zeros((3, I))


@pytest.mark.parametrize("make, words", [
    (lambda: TreeBatch.from_parents([[-1, 0, 1], [1, 2, 0]], [X3, X3]),
     ["tree 1", "no root", "cycle"]),
    (lambda: TreeBatch.from_parents([[-1, 2, 1, 0]], [np.zeros((4, I))]),
     ["tree 0, node 1", "cycle"]),
    (lambda: TreeBatch.from_parents([[-1, 0, 5]], [X3]), ["tree 0, node 2", "parent 5"]),
    (lambda: TreeBatch.from_parents([[-1, -1, 0]], [X3]), ["tree 0 has 2 roots"]),
    (lambda: TreeBatch.from_children([[[1, 2], [2], []]], [X3]),
     ["tree 0, node 2 has two parents (nodes 0 and 1)"]),
    (lambda: TreeBatch.from_children([[[1, 1], [], []]], [X3]),
     ["tree 0, node 1 is a child of node 0 twice"]),
    (lambda: TreeBatch.from_parents([[-1, 0, 0]], [{1: np.zeros(I)}]),
     ["tree 0, node 2", "a leaf without an input"]),
    (lambda: TreeBatch.from_nested([(np.zeros(I), np.zeros(I)), (np.zeros(I), None)]),
     ["tree 1, node 2 (at [1])", "a leaf without an input"]),
    (lambda: TreeBatch.from_parents([[-1, 0, 0]], [np.zeros((2, I))]),
     ["tree 0", "(3, n) array", "shape (2, 3)"]),
])
def test_bad_batches_name_the_tree_and_the_node(make, words):
    with pytest.raises(TreeError) as info:
        make()
    for w in words:
        assert w in str(info.value)


def test_a_node_with_more_children_than_the_cell_takes():
    batch = TreeBatch.from_parents([[-1], [-1, 0, 0, 0]], [np.zeros((1, I)), np.zeros((4, I))])
    cell = rnndsl.compile("binary_tree_lstm", target="reference")
    with pytest.raises(TreeError, match=r"tree 1, node 0 has 3 children; binary_tree_lstm "
                                        r"takes at most 2"):
        cell.forward(cell.init_params(input=I, hidden=H), batch)


# -- the language -----------------------------------------------------------------------------
HEAD = """name: t
sizes: [input, hidden]
inputs: {x: input}
states: {h: hidden, c: hidden}
outputs: [h]
"""
TREE2 = HEAD + "structure: tree\narity: 2\n"
ANY = HEAD + "structure: tree\narity: any\n"


@pytest.mark.parametrize("text, words, line, column", [
    (HEAD + "equations: |\n  c = W @ x + U @ h_left\n  h = tanh(c)\n",
     ["'h_left' is a child's state", "only a tree cell", "h_prev"], 7, 19),
    (HEAD + "equations: |\n  c = sum_k(h_k)\n  h = tanh(c)\n",
     ["sum_k(...) sums over a tree node's children", "structure: tree"], 7, 7),
    (ANY + "equations: |\n  f_k = sigmoid(U @ h_k)\n  c = W @ x + f_k * c_k\n  h = tanh(c)\n",
     ["'c' has one value per child", "'f_k'", "name it 'c_k'", "sum_k(...)"], 10, 3),
    (ANY + "equations: |\n  c = sum_k(W @ x)\n  h = tanh(c)\n",
     ["does not depend on the child", "'h_k' inside sum_k"], 9, 7),
    (ANY + "equations: |\n  a = W @ x\n  f_k = sigmoid(a + U @ h_k)\n"
     "  c = sum_k(f_k * c_k)\n  h = tanh(c)\n",
     ["'a' is computed per node", "per-child value"], 10, 17),
    (ANY + "equations: |\n  c = sum_k(sum_k(c_k))\n  h = tanh(c)\n",
     ["may not stand inside"], 9, 13),
    (TREE2 + "equations: |\n  c = W @ x + U @ h_prev\n  h = tanh(c)\n",
     ["'h_prev': a tree cell has no previous step", "'h_left' and 'h_right'"], 9, 19),
    (TREE2 + "equations: |\n  c = W @ x + U @ h_k\n  h = tanh(c)\n",
     ["'h_k' is no child's state with arity 2", "'h_left' and 'h_right'"], 9, 19),
    (TREE2 + "equations: |\n  c = sum_k(c_k)\n  h = tanh(c)\n",
     ["sum_k(...) sums over any number of children", "arity 2"], 9, 7),
    (TREE2 + "equations: |\n  h_left = W @ x\n  c = h_left\n  h = tanh(c)\n",
     ["'h_left' is the state 'h' of a child", "assign 'h'"], 9, 3),
    (ANY + "equations: |\n  c = W @ x + U @ sum_k(h_k)\n  g_k = W @ x\n  h = tanh(c)\n",
     ["'g_k' ends in '_k'", "uses no child's state"], 10, 3),
    (HEAD + "structure: tree\nequations: |\n  c = W @ x\n  h = tanh(c)\n",
     ["a tree cell needs 'arity'"], 6, 1),
    (HEAD + "arity: 2\nequations: |\n  c = W @ x\n  h = tanh(c)\n",
     ["'arity' is the number of children", "structure: tree"], 6, 1),
    (HEAD + "structure: tree\narity: 0\nequations: |\n  c = W @ x\n  h = tanh(c)\n",
     ["'arity' is a number of children from 1 to 16"], 7, 8),
    (HEAD + "structure: forest\narity: 2\nequations: |\n  c = W @ x\n  h = tanh(c)\n",
     ["unknown structure 'forest'"], 6, 12),
])
def test_misused_tree_syntax_is_a_located_error(text, words, line, column):
    with pytest.raises(rnndsl.SpecError) as info:
        rnndsl.compile(text, target="reference")
    err = info.value
    for w in words:
        assert w in err.message, err.message
    assert (err.pos.line, err.pos.column) == (line, column), err.render()


def test_child_states_of_another_fixed_arity():
    text = HEAD.replace("states: {h: hidden, c: hidden}", "states: {h: hidden}") + \
        "structure: tree\narity: 3\nequations: |\n" \
        "  h = tanh(W @ x + U1 @ h_child1 + U2 @ h_child2 + U3 @ h_child3)\n"
    cell = rnndsl.compile(text, target="reference")
    assert set(cell.node.inputs) == {"x", "h_child1", "h_child2", "h_child3"}
    assert tree_gradcheck(cell).worst[1] < 1e-7


# -- printing and the CLI ---------------------------------------------------------------------
def test_backward_of_a_binary_cell_sends_adjoints_to_both_children():
    text = rnndsl.compile("recursive_nn", target="reference").backward_equations()
    lines = text.splitlines()
    assert lines[0] == "# per node, from the root down"
    assert lines[1:3] == ["d_h = d_h_parent", "d_h_pre = d_h * (1 - h ** 2)"]
    assert "d_h_left = W_l.T @ d_h_pre" in lines
    assert "d_h_right = W_r.T @ d_h_pre" in lines
    assert not any("_prev" in line or "_next" in line for line in lines)


def test_backward_of_child_sum_prints_the_per_child_step():
    text = rnndsl.compile("child_sum_tree_lstm", target="reference").backward_equations()
    node, child = text.split("# per child k")
    assert "d_c_sum = d_c" in node and "d_h_tilde = " in node
    assert "d_c_k = d_c_sum * f_k" in child
    assert "d_h_k = d_h_tilde + U_f.T @ d_f_k_pre" in child


def test_cli_lists_checks_and_compiles_tree_cells(tmp_path, monkeypatch):
    monkeypatch.setenv("RNNDSL_CACHE_DIR", str(tmp_path))
    runner = CliRunner()
    listing = runner.invoke(app, ["list"]).output
    assert "child_sum_tree_lstm  tree  Child-Sum Tree-LSTM" in listing
    assert "ok (binary_tree_lstm: tree cell, 18 parameters)" in \
        runner.invoke(app, ["check", "binary_tree_lstm"]).output
    out = runner.invoke(app, ["compile", "child_sum_tree_lstm", "--show", "ir", "--show",
                              "backward"])
    assert out.exit_code == 0, out.output
    assert "two kernel calls (per-child step, node step) per level" in out.output
    assert "c_sum = f_k * c_k" in out.output and "d_c_k = d_c_sum * f_k" in out.output
    check = runner.invoke(app, ["gradcheck", "recursive_nn"])
    assert check.exit_code == 0 and "recursive_nn: worst relative error" in check.output
    bad = tmp_path / "bad.yaml"
    bad.write_text(TREE2 + "equations: |\n  c = W @ x + U @ h_k\n  h = tanh(c)\n")
    refused = runner.invoke(app, ["check", str(bad)])
    assert refused.exit_code == 2 and "bad.yaml:9:19: 'h_k' is no child's state" in \
        refused.output


def test_sequence_tools_refuse_a_tree_cell():
    with pytest.raises(rnndsl.SpecError, match="is a tree cell"):
        rnndsl.analyse("recursive_nn")


# -- the PyTorch bridge -----------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_tree_module_matches_recursive_pytorch(name):
    from rnndsl.torch import TreeRNN

    fn, arity = REFERENCES[name]
    rng = np.random.default_rng(11)
    parents = random_trees(rng, 4, arity)
    batch = TreeBatch.from_parents(parents, [np.zeros((len(p), I)) for p in parents])
    embedding = torch.tensor(rng.standard_normal((batch.size, I)), requires_grad=True)
    module = TreeRNN(name, I, H, seed=2, dtype=torch.float64)
    nodes, roots = module(batch, embedding * 2)
    (roots.sum() + nodes.square().sum()).backward()

    params = {k: v.detach().clone().requires_grad_() for k, v in module.weights.items()}
    same = embedding.detach().clone().requires_grad_()
    total = 0
    for t, parent in enumerate(parents):
        kids = [[j for j, q in enumerate(parent) if q == i] for i in range(len(parent))]
        rows = np.flatnonzero(batch.tree == t)
        x = same[torch.from_numpy(rows)] * 2
        hs = torch.stack([node_h(fn, params, x, kids, i) for i in range(len(parent))])
        total = total + hs[0].sum() + hs.square().sum()
        np.testing.assert_allclose(nodes[torch.from_numpy(rows)].detach(), hs.detach(),
                                   rtol=0, atol=1e-10)
    total.backward()
    for k, v in params.items():
        np.testing.assert_allclose(module.weights[k].grad, v.grad, rtol=0, atol=1e-10,
                                   err_msg=k)
    np.testing.assert_allclose(embedding.grad, same.grad, rtol=0, atol=1e-10)


def test_tree_module_refuses_a_sequence_cell():
    from rnndsl.torch import TreeRNN

    with pytest.raises(ValueError, match="'lstm' is a sequence cell"):
        TreeRNN("lstm", I, H)


@pytest.mark.parametrize("args", [["bench", "recursive_nn"],
                                  ["train", "recursive_nn", "--task", "adding", "--steps", "2"],
                                  ["compare", "lstm", "recursive_nn", "--steps", "2"]])
def test_sequence_commands_refuse_a_tree_cell(args):
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 2 and "tree cell" in out.output and "Traceback" not in out.output


def test_sequence_module_refuses_a_tree_cell():
    from rnndsl.torch import RNN

    with pytest.raises(ValueError, match="'recursive_nn' is a tree cell; RNN runs sequences"):
        RNN("recursive_nn", I, H)


GENERAL = """name: general
structure: tree
arity: any
sizes: [input, hidden]
inputs: {x: input}
states: {h: hidden}
outputs: [h, y, m]
params:
  W_y: {shape: [input, hidden]}
equations: |
  g_k = tanh(U @ h_k + V @ x)
  h = tanh(W @ x + sum_k(g_k * h_k) + sum_k(g_k))
  y = W_y @ h
  m = max(h)
"""


def test_two_sums_and_outputs_that_are_not_states():
    cell = rnndsl.compile(GENERAL, target="cpu")
    assert cell.sums == {"h_sum1": "hidden", "h_sum2": "hidden"}
    assert "h_sum2 = g_k" in cell.equations().splitlines()
    assert tree_gradcheck(cell).worst[1] < 1e-7


def test_sum_k_of_a_scalar_is_a_located_error():
    text = GENERAL.replace("sum_k(g_k))", "sum_k(max(g_k)))")
    with pytest.raises(rnndsl.SpecError, match=r"sums vectors of one of the spec's sizes") as info:
        rnndsl.compile(text, target="reference")
    assert (info.value.pos.line, info.value.pos.column) == (12, 39)
