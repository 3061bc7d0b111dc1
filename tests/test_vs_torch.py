"""Cross-check against PyTorch itself, where it is installed (optional: skipped otherwise).

The rest of the suite tests against NumPy references written from the
formulas; this file checks that those formulas are PyTorch's."""
import numpy as np
import pytest

import fastopt

torch = pytest.importorskip("torch")
F = torch.nn.functional


def t(a):
    return torch.from_numpy(np.array(a, copy=True))


def trajectories(make_fast, make_torch, steps=20, n=1000, seed=0):
    r = np.random.default_rng(seed)
    p0 = r.standard_normal(n)
    grads = [r.standard_normal(n) for _ in range(steps)]
    p = p0.copy()
    opt = make_fast([p])
    tp = torch.nn.Parameter(t(p0))
    topt = make_torch([tp])
    for g in grads:
        opt.step([g])
        tp.grad = t(g)
        topt.step()
    return p, tp.detach().numpy()


@pytest.mark.parametrize("kw", [
    {}, {"weight_decay": 0.1}, {"amsgrad": True}, {"maximize": True},
    {"betas": (0.8, 0.99), "eps": 1e-6, "lr": 0.01},
])
def test_adam_matches_torch(kw):
    p, q = trajectories(lambda ps: fastopt.Adam(ps, **kw), lambda ps: torch.optim.Adam(ps, **kw))
    np.testing.assert_allclose(p, q, rtol=1e-12, atol=1e-14)


def test_adamw_matches_torch():
    p, q = trajectories(lambda ps: fastopt.AdamW(ps, lr=0.01), lambda ps: torch.optim.AdamW(ps, lr=0.01))
    np.testing.assert_allclose(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kw", [
    {}, {"momentum": 0.9}, {"centered": True}, {"centered": True, "momentum": 0.5, "weight_decay": 0.1},
])
def test_rmsprop_matches_torch(kw):
    p, q = trajectories(lambda ps: fastopt.RMSprop(ps, **kw), lambda ps: torch.optim.RMSprop(ps, **kw))
    np.testing.assert_allclose(p, q, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kw", [{}, {"momentum": 0.5}, {"weight_decay": 0.1}])
def test_centered_rmsprop_at_the_edge_of_the_range_matches_torch(dtype, kw):
    # A finite gradient whose square (and so grad_avg's square) overflows:
    # torch.optim's fused multiply-add gives v - gbar^2 = inf and leaves the
    # parameter where it is; so must fastopt (inf - inf would be NaN).
    big = np.finfo(dtype).max / 4
    g = np.array([big, -big, 1.0, big / 1e10, 0.0], dtype)
    p0 = np.array([1.0, -2.0, 3.0, 0.5, 0.25], dtype)
    p = p0.copy()
    opt = fastopt.RMSprop([p], centered=True, **kw)
    tp = torch.nn.Parameter(t(p0))
    topt = torch.optim.RMSprop([tp], centered=True, **kw)
    for step in range(3):
        opt.step([g * (step + 1) / 3])
        tp.grad = t(g * (step + 1) / 3)
        topt.step()
        q = tp.detach().numpy()
        assert np.array_equal(np.isnan(p), np.isnan(q)), (step, p, q)
        np.testing.assert_allclose(p, q, rtol=1e-5 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("kw", [
    {"lr": 0.1}, {"lr": 0.1, "momentum": 0.9}, {"lr": 0.1, "momentum": 0.9, "dampening": 0.9},
    {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
])
def test_sgd_matches_torch(kw):
    p, q = trajectories(lambda ps: fastopt.SGD(ps, **kw), lambda ps: torch.optim.SGD(ps, **kw))
    np.testing.assert_allclose(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("shape, axis", [((16, 8), 1), ((4, 3, 5, 6), 1), ((4, 5, 6, 3), -1)])
def test_batch_norm_matches_torch(shape, axis):
    r = np.random.default_rng(1)
    x, dy = r.standard_normal(shape), r.standard_normal(shape)
    C = shape[axis]
    gamma, beta = r.standard_normal(C), r.standard_normal(C)
    rm, rv = np.zeros(C), np.ones(C)
    y, ctx = fastopt.batch_norm_forward(x, gamma, beta, rm, rv, axis=axis)
    dx, dgamma, dbeta = fastopt.batch_norm_backward(dy, ctx)

    perm = None
    tx = t(x)
    if axis == -1:
        perm = (0, x.ndim - 1) + tuple(range(1, x.ndim - 1))
        tx = tx.permute(*perm)
    tx.requires_grad_(True)
    tg, tb = t(gamma).requires_grad_(True), t(beta).requires_grad_(True)
    trm, trv = t(np.zeros(C)), t(np.ones(C))
    ty = F.batch_norm(tx, trm, trv, tg, tb, training=True, momentum=0.1, eps=1e-5)
    tdy = t(dy).permute(*perm) if perm else t(dy)
    ty.backward(tdy)
    ty_np = ty.detach().numpy()
    tdx = tx.grad.numpy()
    if perm:
        inv = np.argsort(perm)
        ty_np, tdx = ty_np.transpose(inv), tdx.transpose(inv)
    np.testing.assert_allclose(y, ty_np, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dx, tdx, rtol=1e-9, atol=1e-11)
    np.testing.assert_allclose(dgamma, tg.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dbeta, tb.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(rm, trm.numpy(), rtol=1e-12)
    np.testing.assert_allclose(rv, trv.numpy(), rtol=1e-12)


@pytest.mark.parametrize("kw", [
    {}, {"reduction": "sum"}, {"reduction": "none"}, {"label_smoothing": 0.1},
    {"ignore_index": 2}, {"weight": "w"}, {"weight": "w", "label_smoothing": 0.2, "ignore_index": 1},
])
@pytest.mark.parametrize("soft", [False, True])
def test_cross_entropy_matches_torch(kw, soft):
    if soft and "ignore_index" in kw:
        pytest.skip("probability targets take no ignore_index")
    r = np.random.default_rng(2)
    N, C = 12, 7
    logits = r.standard_normal((N, C)) * 3
    target = r.dirichlet(np.ones(C), N) if soft else r.integers(0, C, N)
    kw = dict(kw)
    w = r.uniform(0.5, 2.0, C)
    if kw.get("weight") == "w":
        kw["weight"] = w
    loss, grad = fastopt.cross_entropy(logits, target, return_grad=True, **kw)
    tkw = {k: (t(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
    tl = t(logits).requires_grad_(True)
    tloss = F.cross_entropy(tl, t(target), **tkw)
    tloss.sum().backward()
    np.testing.assert_allclose(loss, tloss.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(grad, tl.grad.numpy(), rtol=1e-9, atol=1e-12)


def test_log_softmax_matches_torch():
    x = np.random.default_rng(3).standard_normal((3, 4, 5)) * 10
    for axis in (0, 1, 2):
        np.testing.assert_allclose(fastopt.log_softmax(x, axis=axis),
                                   F.log_softmax(t(x), dim=axis).numpy(), rtol=1e-12, atol=1e-12)


def test_clip_grad_norm_matches_torch():
    r = np.random.default_rng(4)
    grads = [r.standard_normal(s) for s in [(3, 4), (5,), (2, 2, 2)]]
    for norm_type in (2.0, 1.0, float("inf")):
        mine = [g.copy() for g in grads]
        total = fastopt.clip_grad_norm_(mine, 1.0, norm_type=norm_type)
        ps = [torch.nn.Parameter(t(g)) for g in grads]
        for p_, g in zip(ps, grads):
            p_.grad = t(g)
        ttotal = torch.nn.utils.clip_grad_norm_(ps, 1.0, norm_type=norm_type)
        np.testing.assert_allclose(total, float(ttotal), rtol=1e-12)
        for m, p_ in zip(mine, ps):
            np.testing.assert_allclose(m, p_.grad.numpy(), rtol=1e-12)


def test_clip_grad_norm_infinite_max_norm_matches_torch():
    """max_norm=inf, PyTorch's idiom for "compute the norm, scale nothing";
    with a non-finite norm both scale by inf/inf = NaN."""
    r = np.random.default_rng(5)
    finite = [r.standard_normal(s) for s in [(3, 4), (5,)]]
    infinite = [np.array([1.0, np.inf]), r.standard_normal(3)]
    for grads in (finite, infinite):
        for norm_type in (2.0, 1.0, float("inf")):
            mine = [g.copy() for g in grads]
            total = fastopt.clip_grad_norm_(mine, float("inf"), norm_type=norm_type)
            ps = [torch.nn.Parameter(t(g)) for g in grads]
            for p_, g in zip(ps, grads):
                p_.grad = t(g)
            ttotal = torch.nn.utils.clip_grad_norm_(ps, float("inf"), norm_type=norm_type)
            np.testing.assert_allclose(total, float(ttotal), rtol=1e-12)
            for m, p_ in zip(mine, ps):
                np.testing.assert_allclose(m, p_.grad.numpy(), rtol=1e-12)
def test_clip_grad_value_matches_torch():
    r = np.random.default_rng(5)
    grads = [r.standard_normal(s) * 2 for s in [(3, 4), (5,), (2, 2, 2)]]
    grads[1][2] = np.nan
    mine = [g.copy() for g in grads]
    fastopt.clip_grad_value_(mine, 0.7)
    ps = [torch.nn.Parameter(t(g)) for g in grads]
    for p_, g in zip(ps, grads):
        p_.grad = t(g)
    torch.nn.utils.clip_grad_value_(ps, 0.7)
    for m, p_ in zip(mine, ps):
        np.testing.assert_array_equal(m, p_.grad.numpy())


def test_add_param_group_matches_torch():
    r = np.random.default_rng(6)
    p0, q0 = r.standard_normal(6), r.standard_normal(4)
    gs = [(r.standard_normal(6), r.standard_normal(4)) for _ in range(8)]
    p, q = p0.copy(), q0.copy()
    opt = fastopt.Adam([p], lr=1e-2)
    tp, tq = torch.nn.Parameter(t(p0)), torch.nn.Parameter(t(q0))
    topt = torch.optim.Adam([tp], lr=1e-2)
    for k, (gp, gq) in enumerate(gs):
        if k == 3:
            opt.add_param_group({"params": [q], "lr": 3e-2, "weight_decay": 0.1})
            topt.add_param_group({"params": [tq], "lr": 3e-2, "weight_decay": 0.1})
        opt.step([gp] if k < 3 else [gp, gq])
        tp.grad, tq.grad = t(gp), t(gq)
        topt.step()
    np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(q, tq.detach().numpy(), rtol=1e-12)
