"""fastopt.torch optimizers under hostile use: gradients freed or shrunk under
a step, partial state-dict loads, changes from another thread during a step,
fork during a step, capturable=True, torch.optim's classes swapped for
fastopt's.  Each varied over optimizers, dtypes and tensor positions."""
import copy
import re
import gc
import os
import subprocess
import sys
import threading
import weakref

import pytest

torch = pytest.importorskip("torch")
fo = pytest.importorskip("fastopt.torch")

NAMES = ["SGD", "RMSprop", "Adam", "AdamW"] + (["Adafactor"] if hasattr(torch.optim, "Adafactor")
                                               else [])         # (torch 2.5 on)
KWARGS = {"SGD": {"lr": 0.1, "momentum": 0.9}, "RMSprop": {"momentum": 0.5, "centered": True},
          "Adam": {"amsgrad": True}, "AdamW": {}, "Adafactor": {"weight_decay": 0.1}}
DTYPES = [torch.float32, torch.float64]
SHAPES = [(3, 4), (5,), (2, 3, 4)]


def make_params(dtype, seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, dtype=dtype, generator=g)) for s in shapes]


def twin(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def set_grads(seed, *lists):
    g = torch.Generator().manual_seed(seed)
    for ps in zip(*lists):
        v = torch.randn(ps[0].shape, dtype=ps[0].dtype, generator=g)
        for p in ps:
            p.grad = v.clone()


def snapshot(opt):
    """A deep copy of the optimizer's state dict and of its parameters."""
    return (copy.deepcopy(opt.state_dict()),
            [p.detach().clone() for g in opt.param_groups for p in g["params"]])


def assert_unchanged(opt, snap):
    sd, params = snap
    now = opt.state_dict()
    assert now["param_groups"] == sd["param_groups"]
    assert now["state"].keys() == sd["state"].keys()
    for i, st in sd["state"].items():
        assert now["state"][i].keys() == st.keys()
        for k, v in st.items():
            torch.testing.assert_close(now["state"][i][k], v, rtol=0, atol=0)
    for p, q in zip((p for g in opt.param_groups for p in g["params"]), params):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=0)


def other_layout(t):
    """The same values, laid out with other strides."""
    if t.dim() >= 2:
        order = list(range(t.dim()))[::-1]
        return t.permute(order).contiguous().permute(order)
    out = torch.zeros(2 * t.numel(), dtype=t.dtype)[::2]
    return out.copy_(t)


def assert_same_params(ps, qs):
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0)


# ------------------------------------------- gradients freed during a step ---
#
# Another thread replaces gradients while steps run: the gradient a step read
# must stay alive until the step is done.  (``p.grad = None`` in one thread
# while another thread uses that gradient crashes torch 2.13 itself, without
# fastopt -- reading ``g = p.grad`` and calling ``g.sum()`` is enough -- so
# the stress test replaces gradients instead; the deterministic test below
# covers ``zero_grad(set_to_none=True)`` between the read and the step.)

HAMMER = r"""
import random, sys, threading
import torch
import fastopt.torch as fo

name, dtype = sys.argv[1], getattr(torch, sys.argv[2])
random.seed(0)
# Large gradients (allocated with mmap, unmapped when freed) around small ones.
shapes = [(1,), (300_000,), (7, 5), (200_000,), (3,)]
params = [torch.nn.Parameter(torch.randn(s, dtype=dtype)) for s in shapes]
opt = getattr(fo, name)(params, lr=1e-4)
stop = threading.Event()

errors = []

def hostile():
    try:
        while not stop.is_set():
            action = random.randrange(3)
            p = random.choice(params)
            if action == 0:
                p.grad = torch.ones_like(p)
            elif action == 1 and p.dim() == 2:      # other strides: copied before the step
                p.grad = torch.ones_like(p).t().contiguous().t()
            else:
                opt.zero_grad(set_to_none=False)
    except BaseException as exc:
        errors.append(exc)

t = threading.Thread(target=hostile)
t.start()
try:
    for i in range(int(sys.argv[3])):
        for p in params:
            if random.random() < 0.8:
                p.grad = torch.ones_like(p)
        opt.step()
finally:
    stop.set()
    t.join()
assert not errors, errors
assert all(bool(torch.isfinite(p).all()) for p in params)
print("ok")
"""


@pytest.mark.parametrize("name", NAMES)
def test_grads_freed_by_another_thread_during_steps(name):
    # Run in a child so that a crash fails this test only.  glibc's fixed
    # mmap threshold makes every large gradient its own mapping, so a read
    # after it is freed faults instead of reading stale heap memory.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536",
               PYTHONPATH=os.pathsep.join(filter(None, [os.path.dirname(fo.__file__) + "/..",
                                                        os.environ.get("PYTHONPATH")])))
    for dtype in ("float32", "float64"):
        r = subprocess.run([sys.executable, "-c", HAMMER, name, dtype, "500"], env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0 and r.stdout.strip() == "ok", \
            (dtype, r.returncode, r.stderr[-2000:])


def test_step_holds_every_gradient_it_read(monkeypatch):
    # Deterministic: gradients dropped between reading and the native step
    # stay alive (and are used) until the step is done.
    ps, qs = make_params(torch.float64), make_params(torch.float64)
    a, b = fo.Adam(ps), torch.optim.Adam(qs)
    set_grads(1, ps, qs)
    ps[1].grad = other_layout(ps[1].grad)      # one of them copied first
    alive = []
    step_addresses = type(a._fused).step_addresses

    def dropping(fused, *args):
        refs = [weakref.ref(p.grad) for p in ps]
        a.zero_grad(set_to_none=True)           # as another thread could
        gc.collect()
        alive.extend(r() is not None for r in refs)
        return step_addresses(fused, *args)

    monkeypatch.setattr(a, "_fused", _Proxy(a._fused, step_addresses=dropping))
    a._update()
    b.step()
    assert alive == [True] * len(ps)
    assert_same_params(ps, qs)


class _Proxy:
    """Forwards to `obj`, with some methods replaced (fn(obj, *args))."""

    def __init__(self, obj, **methods):
        self._obj, self._methods = obj, methods

    def __getattr__(self, name):
        if name in self._methods:
            return lambda *args: self._methods[name](self._obj, *args)
        return getattr(self._obj, name)


# ---------------------------------------------------- storage shrunk under ---

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pos", [0, 1, 2])
@pytest.mark.parametrize("size", [0, 8])
@pytest.mark.parametrize("strided", [False, True], ids=["same-layout", "other-strides"])
def test_grad_whose_storage_shrank_is_refused(name, dtype, pos, size, strided):
    ps = make_params(dtype)
    qs = twin(ps)
    a, b = getattr(fo, name)(ps, **KWARGS[name]), getattr(fo, name)(qs, **KWARGS[name])
    set_grads(0, ps, qs)
    a.step()
    b.step()
    set_grads(1, ps, qs)
    if strided:         # a gradient laid out unlike its parameter (copied before the step)
        ps[pos].grad = other_layout(ps[pos].grad)
    before = snapshot(a)
    ps[pos].grad.untyped_storage().resize_(size)
    with pytest.raises(ValueError, match=rf"the gradient of param_groups\[0\]\['params'\]\[{pos}\]"
                                         r" needs \d+ bytes of storage .* holds "
                                         rf"{size} \(was the storage resized\?\)"):
        a.step()
    assert_unchanged(a, before)
    # a good gradient again: the optimizer carries on as if it never saw the bad one
    ps[pos].grad = qs[pos].grad.clone()
    a.step()
    b.step()
    assert_same_params(ps, qs)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pos", [0, 2])
def test_grad_view_past_its_storage_is_refused(name, dtype, pos):
    # Not resized: a view whose offset puts its end past the storage
    # (made with set_, which does not check).
    ps = make_params(dtype)
    opt = getattr(fo, name)(ps, **KWARGS[name])
    set_grads(0, ps)
    opt.step()
    before = snapshot(opt)
    n = ps[pos].numel()
    base = torch.zeros(n + 2, dtype=dtype)
    g = torch.empty(0, dtype=dtype)
    g.set_(base.untyped_storage(), 0, ps[pos].shape, ps[pos].stride())
    base.untyped_storage().resize_((n - 1) * base.element_size())
    ps[pos].grad = g
    with pytest.raises(ValueError, match=rf"gradient of param_groups\[0\]\['params'\]\[{pos}\]"):
        opt.step()
    assert_unchanged(opt, before)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pos", [0, 1, 2])
@pytest.mark.parametrize("size", [0, 8])
def test_param_whose_storage_shrank_is_refused(name, dtype, pos, size):
    ps = make_params(dtype)
    opt = getattr(fo, name)(ps, **KWARGS[name])
    set_grads(0, ps)
    opt.step()
    set_grads(1, ps)
    before = snapshot(opt)
    others = [i for i in range(len(ps)) if i != pos]
    # The memory the optimizer has taken cannot be resized (torch refuses it
    # for memory shared with NumPy); new data given since then can.
    with pytest.raises(RuntimeError, match="not resizable"):
        ps[pos].untyped_storage().resize_(size)
    ps[pos].data = ps[pos].detach().clone()
    ps[pos].untyped_storage().resize_(size)
    with pytest.raises(ValueError, match=rf"^param_groups\[0\]\['params'\]\[{pos}\] needs "
                                         rf"\d+ bytes of storage .* holds {size} "):
        opt.step()
    sd, params = before
    for i in others:
        torch.testing.assert_close(ps[i].detach(), params[i], rtol=0, atol=0)
    assert opt.state_dict()["state"].keys() == sd["state"].keys()
    for i in sd["state"]:
        for k, v in sd["state"][i].items():
            torch.testing.assert_close(opt.state_dict()["state"][i][k], v, rtol=0, atol=0)
    # a new parameter value (p.data = ...) and the optimizer carries on
    ps[pos].data = params[pos].clone()
    opt.step()
    assert all(bool(torch.isfinite(p).all()) for p in ps)


def test_param_storage_shrunk_at_construction_is_refused():
    ps = make_params(torch.float32)
    ps[1].untyped_storage().resize_(4)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[1\] needs 20 bytes"):
        fo.Adam(ps)


# ------------------------------------------------------------ partial loads ---

def _bad_entries(name):
    """(label, edit of a state entry) that load_state_dict must refuse."""
    nan = float("nan")
    shape_bad = {"SGD": "momentum_buffer", "RMSprop": "square_avg",
                 "Adafactor": "row_var"}.get(name, "exp_avg")       # (of a 2-d or 3-d param)
    cases = [
        ("not-a-dict-list", lambda st, k: [1, 2]),
        ("not-a-dict-string", lambda st, k: "state"),
        ("not-a-dict-number", lambda st, k: 5),
        ("wrong-shape", lambda st, k: {**st, shape_bad: torch.zeros(k + 7)}),
        ("wrong-dtype-int", lambda st, k: {**st, shape_bad: torch.zeros_like(st[shape_bad],
                                                                            dtype=torch.int64)}),
        ("wrong-dtype-complex", lambda st, k: {**st, shape_bad: torch.zeros_like(
            st[shape_bad], dtype=torch.complex128)}),
    ]
    if name != "SGD":
        cases += [
            ("no-step", lambda st, k: {x: v for x, v in st.items() if x != "step"}),
            ("string-step", lambda st, k: {**st, "step": "3"}),
            ("nan-step", lambda st, k: {**st, "step": torch.tensor(nan)}),
            ("nan-step-float", lambda st, k: {**st, "step": nan}),
            ("negative-step", lambda st, k: {**st, "step": torch.tensor(-1.0)}),
            ("fraction-step", lambda st, k: {**st, "step": 2.5}),
            ("two-steps", lambda st, k: {**st, "step": torch.tensor([1.0, 2.0])}),
            ("complex-step", lambda st, k: {**st, "step": torch.tensor(1 + 1j)}),
        ]
    return cases


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pos", [0, 2])
def test_bad_state_entries_load_nothing(name, dtype, pos):
    ps = make_params(dtype)
    qs = twin(ps)
    a = getattr(fo, name)(ps, **KWARGS[name])
    b = getattr(fo, name)(qs, **KWARGS[name])       # never sees a bad load
    for t in range(2):
        set_grads(t, ps, qs)
        a.step()
        b.step()
    # A valid checkpoint with other values (and other hyperparameters), then
    # one entry spoiled: a partial load would be visible everywhere else.
    rs = make_params(dtype, seed=5)
    src = getattr(fo, name)(rs, **{**KWARGS[name], "lr": 0.5})
    for t in range(3):
        set_grads(10 + t, rs)
        src.step()
    good = copy.deepcopy(src.state_dict())
    for label, edit in _bad_entries(name):
        bad = copy.deepcopy(good)
        bad["state"][pos] = edit(bad["state"][pos], ps[pos].numel())
        before = snapshot(a)
        with pytest.raises((TypeError, ValueError),
                           match=rf"param_groups\[0\]\['params'\]\[{pos}\]"):
            a.load_state_dict(bad)
        assert_unchanged(a, before)
    for t in range(3):
        set_grads(20 + t, ps, qs)
        a.step()
        b.step()
    assert_same_params(ps, qs)
    assert_unchanged(a, snapshot(b))


# ---------------------------------------------- changes during a step, fork ---

class _InsideStep:
    """Blocks a step of `opt` inside its update (in the gradient copy that a
    gradient with other strides needs) until released."""

    def __init__(self, monkeypatch, opt, params):
        self.entered, self.release = threading.Event(), threading.Event()
        relayout = fo._relayout

        def blocking(*args):
            self.entered.set()
            assert self.release.wait(60)
            return relayout(*args)
        monkeypatch.setattr(fo, "_relayout", blocking)
        p = params[0]
        p.grad = torch.ones_like(p).t().contiguous().t()    # other strides: copied
        self.error = None

        def run():
            try:
                opt.step()
            except BaseException as exc:        # reported by the test
                self.error = exc
        self.thread = threading.Thread(target=run)

    def __enter__(self):
        self.thread.start()
        assert self.entered.wait(60)
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.thread.join(60)
        assert self.error is None, self.error


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_changes_during_a_step_are_refused(monkeypatch, name, dtype):
    ps = make_params(dtype, shapes=[(4, 3), (5,)])
    opt = getattr(fo, name)(ps, **KWARGS[name])
    set_grads(0, ps)
    opt.step()
    sd = copy.deepcopy(opt.state_dict())
    set_grads(1, ps)
    extra = torch.nn.Parameter(torch.randn(3, dtype=dtype))
    with _InsideStep(monkeypatch, opt, ps):
        groups = copy.copy(opt.param_groups)
        with pytest.raises(RuntimeError, match=r"add_param_group\(\) called during a step"):
            opt.add_param_group({"params": [extra]})
        with pytest.raises(RuntimeError, match=r"load_state_dict\(\) called during a step"):
            opt.load_state_dict(sd)
        with pytest.raises(RuntimeError, match="concurrently"):
            opt.step()
        assert opt.param_groups == groups and len(opt._params) == 2
    # the blocked step finished; the optimizer works and takes both calls now
    opt.add_param_group({"params": [extra]})
    extra.grad = torch.ones_like(extra)
    opt.step()
    assert len(opt.state) == 3


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork() here")
@pytest.mark.parametrize("name", ["SGD", "Adam"])
def test_child_forked_during_a_step_starts_idle(monkeypatch, name):
    ps = make_params(torch.float64, shapes=[(4, 3), (5,)])
    opt = getattr(fo, name)(ps, **KWARGS[name])
    set_grads(0, ps)
    opt.step()
    set_grads(1, ps)
    with _InsideStep(monkeypatch, opt, ps):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:                    # the child: the stepping thread does not exist here
            code = 1
            try:
                os.close(r)
                monkeypatch.undo()
                set_grads(2, ps)
                opt.step()
                extra = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
                opt.add_param_group({"params": [extra]})
                opt.load_state_dict(copy.deepcopy(opt.state_dict()))
                set_grads(3, ps + [extra])
                opt.step()
                os.write(w, b"ok" if len(opt.state) == 3 else b"state")
                code = 0
            except BaseException as exc:
                os.write(w, repr(exc).encode()[:500])
            finally:
                os._exit(code)
        os.close(w)
        with os.fdopen(r, "rb") as f:
            said = f.read()
        _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, said
    assert said == b"ok"


# -------------------------------------------------------------- capturable ---

@pytest.mark.parametrize("name", ["Adam", "AdamW", "RMSprop"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("when", ["constructor", "group-edit", "loaded"])
def test_capturable_raises_as_torch_does(name, dtype, when):
    ps = make_params(dtype)
    qs = twin(ps)
    ref = getattr(torch.optim, name)(qs, capturable=True)
    set_grads(0, qs)
    with pytest.raises(Exception) as expected:
        ref.step()
    a = getattr(fo, name)(ps, capturable=(when == "constructor"))
    if when != "constructor":
        set_grads(0, ps)
        a.step()
    if when == "group-edit":
        a.param_groups[0]["capturable"] = True
    elif when == "loaded":
        sd = copy.deepcopy(a.state_dict())
        sd["param_groups"][0]["capturable"] = True
        a.load_state_dict(sd)
    set_grads(1, ps)
    before = snapshot(a)
    with pytest.raises(expected.type) as got:
        a.step()
    assert str(got.value) == str(expected.value)
    assert_unchanged(a, before)
    a.param_groups[0]["capturable"] = False
    a.step()


def test_sgd_takes_no_capturable_as_torch():
    ps = make_params(torch.float32)
    with pytest.raises(TypeError) as expected:
        torch.optim.SGD(twin(ps), capturable=True)
    with pytest.raises(TypeError) as got:
        fo.SGD(ps, capturable=True)
    assert "capturable" in str(expected.value) and "capturable" in str(got.value)


# ---------------------------------------------- torch.optim classes swapped ---

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_torch_optim_class_swapped_for_fastopt(name, dtype):
    original = getattr(torch.optim, name)
    ps = make_params(dtype)
    qs = twin(ps)
    try:
        setattr(torch.optim, name, getattr(fo, name))
        a = getattr(torch.optim, name)(ps, **KWARGS[name])
        assert type(a) is getattr(fo, name)
        sub = type("Sub", (getattr(fo, name),), {})(twin(ps), **KWARGS[name])  # subclasses too
        b = original(qs, **KWARGS[name])
        for t in range(5):
            set_grads(t, ps, qs, sub.param_groups[0]["params"])
            a.step()
            b.step()
            sub.step()
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
        for p, q, s in zip(ps, qs, sub.param_groups[0]["params"]):
            torch.testing.assert_close(p.detach(), q.detach(), **tol)
            torch.testing.assert_close(s.detach(), p.detach(), rtol=0, atol=0)
    finally:
        setattr(torch.optim, name, original)
    assert getattr(torch.optim, name) is original


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("what", ["grad", "param"])
def test_storage_check_without_exchange_api(monkeypatch, dtype, what):
    # Older torch (no DLPack C exchange API) takes the Python-attribute path.
    monkeypatch.setattr(fo, "_USE_EXCHANGE_API", False)
    ps = make_params(dtype)
    opt = fo.Adam(ps)
    assert not opt._reader.uses_exchange_api
    set_grads(0, ps)
    opt.step()
    set_grads(1, ps)
    before = snapshot(opt)
    if what == "grad":
        ps[1].grad.untyped_storage().resize_(0)
        pattern = r"^the gradient of param_groups\[0\]\['params'\]\[1\] needs"
    else:
        ps[1].data = ps[1].detach().clone()
        ps[1].untyped_storage().resize_(4)
        pattern = r"^param_groups\[0\]\['params'\]\[1\] needs"
    nbytes = ps[1].numel() * ps[1].element_size()
    with pytest.raises(ValueError, match=rf"{pattern} {nbytes} bytes of storage"):
        opt.step()
    if what == "grad":
        assert_unchanged(opt, before)


@pytest.mark.parametrize("name", ["RMSprop", "Adam", "AdamW"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("where", [0, 2])
@pytest.mark.parametrize("bad", [-5.0, float("nan"), 2.5, float("inf")])
def test_a_bad_step_count_set_in_place_names_its_parameter(name, dtype, where, bad):
    params = [torch.nn.Parameter(torch.randn(n, dtype=dtype)) for n in (3, 5, 7)]
    groups = [{"params": params[:2]}, {"params": params[2:]}]
    opt = getattr(fo, name)(groups)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    opt.state[params[where]]["step"].fill_(bad)
    before = [p.detach().clone() for p in params]
    state = {i: {k: v.clone() for k, v in opt.state[p].items()} for i, p in enumerate(params)}
    label = "param_groups[0]['params'][0]" if where == 0 else "param_groups[1]['params'][0]"
    with pytest.raises(ValueError, match=re.escape(f"state['step'] of {label}")):
        opt.step()
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)
    for i, p in enumerate(params):
        for k, v in opt.state[p].items():
            assert torch.equal(v, state[i][k]) or (torch.isnan(v).all() and torch.isnan(state[i][k]).all())
