"""A random search (hypothesis) over fastopt.torch's optimizers (SGD,
RMSprop, Adam, AdamW), with torch.optim's same class as the oracle.

Each case draws a valid setup: 1-4 parameters (float32 or float64; 0-d,
empty, odd sizes, contiguous, channels_last or permuted dense layouts) in 1
or 2 param groups with drawn options (lr, momentum, dampening, nesterov,
alpha, centered, betas, amsgrad, maximize, weight_decay, foreach=None or
False), and a fastopt optimizer and its torch.optim class on copies of the
same parameters.  A few steps on the same gradients must give torch's
parameters and state (float64: rtol 1e-10; float32: rtol 2e-5, atol 1e-6,
as tests/test_torch_optim.py).  Then ONE hostile change is made to both
before a last step: a gradient of another dtype or shape, on the meta
device, sparse, strided, requiring grad, the gradient of another parameter
or the parameter itself; a hyperparameter NaN, infinite, negative, a
string, a list, a NumPy value, a 0-d tensor; a param-group key deleted; a
state_dict loaded without 'step', with a string step, a state tensor of
another shape, an extra group; some gradients None.

* torch refuses the step (or the load): fastopt must refuse it too with one
  of the standard exceptions (TypeError, ValueError, RuntimeError,
  IndexError, KeyError, AssertionError) with a non-empty message, and leave
  every parameter, gradient, state tensor and state_dict() as they were.
* torch accepts it: fastopt must accept it and match torch's parameters and
  state.
* Documented differences (fastopt.torch's docstring) are counted apart; if
  fastopt refuses there, it must change nothing: a gradient not of its
  parameter's dtype and shape, on another device or sparse (fastopt reads
  dense CPU gradients like their parameters; torch promotes dtypes, and its
  SGD takes a sparse gradient), a gradient that shares memory with its
  parameter or another gradient (torch's result depends on the order of its
  reads and writes), a hyperparameter that fastopt validates at every step
  (a TypeError/ValueError naming ``param_groups[g][key]``: not finite, out
  of its range, a flag that is a str or a list, a missing key) where torch
  computes with it; a group without 'foreach' (kept for compatibility,
  never read: torch raises KeyError); an option that needs state (amsgrad,
  centered, momentum) switched on after the first step (its state starts at
  zero: torch raises KeyError).
* Also counted apart: a 0-d array, a bool, a 1-element tensor where torch
  wants a Python number, accepted by fastopt only: it must then match torch
  given float(value); a 0-d float32 tensor hyperparameter, which torch
  computes with in float32: fastopt must match torch given float(value); a
  float32 result that differs from torch's float32 rounding must match
  torch on float64 copies of the same values; centered RMSprop with alpha 0
  is not compared (its variance is 0 up to a rounding error, whose sign
  decides NaN or not).

The kind of change (a gradient, a param group, a state_dict load) is drawn
first, then the change.  A change that torch's own tensor code refuses when it is made (``p.grad =``
a tensor on another device) is counted as refused at setup: there is no step
to compare.  The counts are printed at the end of the run.  A crash or a
hang (more than HANG_SECONDS for one case) stops it.  FASTOPT_FUZZ_EXAMPLES
sets the number of changed cases (default 800, about 12 s on an idle
machine); valid setups are a fifth of it.
"""
import collections
import copy
import faulthandler
import math
import os
import warnings

import numpy as np
import pytest

from conftest import write_fuzz_counts

torch = pytest.importorskip("torch")
fo = pytest.importorskip("fastopt.torch")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

COUNTS = collections.Counter()
EXAMPLES = int(os.environ.get("FASTOPT_FUZZ_EXAMPLES", 800))
HANG_SECONDS = 120
NAMES = ("SGD", "RMSprop", "Adam", "AdamW")
STANDARD = (TypeError, ValueError, RuntimeError, IndexError, KeyError, AssertionError)
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=2e-5, atol=1e-6)}
SHAPES = [(), (0,), (1,), (5,), (3, 0), (3, 4), (1, 7), (2, 3, 5), (4, 3, 2, 5), (2, 1, 3, 3)]


@pytest.fixture(scope="module", autouse=True)
def report_counts(request):
    """The counts, printed when the module's tests are done."""
    yield
    write_fuzz_counts(request, "fuzz_torch_optim", COUNTS)


# ----------------------------------------------------------------- setups ---

def draw_options(draw, name):
    """Valid options for one group of optimizer `name`."""
    kw = dict(lr=draw(st.sampled_from([1e-3, 1e-2, 0.1])),
              weight_decay=draw(st.sampled_from([0.0, 0.0, 0.01, 0.5])),
              maximize=draw(st.booleans()), foreach=draw(st.sampled_from([None, False])))
    if name == "SGD":
        kw["momentum"] = draw(st.sampled_from([0.0, 0.5, 0.9]))
        kw["nesterov"] = kw["momentum"] > 0 and draw(st.booleans())
        kw["dampening"] = 0.0 if kw["nesterov"] else draw(st.sampled_from([0.0, 0.3]))
    elif name == "RMSprop":
        kw.update(alpha=draw(st.sampled_from([0.99, 0.9])), eps=draw(st.sampled_from([1e-8, 1e-4])),
                  momentum=draw(st.sampled_from([0.0, 0.5])), centered=draw(st.booleans()))
    else:
        kw.update(betas=draw(st.sampled_from([(0.9, 0.999), (0.8, 0.9), (0.0, 0.5)])),
                  eps=draw(st.sampled_from([1e-8, 1e-4])), amsgrad=draw(st.booleans()))
    return kw


def draw_spec(draw):
    name = draw(st.sampled_from(NAMES))
    n = draw(st.integers(1, 4))
    shapes = [draw(st.sampled_from(SHAPES)) for _ in range(n)]
    layouts = [draw(st.sampled_from(["contiguous", "reversed", "channels_last"]))
               for _ in range(n)]
    groups = 2 if n > 1 and draw(st.booleans()) else 1
    split = draw(st.integers(1, n - 1)) if groups == 2 else n
    return dict(name=name, dtype=draw(st.sampled_from([torch.float32, torch.float64])),
                shapes=shapes, layouts=layouts, split=split,
                options=[draw_options(draw, name) for _ in range(groups)],
                steps=draw(st.integers(1, 3)), seed=draw(st.integers(0, 2**31)))


def laid_out(t, layout):
    """t's values in a dense tensor with `layout`'s order of dimensions."""
    if layout == "channels_last" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "reversed" and t.dim() > 1:      # dense, not contiguous
        order = list(range(t.dim()))[::-1]
        return t.permute(order).contiguous().permute(order)
    return t


def make(spec, module):
    """(params, optimizer of `module`) for spec, the same values every call."""
    g = torch.Generator().manual_seed(spec["seed"])
    params = [torch.nn.Parameter(laid_out(torch.randn(s, generator=g, dtype=torch.float64)
                                          .to(spec["dtype"]).to(spec.get("upcast", spec["dtype"])),
                                          lay))
              for s, lay in zip(spec["shapes"], spec["layouts"])]
    parts = [params[:spec["split"]], params[spec["split"]:]][:len(spec["options"])]
    groups = [dict(params=ps, **kw) for ps, kw in zip(parts, spec["options"])]
    return params, getattr(module, spec["name"])(groups)


def set_grads(params, seed, dtype):
    """Gradients laid out like their parameters, the same for every call
    (values of `dtype`)."""
    g = torch.Generator().manual_seed(seed)
    for p in params:
        v = torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype).to(p.dtype)
        p.grad = torch.empty_like(p, memory_format=torch.preserve_format).copy_(v)


# ---------------------------------------------------------------- changes ---

def other_float(p):
    return torch.float32 if p.dtype == torch.float64 else torch.float64


def strided(t):
    big = torch.zeros(tuple(t.shape) + (2,), dtype=t.dtype)
    big[..., 0] = t
    return big[..., 0]


def on_grad(i, f):
    """A change of the gradient of params[i]: p.grad = f(p, p.grad)."""
    def change(opt, params):
        p = params[i]
        p.grad = f(p, p.grad)
    return change


def on_grad_data(i, f):
    """p.grad.data = f(p.grad): past the dtype and shape checks of `p.grad =`."""
    def change(opt, params):
        params[i].grad.data = f(params[i].grad)
    return change


def on_group(gi, key, value):
    def change(opt, params):
        opt.param_groups[gi][key] = copy.copy(value)
    return change


def del_group_key(gi, key):
    def change(opt, params):
        del opt.param_groups[gi][key]
    return change


def state_load(f):
    """Load opt's own state_dict changed by f(sd, params) (the load is part of
    the action that must change nothing when refused)."""
    def action(opt, params):
        sd = copy.deepcopy(opt.state_dict())
        f(sd, params)
        opt.load_state_dict(sd)
        opt.step()
    return action


def first_with_state(sd):
    return min(sd["state"]) if sd["state"] else None


def drop_step(sd, params):
    k = first_with_state(sd)
    if k is not None:
        sd["state"][k].pop("step", None)


def string_step(sd, params):
    k = first_with_state(sd)
    if k is not None:
        sd["state"][k]["step"] = "3"


def wrong_shape_state(sd, params):
    for k in sorted(sd["state"]):
        for key, v in sd["state"][k].items():
            if key != "step" and isinstance(v, torch.Tensor):
                sd["state"][k][key] = torch.zeros(v.numel() + 1, dtype=v.dtype)
                return


def extra_group(sd, params):
    g = copy.deepcopy(sd["param_groups"][-1])
    g["params"] = [max(p for g in sd["param_groups"] for p in g["params"]) + 1]
    sd["param_groups"].append(g)


def hyper_keys(name):
    keys = ["lr", "weight_decay", "maximize"]
    if name == "SGD":
        keys += ["momentum", "dampening", "nesterov"]
    elif name == "RMSprop":
        keys += ["alpha", "eps", "momentum", "centered"]
    else:
        keys += ["betas", "eps", "amsgrad"]
    return keys


BAD_VALUES = [math.nan, math.inf, -math.inf, -0.5, 2.0, 0.0, "0.1", [0.1], None,
              np.float64(0.25), np.array(0.25), np.array([0.25]), torch.tensor(0.25),
              torch.tensor([0.25]), True, 1e300]
BAD_BETAS = [(math.nan, 0.9), (0.9, math.inf), (-0.5, 0.9), (0.9, 1.5), (0.9,), (0.9, 0.99, 0.9),
             "0.9", 0.9, [0.9, 0.99], (torch.tensor(0.9), torch.tensor(0.99)),
             (np.float64(0.9), np.float32(0.99)), ("0.9", 0.99), None]


STATE_OPTIONS = ("max_exp_avg_sq", "grad_avg", "momentum_buffer")


def as_float(v):
    """A NumPy or torch number (or a tuple of them) as Python floats, else None."""
    if isinstance(v, tuple):
        out = tuple(map(as_float, v))
        return out if out and all(x is not None for x in out) else None
    if isinstance(v, torch.Tensor):
        return float(v) if v.numel() == 1 else None
    if isinstance(v, (np.ndarray, np.generic, bool)) and np.size(v) == 1:
        return float(np.asarray(v).reshape(()))
    return None


def changes(spec):
    """(description, change(opt, params) made before the action, action or
    None for a step, tag) for a case; tag says how a difference is judged."""
    name, n = spec["name"], len(spec["shapes"])
    groups = len(spec["options"])
    out = []

    def add(desc, change, tag=None, action=None, alt=None):
        out.append((desc, change, action, tag, alt))

    for i in range(n):
        add(f"grad {i}: other dtype", on_grad_data(i, lambda g: g.to(other_float(g))), "kind")
        add(f"grad {i}: float16", on_grad_data(i, lambda g: g.half()), "kind")
        add(f"grad {i}: int64", on_grad_data(i, lambda g: g.long()), "kind")
        add(f"grad {i}: one more element", on_grad_data(
            i, lambda g: torch.ones(g.numel() + 1, dtype=g.dtype)), "kind")
        add(f"grad {i}: flattened", on_grad_data(i, lambda g: g.reshape(-1).clone()), "kind")
        add(f"grad {i}: on meta", on_grad(i, lambda p, g: g.to("meta")), "kind")
        add(f"grad {i}: sparse", on_grad(i, lambda p, g: g.to_sparse()), "kind")
        add(f"grad {i}: strided", on_grad(i, lambda p, g: strided(g)))
        add(f"grad {i}: contiguous", on_grad(i, lambda p, g: g.contiguous()))
        add(f"grad {i}: expanded", on_grad(
            i, lambda p, g: g.reshape(-1)[:1].reshape((1,) * g.dim()).expand(g.shape)
            if g.numel() else g))
        add(f"grad {i}: lazily negated", on_grad(i, lambda p, g: torch._neg_view(-g)))
        add(f"grad {i}: requires grad", on_grad(i, lambda p, g: g.detach().clone()
                                                .requires_grad_()))
        add(f"grad {i}: None", on_grad(i, lambda p, g: None))
        add(f"grad {i}: is its parameter", on_grad(i, lambda p, g: p.detach()), "alias")
        add(f"grad {i}: NaN", on_grad(i, lambda p, g: g.fill_(math.nan)))
        for j in range(n):
            if j != i:
                def same(opt, params, i=i, j=j):
                    if params[j].grad.shape == params[i].grad.shape and \
                            params[j].grad.dtype == params[i].grad.dtype:
                        params[j].grad = params[i].grad
                    else:       # a view of grad i's memory, of grad j's shape
                        gi, gj = params[i].grad, params[j].grad
                        if gi.numel() >= gj.numel():
                            params[j].grad.data = gi.reshape(-1)[:gj.numel()].reshape(gj.shape)
                add(f"grad {j}: shares grad {i}'s memory", same, "alias")
    add("grad: all None", lambda opt, params: [setattr(p, "grad", None) for p in params])
    for gi in range(groups):
        for key in hyper_keys(name):
            for v in (BAD_BETAS if key == "betas" else BAD_VALUES):
                f = as_float(v)
                add(f"group {gi} {key}={v!r:.30}", on_group(gi, key, v), "hyper",
                    alt=on_group(gi, key, f) if f is not None else None)
            add(f"group {gi}: no {key}", del_group_key(gi, key), "hyper")
        add(f"group {gi}: no foreach", del_group_key(gi, "foreach"))
        add(f"group {gi}: no params", del_group_key(gi, "params"))
    add("state_dict: no step", None, action=state_load(drop_step))
    add("state_dict: step '3'", None, action=state_load(string_step))
    add("state_dict: state tensor of another shape", None, action=state_load(wrong_shape_state))
    add("state_dict: an extra group", None, action=state_load(extra_group))
    return out


# --------------------------------------------------------------- checking ---

def snapshot(opt, params):
    """Copies of everything a refused action must leave as it was."""
    def copy_t(t):
        if t is None:
            return None
        t = t.detach()
        if t.is_meta:
            return ("meta", t.dtype, tuple(t.shape))
        if t.layout != torch.strided:
            t = t.to_dense()
        return (t.dtype, tuple(t.shape), t.stride(), t.resolve_neg().clone())
    state = {id(p): {k: copy_t(v) if isinstance(v, torch.Tensor) else copy.deepcopy(v)
                     for k, v in opt.state[p].items()} for p in params if p in opt.state}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sd = opt.state_dict()
    except Exception as e:      # noqa: BLE001 (a param group without 'params')
        return dict(params=[copy_t(p) for p in params], grads=[copy_t(p.grad) for p in params],
                    state=state, state_dict=repr(e))
    sd = {"state": {k: {kk: copy_t(v) if isinstance(v, torch.Tensor) else repr(v)
                        for kk, v in e.items()} for k, e in sd["state"].items()},
          "param_groups": repr(sd["param_groups"])}
    return dict(params=[copy_t(p) for p in params], grads=[copy_t(p.grad) for p in params],
                state=state, state_dict=sd)


def same(a, b):
    if isinstance(a, tuple) and len(a) == 4 and isinstance(a[3], torch.Tensor):
        return isinstance(b, tuple) and a[:3] == b[:3] and \
            torch.equal(a[3].isnan(), b[3].isnan()) and \
            torch.equal(a[3].nan_to_num(0.0), b[3].nan_to_num(0.0))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(same, a, b))
    return a == b


def assert_unchanged(before, after):
    for k in before:
        assert same(before[k], after[k]), f"{k} changed"


def compare(spec, ps, a, qs, b, upcast=False):
    """fastopt's parameters and state against torch's (`upcast`: torch's in
    float64, a reference)."""
    tol = TOL[spec["dtype"]]
    for i, (p, q) in enumerate(zip(ps, qs)):
        assert p.shape == q.shape and (p.dtype == q.dtype or upcast), \
            f"param {i}: {p.dtype} {tuple(p.shape)} but torch's {q.dtype} {tuple(q.shape)}"
        torch.testing.assert_close(p.detach(), q.detach().to(p.dtype), equal_nan=True, **tol,
                                   msg=lambda m, i=i: f"param {i}: {m}")
        sa = {k: v for k, v in a.state.get(p, {}).items() if v is not None}
        sb = {k: v for k, v in b.state.get(q, {}).items() if v is not None}
        assert sa.keys() == sb.keys(), f"state {i}: keys {sorted(sa)} but torch's {sorted(sb)}"
        for k in sa:
            x, y = sa[k], sb[k]
            if isinstance(y, torch.Tensor):
                x = torch.as_tensor(x)
                y = y.to(x.dtype)
                torch.testing.assert_close(x, y, equal_nan=True, **tol,
                                           msg=lambda m, i=i, k=k: f"state {i} {k}: {m}")


def act(opt, params, action):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if action is None:
            opt.step()
        else:
            action(opt, params)


def attempt(f, *args):
    try:
        f(*args)
    except Exception as e:      # noqa: BLE001 (any exception is judged below)
        return e
    return None


def message(e):
    """e's message: a non-empty str (KeyError's str() quotes its key)."""
    text = e.args[0] if len(e.args) == 1 else str(e)
    return text if isinstance(text, str) else ""


def played(spec, module, change, action):
    """The setup of `module`'s optimizer after the valid steps, `change` and
    the action (a step, or `action`): (params, optimizer, the change's
    exception, a snapshot before the action, the action's exception)."""
    params, opt = make(spec, module)
    for t in range(spec["steps"]):
        set_grads(params, spec["seed"] + 1 + t, spec["dtype"])
        act(opt, params, None)
    set_grads(params, spec["seed"] + 99, spec["dtype"])
    if change is not None:
        err = attempt(change, opt, params)
        if err is not None:
            return params, opt, err, None, None
    before = snapshot(opt, params) if module is fo else None
    return params, opt, None, before, attempt(act, opt, params, action)


def check_case(spec, desc, change, action, tag, alt=None):
    """One case: fastopt against torch on copies of the same setup.  `alt`:
    the change with the hyperparameter as a Python float (torch refuses a
    NumPy array where it wants a number, and rounds in a tensor's dtype)."""
    COUNTS["cases"] += 1
    case = f"{spec['name']} {spec['dtype']}, {desc}"

    def fail(kind, detail):
        COUNTS[f"FAILED: {kind}"] += 1
        raise AssertionError(f"{case}: {kind}: {detail}\nspec: {spec}")

    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
    try:
        if change is None and action is None:       # the valid steps alone
            qs, b, _, _, t_err = played(spec, torch.optim, None, None)
            ps, a, _, before, o_err = played(spec, fo, None, None)
        else:
            qs, b, t_set, _, t_err = played(spec, torch.optim, change, action)
            ps, a, o_set, before, o_err = played(spec, fo, change, action)
            if t_set is not None or o_set is not None:
                # torch's own tensor code refused the change (p.grad = ...)
                if t_set is None or o_set is None or type(t_set) is not type(o_set):
                    fail("setup differs", f"torch {t_set!r}, fastopt {o_set!r}")
                COUNTS["refused at setup (torch's tensor checks)"] += 1
                return
        as_float = played(spec, torch.optim, alt, action) if alt is not None else None
    finally:
        faulthandler.cancel_dump_traceback_later()

    def unchanged():
        try:
            assert_unchanged(before, snapshot(a, ps))
        except AssertionError as e:
            fail("refused but changed", e)

    def matches(qs, b, upcast=False):
        try:
            compare(spec, ps, a, qs, b, upcast)
        except AssertionError as e:
            return e
        return None

    if o_err is not None and not (isinstance(o_err, STANDARD) and message(o_err)):
        fail("not a standard error with a message", repr(o_err))
    if t_err is not None:
        if o_err is None:
            if as_float is not None and \
                    as_float[4] is None and matches(as_float[0], as_float[1]) is None:
                # A 0-d array or a bool where torch wants a Python number:
                # fastopt reads it as one (and computes torch's result for it).
                COUNTS["accepted by fastopt only (a number torch refuses for its type; "
                       "matches torch on float(value))"] += 1
                return
            if isinstance(t_err, KeyError) and t_err.args[0] == "foreach":
                # Documented: 'foreach' is kept in the groups for compatibility
                # and never read (the step is always fastopt's fused one).
                COUNTS["documented: a group without 'foreach' (never read; torch: "
                       "KeyError)"] += 1
                return
            if isinstance(t_err, KeyError) and t_err.args[0] in STATE_OPTIONS \
                    and tag == "hyper":
                # Documented: an option that needs state (amsgrad, centered,
                # momentum) switched on after the first step starts that state
                # at zero; torch raises KeyError at its next step.
                COUNTS["documented: state option switched on later (torch: KeyError)"] += 1
                return
            fail("accepted", f"torch raised {t_err!r}")
        unchanged()
        COUNTS["refused as torch"] += 1
        return
    if o_err is not None:
        if tag in ("kind", "alias") or tag == "hyper" and \
                isinstance(o_err, (TypeError, ValueError)) and "param_groups[" in message(o_err):
            unchanged()
            COUNTS[f"refused by fastopt only (documented: {tag})"] += 1
            return
        fail("refused", f"{o_err!r} (torch accepts)")
    e = matches(qs, b)
    if e is not None and spec["name"] == "RMSprop" and any(
            g.get("centered") and g.get("alpha") == 0 for g in b.param_groups):
        # Centered RMSprop with alpha 0: the variance square_avg - grad_avg**2
        # is g*g - g*g, 0 up to a rounding error whose sign (torch: NaN from
        # the square root of a negative one) depends on the order of operations.
        COUNTS["not compared: centered RMSprop with alpha 0 (variance 0 +- rounding)"] += 1
        return
    if e is not None:
        if as_float is not None and as_float[4] is None and \
                matches(as_float[0], as_float[1]) is None:
            # torch computes with a 0-d float32 tensor hyperparameter in
            # float32 (1 - beta1...); fastopt in double, as with float(value).
            COUNTS["matched torch on float(value) (torch rounds in the tensor's dtype)"] += 1
            return
        if spec["dtype"] == torch.float32 and tag != "kind":
            # torch's float32 rounding (an update divided by the square root of
            # a small average): fastopt against torch on float64 copies.
            ref = played(dict(spec, upcast=torch.float64), torch.optim, change, action)
            if ref[2] is None and ref[4] is None and matches(ref[0], ref[1], True) is None:
                COUNTS["matched torch on float64 copies (not torch's float32 rounding)"] += 1
                return
        fail("misread", e)
    COUNTS["matched torch"] += 1


FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(data=st.data())
def test_changed_steps_raise_or_match_torch(data):
    spec = draw_spec(data.draw)
    # (the kind of change first: a gradient, a param group, a state_dict load)
    by_kind = collections.defaultdict(list)
    for c in changes(spec):
        by_kind[c[0].split()[0]].append(c)
    kind = data.draw(st.sampled_from(sorted(by_kind)), label="kind")
    desc, change, action, tag, alt = data.draw(st.sampled_from(by_kind[kind]), label="change")
    check_case(spec, desc, change, action, tag, alt)


@settings(max_examples=max(EXAMPLES // 5, 10), deadline=None)
@given(data=st.data())
def test_drawn_valid_setups_match_torch(data):
    """The starting points are valid setups that match torch (else the
    changed cases are moot)."""
    check_case(draw_spec(data.draw), "valid steps", None, None, None)
