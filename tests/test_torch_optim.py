"""fastopt.torch optimizers against torch.optim itself (skipped without torch).

Every comparison runs the same parameters and gradients through a
fastopt.torch optimizer and its torch.optim class and compares the
trajectories (float64: rtol 1e-12 over 50 steps)."""
import copy
import io
import pickle

import pytest

torch = pytest.importorskip("torch")
fo = pytest.importorskip("fastopt.torch")
from conftest import num_threads  # noqa: E402
from torch.optim.optimizer import register_optimizer_step_post_hook  # noqa: E402

# 0-d, empty, size-1 dims, a channels_last conv weight, and a permuted 3-d block
SHAPES = [(3, 4), (5,), (), (0,), (1, 1, 7), (4, 3, 2, 5), (2, 3, 4)]
# Adafactor factors the last two dimensions of row-major parameters (torch's
# divides by the number of elements: none empty): contiguous ones, with
# size-1 dimensions at either end of the factored pair.
CONTIGUOUS = {"Adafactor"}
SHAPES_OF = {"Adafactor": [(3, 4), (5,), (), (1, 1, 7), (4, 3, 2, 5), (2, 3, 4), (7, 1)]}

CASES = [
    ("Adam", {}),
    ("Adam", {"lr": 1e-2, "betas": (0.8, 0.99), "eps": 1e-6}),
    ("Adam", {"amsgrad": True, "weight_decay": 0.1}),
    ("Adam", {"maximize": True, "weight_decay": 0.01}),
    ("Adam", {"decoupled_weight_decay": True, "weight_decay": 0.1, "amsgrad": True}),
    ("AdamW", {}),
    ("AdamW", {"lr": 1e-2, "amsgrad": True, "maximize": True}),
    ("SGD", {"lr": 0.1}),
    ("SGD", {"lr": 0.1, "momentum": 0.9}),
    ("SGD", {"lr": 0.1, "momentum": 0.9, "dampening": 0.5, "weight_decay": 0.1}),
    ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    ("SGD", {"lr": 0.1, "momentum": 0.5, "maximize": True}),
    ("RMSprop", {}),
    ("RMSprop", {"momentum": 0.9, "alpha": 0.9}),
    ("RMSprop", {"centered": True, "weight_decay": 0.1}),
    ("RMSprop", {"centered": True, "momentum": 0.5, "maximize": True, "eps": 1e-4}),
    ("Adagrad", {"lr_decay": 0.01, "weight_decay": 0.1, "initial_accumulator_value": 0.5}),
    ("Adamax", {"weight_decay": 0.1, "maximize": True}),
    ("NAdam", {"weight_decay": 0.1, "momentum_decay": 0.01}),
    ("NAdam", {"decoupled_weight_decay": True, "weight_decay": 0.1}),
    ("RAdam", {}),
    ("RAdam", {"decoupled_weight_decay": True, "weight_decay": 0.1, "betas": (0.8, 0.9)}),
    ("Adadelta", {"weight_decay": 0.1, "rho": 0.8}),
    ("ASGD", {"t0": 5, "lr": 0.05, "weight_decay": 0.01}),
    ("Rprop", {"etas": (0.4, 1.3), "step_sizes": (1e-5, 1.0)}),
    ("Rprop", {"maximize": True}),
] + ([
    ("Adafactor", {}),
    ("Adafactor", {"weight_decay": 0.1, "maximize": True, "eps": (1e-20, 1e-2)}),
    ("Adafactor", {"lr": 0.05, "beta2_decay": -0.5, "d": 2.0}),
] if hasattr(torch.optim, "Adafactor") else [])     # (torch 2.5 on)
IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in kw.items()) or 'default'}" for name, kw in CASES]


def tol(dtype):
    return dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-6)


def make_params(seed, dtype=torch.float64, shapes=SHAPES, contiguous=False):
    g = torch.Generator().manual_seed(seed)
    ps = []
    for s in shapes:
        t = torch.randn(s, dtype=dtype, generator=g)
        if contiguous:
            pass
        elif len(s) == 4:
            t = t.to(memory_format=torch.channels_last)
        elif len(s) == 3 and s[0] > 1:
            t = t.permute(2, 0, 1).contiguous().permute(1, 2, 0)     # dense, not contiguous
        ps.append(torch.nn.Parameter(t))
    return ps


def twin(params):
    """Same values, same strides, own memory."""
    out = []
    for p in params:
        q = torch.empty_like(p, memory_format=torch.preserve_format)
        q.copy_(p.detach())
        out.append(torch.nn.Parameter(q))
    return out


def set_grads(seed, *param_lists, none=()):
    """The same random gradients (laid out like each parameter) on every list."""
    g = torch.Generator().manual_seed(seed)
    for i, ps in enumerate(zip(*param_lists)):
        if i in none:
            for p in ps:
                p.grad = None
            continue
        v = torch.randn(ps[0].shape, dtype=ps[0].dtype, generator=g)
        for p in ps:
            p.grad = torch.empty_like(p, memory_format=torch.preserve_format).copy_(v)


# NAdam's update adds two terms, ASGD's average follows the parameter: torch
# contracts their multiply-adds (FMA) where fastopt rounds each operation
# (the same bits on every CPU), and over 50 steps that differs by up to
# ~4e-12 relative on an element whose terms cancel: these two are held to
# 1e-11 of the tensor's size.
ATOL_OF_SIZE = {"NAdam": 1e-11, "ASGD": 1e-11}


def assert_same(ps, qs, dtype=torch.float64, name=None):
    for p, q in zip(ps, qs):
        t = tol(dtype)
        if name in ATOL_OF_SIZE and q.numel():
            t["atol"] = ATOL_OF_SIZE[name] * float(q.detach().abs().max())
        torch.testing.assert_close(p.detach(), q.detach(), **t)


def pair(name, kwargs, dtype=torch.float64, shapes=None, seed=0):
    ps = make_params(seed, dtype, shapes or SHAPES_OF.get(name, SHAPES), name in CONTIGUOUS)
    qs = twin(ps)
    return ps, qs, getattr(fo, name)(ps, **kwargs), getattr(torch.optim, name)(qs, **kwargs)


def run(opts, lists, steps, seed=100, none_every=0):
    for t in range(steps):
        none = {t % len(lists[0])} if none_every and t % none_every == 0 else ()
        set_grads(seed + t, *lists, none=none)
        for o in opts:
            o.step()


# ---------------------------------------------------------------- results ---

@pytest.mark.parametrize("name, kwargs", CASES, ids=IDS)
def test_50_steps_match_torch_float64(name, kwargs):
    ps, qs, a, b = pair(name, kwargs)
    run((a, b), (ps, qs), 50, none_every=7)
    assert_same(ps, qs, name=name)
    # state in torch's format, with the same values
    for p, q in zip(ps, qs):
        sa, sb = a.state.get(p, {}), b.state.get(q, {})
        assert sa.keys() == sb.keys()
        for k in sa:
            torch.testing.assert_close(sa[k], sb[k], **tol(torch.float64))
            # laid out as torch's: like the parameter (Adafactor's factors: their own shapes)
            assert sa[k].shape == sb[k].shape and sa[k].stride() == sb[k].stride()


@pytest.mark.parametrize("name, kwargs", CASES[::3], ids=IDS[::3])
def test_float32_matches_torch(name, kwargs):
    ps, qs, a, b = pair(name, kwargs, torch.float32)
    run((a, b), (ps, qs), 20)
    assert_same(ps, qs, torch.float32)


def test_param_groups_with_their_own_options():
    ps, qs = make_params(1), None
    qs = twin(ps)

    def groups(p):
        return [{"params": p[:3]}, {"params": p[3:5], "lr": 0.1, "amsgrad": True},
                {"params": p[5:], "weight_decay": 0.5, "betas": (0.5, 0.6)}]
    a = fo.Adam(groups(ps), lr=1e-2)
    b = torch.optim.Adam(groups(qs), lr=1e-2)
    run((a, b), (ps, qs), 30)
    assert_same(ps, qs)


def test_tensor_hyperparameters():
    d = torch.float64
    kw = {"lr": torch.tensor(0.01, dtype=d),
          "betas": (torch.tensor(0.8, dtype=d), torch.tensor(0.9, dtype=d))}
    ps, qs, a, b = pair("Adam", kw)
    run((a, b), (ps, qs), 10)
    assert_same(ps, qs)


def test_is_a_torch_optimizer_with_torch_defaults():
    p = [torch.nn.Parameter(torch.zeros(3))]
    for name in ("Adam", "AdamW", "SGD", "RMSprop"):
        a, b = getattr(fo, name)(p), getattr(torch.optim, name)(p)
        assert isinstance(a, torch.optim.Optimizer) and isinstance(a, type(b))
        assert a.defaults == b.defaults
        assert a.param_groups[0].keys() == b.param_groups[0].keys()


def test_constructor_errors_are_torch_errors():
    p = [torch.nn.Parameter(torch.zeros(3))]
    for name, kw in [("Adam", {"lr": -1}), ("Adam", {"betas": (1.0, 0.9)}),
                     ("SGD", {"momentum": -0.1}), ("SGD", {"nesterov": True}),
                     ("RMSprop", {"alpha": -1}), ("AdamW", {"eps": -1})]:
        with pytest.raises(ValueError) as theirs:
            getattr(torch.optim, name)(p, **kw)
        with pytest.raises(ValueError, match=str(theirs.value)[:20]):
            getattr(fo, name)(p, **kw)
    with pytest.raises(ValueError, match="differentiable=True"):
        fo.Adam(p, differentiable=True)
    with pytest.raises(ValueError, match="empty parameter list"):
        fo.SGD([])


# ---------------------------------------------------------- grads, groups ---

@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(set_to_none):
    ps, qs, a, b = pair("SGD", {"lr": 0.1, "momentum": 0.9})
    for t in range(10):
        if t % 3 == 0:
            set_grads(t, ps, qs)
        else:           # accumulate into the existing grads (or none after set_to_none)
            for p, q in zip(ps, qs):
                if p.grad is not None:
                    p.grad.add_(1.0)
                    q.grad.add_(1.0)
        a.step()
        b.step()
        a.zero_grad(set_to_none)
        b.zero_grad(set_to_none)
        for p, q in zip(ps, qs):
            assert (p.grad is None) == (q.grad is None)
            if p.grad is not None:
                assert not p.grad.any()
    assert_same(ps, qs)


def test_none_grads_skip_params_and_their_state():
    ps, qs, a, b = pair("Adam", {"lr": 1e-2})
    set_grads(0, ps, qs, none={1, 2})
    a.step()
    b.step()
    assert set(a.state) == {ps[i] for i in (0, 3, 4, 5, 6)}
    assert a.state_dict()["state"].keys() == b.state_dict()["state"].keys()
    for p in ps:
        p.grad = None
    before = [p.detach().clone() for p in ps]
    a.step()                                    # no grads: nothing moves
    assert_same(ps, before)
    assert float(a.state[ps[0]]["step"]) == 1


def test_add_param_group_between_steps():
    ps, qs = make_params(2), None
    qs = twin(ps)
    a = fo.RMSprop(ps[:3], lr=1e-2, momentum=0.5)
    b = torch.optim.RMSprop(qs[:3], lr=1e-2, momentum=0.5)
    run((a, b), (ps[:3], qs[:3]), 5)
    exp_avg_view = a.state[ps[0]]["square_avg"]
    a.add_param_group({"params": ps[3:], "lr": 1e-3, "centered": True})
    b.add_param_group({"params": qs[3:], "lr": 1e-3, "centered": True})
    torch.testing.assert_close(a.state[ps[0]]["square_avg"], exp_avg_view)
    run((a, b), (ps, qs), 10, seed=7)
    assert_same(ps, qs)
    with pytest.raises(ValueError, match="more than one parameter group"):
        a.add_param_group({"params": ps[:1]})
    with pytest.raises(TypeError, match=r"param_groups\[2\]\['params'\]\[0\] has dtype torch.int32"):
        a.add_param_group({"params": [torch.zeros(3, dtype=torch.int32)]})
    assert len(a.param_groups) == 2


@pytest.mark.parametrize("edit", ["lr", "betas", "weight_decay", "maximize", "eps", "params"])
def test_param_group_edits_between_steps(edit):
    ps, qs, a, b = pair("Adam", {"lr": 1e-2})
    run((a, b), (ps, qs), 5)
    for o, p in ((a, ps), (b, qs)):
        g = o.param_groups[0]
        if edit == "betas":
            g["betas"] = (0.5, 0.9)
        elif edit == "weight_decay":
            g["weight_decay"] = 0.3
        elif edit == "maximize":
            g["maximize"] = True
        elif edit == "params":
            g["params"] = g["params"][:4]       # torch reads the list at every step
        else:
            g[edit] = g[edit] * 0.1
    run((a, b), (ps, qs), 10, seed=3)
    assert_same(ps, qs)


def test_sgd_momentum_switched_on_later():
    ps, qs, a, b = pair("SGD", {"lr": 0.1})
    run((a, b), (ps, qs), 3)
    assert not a.state
    for o in (a, b):
        o.param_groups[0]["momentum"] = 0.9
    run((a, b), (ps, qs), 10, seed=9)      # torch: buffer = first gradient, then momentum
    assert_same(ps, qs)
    assert a.state_dict()["state"].keys() == b.state_dict()["state"].keys()


@pytest.mark.parametrize("name, key, value, slot", [
    ("Adam", "amsgrad", True, "max_exp_avg_sq"),
    ("RMSprop", "momentum", 0.9, "momentum_buffer"),
    ("RMSprop", "centered", True, "grad_avg"),
])
def test_option_with_new_state_switched_on_later(name, key, value, slot):
    # torch.optim creates these state tensors only at a parameter's first
    # step (switching later raises KeyError there); fastopt starts them at
    # zero, which is torch's run with a zero tensor put in.
    ps, qs, a, b = pair(name, {"lr": 1e-2})
    run((a, b), (ps, qs), 4)
    for o, plist in ((a, ps), (b, qs)):
        o.param_groups[0][key] = value
    for q in qs:
        if q in b.state:
            b.state[q][slot] = torch.zeros_like(q, memory_format=torch.preserve_format)
    run((a, b), (ps, qs), 10, seed=11)
    assert_same(ps, qs)


def test_param_data_replaced_between_steps():
    ps, qs, a, b = pair("Adam", {"lr": 1e-2})
    run((a, b), (ps, qs), 3)
    for p, q in zip(ps, qs):
        new = torch.randn(p.shape, dtype=p.dtype)
        p.data = new.clone()
        q.data = new.clone()
    run((a, b), (ps, qs), 5, seed=5)
    assert_same(ps, qs)
    ps[0].data = torch.zeros(3, 4, dtype=torch.complex64)
    set_grads(0, ps)
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[0\] has dtype"):
        a.step()


# ------------------------------------------- schedulers, clipping, closure ---

SCHEDULERS = [
    ("StepLR", lambda o: torch.optim.lr_scheduler.StepLR(o, 3, gamma=0.5)),
    ("CosineAnnealingLR", lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=10)),
    ("OneCycleLR", lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=20)),
    ("ExponentialLR", lambda o: torch.optim.lr_scheduler.ExponentialLR(o, 0.9)),
    ("LambdaLR", lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda e: 1 / (1 + e))),
    ("SequentialLR", lambda o: torch.optim.lr_scheduler.SequentialLR(
        o, [torch.optim.lr_scheduler.LinearLR(o, 0.1, total_iters=3),
            torch.optim.lr_scheduler.ExponentialLR(o, 0.9)], milestones=[3])),
    ("ReduceLROnPlateau", lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=1)),
]


@pytest.mark.parametrize("name", ["Adam", "SGD"])
@pytest.mark.parametrize("sched_name, make", SCHEDULERS, ids=[s for s, _ in SCHEDULERS])
def test_lr_schedulers_drive_fastopt_optimizers(name, sched_name, make):
    kw = {"lr": 1e-2} if name == "Adam" else {"lr": 1e-2, "momentum": 0.9}
    ps, qs, a, b = pair(name, kw)
    sa, sb = make(a), make(b)
    for t in range(20):
        set_grads(t, ps, qs)
        a.step()
        b.step()
        if sched_name == "ReduceLROnPlateau":
            sa.step(1.0)
            sb.step(1.0)
        else:
            sa.step()
            sb.step()
        assert [g["lr"] for g in a.param_groups] == [g["lr"] for g in b.param_groups]
    assert_same(ps, qs)


def test_clip_grad_norm_before_step():
    ps, qs, a, b = pair("AdamW", {"lr": 1e-2})
    for t in range(10):
        set_grads(t, ps, qs)
        na = torch.nn.utils.clip_grad_norm_(ps, 0.5)
        nb = torch.nn.utils.clip_grad_norm_(qs, 0.5)
        torch.testing.assert_close(na, nb)
        a.step()
        b.step()
    assert_same(ps, qs)


def test_step_with_closure():
    ps, qs, a, b = pair("SGD", {"lr": 0.05, "momentum": 0.9})
    x = torch.randn(6, 4, dtype=torch.float64)

    def closure_for(params, opt):
        def closure():
            opt.zero_grad()
            loss = sum((p.sum() * (i + 1)) ** 2 for i, p in enumerate(params)) + (x @ params[0].T).square().mean()
            assert torch.is_grad_enabled()
            loss.backward()
            return loss
        return closure
    for _ in range(10):
        with torch.no_grad():            # step(closure) turns grad mode on for the closure
            la = a.step(closure_for(ps, a))
        lb = b.step(closure_for(qs, b))
        torch.testing.assert_close(la, lb, **tol(torch.float64))
    assert_same(ps, qs)


def test_step_hooks_run():
    ps, qs, a, b = pair("Adam", {})
    calls = []
    h1 = a.register_step_pre_hook(lambda o, args, kw: calls.append(("pre", o)))
    h2 = a.register_step_post_hook(lambda o, args, kw: calls.append(("post", o)))
    h3 = register_optimizer_step_post_hook(
        lambda o, args, kw: calls.append(("global", o)))
    set_grads(0, ps, qs)
    a.step()
    b.step()
    assert calls == [("pre", a), ("post", a), ("global", a), ("global", b)]
    for h in (h1, h2, h3):
        h.remove()
    calls.clear()
    run((a, b), (ps, qs), 3)
    assert calls == []
    assert_same(ps, qs)


def test_concurrent_steps_are_refused():
    ps = make_params(0)
    a = fo.SGD(ps, lr=0.1)
    set_grads(0, ps)
    before = [p.detach().clone() for p in ps]
    a._lock.acquire()           # as if another thread were inside step()
    try:
        with pytest.raises(RuntimeError, match="concurrently"):
            a.step()
    finally:
        a._lock.release()
    assert_same(ps, before)
    a.step()


def test_profiler_sees_the_step():
    ps = make_params(0)
    a = fo.Adam(ps)
    set_grads(0, ps)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        a.step()
        a.zero_grad()
    names = {e.name for e in prof.events()}
    assert "Optimizer.step#Adam.step" in names
    assert "Optimizer.zero_grad#Adam.zero_grad" in names


# ---------------------------------------------------------- state dicts ---

def roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf)


@pytest.mark.parametrize("name, kwargs", CASES, ids=IDS)
@pytest.mark.parametrize("direction", ["torch_to_fastopt", "fastopt_to_torch"])
def test_checkpoints_move_between_torch_and_fastopt(name, kwargs, direction):
    ps, qs, a, b = pair(name, kwargs)
    first, second = (b, a) if direction == "torch_to_fastopt" else (a, b)
    src_params = qs if first is b else ps
    run((first,), (src_params,), 6, none_every=4)
    sd = roundtrip(first.state_dict())
    # the other optimizer takes the trained values and the checkpoint
    dst_params = ps if first is b else qs
    for d, s in zip(dst_params, src_params):
        d.data.copy_(s.detach())
    second.load_state_dict(sd)
    assert second.state_dict()["param_groups"] == first.state_dict()["param_groups"]
    run((a, b), (ps, qs), 10, seed=50, none_every=3)
    assert_same(ps, qs, name=name)


def test_state_dict_is_torch_format():
    ps, qs, a, b = pair("Adam", {"amsgrad": True})
    set_grads(0, ps, qs, none={2})
    a.step()
    b.step()
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for i, st in sa["state"].items():
        assert list(st) == list(sb["state"][i])
        assert st["step"].dtype == sb["state"][i]["step"].dtype and st["step"].dim() == 0
        assert float(st["step"]) == 1.0


def test_state_tensors_share_fastopt_memory():
    ps = make_params(0)
    a = fo.Adam(ps)
    set_grads(0, ps)
    a.step()
    m = a.state[ps[5]]["exp_avg"]
    assert m.is_contiguous(memory_format=torch.channels_last)
    step = a.state[ps[5]]["step"]
    set_grads(1, ps)
    a.step()
    assert float(step) == 2.0                   # the same tensor, updated by the step
    # writes in place reach the step: zero the moments and the count
    for st in a.state.values():
        st["exp_avg"].zero_()
        st["exp_avg_sq"].zero_()
        st["step"].zero_()
    qs = twin(ps)
    b = torch.optim.Adam(qs)
    run((a, b), (ps, qs), 3, seed=20)
    assert_same(ps, qs)


def test_load_state_dict_errors_change_nothing():
    ps, qs, a, b = pair("Adam", {})
    run((a, b), (ps, qs), 2)
    before = copy.deepcopy(a.state_dict())
    sd = b.state_dict()
    bad = copy.deepcopy(sd)
    bad["state"][0]["exp_avg"] = torch.zeros(5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"state\['exp_avg'\] of param_groups\[0\]\['params'\]\[0\] has shape"):
        a.load_state_dict(bad)
    bad = copy.deepcopy(sd)
    del bad["state"][1]["exp_avg_sq"]
    with pytest.raises(ValueError, match="has no 'exp_avg_sq'"):
        a.load_state_dict(bad)
    bad = copy.deepcopy(sd)
    bad["state"][1]["step"] = torch.tensor(1.5)
    with pytest.raises(ValueError, match="whole number"):
        a.load_state_dict(bad)
    bad = copy.deepcopy(sd)
    bad["param_groups"][0]["lr"] = -1.0
    with pytest.raises(ValueError, match="lr"):
        a.load_state_dict(bad)
    with pytest.raises(ValueError, match="different number of parameter groups"):
        a.load_state_dict({"state": {}, "param_groups": []})
    after = a.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for i in before["state"]:
        for k in before["state"][i]:
            torch.testing.assert_close(after["state"][i][k], before["state"][i][k], rtol=0, atol=0)
    run((a, b), (ps, qs), 3, seed=30)            # still works, still the same
    assert_same(ps, qs)


def test_pickle_and_deepcopy():
    ps, qs, a, b = pair("RMSprop", {"momentum": 0.9, "centered": True})
    run((a, b), (ps, qs), 3)
    for clone in (copy.deepcopy(a), pickle.loads(pickle.dumps(a))):
        cps = [p for g in clone.param_groups for p in g["params"]]
        cqs = twin(qs)
        c2 = torch.optim.RMSprop(cqs, momentum=0.9, centered=True)
        c2.load_state_dict(copy.deepcopy(b.state_dict()))   # torch would alias the tensors
        run((clone, c2), (cps, cqs), 4, seed=40)
        assert_same(cps, cqs)


# ------------------------------------------------------ layouts, autograd ---

def test_grad_with_other_strides_is_copied_into_param_layout():
    p = torch.nn.Parameter(torch.randn(4, 3, 2, 5, dtype=torch.float64).to(
        memory_format=torch.channels_last))
    q = twin([p])[0]
    a, b = fo.SGD([p], lr=0.1, momentum=0.9), torch.optim.SGD([q], lr=0.1, momentum=0.9)
    for t in range(5):
        g = torch.randn(p.shape, dtype=p.dtype)          # contiguous: other strides
        p.grad = g.clone()
        q.grad = g.clone()
        if t == 2:
            p.grad = torch.randn(10, 4, 3, 2, dtype=p.dtype).permute(1, 2, 3, 0)[..., ::2]
            q.grad = p.grad.clone()
        a.step()
        b.step()
        assert a._reader.relayout == [0]            # copied, not refused
    assert_same([p], [q])
    assert a.state[p]["momentum_buffer"].stride() == p.stride()


def test_negated_view_grad_is_read_by_value():
    ps, qs, a, b = pair("Adam", {})
    for t in range(3):
        set_grads(t, ps, qs)
        for p in ps[:3]:
            if p.grad.dim():
                p.grad = torch._neg_view(-p.grad)       # same values, negative bit
        a.step()
        b.step()
        assert a._reader.relayout == [0, 1]
    assert_same(ps, qs)


def test_update_between_forward_and_backward_raises():
    for make in (fo.Adam, torch.optim.Adam):
        w = torch.nn.Parameter(torch.randn(3, 3))
        opt = make([w])
        x = torch.randn(2, 3)
        w.grad = torch.ones_like(w)
        loss = (x @ w.sin()).sum()          # sin saves w for backward
        opt.step()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


def test_version_counter_of_every_updated_param_moves():
    ps = make_params(0)
    a = fo.SGD(ps, lr=0.1)
    set_grads(0, ps, none={1})
    before = [p._version for p in ps]
    a.step()
    assert [p._version - v for p, v in zip(ps, before)] == [1, 0, 1, 1, 1, 1, 1]


def test_one_and_two_threads_identical():
    shapes = [(300, 200), (7,), (64, 3, 5, 5)]      # large enough for two threads
    results = []
    for n in (1, 2):
        ps = make_params(0, torch.float32, shapes)
        a = fo.Adam(ps, amsgrad=True)
        with num_threads(n):
            run((a,), (ps,), 5)
        results.append([p.detach().clone() for p in ps])
    for x, y in zip(*results):
        assert torch.equal(x, y)


def test_training_a_model_matches_torch():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 6 * 6, 10)).double()
    net = net.to(memory_format=torch.channels_last)
    net2 = copy.deepcopy(net)
    a = fo.AdamW(net.parameters(), lr=1e-2)
    b = torch.optim.AdamW(net2.parameters(), lr=1e-2)
    x = torch.randn(16, 3, 8, 8, dtype=torch.float64).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (16,))
    for _ in range(10):
        for m, o in ((net, a), (net2, b)):
            o.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            o.step()
    assert_same(list(net.parameters()), list(net2.parameters()))


# ----------------------------------------------------------------- errors ---

def test_bad_params_name_the_parameter():
    z = torch.nn.Parameter
    base = torch.zeros(10)
    cases = [
        ([z(torch.zeros(3)), z(torch.zeros(3, device="meta"))], TypeError, r"\]\[1\] is on meta"),
        ([z(torch.zeros(3, dtype=torch.complex64))], TypeError, "is complex"),
        ([torch.zeros(3, dtype=torch.int32)], TypeError, "has dtype torch.int32"),
        ([z(torch.zeros(3)), z(torch.zeros(4, 4)[:, :2])], TypeError, None),
        ([z(base[:6]), z(base[4:])], ValueError, r"\]\[0\] and param_groups\[0\]\['params'\]\[1\] overlap"),
        ([z(torch.zeros(3).to_sparse())], TypeError, "sparse"),
    ]
    for params, exc, msg in cases:
        if msg is None:      # a non-dense Parameter (torch keeps the strides)
            exc, msg = ValueError, r"\]\[1\] \(shape \(4, 2\), strides \(4, 1\)\) does not fill"
        with pytest.raises(exc, match=msg):
            fo.Adam(params)


def test_bad_grads_name_the_parameter_and_change_nothing():
    ps = make_params(0)
    a = fo.Adam(ps, amsgrad=True)
    run((a,), (ps,), 2)
    snapshot = [p.detach().clone() for p in ps]
    state = copy.deepcopy(a.state_dict())

    def check(make_bad, exc, msg):
        set_grads(9, ps)
        make_bad()
        with pytest.raises(exc, match=msg):
            a.step()
        assert_same(ps, snapshot)
        after = a.state_dict()["state"]
        for i in state["state"]:
            for k in state["state"][i]:
                assert torch.equal(after[i][k], state["state"][i][k])

    def sparse():
        ps[1].grad = torch.zeros(5, dtype=torch.float64).to_sparse()

    def dtype():
        ps[2].grad.data = torch.zeros((), dtype=torch.float32)

    def shape():
        ps[0].grad.data = torch.zeros(4, 3, dtype=torch.float64)

    def grad_is_param():
        ps[0].grad.data = ps[0].data

    check(sparse, TypeError, r"gradient of param_groups\[0\]\['params'\]\[1\] is a torch.sparse_coo")
    check(dtype, TypeError, r"gradient of param_groups\[0\]\['params'\]\[2\] has dtype torch.float32")
    check(shape, ValueError, r"gradient of param_groups\[0\]\['params'\]\[0\] has shape \(4, 3\)")
    check(grad_is_param, ValueError, r"the gradient of param_groups\[0\]\[.params.\]\[0\] overlaps param_groups")


def test_without_exchange_api_same_results(monkeypatch):
    # Older torch: the reader falls back to Python attributes.
    monkeypatch.setattr(fo, "_USE_EXCHANGE_API", False)
    ps, qs, a, b = pair("Adam", {"amsgrad": True})
    assert not a._reader.uses_exchange_api
    run((a, b), (ps, qs), 10, none_every=3)
    assert_same(ps, qs)
    set_grads(0, ps)
    ps[1].grad = torch.zeros(5, dtype=torch.float64).to_sparse()
    with pytest.raises(TypeError, match="sparse"):
        a.step()


@pytest.mark.parametrize("name", ["SGD", "RMSprop", "Adam", "AdamW"])
def test_bridge_classes_read_the_declared_kind(name):
    import inspect

    from fastopt import _kinds
    cls, decl = getattr(fo, name), _kinds.KINDS[name]
    assert cls._decl is decl
    sig = inspect.signature(cls)
    for h in decl.hypers:
        if h.name in sig.parameters:
            assert sig.parameters[h.name].default == h.default, h.name
    p = torch.nn.Parameter(torch.zeros(3))
    opt = cls([p])
    p.grad = torch.ones(3)
    opt.step()
    want = {s.name for s in decl.slots if s.option is None}
    assert want <= set(opt.state[p]), (want, set(opt.state[p]))
    assert ("step" in opt.state[p]) == (decl.steps_with is None)


@pytest.mark.parametrize("kwargs", [{}, {"lr": 1e-3, "betas": (0.8, 0.95), "weight_decay": 0.1,
                                     "maximize": True}])
def test_lion_matches_the_numpy_api(kwargs):
    # Lion is not in torch.optim: the bridge against fastopt.Lion (itself
    # tested against a NumPy reference), and its checkpoint round trip.
    import fastopt
    ps = make_params(0)
    arrays = [p.detach().numpy().copy() for p in ps]
    a, b = fo.Lion(ps, **kwargs), fastopt.Lion(arrays, **kwargs)
    assert isinstance(a, torch.optim.Optimizer)
    for t in range(20):
        set_grads(t, ps)
        a.step()
        b.step([p.grad.detach().numpy().copy() for p in ps])
    for p, arr in zip(ps, arrays):
        assert torch.equal(p.detach(), torch.from_numpy(arr))
    qs = twin(ps)
    c = fo.Lion(qs, **kwargs)
    c.load_state_dict(copy.deepcopy(a.state_dict()))
    set_grads(99, ps, qs)
    a.step()
    c.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, qs))
