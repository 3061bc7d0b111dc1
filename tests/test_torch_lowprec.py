"""fastopt.torch with float16/bfloat16 parameters, bfloat16 state and torch's
GradScaler (skipped without torch or ml_dtypes).

A 16-bit parameter is updated through a float32 master kept in
``opt.state[p]["master_param"]``: the result must be bit for bit what the
NumPy API (`fastopt.Adam`... over the same 16-bit arrays, whose masters and
kernels are tested against references in test_lowprec.py) computes, and
likewise for bfloat16 state."""
import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ml_dtypes = pytest.importorskip("ml_dtypes")
fo = pytest.importorskip("fastopt.torch")
import fastopt  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)
SHAPES = [(3, 4), (5,), (), (0,), (17, 33), (2, 3, 4, 5)]
KINDS = [("Adam", {"amsgrad": True, "weight_decay": 0.1}), ("AdamW", {"lr": 1e-2}),
         ("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
         ("RMSprop", {"centered": True, "momentum": 0.5})]
TDT = {"bfloat16": torch.bfloat16, "float16": torch.float16}
NDT = {"bfloat16": BF16, "float16": np.dtype(np.float16)}


def to_numpy(t):
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(BF16)
    return t.numpy()


def params(dtype, seed=0, channels_last=True):
    g = torch.Generator().manual_seed(seed)
    out = []
    for s in SHAPES:
        t = torch.randn(s, generator=g).to(dtype)
        if len(s) == 4 and channels_last:
            t = t.to(memory_format=torch.channels_last)
        out.append(torch.nn.Parameter(t))
    return out


def grads(ps, seed):
    g = torch.Generator().manual_seed(seed)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype).to(
            memory_format=torch.channels_last if p.dim() == 4 else torch.contiguous_format)


@pytest.mark.parametrize("name, kwargs", KINDS)
@pytest.mark.parametrize("dt", ["bfloat16", "float16"])
@pytest.mark.parametrize("state_dtype", [None, "bfloat16"])
def test_16bit_params_match_the_numpy_api(name, kwargs, dt, state_dtype):
    ps = params(TDT[dt], channels_last=False)
    arrays = [to_numpy(p).copy() for p in ps]
    low = dict(state_dtype=state_dtype, state_rounding="stochastic", seed=7)
    a = getattr(fo, name)(ps, **kwargs, **low)
    b = getattr(fastopt, name)(arrays, **kwargs, **low)
    for t in range(6):
        grads(ps, t)
        a.step()
        b.step([to_numpy(p.grad).copy() for p in ps])
    for p, arr in zip(ps, arrays):
        np.testing.assert_array_equal(to_numpy(p).view(np.uint16), arr.view(np.uint16))
    for i, p in enumerate(ps):
        st = a.state[p]
        assert st["master_param"].dtype == torch.float32
        np.testing.assert_array_equal(st["master_param"].numpy(), b.state[i]["master_param"])
        for k, v in b.state[i].items():
            if k != "master_param":
                np.testing.assert_array_equal(to_numpy(st[k]).view(v.dtype), v)


def test_16bit_params_any_layout_and_the_master_follows_edits():
    ps = params(torch.bfloat16)
    a = fo.SGD(ps, lr=1e-2, weight_decay=0.5)
    grads(ps, 0)
    a.step()
    m = a.state[ps[0]]["master_param"]
    assert m.shape == ps[0].shape and m.stride() == ps[0].stride()
    torch.testing.assert_close(m.to(torch.bfloat16), ps[0].detach(), rtol=0, atol=0)
    # An in-place edit of the parameter (model.load_state_dict does this) is
    # where the next step starts: the master takes the parameter's values.
    with torch.no_grad():
        ps[0].copy_(torch.full_like(ps[0], 0.5))
    grads(ps, 1)
    ps[0].grad.zero_()
    a.step()            # weight decay only, from 0.5: 0.5 - 1e-2 * 0.5 * 0.5
    assert torch.all(a.state[ps[0]]["master_param"] == torch.tensor(0.5 - 0.0025))
    assert torch.all(ps[0] == torch.tensor(0.4975).to(torch.bfloat16))


@pytest.mark.parametrize("dt", ["bfloat16", "float16"])
def test_16bit_checkpoints_keep_float32_state_and_masters(dt):
    ps = params(TDT[dt])
    a = fo.Adam(ps, lr=1e-2)
    for t in range(3):
        grads(ps, t)
        a.step()
    sd = copy.deepcopy(a.state_dict())
    assert sd["state"][0]["master_param"].dtype == torch.float32
    assert sd["state"][0]["exp_avg"].dtype == torch.float32
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    b = fo.Adam(qs, lr=1e-2)
    b.load_state_dict(sd)           # torch would cast them to the parameter's dtype
    for k in ("master_param", "exp_avg", "exp_avg_sq"):
        assert torch.equal(b.state[qs[1]][k], a.state[ps[1]][k])
    for t in range(3, 6):
        grads(ps, t)
        grads(qs, t)
        a.step()
        b.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, qs))
    # torch.optim reads the checkpoint (it ignores master_param), and a
    # torch.optim checkpoint (no masters) loads: the masters are the parameters.
    t = torch.optim.Adam([torch.nn.Parameter(p.detach().clone()) for p in ps], lr=1e-2)
    t.load_state_dict(copy.deepcopy(a.state_dict()))
    for t_ in range(2):
        t.param_groups[0]["params"][1].grad = torch.ones_like(ps[1])
        t.step()
    c = fo.Adam([torch.nn.Parameter(p.detach().clone()) for p in ps], lr=1e-2)
    c.load_state_dict(t.state_dict())
    cp = c.param_groups[0]["params"][1]
    assert torch.equal(c.state[cp]["master_param"].to(TDT[dt]), cp.detach())


def test_bfloat16_state_dict_round_trip_keeps_rounding_options():
    ps = params(torch.float32)
    a = fo.Adam(ps, state_dtype="bfloat16", state_rounding="nearest", seed=3)
    grads(ps, 0)
    a.step()
    sd = a.state_dict()
    assert sd["fastopt"] == {"state_dtype": "bfloat16", "state_rounding": "nearest", "seed": 3}
    assert sd["state"][0]["exp_avg"].dtype == torch.bfloat16
    b = fo.Adam([torch.nn.Parameter(p.detach().clone()) for p in ps], state_dtype="bfloat16")
    b.load_state_dict(sd)
    assert (b.state_rounding, b.seed) == ("nearest", 3)
    with pytest.raises(ValueError, match="state_dtype"):
        fo.Adam(ps, state_dtype="float16")
    with pytest.raises(ValueError, match="float64"):
        fo.Adam([torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))],
                state_dtype="bfloat16")


# ----------------------------------------------------------- GradScaler ---

def _scaler_run(opt_cls, kwargs, steps=12):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    model = model.double()
    opt = opt_cls(model.parameters(), **kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=3)
    x = torch.randn(32, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    scales = []
    for t in range(steps):
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        scaler.scale(loss).backward()
        if t in (2, 7):                 # an overflow: the step must be skipped
            next(model.parameters()).grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    return scales, [p.detach().clone() for p in model.parameters()], opt


@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD"])
def test_grad_scaler_uses_the_fused_contract(name, monkeypatch):
    kwargs = {"lr": 1e-2} if name != "SGD" else {"lr": 1e-2, "momentum": 0.9}
    assert getattr(fo, name)([torch.nn.Parameter(torch.zeros(2))])._step_supports_amp_scaling
    # The gradients are not written (no unscale pass): the scale is read in the step.
    calls = []
    real = torch._amp_foreach_non_finite_check_and_unscale_
    monkeypatch.setattr(torch, "_amp_foreach_non_finite_check_and_unscale_",
                        lambda g, f, inv: (calls.append(float(inv)), real(g, f, inv))[1])
    s1, p1, o1 = _scaler_run(getattr(fo, name), kwargs)
    assert set(calls) == {1.0}          # only torch's inf check, with scale 1
    s2, p2, o2 = _scaler_run(getattr(torch.optim, name), {**kwargs, "fused": True})
    assert s1 == s2
    for a, b in zip(p1, p2):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    if name != "SGD":
        st1 = o1.state[o1.param_groups[0]["params"][0]]["step"]
        st2 = o2.state[o2.param_groups[0]["params"][0]]["step"]
        assert float(st1) == float(st2) == 10      # two skipped


def test_step_takes_grad_scale_and_found_inf():
    ps = [torch.nn.Parameter(torch.randn(5, dtype=torch.float64)) for _ in range(2)]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    a, b = fo.Adam(ps, lr=0.1), fo.Adam(qs, lr=0.1)
    for p, q in zip(ps, qs):
        g = torch.randn(5, dtype=torch.float64)
        p.grad, q.grad = g * 256, g.clone()
    a.step(grad_scale=torch.tensor(256.0), found_inf=torch.tensor(0.0))
    b.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, qs))
    before = [p.detach().clone() for p in ps]
    a.step(grad_scale=256.0, found_inf=torch.tensor(1.0))
    assert all(torch.equal(p, q) for p, q in zip(ps, before))
    assert float(a.state[ps[0]]["step"]) == 1
    with pytest.raises(ValueError, match="grad_scale must be > 0"):
        a.step(grad_scale=0.0)
    with pytest.raises(TypeError, match="grad_scale must be a number"):
        a.step(grad_scale="2")


# ------------------------------------------------------------ split master ---

@pytest.mark.parametrize("name, kwargs", KINDS)
def test_split_master_keeps_the_float32_masters_bits(name, kwargs):
    # split_master=True: a bfloat16 parameter holds the high 16 bits of its
    # float32 master, state["master_low_bits"] (int16) the low ones: the
    # same float32 master bit for bit as the float32 master, 4 bytes per
    # element instead of 6; the parameter is the master truncated.
    ps, qs = params(torch.bfloat16), params(torch.bfloat16)
    a = getattr(fo, name)(ps, **kwargs, split_master=True)
    b = getattr(fo, name)(qs, **kwargs)
    for t in range(6):
        grads(ps, t)
        grads(qs, t)
        a.step()
        b.step()
    for p, q in zip(ps, qs):
        low = a.state[p]["master_low_bits"]
        assert low.dtype == torch.int16 and low.stride() == p.stride()
        whole = (p.detach().view(torch.int16).to(torch.int32) << 16) | \
            (low.to(torch.int32) & 0xFFFF)
        assert torch.equal(whole.view(torch.float32), b.state[q]["master_param"])
    # checkpoints (with their models' weights: a split master's high bits
    # are the parameter): split <-> float32 master, both ways
    sd = copy.deepcopy(a.state_dict())
    rs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    c = getattr(fo, name)(rs, **kwargs)
    c.load_state_dict(sd)
    for r, q in zip(rs, qs):
        assert torch.equal(c.state[r]["master_param"], b.state[q]["master_param"])
    us = [torch.nn.Parameter(q.detach().clone()) for q in qs]
    d = getattr(fo, name)(us, **kwargs, split_master=True)
    d.load_state_dict(copy.deepcopy(b.state_dict()))
    for u, p in zip(us, ps):
        assert torch.equal(u.detach().view(torch.int16), p.detach().view(torch.int16))
        assert torch.equal(d.state[u]["master_low_bits"], a.state[p]["master_low_bits"])
