"""A random search (hypothesis) over fastopt.torch.cross_entropy and
batch_norm, with torch itself as the oracle.

Each case draws a valid call (shapes, float32/float64/float16/bfloat16,
class-index or probability targets, options, parameters, training or
evaluation) and changes one thing: a tensor's dtype, shape or layout
(strided, transposed, channels_last, expanded from one value, lazily
negated, empty, on the meta device, a list), one value NaN, infinite or
huge, a hostile hyperparameter (NaN, infinite, negative, of a wrong type).
torch.nn.functional runs the same call:

* torch refuses it: fastopt must refuse it too, with torch's exception type,
  and change nothing.  A tensor on the meta device, a list, or an input
  dtype the kernels do not compute in (integer, complex): fastopt raises
  TypeError whatever torch does (RuntimeError, NotImplementedError,
  AttributeError, or computing on the meta device).  0-d and 1-d input to
  batch_norm: any TypeError/ValueError/RuntimeError/IndexError (torch reads
  their channels past their shape; its exception depends on what it reads).
* torch accepts it: fastopt must give torch's dtypes and shapes (output,
  gradients of input, weight, bias and probability target, running
  statistics) and torch's values, change no other argument.  Values are
  compared with torch on dense float64 copies of the arguments: torch's own
  results are rounded in the arguments' dtypes, and for some layouts wrong
  (2.13: batch_norm's input gradient in evaluation mode with a strided
  weight; a lazily negated running statistic not updated).  The tolerance
  is that of the least precise dtype among the arguments: 2e-4 for float32,
  two units in the last place for 16-bit dtypes (fastopt rounds once or
  twice from float32 or double), relative to the largest magnitude in the
  computation.  With a value not finite, the places of the values that are
  not finite must agree (NaN or which infinity depends on the order of
  operations) and the others must match.  A result equal to torch's own (a
  call fastopt leaves to torch) matches.
* torch accepts the forward but its backward raises (a weight of shape
  (1, C), a (1,) target for (C,) input): fastopt gives torch's output and a
  gradient, or refuses in the forward with the backward's exception type.
* Documented differences (fastopt.torch's docstrings) are counted apart:
  an expanded running statistic refused in training; for cross_entropy, an
  ignored row whose logits are not finite (gradient 0), a probability
  target 0 at a logit -inf (adds 0, not NaN), a probability target that is
  not finite (NaN).

The numbers of cases, refusals, matches and differences are printed at the
end of the run.  A crash or a hang (more than HANG_SECONDS for one case)
stops it.  FASTOPT_FUZZ_EXAMPLES sets the cases per function (default 150,
about 10 s in all on an idle machine).
"""
import collections
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

F = torch.nn.functional
COUNTS = collections.Counter()
EXAMPLES = int(os.environ.get("FASTOPT_FUZZ_EXAMPLES", 150))
HANG_SECONDS = 120
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
HALF = (torch.float16, torch.bfloat16)
# (relative, absolute as a fraction of the largest finite magnitude in the
# computation: see `close`)
TOL = {torch.float64: (1e-7, 1e-9), torch.float32: (2e-4, 2e-5),
       torch.float16: (2**-9, 2e-5), torch.bfloat16: (2**-6, 2e-5)}


@pytest.fixture(scope="module", autouse=True)
def report_counts(request):
    """The counts, printed when the module's tests are done."""
    yield
    write_fuzz_counts(request, "fuzz_torch", COUNTS)


# ------------------------------------------------------------- mutations ---

def gen(seed):
    return torch.Generator().manual_seed(seed)


def strided(t):
    """t's values in a tensor whose elements are not adjacent in memory."""
    big = torch.zeros(tuple(t.shape) + (2,), dtype=t.dtype)
    big[..., 0] = t
    return big[..., 0]


def transposed(t):
    """t's values with the dimensions in memory in reverse order."""
    order = list(range(t.dim()))[::-1]
    return t.permute(order).contiguous().permute(order)


def expanded(t):
    """One value of t for every element: a stride-0 tensor."""
    return t.reshape(-1)[:1].reshape((1,) * t.dim()).expand(t.shape) if t.numel() else t


def neg_view(t):
    """t's values in a tensor whose memory holds -t (torch's lazy negation)."""
    return torch._neg_view(-t.detach())


def with_value(t, value, seed):
    """t with one element (chosen by seed) set to value."""
    t = t.detach().clone()
    if t.numel():
        t.reshape(-1)[seed % t.numel()] = value
    return t


def memory_format(t):
    return torch.channels_last if t.dim() == 4 else torch.channels_last_3d


def tag_of(desc):
    """How a tensor mutation is judged (see check_case): fastopt refuses a
    tensor on the meta device and a list with TypeError whatever torch
    raises; NaN and infinities are compared where they are not."""
    return "fastopt-type" if desc in ("on meta", "a list") else \
        "nan" if desc.startswith("one value") else None


def dtype_changes(t, dtypes):
    return [(f"as {dt}", lambda t, dt=dt: t.to(dt)) for dt in dtypes if dt != t.dtype]


def tensor_mutations(t, *, floating=True, seed=0):
    """(description, t -> new t) for a tensor argument: layouts, the meta
    device, a list; for floating `t` lazy negation and one value NaN,
    infinite or huge."""
    out = [("strided", strided), ("expanded", expanded), ("a list", lambda t: t.tolist()),
           ("on meta", lambda t: t.to("meta"))]
    if t.dim() > 1:
        out.append(("transposed layout", transposed))
    if t.dim() in (4, 5):
        out.append(("channels_last", lambda t: t.contiguous(memory_format=memory_format(t))))
    if floating:
        out.append(("lazily negated", neg_view))
        out += [(f"one value {v}", lambda t, v=v: with_value(t, v, seed))
                for v in (math.nan, math.inf, -math.inf, 1e30)]
    return out


# --------------------------------------------------------------- running ---

class Api:
    """One function under test: how to draw a valid call and build its
    arguments, how to change them, how to call it; `differentiated(args)`:
    the arguments that require grad in torch's valid calls; `grad_keys`:
    those whose gradients are compared; `stat_keys`: those it updates."""

    def __init__(self, name, draw_spec, make, mutations, call, differentiated, grad_keys,
                 stat_keys=(), nan_difference=lambda args: False):
        self.name, self.draw_spec, self.make, self.mutations = name, draw_spec, make, mutations
        self.call, self.differentiated, self.grad_keys = call, differentiated, grad_keys
        self.stat_keys, self.nan_difference = stat_keys, nan_difference


def incoming_grad(out):
    return (torch.arange(out.numel()) % 5 * 0.25 + 0.5).reshape(out.shape).to(out.dtype)


def require_grad(args, keys):
    """Floating tensors of `keys` require grad (their gradients are compared)."""
    for k in keys:
        t = args.get(k)
        if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()) \
                and t.is_leaf:
            t.requires_grad_()


def run(api, args, fn):
    """Call fn on args (and its backward): {"error", "stage"} or {"out"}."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = api.call(fn, args)
    except Exception as e:
        return {"error": e, "stage": "forward"}
    try:
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.backward(incoming_grad(out))
    except Exception as e:
        return {"error": e, "stage": "backward", "out": out}
    return {"out": out}


def reference(args):
    """The arguments as the reference computes them: every tensor a dense
    contiguous copy with its values, floating ones in float64."""
    out = {}
    for k, v in args.items():
        if isinstance(v, torch.Tensor) and not v.is_meta:
            v = v.detach().resolve_neg().contiguous().clone()
            v = v.double() if v.is_floating_point() else v
        out[k] = v
    return out


def same_values(a, b):
    if not isinstance(a, torch.Tensor):
        return type(a) is type(b) and (a == b if not isinstance(a, float) or not math.isnan(a)
                                       else isinstance(b, float) and math.isnan(b))
    if a.is_meta or b.is_meta:
        return a.is_meta and b.is_meta and a.shape == b.shape and a.dtype == b.dtype
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = a.detach().resolve_neg(), b.detach().resolve_neg()
    if a.is_floating_point():
        return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0.0),
                                                                 b.nan_to_num(0.0))
    return torch.equal(a, b)


def largest(*tensors):
    """The largest finite magnitude among the values of tensors (at least 1)."""
    out = 1.0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not t.is_meta and t.numel():
            t = t.detach().resolve_neg().double()
            finite = t[t.isfinite()]
            if finite.numel():
                out = max(out, float(finite.abs().max()))
    return out


def close(ours, ref, dtype, what, scale=1.0, finite_only=False):
    """ours against the reference value, with `dtype`'s tolerance; the
    absolute one relative to the largest magnitude in the computation,
    `scale` (rounding errors are relative to it).  `finite_only`: where a
    value is not finite the other must not be, whether NaN or which
    infinity (that depends on the order of operations)."""
    rtol, atol = TOL[dtype]
    if finite_only:
        # (a value too large for ours's dtype is an infinity there)
        finite = ref.detach().to(ours.dtype).isfinite()
        assert torch.equal(ours.detach().isfinite(), finite), \
            f"{what}: not finite at other places than the reference"
        ours, ref = ours.detach()[finite], ref.detach()[finite]
    ours, ref = ours.detach().double(), ref.detach().double()
    torch.testing.assert_close(ours, ref, rtol=rtol, atol=atol * max(scale, largest(ref)),
                               equal_nan=True, msg=lambda m: f"{what}: {m}")


def results(api, args, res):
    """{what: tensor} a call produced: output, gradients, running statistics."""
    out = {"output": res["out"]}
    for k in api.grad_keys:
        t = args.get(k)
        if isinstance(t, torch.Tensor) and t.requires_grad:
            out[f"{k}.grad"] = t.grad
    for k in api.stat_keys:
        if isinstance(args.get(k), torch.Tensor):
            out[k] = args[k]
    return out


def precision(args):
    """The least precise floating dtype of the tensor arguments: the
    tolerance of a comparison (torch computes in it where fastopt may not:
    float32 input with float64 targets, say)."""
    dtypes = [v.dtype for v in args.values() if isinstance(v, torch.Tensor)
              and v.is_floating_point()]
    return max(dtypes, key=lambda d: TOL[d][0]) if dtypes else torch.float64


def run_reference(api, make, theirs_args):
    """torch on the `reference` arguments (the gradients torch computed)."""
    ref_args = reference(make())
    require_grad(ref_args, [k for k in api.grad_keys if isinstance(theirs_args.get(k), torch.Tensor)
                            and theirs_args[k].requires_grad])
    return ref_args, run(api, ref_args, api.torch_fn)


def compare(api, make, ours_args, ours, theirs_args, theirs, finite_only):
    """torch accepted: fastopt's results must have torch's dtypes and shapes
    and the values of torch on dense float64 copies of the arguments
    (`reference`: torch's own results are rounded in the arguments' dtype,
    and some are wrong for other layouts: in 2.13 the input gradient of
    batch_norm in evaluation mode with a strided weight), or be torch's own
    (a call fastopt leaves to torch)."""
    mine, torchs = results(api, ours_args, ours), results(api, theirs_args, theirs)
    ref_args, ref_res = run_reference(api, make, theirs_args)
    assert "error" not in ref_res, f"the reference raised {ref_res['error']!r}"
    ref = results(api, ref_args, ref_res)
    assert set(mine) == set(torchs), f"results {sorted(mine)} but torch's {sorted(torchs)}"
    dtype, scale = precision(theirs_args), largest(*theirs_args.values())
    for what, t in torchs.items():
        m = mine[what]
        if t is None or m is None:
            assert t is None and m is None, f"{what}: {m!r} but torch's {t!r}"
            continue
        assert m.dtype == t.dtype and m.shape == t.shape, \
            f"{what}: {m.dtype} {tuple(m.shape)} but torch's {t.dtype} {tuple(t.shape)}"
        if not same_values(m, t):
            close(m, ref[what], dtype, what, scale, finite_only)


def check_case(api, make, desc, tag):
    """One case: fastopt against torch on fresh copies of the same arguments."""
    COUNTS["cases"] += 1
    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
    try:
        theirs_args, ours_args = make(), make()
        theirs = run(api, theirs_args, api.torch_fn)
        ours = run(api, ours_args, api.fo_fn)
    finally:
        faulthandler.cancel_dump_traceback_later()
    fresh = make()
    case = f"{api.name}, {desc}"

    def fail(kind, detail):
        COUNTS[f"FAILED: {kind}"] += 1
        raise AssertionError(f"{case}: {kind}: {detail}")

    def unchanged(keys):
        for k in keys:
            if not same_values(ours_args[k], fresh[k]):
                fail("changed an argument", k)

    t_err, o_err = theirs.get("error"), ours.get("error")
    if tag == "fastopt-type" and isinstance(o_err, TypeError) and not isinstance(t_err, TypeError):
        unchanged(ours_args)
        COUNTS["refused, TypeError (fastopt only: device/dtype)"] += 1
        return
    if t_err is not None and theirs["stage"] == "forward":
        if o_err is None:
            fail("accepted", f"torch raised {t_err!r}")
        if type(o_err) is not type(t_err) and not (
                tag == "any error" and isinstance(o_err, (TypeError, ValueError, RuntimeError,
                                                          IndexError))):
            fail("wrong error", f"torch raised {t_err!r}, fastopt {o_err!r}")
        unchanged(ours_args)
        COUNTS["refused as torch"] += 1
        return
    if t_err is not None:                   # torch takes the forward, its backward refuses
        if o_err is not None and type(o_err) is not type(t_err):
            fail("wrong error", f"torch's backward raised {t_err!r}, fastopt {o_err!r}")
        if o_err is None:
            ref = run_reference(api, make, theirs_args)[1]["out"]
            close(ours["out"], ref, precision(ours_args), "output", finite_only=tag == "nan")
            COUNTS["torch's backward refuses; fastopt computes"] += 1
        else:
            COUNTS["refused as torch (torch: in its backward)"] += 1
        return
    if o_err is not None:
        if tag == "documented":
            unchanged(ours_args)
            COUNTS[f"documented: refused ({desc.split(':')[0]})"] += 1
            return
        fail("refused", f"{o_err!r}")
    try:
        compare(api, make, ours_args, ours, theirs_args, theirs, finite_only=tag == "nan")
    except AssertionError as e:
        if tag == "documented" or tag == "nan" and api.nan_difference(fresh):
            COUNTS[f"documented: other values ({desc.split(':')[0]})"] += 1
            return
        fail("misread", e)
    unchanged([k for k in ours_args if k not in api.stat_keys])
    COUNTS["matched torch"] += 1


# ----------------------------------------------------------- cross-entropy ---

def draw_ce(draw):
    nd = draw(st.integers(1, 5))
    n, c = draw(st.integers(1, 4)), draw(st.integers(1, 6))
    shape = (c,) if nd == 1 else (n, c) + tuple(draw(st.integers(1, 3)) for _ in range(nd - 2))
    return dict(shape=shape, dtype=draw(st.sampled_from(FLOATS)),
                kind=draw(st.sampled_from(["index", "prob"])), weight=draw(st.booleans()),
                reduction=draw(st.sampled_from(["mean", "sum", "none"])),
                ignore=draw(st.booleans()), smoothing=draw(st.sampled_from([0.0, 0.1])),
                seed=draw(st.integers(0, 2**31)))


def make_ce(spec):
    g = gen(spec["seed"])
    shape, dtype = spec["shape"], spec["dtype"]
    C = shape[0] if len(shape) == 1 else shape[1]
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    if spec["kind"] == "index":
        target = torch.randint(0, C, shape[:1] + shape[2:] if len(shape) > 1 else (), generator=g)
        ignore = int(target.reshape(-1)[0]) if spec["ignore"] else -100
    else:
        target = torch.softmax(torch.randn(shape, generator=g), 1 if len(shape) > 1 else 0)
        target, ignore = target.to(dtype), -100
    args = dict(input=x, target=target, reduction=spec["reduction"], ignore_index=ignore,
                label_smoothing=spec["smoothing"])
    if spec["weight"]:
        args["weight"] = (torch.rand(C, generator=g) + 0.5).to(dtype)
    return args


def call_ce(fn, a):
    kw = {k: v for k, v in a.items() if k not in ("input", "target")}
    return fn(a["input"], a["target"], **kw)


def ce_mutations(spec, args):
    seed = spec["seed"]
    x, target = args["input"], args["target"]
    shape, C = tuple(x.shape), x.shape[0] if x.dim() == 1 else x.shape[1]
    prob = spec["kind"] == "prob"
    out = []

    def on(key, desc, f, tag=None):
        out.append((f"{key}: {desc}", key, f, tag))

    for desc, f in dtype_changes(x, FLOATS):
        on("input", desc, f)
    for dt in (torch.int64, torch.bool, torch.complex64):
        on("input", f"as {dt}", lambda t, dt=dt: t.to(dt), "fastopt-type")
    for desc, f in tensor_mutations(x, seed=seed):
        on("input", desc, f, tag_of(desc))
    on("input", "0-d", lambda t: t.reshape(-1)[0])
    on("input", "a dimension more", lambda t: t.unsqueeze(-1))
    on("input", "empty batch", lambda t: t[:0])
    tdtypes = [torch.int32, torch.uint8, torch.int16, torch.bool, torch.float32] if not prob \
        else FLOATS + [torch.int64, torch.complex64]
    for desc, f in dtype_changes(target, tdtypes):
        on("target", desc, f)
    for desc, f in tensor_mutations(target, floating=prob, seed=seed):
        on("target", desc, f, tag_of(desc))
    tshape = tuple(target.shape)
    for s in {(), (1,), tshape[::-1], (math.prod(tshape),), tshape + (1,), tshape[1:],
              shape[::-1], (shape[0] + 1,) + tshape[1:] if tshape else (2,)}:
        if s != tshape:
            on("target", f"shape {s}", lambda t, s=s: (torch.zeros(s, dtype=t.dtype) if prob
                                                       else torch.randint(0, C, s, generator=gen(
                                                           seed))).to(t.dtype))
    if not prob:
        for v in (C, -1, 255, args["ignore_index"]):
            on("target", f"one class {v}", lambda t, v=v: with_value(t, v, seed).to(t.dtype))
    else:
        on("target", "one-hot", lambda t: F.one_hot(t.argmax(1 if t.dim() > 1 else 0), C)
           .movedim(-1, 1 if t.dim() > 1 else 0).to(t.dtype))
        on("target", "negative", lambda t: -t)
    w = args.get("weight", torch.rand(C, generator=gen(seed)) + 0.5)
    if "weight" in args:
        on("weight", "None", lambda t: None)
        for desc, f in tensor_mutations(w, seed=seed):
            on("weight", desc, f, tag_of(desc))
        for desc, f in dtype_changes(w, FLOATS + [torch.int64]):
            on("weight", desc, f)
        on("weight", "as complex64", lambda t: t.to(torch.complex64), "fastopt-type")
        on("weight", "requires grad", lambda t: t.detach().clone().requires_grad_())
        for v in (0.0, -1.0):
            on("weight", f"one value {v}", lambda t, v=v: with_value(t, v, seed))
    else:
        on("weight", "given", lambda _: w.to(x.dtype))
    on("weight", f"length {C + 1}", lambda _: torch.ones(C + 1, dtype=x.dtype))
    on("weight", "shape (1, C)", lambda _: torch.ones(1, C, dtype=x.dtype))
    for v in ("avg", None, "MEAN", "elementwise_mean", 1, b"mean"):
        on("reduction", repr(v), lambda _, v=v: v)
    for v in (1.5, True, "1", None, 2**63, -2**63, np.int64(1), torch.tensor(1), 0, C - 1, -1):
        on("ignore_index", repr(v), lambda _, v=v: v)
    for v in (-0.5, math.nan, math.inf, 1.0, 1.5, "0.1", None, np.float32(0.25),
              torch.tensor(0.25), [0.1], 10**400, True):
        on("label_smoothing", repr(v)[:20], lambda _, v=v: v)
    on("size_average", "False", lambda _: False)
    on("reduce", "False", lambda _: False)
    return out


def ce_differentiated(args):
    """torch differentiates input, and a probability target and the weight."""
    prob = isinstance(args["target"], torch.Tensor) and args["target"].is_floating_point()
    return ("input", "target", "weight") if prob else ("input",)


def ce_nan_difference(args):
    """The documented differences with values that are not finite: an
    ignored row's gradient is 0 whatever its logits; a probability target 0
    (times its weight, after label smoothing) at a logit -inf adds 0, not
    NaN; an infinite probability target gives NaN."""
    x, target = args["input"], args["target"]
    if not isinstance(x, torch.Tensor) or not isinstance(target, torch.Tensor):
        return False
    x = x.detach().resolve_neg().double()
    cls = 0 if x.dim() == 1 else 1
    if x.shape != target.shape:
        ignored = target.detach() == args.get("ignore_index", -100)
        return bool((ignored & (~x.isfinite()).any(cls)).any())
    q = target.detach().resolve_neg().double()
    if not q.isfinite().all():
        return True
    eps = float(args.get("label_smoothing", 0.0))
    if eps > 0:
        q = q * (1 - eps) + eps / x.shape[cls]
    w = args.get("weight")
    if isinstance(w, torch.Tensor):
        q = q * w.detach().double().reshape([-1 if d == cls else 1 for d in range(x.dim())])
    return bool(((x == -math.inf) & (q == 0)).any())


# -------------------------------------------------------------- batch norm ---

def draw_bn(draw):
    nd = draw(st.integers(2, 5))
    shape = (draw(st.integers(1, 4)), draw(st.integers(1, 5))) + tuple(
        draw(st.integers(1, 3)) for _ in range(nd - 2))
    dtype = draw(st.sampled_from(FLOATS))
    training = draw(st.booleans()) and math.prod(shape) // shape[1] > 1
    return dict(shape=shape, dtype=dtype, training=training,
                params=draw(st.sampled_from([dtype, torch.float32])) if dtype in HALF else dtype,
                weight=draw(st.booleans()), bias=draw(st.booleans()),
                stats=draw(st.booleans()) or not training,
                momentum=draw(st.sampled_from([0.1, 0.0, 1.0])),
                eps=draw(st.sampled_from([1e-5, 1e-3])), seed=draw(st.integers(0, 2**31)))


def make_bn(spec):
    g = gen(spec["seed"])
    shape, C, p = spec["shape"], spec["shape"][1], spec["params"]
    args = dict(input=(torch.randn(shape, generator=g) * 2 + 0.5).to(spec["dtype"]),
                running_mean=None, running_var=None, weight=None, bias=None,
                training=spec["training"], momentum=spec["momentum"], eps=spec["eps"])
    if spec["weight"]:
        args["weight"] = (torch.rand(C, generator=g) + 0.5).to(p)
    if spec["bias"]:
        args["bias"] = torch.randn(C, generator=g).to(p)
    if spec["stats"]:
        args["running_mean"] = torch.randn(C, generator=g).to(p)
        args["running_var"] = (torch.rand(C, generator=g) + 0.5).to(p)
    return args


def call_bn(fn, a):
    return fn(a["input"], a["running_mean"], a["running_var"], a["weight"], a["bias"],
              a["training"], a["momentum"], a["eps"])


def bn_mutations(spec, args):
    seed, C = spec["seed"], spec["shape"][1]
    x = args["input"]
    out = []

    def on(key, desc, f, tag=None):
        out.append((f"{key}: {desc}", key, f, tag))

    for desc, f in dtype_changes(x, FLOATS):
        on("input", desc, f)
    for dt in (torch.int64, torch.complex64):
        on("input", f"as {dt}", lambda t, dt=dt: t.to(dt), "fastopt-type")
    for desc, f in tensor_mutations(x, seed=seed):
        on("input", desc, f, tag_of(desc))
    # (torch reads the channels of 0-d and 1-d input past their shape: its
    # exception depends on what it reads)
    on("input", "0-d", lambda t: t.reshape(-1)[0], "any error")
    on("input", "1-d", lambda t: t.reshape(-1), "any error")
    on("input", "empty batch", lambda t: t[:0])
    on("input", "no channels", lambda t: t[:, :0])
    on("input", "a batch of one", lambda t: t[:1])
    for key in ("weight", "bias", "running_mean", "running_var"):
        stat = key.startswith("running")
        t = args[key]
        like = t if t is not None else torch.ones(C, dtype=spec["params"])
        on(key, "None" if t is not None else "given", lambda _, t=t, like=like: None
           if t is not None else like.clone())
        on(key, f"{C + 1} elements", lambda _, like=like: torch.ones(C + 1, dtype=like.dtype))
        on(key, "shape (1, C)", lambda _, like=like: torch.ones(1, C, dtype=like.dtype))
        for desc, f in dtype_changes(like, FLOATS + [torch.int64]):
            on(key, desc, lambda _, f=f, like=like: f(like))
        if t is None:
            continue
        # (a running statistic is written in place: torch writes an expanded one
        # channel by channel, and drops the update of a lazily negated one)
        for desc, f in tensor_mutations(t, seed=seed):
            # (torch writes an expanded running statistic channel by channel)
            on(key, desc, f, "documented" if stat and desc == "expanded" else tag_of(desc))
        if stat:
            on(key, "requires grad", lambda t: t.detach().clone().requires_grad_())
            on(key, "negative", lambda t: -t)
        else:
            on(key, "no grad", lambda t: t.detach())
    if args["running_mean"] is not None:
        # a running statistic sharing memory with another argument: refused in
        # training (torch's result depends on the order of its reads and writes)
        for key, other in (("running_mean", "weight"), ("running_var", "bias"),
                           ("running_mean", "running_var")):
            if args[other] is not None:
                out.append((f"{key}: is {other}", key, (key, other), "documented"))
    for v in (None, 1, "yes", np.bool_(True), not args["training"]):
        on("training", repr(v), lambda _, v=v: v)
    for v in (2.0, -1.0, math.nan, math.inf, None, "0.1", torch.tensor(0.5), np.float32(0.5), 1):
        on("momentum", repr(v), lambda _, v=v: v)
    for v in (0.0, -1.0, math.nan, math.inf, "1e-5", None, 1e3, torch.tensor(1e-3), 10**400):
        on("eps", repr(v)[:20], lambda _, v=v: v)
    return out


# ------------------------------------------------------------------- tests ---

APIS = {
    "cross_entropy": Api("cross_entropy", draw_ce, make_ce, ce_mutations, call_ce,
                         ce_differentiated, ("input", "target", "weight"),
                         nan_difference=ce_nan_difference),
    "batch_norm": Api("batch_norm", draw_bn, make_bn, bn_mutations, call_bn,
                      lambda args: ("input", "weight", "bias"), ("input", "weight", "bias"),
                      ("running_mean", "running_var")),
}
for _api, _fns in ((APIS["cross_entropy"], (F.cross_entropy, fo.cross_entropy)),
                   (APIS["batch_norm"], (F.batch_norm, fo.batch_norm))):
    _api.torch_fn, _api.fo_fn = _fns

FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.parametrize("name", sorted(APIS))
@FUZZ
@given(data=st.data())
def test_changed_calls_raise_or_match_torch(name, data):
    api = APIS[name]
    spec = api.draw_spec(data.draw)
    cands = api.mutations(spec, api.make(spec))
    desc, key, mutate, tag = data.draw(st.sampled_from(cands), label="change")

    def make():
        args = api.make(spec)
        if isinstance(mutate, tuple):           # (one argument is another)
            args[mutate[0]] = args[mutate[1]]
        else:
            args[key] = mutate(args.get(key))
        # (the change "no grad" keeps its tensor out of autograd)
        require_grad(args, [k for k in api.differentiated(args)
                            if not (k == key and desc.endswith("no grad"))])
        return args
    check_case(api, make, desc, tag)


@pytest.mark.parametrize("name", sorted(APIS))
@settings(max_examples=max(EXAMPLES // 5, 10), deadline=None)
@given(data=st.data())
def test_drawn_valid_calls_match_torch(name, data):
    """The starting points are valid calls that match torch (else the
    changed cases are moot)."""
    api = APIS[name]
    spec = api.draw_spec(data.draw)

    def make():
        args = api.make(spec)
        require_grad(args, api.differentiated(args))
        return args
    check_case(api, make, "valid call", None)
