"""fastopt.torch.cross_entropy, batch_norm and BatchNorm1d/2d against torch
(skipped without torch): gradcheck in float64, torch.nn.functional in float32,
16-bit input against torch in float32, and torch's argument checks (which
calls raise, with which exception type and naming which argument)."""
import copy
import itertools
import math
import re
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
fo = pytest.importorskip("fastopt.torch")
F = torch.nn.functional

F32 = dict(rtol=1e-5, atol=1e-6)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------- cross-entropy ---

XENT_OPTIONS = [
    {}, {"reduction": "sum"}, {"reduction": "none"}, {"label_smoothing": 0.2},
    {"weight": "w"}, {"ignore_index": 2}, {"weight": "w", "reduction": "none", "ignore_index": 0},
    {"weight": "w", "label_smoothing": 0.1, "reduction": "sum"},
]
XENT_IDS = ["-".join(f"{k}={v}" for k, v in o.items()) or "default" for o in XENT_OPTIONS]
# (input shape, target kind)
XENT_SHAPES = [((7, 5), "index"), ((7, 5), "prob"), ((5,), "index"), ((5,), "prob"),
               ((3, 5, 2, 4), "index"), ((3, 5, 2, 4), "prob"), ((0, 5), "index")]


def xent_inputs(shape, kind, dtype, opts, seed=0):
    g = gen(seed)
    C = shape[0] if len(shape) == 1 else shape[1]
    x = (torch.randn(shape, dtype=dtype, generator=g) * 3).requires_grad_()
    tshape = shape[:1] + shape[2:] if len(shape) > 1 else ()
    if kind == "index":
        target = torch.randint(0, C, tshape, generator=g)
        if opts.get("ignore_index") is not None and target.numel() > 1:
            target.view(-1)[0] = opts["ignore_index"]
    else:
        target = torch.softmax(torch.randn(shape, dtype=dtype, generator=g), 1 if len(shape) > 1 else 0)
    kw = dict(opts)
    if kw.get("weight") == "w":
        kw["weight"] = torch.rand(C, dtype=dtype, generator=g) + 0.5
    if kind == "prob":
        kw.pop("ignore_index", None)          # torch: not for probability targets
    return x, target, kw


@pytest.mark.parametrize("opts", XENT_OPTIONS, ids=XENT_IDS)
@pytest.mark.parametrize("shape, kind", XENT_SHAPES)
def test_cross_entropy_matches_torch_float32(shape, kind, opts):
    x, target, kw = xent_inputs(shape, kind, torch.float32, opts)
    x2 = x.detach().clone().requires_grad_()
    ours = fo.cross_entropy(x, target, **kw)
    theirs = F.cross_entropy(x2, target, **kw)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, **F32, equal_nan=True)
    if x.numel():
        gout = torch.rand(theirs.shape, generator=gen(1))
        ours.backward(gout)
        theirs.backward(gout)
        torch.testing.assert_close(x.grad, x2.grad, **F32)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(7, 5), (5,), (3, 5, 2, 4)])
def test_cross_entropy_probability_target_and_weight_grads_match_torch(shape, reduction):
    """With probability targets torch differentiates the loss with respect
    to target and weight too."""
    x, target, kw = xent_inputs(shape, "prob", torch.float32, {"weight": "w",
                                                                "label_smoothing": 0.15})
    w = kw.pop("weight")
    args = [[t.detach().clone().requires_grad_() for t in (x, target, w)] for _ in range(2)]
    outs = [f(a[0], a[1], weight=a[2], reduction=reduction, **kw)
            for f, a in zip((fo.cross_entropy, F.cross_entropy), args)]
    torch.testing.assert_close(outs[0], outs[1], **F32)
    gout = torch.rand(outs[1].shape, generator=gen(2))
    for o in outs:
        o.backward(gout)
    for a, b in zip(*args):
        torch.testing.assert_close(a.grad, b.grad, **F32)


@pytest.mark.parametrize("opts", XENT_OPTIONS, ids=XENT_IDS)
@pytest.mark.parametrize("shape, kind", [s for s in XENT_SHAPES if s[0][0]])
def test_cross_entropy_gradcheck_float64(shape, kind, opts):
    x, target, kw = xent_inputs(shape, kind, torch.float64, opts)
    assert torch.autograd.gradcheck(lambda x: fo.cross_entropy(x, target, **kw), (x,))
    if kind == "prob":      # also with respect to the probabilities and the class weights
        t = target.clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda x, t: fo.cross_entropy(x, t, **kw), (x, t))
        if "weight" in kw:
            w = kw.pop("weight").clone().requires_grad_()
            assert torch.autograd.gradcheck(
                lambda x, t, w: fo.cross_entropy(x, t, weight=w, **kw), (x, t, w))


def test_cross_entropy_legacy_reduction_arguments():
    x, target, _ = xent_inputs((6, 4), "index", torch.float32, {})
    for kw in ({"size_average": False}, {"reduce": False}):
        with pytest.warns(UserWarning, match="size_average and reduce"):
            ours = fo.cross_entropy(x, target, **kw)
        with pytest.warns(UserWarning):
            theirs = F.cross_entropy(x, target, **kw)
        torch.testing.assert_close(ours, theirs, **F32)


def test_cross_entropy_channels_last_logits():
    g = gen(3)
    x = torch.randn(2, 6, 3, 5, generator=g).to(memory_format=torch.channels_last).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y = torch.randint(0, 6, (2, 3, 5), generator=g)
    fo.cross_entropy(x, y).backward()
    F.cross_entropy(x2, y).backward()
    torch.testing.assert_close(x.grad, x2.grad, **F32)


# ------------------------------------------ cross-entropy: torch's checks ---

XENT_GRID_INPUTS = [(), (5,), (1, 5), (4, 5), (0, 5), (4, 1), (2, 5, 3), (0, 5, 3),
                    (2, 5, 3, 4), (1, 5, 3, 4), (2, 5, 3, 1, 2)]
XENT_GRID_OPTIONS = [{}, {"label_smoothing": 0.1}, {"weight": "w"}, {"weight": "short"},
                     {"ignore_index": 1}, {"reduction": "none"}]
ARG_NAMES = re.compile(r"\b(input|target|weight|ignore_index|label_smoothing|reduction)\b")
KERNEL_NAMES = re.compile(r"\b(logits|x|gamma|beta|dy)\b")


def target_shapes(xs):
    """Target shapes to try with input of shape xs: the right ones for class
    indices and for probabilities, and near misses (reversed or otherwise
    permuted, flattened, another batch size, a dimension more or fewer,
    0-d, (1,))."""
    out = {(), (1,), xs, xs[::-1]}
    if xs:
        index = (xs[0],) + xs[2:] if len(xs) > 1 else ()
        out |= {index, index + (1,), index[1:], (math.prod(index),),
                (xs[0] + 1,) + index[1:] if index else (2,)}
        if len(xs) > 2:
            out |= {(xs[0],) + xs[2:][::-1], xs[:1] + xs[2:] + xs[1:2],
                    (xs[0], math.prod(xs[2:])), xs[:1] + (1,) + xs[2:]}
    return sorted(out, key=lambda s: (len(s), s))


def run_xent(f, x, target, kw):
    """(forward error, backward error, loss, input gradient) of one call."""
    x = x.detach().clone().requires_grad_()
    try:
        loss = f(x, target, **kw)
    except Exception as e:
        return e, None, None, None
    try:
        loss.backward(torch.rand(loss.shape, generator=gen(1)))
    except Exception as e:
        return None, e, loss.detach(), None
    return None, None, loss.detach(), x.grad


@pytest.mark.parametrize("xshape", XENT_GRID_INPUTS, ids=str)
def test_cross_entropy_raises_exactly_when_torch_does(xshape):
    """For input of shape `xshape`, every target shape of `target_shapes`,
    class-index and probability dtypes and wrong ones, and options (label
    smoothing, a weight of the right or wrong length, ignore_index with
    probability targets): fastopt's forward raises exactly when torch's
    does, the same exception type, naming an argument (the target when
    only its shape or dtype is wrong) and not the kernel's names;
    otherwise the loss and the input's gradient are torch's.  Where torch
    accepts the forward but its backward raises (a (1,) target for (C,)
    input; uint8 targets of an empty batch with input of 3 or more
    dimensions), fastopt returns torch's loss or raises that error in the
    forward."""
    x = torch.randn(xshape, generator=gen(0)) * 3
    C = xshape[0] if len(xshape) == 1 else xshape[1] if xshape else 1
    for tshape, tdtype, opts in itertools.product(
            target_shapes(xshape), [torch.int64, torch.uint8, torch.int32, torch.float32],
            XENT_GRID_OPTIONS):
        if tdtype.is_floating_point:
            target = torch.rand(tshape, generator=gen(2))
        else:
            target = torch.randint(0, max(C, 1), tshape, generator=gen(2)).to(tdtype)
        kw = dict(opts)
        if "weight" in kw:
            kw["weight"] = torch.rand(C if kw["weight"] == "w" else C + 1, generator=gen(3)) + 0.5
        case = f"input {xshape}, target {tshape} {tdtype}, {opts}"
        theirs = run_xent(F.cross_entropy, x, target, kw)
        ours = run_xent(fo.cross_entropy, x, target, kw)
        if theirs[0] is not None:
            assert type(ours[0]) is type(theirs[0]), f"{case}: torch raised {theirs[0]!r}, " \
                f"fastopt {ours[0]!r}"
            message = str(ours[0])
            assert ARG_NAMES.search(message) and not KERNEL_NAMES.search(message), message
            if not opts and xshape:
                assert "target" in message, message
        elif theirs[1] is not None:
            assert ours[0] is None or type(ours[0]) is type(theirs[1]), case
            if ours[0] is None:
                torch.testing.assert_close(ours[2], theirs[2], **F32, equal_nan=True)
        else:
            assert ours[0] is None and ours[1] is None, f"{case}: torch accepted, fastopt " \
                f"raised {ours[0] or ours[1]!r}"
            torch.testing.assert_close(ours[2], theirs[2], **F32, equal_nan=True)
            torch.testing.assert_close(ours[3], theirs[3], **F32, equal_nan=True)


@pytest.mark.parametrize("xshape", [(4, 6), (2, 6, 3, 5)], ids=str)
def test_cross_entropy_wrong_target_shape_named(xshape):
    """The examples of the shape rules, from (N, C, d1, ...) input: class
    indices of a permuted or flattened shape, probabilities permuted."""
    x = torch.randn(xshape, generator=gen(4))
    index = (xshape[0],) + xshape[2:]
    bad = [index[::-1], (math.prod(index),), (xshape[0] + 1,) + index[1:], index + (1,)]
    for shape in bad:
        if shape == index:
            continue
        for t in (torch.zeros(shape, dtype=torch.long), torch.rand(shape)):
            with pytest.raises((ValueError, RuntimeError)) as ours:
                fo.cross_entropy(x, t)
            with pytest.raises((ValueError, RuntimeError)) as theirs:
                F.cross_entropy(x, t)
            assert ours.type is theirs.type
            assert "target" in str(ours.value) and f"{shape}" in str(ours.value)


def test_cross_entropy_class_index_out_of_range_raises_index_error_as_torch():
    for x, t in [(torch.randn(4, 3), torch.tensor([0, 1, 2, 3])),
                 (torch.randn(4, 3), torch.tensor([0, -1, 2, 1])),
                 (torch.randn(2, 3, 2), torch.tensor([[0, 1], [2, 7]])),
                 (torch.randn(4, 3), torch.tensor([0, 1, 255, 2], dtype=torch.uint8))]:
        with pytest.raises(IndexError):
            F.cross_entropy(x, t)
        with pytest.raises(IndexError, match=r"target\[.*\] = .* is out of range"):
            fo.cross_entropy(x, t)
    # ignored indices need not be classes, uint8 ones compared as integers
    x, t = torch.randn(4, 3), torch.tensor([0, 1, 255, 2], dtype=torch.uint8)
    torch.testing.assert_close(fo.cross_entropy(x, t, ignore_index=255),
                               F.cross_entropy(x, t, ignore_index=255), **F32)


@pytest.mark.parametrize("smoothing, raises", [(-0.5, False), (math.nan, False), (0.0, False),
                                               (1.0, False), (1.0 + 1e-9, True), (math.inf, True)])
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_cross_entropy_label_smoothing_range_as_torch(smoothing, raises, kind):
    """torch refuses label_smoothing > 1 and ignores it when <= 0 or NaN."""
    x, target, _ = xent_inputs((6, 4), kind, torch.float32, {})
    if raises:
        for f in (F.cross_entropy, fo.cross_entropy):
            with pytest.raises(RuntimeError, match="label_smoothing"):
                f(x, target, label_smoothing=smoothing)
    else:
        torch.testing.assert_close(fo.cross_entropy(x, target, label_smoothing=smoothing),
                                   F.cross_entropy(x, target, label_smoothing=smoothing), **F32)


@pytest.mark.parametrize("ignore_index, raises", [(-100, False), (-1, False), (0, True), (3, True)])
def test_cross_entropy_ignore_index_with_probability_targets_as_torch(ignore_index, raises):
    x, target, _ = xent_inputs((5, 4), "prob", torch.float32, {})
    if raises:
        for f in (F.cross_entropy, fo.cross_entropy):
            with pytest.raises(RuntimeError, match="ignore_index"):
                f(x, target, ignore_index=ignore_index)
    else:
        torch.testing.assert_close(fo.cross_entropy(x, target, ignore_index=ignore_index),
                                   F.cross_entropy(x, target, ignore_index=ignore_index), **F32)


@pytest.mark.parametrize("wshape", [(3,), (5,), (1, 4), (4, 1), ()])
@pytest.mark.parametrize("kind", ["index", "prob"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_weight_of_wrong_shape_as_torch(wshape, kind, smoothing):
    x, target, _ = xent_inputs((5, 4), kind, torch.float32, {})
    w = torch.ones(wshape)
    for f in (F.cross_entropy, fo.cross_entropy):
        with pytest.raises(RuntimeError, match="weight"):
            f(x, target, weight=w, label_smoothing=smoothing)


@pytest.mark.parametrize("tdtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("wdtype", [None, torch.float64, torch.int64])
def test_cross_entropy_probability_targets_promote_as_torch(tdtype, wdtype):
    """Probability targets and weights of other dtypes: the loss has the
    promoted dtype, as in torch; the input's gradient has the input's."""
    x, target, _ = xent_inputs((6, 4), "prob", torch.float32, {})
    target = target.to(tdtype)
    w = None if wdtype is None else (torch.rand(4, generator=gen(5)) * 3).to(wdtype)
    xs = [x.detach().clone().requires_grad_() for _ in range(2)]
    ours, theirs = fo.cross_entropy(xs[0], target, w), F.cross_entropy(xs[1], target, w)
    assert ours.dtype == theirs.dtype
    torch.testing.assert_close(ours, theirs, **F32)
    ours.backward()
    theirs.backward()
    assert xs[0].grad.dtype == torch.float32
    torch.testing.assert_close(xs[0].grad, xs[1].grad, **F32)


def test_cross_entropy_class_index_dtypes_as_torch():
    """Class indices are int64, or uint8 for input of 1 or 2 dimensions; a
    weight has the input's dtype (torch: RuntimeError otherwise)."""
    x = torch.randn(4, 3)
    for dt in (torch.int32, torch.int16, torch.int8, torch.bool, torch.uint16):
        for f in (F.cross_entropy, fo.cross_entropy):
            with pytest.raises(RuntimeError, match="target|Long"):
                f(x, torch.zeros(4, dtype=dt))
    for f in (F.cross_entropy, fo.cross_entropy):
        with pytest.raises(RuntimeError):
            f(torch.randn(2, 3, 4), torch.zeros(2, 4, dtype=torch.uint8))
        with pytest.raises(RuntimeError):
            f(x, torch.zeros(4, dtype=torch.long), weight=torch.ones(3, dtype=torch.float64))


def test_cross_entropy_one_dimensional_input():
    """(C,) input: a 0-d class index (or (1,), which torch's forward takes
    and its backward refuses; fastopt computes both), or (C,) probabilities."""
    x = torch.randn(5, generator=gen(6))
    for reduction in ("mean", "sum", "none"):
        for t in (torch.tensor(3), torch.tensor([3])):
            ours = fo.cross_entropy(x, t, reduction=reduction)
            torch.testing.assert_close(ours, F.cross_entropy(x, t, reduction=reduction), **F32)
            assert ours.shape == ()
        xs = [x.clone().requires_grad_() for _ in range(2)]
        fo.cross_entropy(xs[0], torch.tensor([3]), reduction=reduction).backward()
        F.cross_entropy(xs[1], torch.tensor(3), reduction=reduction).backward()
        torch.testing.assert_close(xs[0].grad, xs[1].grad, **F32)
    for f in (F.cross_entropy, fo.cross_entropy):
        with pytest.raises(ValueError):
            f(x, torch.tensor([1, 2]))
        with pytest.raises(RuntimeError):         # torch's label smoothing needs a 0-d target
            f(x, torch.tensor([1]), label_smoothing=0.1)
        with pytest.raises(IndexError):
            f(torch.tensor(1.0), torch.tensor(0.5))


def test_cross_entropy_no_classes_and_empty_batches_as_torch():
    cases = [((2, 0), torch.full((2,), -100)), ((2, 0), torch.rand(2, 0)),
             ((0, 5), torch.zeros(0, dtype=torch.long)), ((0, 5), torch.rand(0, 5)),
             ((0, 5, 3), torch.zeros(0, 3, dtype=torch.long))]
    for shape, t in cases:
        for kw in ({}, {"reduction": "sum"}, {"reduction": "none"}, {"label_smoothing": 0.1}):
            torch.testing.assert_close(fo.cross_entropy(torch.randn(shape), t, **kw),
                                       F.cross_entropy(torch.randn(shape), t, **kw),
                                       equal_nan=True)


def test_cross_entropy_hyperparameter_types_as_torch():
    x, t = torch.randn(4, 3), torch.zeros(4, dtype=torch.long)
    for kw in ({"ignore_index": 1.0}, {"ignore_index": True}, {"ignore_index": "1"},
               {"ignore_index": None}, {"label_smoothing": "0.1"}, {"label_smoothing": None},
               {"label_smoothing": [0.1]}, {"label_smoothing": np.array([0.1])}):
        for f in (F.cross_entropy, fo.cross_entropy):
            with pytest.raises(TypeError, match=list(kw)[0]):
                f(x, t, **kw)
    for kw in ({"ignore_index": 2**63}, {"reduction": "avg"}, {"reduction": None}):
        for f in (F.cross_entropy, fo.cross_entropy):
            with pytest.raises(ValueError):
                f(x, t, **kw)
    for kw in ({"ignore_index": np.int64(1)}, {"ignore_index": torch.tensor(1)},
               {"label_smoothing": np.float32(0.25)}, {"label_smoothing": torch.tensor(0.25)},
               {"label_smoothing": 1}, {"ignore_index": -2**63}):
        torch.testing.assert_close(fo.cross_entropy(x, t, **kw), F.cross_entropy(x, t, **kw),
                                   **F32)


def neg_view(t):
    """A tensor with t's values whose memory holds -t (torch's lazy negation)."""
    v = torch._neg_view(-t.detach())
    assert v.is_neg() and torch.equal(v.resolve_neg(), t.detach())
    return v


@pytest.mark.parametrize("which", ["input", "target", "weight"])
def test_cross_entropy_reads_lazily_negated_views_as_torch(which):
    """Lazily negated tensors (the neg bit: what negating a tensor that needs
    no grad may give, without a copy) are read as their values."""
    x, target, kw = xent_inputs((6, 5), "prob", torch.float32, {"weight": "w"})
    args = {"input": x.detach(), "target": target, "weight": kw["weight"]}
    args[which] = neg_view(args[which])
    torch.testing.assert_close(fo.cross_entropy(args["input"], args["target"], weight=args["weight"]),
                               F.cross_entropy(args["input"], args["target"], weight=args["weight"]),
                               **F32)
    torch.testing.assert_close(fo.cross_entropy(args["input"], args["target"], weight=args["weight"]),
                               F.cross_entropy(x, target, weight=kw["weight"]), **F32)


@pytest.mark.parametrize("which", ["input", "target", "weight"])
def test_cross_entropy_meta_tensors_refused_naming_them(which):
    x, target, kw = xent_inputs((4, 3), "index", torch.float32, {"weight": "w"})
    args = {"input": x.detach(), "target": target, "weight": kw["weight"]}
    args[which] = args[which].to("meta")
    with pytest.raises(TypeError, match=rf"^{which} is on meta"):
        fo.cross_entropy(args["input"], args["target"], weight=args["weight"])


# ------------------------------------------------------------- batch norm ---

BN_SHAPES = [(8, 3), (4, 3, 5), (4, 3, 5, 6), (2, 3, 4, 5, 3)]


def bn_inputs(shape, dtype, seed=0, channels_last=False):
    g = gen(seed)
    C = shape[1]
    x = torch.randn(shape, dtype=dtype, generator=g) * 2 + 0.5
    if channels_last:
        x = x.to(memory_format=torch.channels_last if len(shape) == 4 else torch.channels_last_3d)
    w = torch.rand(C, dtype=dtype, generator=g) + 0.5
    b = torch.randn(C, dtype=dtype, generator=g)
    rm = torch.randn(C, dtype=dtype, generator=g)
    rv = torch.rand(C, dtype=dtype, generator=g) + 0.5
    return x, w, b, rm, rv


@pytest.mark.parametrize("shape, channels_last",
                         [(s, False) for s in BN_SHAPES] + [(s, True) for s in BN_SHAPES[2:]])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_matches_torch_float32(shape, channels_last, training, affine):
    x, w, b, rm, rv = bn_inputs(shape, torch.float32, channels_last=channels_last)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    ws = [w.clone().requires_grad_() if affine else None for _ in range(2)]
    bs = [b.clone().requires_grad_() if affine else None for _ in range(2)]
    rms, rvs = [rm.clone() for _ in range(2)], [rv.clone() for _ in range(2)]
    outs = [f(xs[k], rms[k], rvs[k], ws[k], bs[k], training, 0.3, 1e-3)
            for k, f in enumerate((fo.batch_norm, F.batch_norm))]
    torch.testing.assert_close(outs[0], outs[1], **F32)
    if channels_last:
        assert outs[0].stride() == outs[1].stride() == x.stride()
    torch.testing.assert_close(rms[0], rms[1], **F32)
    torch.testing.assert_close(rvs[0], rvs[1], **F32)
    dy = torch.randn(shape, generator=gen(5))
    for o in outs:
        o.backward(dy)
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-4, atol=1e-5)
    if affine:
        torch.testing.assert_close(ws[0].grad, ws[1].grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(bs[0].grad, bs[1].grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(6, 3), (3, 2, 4), (3, 2, 3, 2)])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_gradcheck_float64(shape, training):
    x, w, b, rm, rv = bn_inputs(shape, torch.float64)
    args = [t.requires_grad_() for t in (x, w, b)]
    stats = (None, None) if training else (rm, rv)
    assert torch.autograd.gradcheck(
        lambda x, w, b: fo.batch_norm(x, *stats, w, b, training, 0.1, 1e-5), args)
    xc = x.detach().to(memory_format=torch.channels_last) if x.dim() == 4 else x.detach()
    assert torch.autograd.gradcheck(
        lambda x: fo.batch_norm(x, *stats, None, None, training), (xc.requires_grad_(),))


def test_batch_norm_no_running_stats_and_errors():
    x, w, b, rm, rv = bn_inputs((5, 3), torch.float32)
    torch.testing.assert_close(fo.batch_norm(x, None, None, w, b, True),
                               F.batch_norm(x, None, None, w, b, True), **F32)
    with pytest.raises(RuntimeError, match="evaluation mode"):
        fo.batch_norm(x, None, None, w, b, False)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fo.batch_norm(x[:1], None, None, w, b, True)
    with pytest.raises(RuntimeError, match="weight has dtype torch.float64"):
        fo.batch_norm(x, rm, rv, w.double(), b, True)


def test_batch_norm_input_modified_before_backward_raises():
    x, w, b, rm, rv = bn_inputs((6, 3), torch.float64)
    x.requires_grad_()
    h = x * 1.0
    y = fo.batch_norm(h, rm, rv, w, b, True)
    h.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_batch_norm_running_stats_version_moves():
    x, w, b, rm, rv = bn_inputs((6, 3), torch.float32)
    v = rm._version
    fo.batch_norm(x, rm, rv, w, b, True)
    assert rm._version > v


@pytest.mark.parametrize("kwargs", [{}, {"momentum": None}, {"affine": False},
                                    {"track_running_stats": False}, {"eps": 1e-3, "momentum": 0.5}])
def test_batchnorm2d_module_matches_torch(kwargs):
    torch.manual_seed(0)
    theirs = torch.nn.BatchNorm2d(4, **kwargs)
    ours = fo.BatchNorm2d(4, **kwargs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    if kwargs.get("affine", True):
        with torch.no_grad():
            theirs.weight.uniform_(0.5, 1.5)
            theirs.bias.normal_()
    ours.load_state_dict(theirs.state_dict())
    for step in range(4):
        x = torch.randn(8, 4, 5, 5) * 2 + 1
        if step == 2:
            ours.eval()
            theirs.eval()
        xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
        ya, yb = ours(xs[0]), theirs(xs[1])
        torch.testing.assert_close(ya, yb, **F32)
        ya.square().sum().backward()
        yb.square().sum().backward()
        torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-4, atol=1e-4)
    for (ka, va), (kb, vb) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert ka == kb
        torch.testing.assert_close(va, vb, **F32)
    if kwargs.get("affine", True):
        torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-4, atol=1e-4)


def test_batchnorm2d_in_a_model_trains_like_torch():
    torch.manual_seed(0)

    def net(bn):
        return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), bn(8), torch.nn.ReLU(),
                                   torch.nn.Flatten(), torch.nn.Linear(8 * 16, 5)).double()
    a = net(fo.BatchNorm2d)
    b = net(torch.nn.BatchNorm2d)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    oa, ob = fo.SGD(a.parameters(), lr=0.1, momentum=0.9), torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(16, 3, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 5, (16,))
    for _ in range(5):
        for m, o, ce in ((a, oa, fo.cross_entropy), (b, ob, F.cross_entropy)):
            o.zero_grad()
            ce(m(x), y).backward()
            o.step()
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values()):
        torch.testing.assert_close(pa, pb, rtol=1e-10, atol=1e-12)
