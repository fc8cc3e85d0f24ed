"""Output heads: losses against explicit loops, gradients against central differences
(float64), padding and masked-out steps inert."""
import math

import numpy as np
import pytest

from rnndsl.training.heads import KINDS, Head

T, B, N, OUT = 5, 3, 4, 3
LENGTHS = np.array([5, 3, 1])
VALID = np.arange(T)[:, None] < LENGTHS  # (T, B)
STEP_KINDS = [k for k in KINDS if k.endswith("_step")]


def make_case(kind, masked, seed=0):
    """A head with random parameters and a batch whose padding holds junk (random y, invalid
    targets), which must not matter."""
    rng = np.random.default_rng(seed)
    head = Head(kind, N, OUT)
    params = {k: 2 * v for k, v in head.init_params(rng, np.float64).items()}
    y = rng.standard_normal((T, B, N))
    family, last = kind.split("_")[0], kind.endswith("_last")
    shape = (B,) if last else (T, B)
    if family == "softmax":
        target = rng.integers(0, OUT, shape)
        if not last:
            target[~VALID] = -1
    else:
        target = rng.standard_normal(shape + (OUT,)) if family == "mse" else \
            rng.integers(0, 2, shape + (OUT,)).astype(float)
        if not last:
            target[~VALID] = np.nan
    mask = None
    if masked:
        mask = rng.random((T, B)) < 0.6
        mask[0, 0] = True
        mask[4, 1] = True  # past sequence 1's end: still must not count
    return head, params, y, target, mask


def counted(kind, mask):
    if kind.endswith("_last"):
        out = np.zeros((T, B), dtype=bool)
        out[LENGTHS - 1, np.arange(B)] = True
        return out
    return VALID if mask is None else VALID & mask


def loop_loss(kind, params, y, target, mask):
    """The mean loss written out one item at a time, with scalar math."""
    W, b = params["head.W"], params["head.b"]
    where = counted(kind, mask)
    items = []
    for t in range(T):
        for s in range(B):
            if not where[t, s]:
                continue
            z = [sum(W[o, i] * y[t, s, i] for i in range(N)) + b[o] for o in range(OUT)]
            tg = target[s] if kind.endswith("_last") else target[t, s]
            if kind.startswith("softmax"):
                items.append(math.log(sum(math.exp(v) for v in z)) - z[tg])
            elif kind.startswith("mse"):
                items += [(z[o] - tg[o]) ** 2 for o in range(OUT)]
            else:
                p = [1 / (1 + math.exp(-v)) for v in z]
                items += [-(tg[o] * math.log(p[o]) + (1 - tg[o]) * math.log(1 - p[o]))
                          for o in range(OUT)]
    return sum(items) / len(items)


CASES = [(k, False) for k in KINDS] + [(k, True) for k in STEP_KINDS]
IDS = [f"{k}{'-mask' if m else ''}" for k, m in CASES]


@pytest.mark.parametrize("kind,masked", CASES, ids=IDS)
def test_loss_equals_explicit_loops(kind, masked):
    head, params, y, target, mask = make_case(kind, masked)
    res = head.loss(params, y, target, LENGTHS, mask)
    assert res.loss == pytest.approx(loop_loss(kind, params, y, target, mask), rel=1e-12)


@pytest.mark.parametrize("kind,masked", CASES, ids=IDS)
def test_gradients_equal_central_differences(kind, masked):
    head, params, y, target, mask = make_case(kind, masked, seed=1)
    res = head.loss(params, y, target, LENGTHS, mask)
    eps = 1e-6
    for name, arr, derived in [("y", y, res.dy), ("head.W", params["head.W"], res.grads["head.W"]),
                               ("head.b", params["head.b"], res.grads["head.b"])]:
        assert derived.shape == arr.shape
        numeric = np.zeros_like(arr)
        flat, out = arr.reshape(-1), numeric.reshape(-1)
        for k in range(flat.size):
            keep = flat[k]
            flat[k] = keep + eps
            up = head.loss(params, y, target, LENGTHS, mask).loss
            flat[k] = keep - eps
            down = head.loss(params, y, target, LENGTHS, mask).loss
            flat[k] = keep
            out[k] = (up - down) / (2 * eps)
        np.testing.assert_allclose(derived, numeric, atol=1e-8, err_msg=name)


@pytest.mark.parametrize("kind,masked", CASES, ids=IDS)
def test_uncounted_steps_are_inert(kind, masked):
    head, params, y, target, mask = make_case(kind, masked, seed=2)
    res = head.loss(params, y, target, LENGTHS, mask)
    off = ~counted(kind, mask)
    assert np.all(res.dy[off] == 0)
    assert np.all(np.isfinite(res.dy)) and np.isfinite(res.loss)
    y2 = y.copy()
    y2[off] = 1e3  # junk outputs where nothing counts change nothing
    res2 = head.loss(params, y2, target, LENGTHS, mask)
    assert res2.loss == res.loss
    for name in res.grads:
        np.testing.assert_array_equal(res2.grads[name], res.grads[name])


def test_metrics_count_items_right():
    head = Head("softmax_step", 2, 3)
    params = {"head.W": np.array([[1.0, 0], [0, 1], [0, 0]]), "head.b": np.zeros(3)}
    # scores argmax: class 0, class 1, class 1, class 0 (the last step is padding)
    y = np.array([[[2.0, 0]], [[0, 2.0]], [[0, 2.0]], [[5.0, 0]]])
    res = head.loss(params, y, np.array([[0], [1], [2], [2]]), lengths=[3])
    assert res.metrics["accuracy"] == pytest.approx(2 / 3)

    bits = Head("bits_step", 2, 2)
    params = {"head.W": np.eye(2), "head.b": np.zeros(2)}
    y = np.array([[[3.0, -3.0], [1.0, 1.0]], [[-1.0, 2.0], [0.5, -0.5]]])  # (T=2, B=2, 2)
    target = np.array([[[1, 0], [0, 1]], [[1, 1], [1, 1]]], dtype=float)
    mask = np.array([[True, True], [True, False]])
    res = bits.loss(params, y, target, lengths=[2, 2], mask=mask)
    # counted bits: seq 0 all right at t=0, one wrong at t=1; seq 1 one wrong at t=0
    assert res.metrics["accuracy"] == pytest.approx(4 / 6)
    assert res.metrics["bits_wrong_per_seq"] == pytest.approx(1.0)
    assert res.metrics["cost_per_seq"] == pytest.approx(res.loss * 6 / 2 / math.log(2))
    assert "accuracy" not in Head("mse_last", 2, 1).loss(
        {"head.W": np.ones((1, 2)), "head.b": np.zeros(1)}, y, np.zeros((2, 1)), [2, 1]).metrics


@pytest.mark.parametrize("kind", ["softmax_step", "bits_step"])
def test_extreme_scores_stay_finite(kind):
    head, params, y, target, _ = make_case(kind, False, seed=3)
    res = head.loss(params, 1e4 * y, target, LENGTHS)
    assert np.isfinite(res.loss) and res.loss > 10
    assert all(np.all(np.isfinite(g)) for g in [res.dy, *res.grads.values()])
    assert np.all(np.isfinite(head.predict(params, 1e4 * y, LENGTHS)))


def test_predict_shapes_and_values():
    rng = np.random.default_rng(4)
    y = rng.standard_normal((T, B, N)).astype(np.float32)
    for kind in KINDS:
        head = Head(kind, N, OUT)
        params = head.init_params(rng, np.float32)
        pred = head.predict(params, y, LENGTHS)
        assert pred.shape == ((T, B, OUT) if kind.endswith("_step") else (B, OUT))
        assert pred.dtype == np.float32
        if kind.startswith("softmax"):
            np.testing.assert_allclose(pred.sum(-1), 1, rtol=1e-5)
        if kind == "mse_last":  # each sequence's own last step
            expect = y[LENGTHS - 1, np.arange(B)] @ params["head.W"].T + params["head.b"]
            np.testing.assert_allclose(pred, expect, rtol=1e-6)
        if kind == "bits_step":
            assert np.all((pred > 0) & (pred < 1))


def test_init_params():
    params = Head("mse_step", 16, 3).init_params(np.random.default_rng(0), np.float64)
    assert set(params) == {"head.W", "head.b"}
    assert params["head.W"].shape == (3, 16) and params["head.b"].shape == (3,)
    assert np.abs(params["head.W"]).max() <= 0.25 and params["head.W"].dtype == np.float64


def test_float32_in_float32_out():
    head, params, y, target, mask = make_case("bits_step", True)
    params = {k: v.astype(np.float32) for k, v in params.items()}
    res = head.loss(params, y.astype(np.float32), target, LENGTHS, mask)  # float64 target
    assert res.dy.dtype == np.float32
    assert all(g.dtype == np.float32 for g in res.grads.values())


def test_errors():
    with pytest.raises(ValueError, match="unknown head kind 'softmax'.*softmax_step"):
        Head("softmax", 2, 2)
    head, params, y, target, _ = make_case("softmax_last", False)
    with pytest.raises(ValueError, match="no mask"):
        head.loss(params, y, target, LENGTHS, mask=np.ones((T, B), dtype=bool))
    with pytest.raises(ValueError, match="last step"):
        head.loss(params, y, target, np.array([5, 0, 1]))
    with pytest.raises(ValueError, match=r"target has shape \(5, 3\), expected \(3,\)"):
        head.loss(params, y, np.zeros((T, B), dtype=int), LENGTHS)
