"""Optimisers against hand-written update formulas, clipping against hand-computed norms,
exact resumption from a saved state, divergence checks."""
import io

import numpy as np
import pytest

from rnndsl.training.optim import (SGD, Adam, Schedule, TrainingDiverged, check_finite,
                                  clip_global_norm, clip_value, flatten, global_norm,
                                  make_optimizer)


def test_global_norm_and_clipping():
    grads = {"a": np.array([3.0, 4.0]), "b": np.array([12.0])}
    assert global_norm(grads) == pytest.approx(13.0)  # sqrt(9 + 16 + 144)
    assert clip_global_norm(grads, 6.5) == pytest.approx(13.0)
    np.testing.assert_allclose(grads["a"], [1.5, 2.0])  # scaled by 6.5 / 13
    np.testing.assert_allclose(grads["b"], [6.0])
    assert global_norm(grads) == pytest.approx(6.5)

    under = {"a": np.array([3.0, 4.0], dtype=np.float32)}
    assert clip_global_norm(under, 5.5) == pytest.approx(5.0)
    np.testing.assert_array_equal(under["a"], [3.0, 4.0])


def test_clip_value():
    grads = {"a": np.array([-3.0, 0.5, 2.0]), "b": np.array([[7.0, -0.1]])}
    clip_value(grads, 1.0)
    np.testing.assert_array_equal(grads["a"], [-1.0, 0.5, 1.0])
    np.testing.assert_array_equal(grads["b"], [[1.0, -0.1]])


GRADS = [{"w": np.array([0.5, -1.0]), "b": np.array([2.0])},
         {"w": np.array([-0.25, 0.75]), "b": np.array([-1.0])},
         {"w": np.array([1.0, 1.0]), "b": np.array([0.5])}]


def fresh_params():
    return {"w": np.array([1.0, 2.0]), "b": np.array([-0.5])}


def test_sgd_momentum_matches_formula():
    params, opt = fresh_params(), SGD(lr=0.1, momentum=0.9)
    w_array = params["w"]
    expect, v = fresh_params(), {k: 0.0 for k in params}
    for g in GRADS:
        opt.step(params, g)
        for k in expect:
            v[k] = 0.9 * v[k] + g[k]
            expect[k] = expect[k] - 0.1 * v[k]
            np.testing.assert_allclose(params[k], expect[k], rtol=1e-15)
    assert params["w"] is w_array  # updated in place


def test_plain_sgd():
    params = fresh_params()
    SGD(lr=0.5).step(params, GRADS[0])
    np.testing.assert_allclose(params["w"], [0.75, 2.5])
    np.testing.assert_allclose(params["b"], [-1.5])


def test_adam_matches_formula():
    lr, b1, b2, eps = 0.01, 0.8, 0.9, 1e-6
    params, opt = fresh_params(), Adam(lr, (b1, b2), eps)
    expect, m, v = fresh_params(), {k: 0.0 for k in params}, {k: 0.0 for k in params}
    for t, g in enumerate(GRADS, start=1):
        opt.step(params, g)
        for k in expect:
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            m_hat, v_hat = m[k] / (1 - b1 ** t), v[k] / (1 - b2 ** t)
            expect[k] = expect[k] - lr * m_hat / (np.sqrt(v_hat) + eps)
            np.testing.assert_allclose(params[k], expect[k], rtol=1e-14)
    # the first step moves every entry by about lr, whatever the gradient's scale
    first = fresh_params()
    Adam(lr).step(first, {k: 1e-3 * g for k, g in GRADS[0].items()})
    np.testing.assert_allclose(np.abs(first["w"] - fresh_params()["w"]), lr, rtol=1e-4)


def test_parameters_without_gradient_are_left_alone():
    params = fresh_params()
    Adam(0.1).step(params, {"w": np.ones(2)})
    np.testing.assert_array_equal(params["b"], fresh_params()["b"])


@pytest.mark.parametrize("make", [lambda: SGD(0.05, momentum=0.9), lambda: Adam(0.01)],
                         ids=["sgd-momentum", "adam"])
def test_resume_through_savez_is_bit_identical(make):
    rng = np.random.default_rng(0)
    grads = [{"layer0.fwd.W_ii": rng.standard_normal((3, 2)).astype(np.float32),
              "head.b": rng.standard_normal(2).astype(np.float32)} for _ in range(6)]
    start = {"layer0.fwd.W_ii": rng.standard_normal((3, 2)).astype(np.float32),
             "head.b": np.zeros(2, dtype=np.float32)}

    straight, opt = {k: v.copy() for k, v in start.items()}, make()
    for g in grads:
        opt.step(straight, g)

    resumed, first = {k: v.copy() for k, v in start.items()}, make()
    for g in grads[:3]:
        first.step(resumed, g)
    buf = io.BytesIO()
    np.savez(buf, **first.state_dict())
    buf.seek(0)
    second = make()
    second.load_state_dict(np.load(buf))
    for g in grads[3:]:
        second.step(resumed, g)

    for k in start:
        assert resumed[k].dtype == np.float32
        np.testing.assert_array_equal(resumed[k], straight[k])
    assert all("/" in k or k == "t" for k in first.state_dict())


def test_state_dict_keys_and_copying():
    opt = Adam()
    opt.step(fresh_params(), GRADS[0])
    state = opt.state_dict()
    assert set(state) == {"m/w", "m/b", "v/w", "v/b", "t"} and int(state["t"]) == 1
    state["m/w"][:] = 99  # a copy: the optimiser's own state is untouched
    assert opt.state_dict()["m/w"][0] != 99
    assert set(SGD(momentum=0.5).state_dict()) == set()
    with pytest.raises(ValueError, match="unexpected state entry 'q/w'"):
        SGD().load_state_dict({"q/w": np.zeros(2)})
    with pytest.raises(ValueError, match="'t'"):
        Adam().load_state_dict({"m/w": np.zeros(2)})


def test_make_optimizer():
    sgd = make_optimizer("sgd", None, momentum=0.9)
    assert isinstance(sgd, SGD) and sgd.lr == 0.1 and sgd.momentum == 0.9
    adam = make_optimizer("Adam", None)
    assert isinstance(adam, Adam) and adam.lr == 1e-3
    assert make_optimizer("adam", 0.02).lr == 0.02
    adamw = make_optimizer("adamw", None)
    assert isinstance(adamw, Adam) and adamw.weight_decay == 0.01 and adam.weight_decay == 0
    assert make_optimizer("adamw", 0.02, weight_decay=0.5).weight_decay == 0.5
    with pytest.raises(ValueError, match="weight decay applies to adamw only"):
        make_optimizer("adam", None, weight_decay=0.1)
    with pytest.raises(ValueError, match="unknown optimizer 'rmsprop'; choose sgd, adam, adamw"):
        make_optimizer("rmsprop", None)
    with pytest.raises(ValueError, match="momentum applies to sgd only"):
        make_optimizer("adam", None, momentum=0.9)


def test_check_finite():
    good = {"layer0.fwd.W_ii": np.ones(3), "head.W": np.zeros((2, 2))}
    check_finite(5, 0.7, good)
    with pytest.raises(TrainingDiverged, match=r"^step 120: loss is nan$") as info:
        check_finite(120, float("nan"), good)
    assert info.value.step == 120 and info.value.name is None
    bad = {**good, "layer0.fwd.W_ii": np.array([1.0, np.inf, 2.0])}
    with pytest.raises(TrainingDiverged,
                       match=r"^step 120: gradient of 'layer0.fwd.W_ii' has inf$") as info:
        check_finite(120, 0.7, bad)
    assert info.value.name == "layer0.fwd.W_ii"
    with pytest.raises(TrainingDiverged, match="step 3: loss is inf"):
        check_finite(3, float("inf"), good)
    with pytest.raises(TrainingDiverged, match="'head.W' has nan"):
        check_finite(3, 1.0, {"head.W": np.array([np.nan, np.inf])})


# -- the fused pass: clipping inside the update, flat parameter buffers --------------------------
def random_grads(rng, steps, dtype=np.float64):
    return [{"w": rng.standard_normal(2).astype(dtype) * 3,
             "b": rng.standard_normal(1).astype(dtype)} for _ in range(steps)]


@pytest.mark.parametrize("make", [lambda: SGD(0.05, momentum=0.9), lambda: SGD(0.05),
                                  lambda: Adam(0.01), lambda: Adam(0.01, weight_decay=0.1)],
                         ids=["sgd-momentum", "sgd", "adam", "adamw"])
def test_fused_clipping_matches_clipping_first(make):
    """step(clip_norm, clip_value) updates as clip_global_norm, clip_value, then step did, and
    leaves the gradients as they were."""
    grads = random_grads(np.random.default_rng(1), 5)
    fused, fused_opt = fresh_params(), make()
    plain, plain_opt = fresh_params(), make()
    for g in grads:
        kept = {k: v.copy() for k, v in g.items()}
        norm = fused_opt.step(fused, g, clip_norm=1.5, clip_value=0.4)
        for k in g:
            np.testing.assert_array_equal(g[k], kept[k])
        assert norm == pytest.approx(global_norm(kept), rel=1e-15)
        clip_global_norm(kept, 1.5)
        clip_value(kept, 0.4)
        plain_opt.step(plain, kept)
        for k in plain:
            np.testing.assert_allclose(fused[k], plain[k], rtol=1e-15, atol=1e-17)


def test_flat_parameters_are_updated_in_their_buffer():
    params = flatten(fresh_params())
    base = params["w"].base
    assert params["b"].base is base and base.size == 3
    np.testing.assert_array_equal(base, [1.0, 2.0, -0.5])
    loose, opt_flat, opt_loose = fresh_params(), Adam(0.01), Adam(0.01)
    for g in GRADS:
        opt_flat.step(params, g)
        opt_loose.step(loose, g)
    for k in loose:
        np.testing.assert_array_equal(params[k], loose[k])
        assert params[k].base is base


def test_non_finite_gradients_update_nothing():
    params, opt = fresh_params(), Adam(0.1)
    norm = opt.step(params, {"w": np.array([1.0, np.nan]), "b": np.ones(1)})
    assert np.isnan(norm)
    for k, v in fresh_params().items():
        np.testing.assert_array_equal(params[k], v)


# -- against PyTorch: AdamW and the schedules, float64 ----------------------------------------
torch = pytest.importorskip("torch")


def torch_run(params, grads, make_optimizer, make_scheduler=None):
    """The parameters after torch's optimiser (and scheduler) took these gradients."""
    tensors = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True)
               for k, v in params.items()}
    opt = make_optimizer(list(tensors.values()))
    sched = make_scheduler(opt) if make_scheduler else None
    lrs = []
    for g in grads:
        for k, t in tensors.items():
            t.grad = torch.tensor(g[k], dtype=torch.float64)
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        if sched:
            sched.step()
    return {k: t.detach().numpy() for k, t in tensors.items()}, lrs


@pytest.mark.parametrize("decay", [0.0, 0.01, 0.3])
def test_adamw_matches_torch(decay):
    grads = random_grads(np.random.default_rng(2), 20)
    ours, opt = fresh_params(), make_optimizer("adamw", 0.05, weight_decay=decay)
    for g in grads:
        opt.step(ours, g)
    theirs, _ = torch_run(fresh_params(), grads,
                          lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=decay))
    for k in ours:
        np.testing.assert_allclose(ours[k], theirs[k], rtol=1e-13, atol=1e-15)


def torch_schedule(kind, warmup, steps):
    """torch.optim.lr_scheduler's own schedulers for each of our kinds."""
    from torch.optim import lr_scheduler as ls

    def make(opt):
        ramp = ls.LinearLR(opt, start_factor=1 / (warmup + 1), end_factor=1.0,
                           total_iters=warmup)
        if kind == "constant":
            return ls.ConstantLR(opt, factor=1.0, total_iters=0)
        if kind == "warmup":
            return ramp
        cosine = ls.CosineAnnealingLR(opt, T_max=steps - warmup, eta_min=0.0)
        return ls.SequentialLR(opt, [ramp, cosine], milestones=[warmup]) if warmup else cosine
    return make


@pytest.mark.parametrize("kind,warmup", [("constant", 0), ("warmup", 5), ("warmup", 1),
                                         ("cosine", 0), ("cosine", 4), ("cosine", 29)])
def test_schedules_match_torch(kind, warmup):
    """The learning rate of every step, and AdamW's parameters after a run under it."""
    steps, lr = 30, 0.05
    schedule = Schedule(kind, warmup, steps)
    grads = random_grads(np.random.default_rng(3), steps)
    ours, opt = fresh_params(), make_optimizer("adamw", lr, weight_decay=0.1)
    for t, g in enumerate(grads):
        opt.step(ours, g, lr=lr * schedule(t))
    theirs, lrs = torch_run(fresh_params(), grads,
                            lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=0.1),
                            torch_schedule(kind, warmup, steps))
    np.testing.assert_allclose([lr * schedule(t) for t in range(steps)], lrs, rtol=1e-12)
    for k in ours:
        np.testing.assert_allclose(ours[k], theirs[k], rtol=1e-12, atol=1e-15)


def test_schedule_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        Schedule("step")
    with pytest.raises(ValueError, match="warmup applies to the warmup and cosine"):
        Schedule("constant", 3, 10)
    with pytest.raises(ValueError, match="0 <= warmup < steps"):
        Schedule("cosine", 10, 10)
    assert Schedule("cosine", 0, 10)(10) == 0.0  # reaches zero at the end of the run
