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


def test_cross_entropy_weights_torch_refuses_or_computes_differently():
    """uint8 class indices with a weight, label smoothing and "mean" (torch
    gathers the weights with them: RuntimeError); weights of C elements in
    another shape for input of 3 or more dimensions (torch takes them but
    for label smoothing by the first dimension and, with "mean", to gather
    from them)."""
    x = torch.randn(4, 3, generator=gen(13))
    t8 = torch.tensor([0, 1, 2, 1], dtype=torch.uint8)
    for reduction, raises in (("mean", True), ("sum", False), ("none", False)):
        kw = dict(weight=torch.rand(3) + 0.5, label_smoothing=0.1, reduction=reduction)
        if raises:
            for f in (F.cross_entropy, fo.cross_entropy):
                with pytest.raises(RuntimeError):
                    f(x, t8, **kw)
        else:
            torch.testing.assert_close(fo.cross_entropy(x, t8, **kw), F.cross_entropy(x, t8, **kw),
                                       **F32)
    x = torch.randn(4, 3, 2, generator=gen(14))
    t = torch.randint(0, 3, (4, 2), generator=gen(15))
    for wshape in ((1, 3), (3, 1)):
        for smoothing, reduction in itertools.product((0.0, 0.1), ("mean", "none")):
            kw = dict(weight=torch.rand(wshape, generator=gen(16)) + 0.5,
                      label_smoothing=smoothing, reduction=reduction)
            try:
                theirs = F.cross_entropy(x, t, **kw)
            except RuntimeError:
                with pytest.raises(RuntimeError, match="weight"):
                    fo.cross_entropy(x, t, **kw)
            else:
                torch.testing.assert_close(fo.cross_entropy(x, t, **kw), theirs, **F32)


@pytest.mark.parametrize("value", [-1.0, 0.0, math.nan, math.inf])
@pytest.mark.parametrize("kind", ["index", "prob"])
def test_cross_entropy_weights_outside_the_kernels_domain_are_torchs(value, kind):
    """Negative or non-finite weights (the kernel takes finite weights >= 0)
    and, with label smoothing and "mean", weights 0 for every class index
    not ignored (torch: 0/0): torch's results."""
    x, target, kw = xent_inputs((5, 4), kind, torch.float32, {"weight": "w"}, seed=17)
    if kind == "index":
        target = torch.full((5,), 2)
    kw["weight"][2] = value
    for opts in ({}, {"label_smoothing": 0.1}, {"label_smoothing": 0.1, "reduction": "sum"}):
        xs = [x.detach().clone().requires_grad_() for _ in range(2)]
        ours, theirs = fo.cross_entropy(xs[0], target, **kw, **opts), \
            F.cross_entropy(xs[1], target, **kw, **opts)
        torch.testing.assert_close(ours, theirs, **F32, equal_nan=True)
        ours.backward()
        theirs.backward()
        torch.testing.assert_close(xs[0].grad, xs[1].grad, **F32, equal_nan=True)


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
    ours = fo.cross_entropy(args["input"], args["target"], weight=args["weight"])
    torch.testing.assert_close(
        ours, F.cross_entropy(args["input"], args["target"], weight=args["weight"]), **F32)
    torch.testing.assert_close(ours, F.cross_entropy(x, target, weight=kw["weight"]), **F32)


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
    _module_matches_torch(ours, theirs, (8, 4, 5, 5), 4, kwargs.get("affine", True))
    if kwargs.get("affine", True):
        torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-4, atol=1e-4)


def _module_matches_torch(ours, theirs, shape, steps, affine):
    """`ours` (a fastopt.torch BatchNorm module) computes `theirs`'s outputs,
    input gradients and running statistics over `steps` batches of `shape`,
    evaluating from the third."""
    if affine:
        with torch.no_grad():
            theirs.weight.uniform_(0.5, 1.5)
            theirs.bias.normal_()
    ours.load_state_dict(theirs.state_dict())
    for step in range(steps):
        if step == 2:
            ours.eval()
            theirs.eval()
        x = torch.randn(shape) * 2 + 1
        xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
        ya, yb = ours(xs[0]), theirs(xs[1])
        torch.testing.assert_close(ya, yb, **F32)
        ya.square().sum().backward()
        yb.square().sum().backward()
        torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-4, atol=1e-4)
    for (ka, va), (kb, vb) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert ka == kb
        torch.testing.assert_close(va, vb, **F32)


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


@pytest.mark.parametrize("kwargs", [{}, {"momentum": None}, {"affine": False},
                                    {"track_running_stats": False}])
@pytest.mark.parametrize("shape", [(8, 4), (8, 4, 5)])
def test_batchnorm1d_module_matches_torch(kwargs, shape):
    torch.manual_seed(1)
    theirs = torch.nn.BatchNorm1d(4, **kwargs)
    ours = fo.BatchNorm1d(4, **kwargs)
    assert isinstance(ours, torch.nn.BatchNorm1d)
    _module_matches_torch(ours, theirs, shape, 3, kwargs.get("affine", True))
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        ours(torch.randn(2, 4, 3, 3))


# ------------------------------------------------ batch norm: torch's checks ---

def bn_call(f, args):
    return f(args["input"], args["running_mean"], args["running_var"], args["weight"],
             args["bias"], args["training"], args["momentum"], args["eps"])


def bn_args(training=True, dtype=torch.float32, shape=(4, 3, 5)):
    x, w, b, rm, rv = bn_inputs(shape, torch.float32)
    return dict(input=x.to(dtype), running_mean=rm, running_var=rv, weight=w, bias=b,
                training=training, momentum=0.1, eps=1e-5)


# (what is changed, the argument the message must name); each is applied to a
# valid call in training and in evaluation mode, when torch refuses it there
BN_BAD = [
    ({"weight": torch.ones(4)}, "weight"), ({"bias": torch.ones(2)}, "bias"),
    ({"running_mean": torch.zeros(4)}, "running_mean"),
    ({"running_var": torch.ones(1, 3)}, "running_var"),
    ({"running_mean": torch.zeros(3, dtype=torch.float64)}, "running_mean"),
    ({"running_var": torch.ones(3, dtype=torch.bfloat16)}, "running_var"),
    ({"weight": torch.ones(3, dtype=torch.float64)}, "weight"),
    ({"bias": torch.zeros(3, dtype=torch.int64)}, "bias"),
    ({"running_var": None}, "running_"), ({"running_mean": None}, "running_"),
    ({"running_mean": torch.zeros(3, requires_grad=True)}, "running_mean"),
    ({"eps": -1.0}, "eps"), ({"eps": 0.0}, "eps"), ({"eps": "1e-5"}, "eps"),
    ({"momentum": None}, "momentum"), ({"momentum": "0.1"}, "momentum"),
    ({"training": None}, "training"), ({"training": 1}, "training"),
    ({"weight": [1.0, 1.0, 1.0]}, "weight"), ({"running_mean": np.zeros(3)}, "running_mean"),
    ({"input": torch.randn(1, 3)}, "1 value per channel"),
    ({"input": torch.randn(1, 3, 1)}, "1 value per channel"),
    ({"input": torch.tensor(1.0)}, "input"),
    ({"input": torch.randn(4, 3).bfloat16(), "weight": torch.ones(3).bfloat16()}, "weight"),
    ({"input": torch.randn(4, 3).half(), "running_mean": torch.zeros(3).half(),
      "running_var": torch.ones(3).half(), "weight": torch.ones(3).bfloat16()}, "weight"),
]


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("change, name", BN_BAD, ids=[f"{list(c)[0]}-{n}" for c, n in BN_BAD])
def test_batch_norm_raises_as_torch_naming_the_argument(change, name, training):
    """torch's exception type, a message naming the argument as torch names
    it (never the kernels' x, gamma, beta), and nothing changed."""
    args = bn_args(training)
    args.update(change)
    try:
        bn_call(F.batch_norm, {k: v.clone() if isinstance(v, torch.Tensor) else v
                               for k, v in args.items()})
    except Exception as e:
        theirs = e
    else:                       # torch accepts it in this mode: its results
        bn_compare(args)
        return
    before = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(Exception) as ours:
        bn_call(fo.batch_norm, args)
    assert type(ours.value) is type(theirs), f"torch: {theirs!r}, fastopt: {ours.value!r}"
    message = str(ours.value)
    assert name in message and not re.search(r"\b(x|gamma|beta)\b", message), message
    for k, v in before.items():
        assert torch.equal(args[k], v), k


@pytest.mark.parametrize("which", ["input", "running_mean", "running_var", "weight", "bias"])
def test_batch_norm_meta_tensors_refused_naming_them(which):
    args = bn_args()
    args[which] = args[which].to("meta")
    before = {k: v.clone() for k, v in args.items()
              if isinstance(v, torch.Tensor) and not v.is_meta}
    with pytest.raises(TypeError, match=rf"^{which} is on meta"):
        bn_call(fo.batch_norm, args)
    for k, v in before.items():
        assert torch.equal(args[k], v)


def bn_compare(args, grads=True):
    """fastopt's batch_norm and torch's on copies of `args`: output, running
    statistics and input/weight/bias gradients."""
    runs = []
    for f in (fo.batch_norm, F.batch_norm):
        a = {k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
        for k in ("input", "weight", "bias"):
            if a[k] is not None:
                a[k].requires_grad_()
        y = bn_call(f, a)
        if grads:
            y.backward(torch.ones_like(y) * 0.5 + torch.arange(y.numel()).reshape(y.shape) % 3)
        runs.append((y, a))
    (ya, a), (yb, b) = runs
    assert ya.dtype == yb.dtype and ya.shape == yb.shape
    torch.testing.assert_close(ya, yb, **F32, equal_nan=True)
    for k in ("running_mean", "running_var", "input", "weight", "bias"):
        if a[k] is None:
            continue
        va, vb = (a[k].grad, b[k].grad) if k in ("input", "weight", "bias") else (a[k], b[k])
        if grads or k.startswith("running"):
            torch.testing.assert_close(va, vb, rtol=1e-4, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("change", [
    {"momentum": 2.0}, {"momentum": -0.5}, {"momentum": math.nan}, {"momentum": math.inf},
    {"eps": math.nan}, {"eps": math.inf}, {"training": False, "eps": 0.0},
    {"training": False, "eps": math.nan}, {"input": torch.randn(0, 3)},
    {"input": torch.randn(4, 3, 0)}, {"input": torch.randn(0, 3), "training": False},
    {"input": torch.randn(0, 3), "weight": torch.ones(7), "running_mean": None,
     "running_var": None},
], ids=str)
def test_batch_norm_outside_the_kernels_domain_is_torchs(change):
    """Hyperparameters torch takes but the kernels do not (momentum outside
    [0, 1] or not finite, eps = 0 in evaluation, eps not finite) and input
    with no elements: torch's results."""
    args = bn_args()
    args.update(change)
    bn_compare(args)


def test_batch_norm_weight_of_c_elements_in_another_shape():
    """torch reads a weight and bias of C elements in any shape, (1, C) say
    (its forward does; its backward then fails): so does fastopt, whose
    gradients have their shape."""
    args = bn_args()
    args.update(weight=args["weight"].reshape(1, 3), bias=args["bias"].reshape(3, 1))
    bn_compare(args, grads=False)
    flat = dict(args, weight=args["weight"].reshape(3), bias=args["bias"].reshape(3))
    grads = []
    for a in (args, flat):
        a = {k: v.detach().clone().requires_grad_() if k in ("weight", "bias") else v
             for k, v in a.items()}
        bn_call(fo.batch_norm, a).square().sum().backward()
        grads.append((a["weight"].grad, a["bias"].grad))
    assert grads[0][0].shape == (1, 3) and grads[0][1].shape == (3, 1)
    torch.testing.assert_close(grads[0][0].reshape(3), grads[1][0])
    torch.testing.assert_close(grads[0][1].reshape(3), grads[1][1])


def test_batch_norm_running_statistics_of_other_layouts():
    """Running statistics that are strided views are updated in place as
    torch updates them."""
    args = bn_args()
    rm, rv = torch.zeros(6), torch.ones(9)
    args.update(running_mean=rm[::2], running_var=rv[::3])
    bn_compare(args)
    ours = bn_args()
    theirs = dict(ours, running_mean=torch.zeros(3), running_var=torch.ones(3))
    rm, rv = torch.zeros(6), torch.ones(9)
    ours.update(running_mean=rm[::2], running_var=rv[::3])
    bn_call(fo.batch_norm, ours)
    bn_call(F.batch_norm, theirs)
    torch.testing.assert_close(rm[::2], theirs["running_mean"], **F32)
    torch.testing.assert_close(rv[::3], theirs["running_var"], **F32)
    assert torch.equal(rm[1::2], torch.zeros(3)) and torch.equal(rv[1::3], torch.ones(3))


def test_batch_norm_expanded_running_statistics():
    """One value expanded to every channel: read in evaluation as torch reads
    it; refused in training, where torch writes every channel's value to it
    in turn."""
    args = bn_args(training=False)
    args.update(running_mean=torch.zeros(1).expand(3), running_var=torch.full((1,), 2.0).expand(3))
    bn_compare(args)
    args = bn_args(training=True)
    rm = torch.zeros(1)
    args["running_mean"] = rm.expand(3)
    with pytest.raises(RuntimeError, match="running_mean .*expanded"):
        bn_call(fo.batch_norm, args)
    assert torch.equal(rm, torch.zeros(1))


@pytest.mark.parametrize("stat, other", [("running_mean", "weight"), ("running_var", "bias"),
                                         ("running_mean", "running_var"), ("running_var", "input")])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_running_statistics_sharing_memory(stat, other, training):
    """A running statistic that is (a view of) another argument: read as
    torch reads it in evaluation; in training, where it is written, a
    ValueError naming both as torch names them (torch computes a result that
    depends on the order of its reads and writes), and nothing changed."""
    args = bn_args(training)
    args["bias"] = args["bias"].abs() + 0.5        # (also a variance here)
    args[stat] = args[other] if other != "input" else args["input"][0, :, 0].abs()
    if other == "input":
        args["input"][0, :, 0] = args[stat]
        args[stat] = args["input"][0, :, 0]
    if not training:
        bn_compare(args)
        return
    before = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError, match=rf"{stat} and {other} overlap|{other} and {stat} overlap"):
        bn_call(fo.batch_norm, args)
    for k, v in before.items():
        assert torch.equal(args[k], v), k


@pytest.mark.parametrize("which", ["input", "weight", "bias"])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_reads_lazily_negated_views_as_torch(which, training):
    args = bn_args(training)
    plain = dict(args)
    args[which] = neg_view(args[which])
    for a in (args, plain):
        a["running_mean"], a["running_var"] = a["running_mean"].clone(), a["running_var"].clone()
    torch.testing.assert_close(bn_call(fo.batch_norm, args), bn_call(F.batch_norm, plain), **F32)
    torch.testing.assert_close(args["running_mean"], plain["running_mean"], **F32)


@pytest.mark.parametrize("dtype, stats", [(torch.float32, torch.float32),
                                          (torch.float16, torch.float16),
                                          (torch.bfloat16, torch.float32)], ids=str)
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_lazily_negated_running_statistics(dtype, stats, training):
    """A lazily negated running statistic is read as its values and updated
    through the view: it then reads what torch computes for a plain tensor.
    (torch itself updates a temporary copy and leaves the view as it was;
    16-bit ones go through a float32 copy, which torch's copy_ between
    dtypes would make with the wrong sign.)"""
    args, plain = bn_args(training, dtype), bn_args(training, dtype)
    for a in (args, plain):
        for k in ("running_mean", "running_var", "weight", "bias"):
            a[k] = a[k].to(stats)
    args["running_mean"] = neg_view(args["running_mean"])
    args["running_var"] = neg_view(args["running_var"])
    torch.testing.assert_close(bn_call(fo.batch_norm, args), bn_call(F.batch_norm, plain),
                               rtol=2**-7, atol=1e-3)
    torch.testing.assert_close(args["running_mean"], plain["running_mean"], rtol=2**-7, atol=1e-5)
    torch.testing.assert_close(args["running_var"], plain["running_var"], rtol=2**-7, atol=1e-5)


def test_batch_norm_strided_weight_in_evaluation_gradient():
    """torch 2.13's input gradient of batch_norm in evaluation mode is wrong
    for a strided weight; fastopt's is the one torch gives for a contiguous
    copy of it."""
    args = bn_args(training=False, shape=(3, 3, 1))
    w = torch.zeros(3, 2)
    w[:, 0] = args["weight"]
    grads = []
    for f, weight in ((fo.batch_norm, w[:, 0]), (F.batch_norm, args["weight"])):
        x = args["input"].clone().requires_grad_()
        f(x, args["running_mean"], args["running_var"], weight, None, False).backward(
            torch.arange(9.0).reshape(3, 3, 1))
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], **F32)


# ---------------------------------------------------- float16 and bfloat16 ---
# fastopt computes 16-bit input in float32 (statistics and sums in double) and
# rounds each result once to the 16-bit dtype (a gradient scaled by an
# incoming 16-bit gradient: twice).  The reference is torch in float32 on the
# same 16-bit values, upcast, so each result must be within one unit in the
# last place of it: relative 2**-7 for bfloat16, 2**-10 for float16 (one
# rounding is within half of that; a unit allows the second rounding), plus
# an absolute 1e-6 for values near 0, where the float32 reference's own error
# (~1e-7 of the values' scale, from cancellation) is not relative to them.
# (torch's own 16-bit cross-entropy, computed partly in 16-bit, does not.)

HALF = [torch.bfloat16, torch.float16]
HALF_TOL = {torch.bfloat16: dict(rtol=2**-7, atol=1e-6),
            torch.float16: dict(rtol=2**-10, atol=1e-6)}


@pytest.mark.parametrize("opts", XENT_OPTIONS, ids=XENT_IDS)
@pytest.mark.parametrize("shape, kind", [((7, 5), "index"), ((7, 5), "prob"), ((5,), "index"),
                                         ((3, 5, 2, 4), "index"), ((3, 5, 2, 4), "prob")])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_cross_entropy_16bit_matches_torch_in_float32(dtype, shape, kind, opts):
    x, target, kw = xent_inputs(shape, kind, torch.float32, opts, seed=7)
    x16 = x.detach().to(dtype).requires_grad_()
    t16 = target.to(dtype) if kind == "prob" else target
    kw16 = dict(kw, weight=kw["weight"].to(dtype)) if "weight" in kw else kw
    ours = fo.cross_entropy(x16, t16, **kw16)
    assert ours.dtype == F.cross_entropy(x16.detach(), t16, **kw16).dtype == dtype
    xr = x16.detach().float().requires_grad_()
    ref = F.cross_entropy(xr, t16.float() if kind == "prob" else t16,
                          **dict(kw16, weight=kw16["weight"].float()) if "weight" in kw16 else kw16)
    torch.testing.assert_close(ours.float(), ref, **HALF_TOL[dtype], equal_nan=True)
    gout = torch.rand(ref.shape, generator=gen(8)).to(dtype) + 0.5
    ours.backward(gout)
    ref.backward(gout.float())
    assert x16.grad.dtype == dtype
    torch.testing.assert_close(x16.grad.float(), xr.grad, **HALF_TOL[dtype])


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_cross_entropy_16bit_probability_target_and_weight_grads(dtype):
    x, target, kw = xent_inputs((6, 5), "prob", torch.float32, {"weight": "w"}, seed=9)
    ours = [t.detach().to(dtype).requires_grad_() for t in (x, target, kw["weight"])]
    ref = [t.detach().float().requires_grad_() for t in ours]
    fo.cross_entropy(ours[0], ours[1], weight=ours[2], label_smoothing=0.1).backward()
    F.cross_entropy(ref[0], ref[1], weight=ref[2], label_smoothing=0.1).backward()
    for a, b in zip(ours, ref):
        assert a.grad.dtype == dtype
        # (the target and weight gradients multiply 16-bit log-probabilities: 2 units)
        torch.testing.assert_close(a.grad.float(), b.grad, rtol=2 * HALF_TOL[dtype]["rtol"],
                                   atol=1e-5)


@pytest.mark.parametrize("params", ["float32", "16-bit"])
@pytest.mark.parametrize("shape, channels_last",
                         [((8, 3), False), ((4, 3, 5), False), ((4, 3, 5, 6), False),
                          ((4, 3, 5, 6), True)])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_batch_norm_16bit_matches_torch_in_float32(dtype, training, shape, channels_last,
                                                   params):
    """16-bit input with float32 parameters and statistics (torch's mixed
    mode) or all 16-bit: output, running statistics and gradients against
    torch in float32 on the upcast values."""
    x, w, b, rm, rv = bn_inputs(shape, torch.float32, seed=11, channels_last=channels_last)
    pdt = torch.float32 if params == "float32" else dtype
    ours = [x.to(dtype).requires_grad_()] + [t.to(pdt).requires_grad_() for t in (w, b)] + \
           [t.to(pdt) for t in (rm, rv)]
    ref = [t.detach().float().requires_grad_() for t in ours[:3]] + \
          [t.float() for t in ours[3:]]
    y = fo.batch_norm(ours[0], ours[3], ours[4], ours[1], ours[2], training, 0.3, 1e-3)
    y_ref = F.batch_norm(ref[0], ref[3], ref[4], ref[1], ref[2], training, 0.3, 1e-3)
    assert y.dtype == dtype and y.stride() == ours[0].stride()
    torch.testing.assert_close(y.float(), y_ref, **HALF_TOL[dtype])
    stat_tol = HALF_TOL[dtype] if params == "16-bit" else F32
    for a, r in zip(ours[3:], ref[3:]):
        assert a.dtype == pdt
        torch.testing.assert_close(a.float(), r, **stat_tol)
    dy = torch.randn(shape, generator=gen(12)).to(dtype)
    y.backward(dy)
    y_ref.backward(dy.float())
    assert ours[0].grad.dtype == dtype
    torch.testing.assert_close(ours[0].grad.float(), ref[0].grad, **HALF_TOL[dtype])
    # weight and bias gradients: sums over the batch in double, rounded once
    # to their dtype; the float32 reference's sums carry ~1e-5 of relative error
    sum_tol = HALF_TOL[dtype] if params == "16-bit" else dict(rtol=1e-4, atol=1e-4)
    for a, r in zip(ours[1:3], ref[1:3]):
        assert a.grad.dtype == pdt
        torch.testing.assert_close(a.grad.float(), r.grad, **sum_tol)


@pytest.mark.parametrize("module", ["BatchNorm1d", "BatchNorm2d"])
@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_batchnorm_modules_16bit(module, dtype):
    """A module converted to a 16-bit dtype (parameters and buffers) and a
    float32 module given 16-bit input, against torch's module in float32."""
    shape = (8, 4, 6) if module == "BatchNorm1d" else (8, 4, 3, 3)
    torch.manual_seed(2)
    for convert in (True, False):
        theirs = getattr(torch.nn, module)(4, momentum=0.2)
        with torch.no_grad():
            theirs.weight.uniform_(0.5, 1.5)
            theirs.bias.normal_()
        ours = getattr(fo, module)(4, momentum=0.2)
        ours.load_state_dict(theirs.state_dict())
        if convert:
            ours.to(dtype)
            theirs.load_state_dict({k: v.to(dtype).to(v.dtype) for k, v in
                                    theirs.state_dict().items()})
        for step in range(3):
            if step == 2:
                ours.eval()
                theirs.eval()
                with torch.no_grad():   # (the same statistics, not the same up to rounding)
                    theirs.running_mean.copy_(ours.running_mean)
                    theirs.running_var.copy_(ours.running_var)
            x = (torch.randn(shape) * 2 + 1).to(dtype)
            xa, xb = x.clone().requires_grad_(), x.float().requires_grad_()
            ya, yb = ours(xa), theirs(xb)
            assert ya.dtype == dtype
            torch.testing.assert_close(ya.float(), yb, **HALF_TOL[dtype])
            dy = torch.randn(shape).to(dtype)
            ya.backward(dy)
            yb.backward(dy.float())
            torch.testing.assert_close(xa.grad.float(), xb.grad, **HALF_TOL[dtype])
            tol = HALF_TOL[dtype] if convert else F32
            torch.testing.assert_close(ours.running_mean.float(), theirs.running_mean, **tol)
            torch.testing.assert_close(ours.running_var.float(), theirs.running_var, **tol)
        assert ours.weight.grad.dtype == (dtype if convert else torch.float32)


def test_bfloat16_without_ml_dtypes_raises_import_error(monkeypatch):
    """bfloat16 is read through ml_dtypes (fastopt's optional extra): without
    it, bfloat16 tensors raise ImportError saying so, and change nothing;
    float16 needs nothing."""
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)
    x = torch.randn(6, 4)
    target = torch.zeros(6, dtype=torch.long)
    with pytest.raises(ImportError, match="input .*ml_dtypes"):
        fo.cross_entropy(x.bfloat16(), target)
    rm, rv = torch.zeros(4), torch.ones(4)
    with pytest.raises(ImportError, match="input .*ml_dtypes"):
        fo.batch_norm(x.bfloat16(), rm, rv, training=True)
    assert torch.equal(rm, torch.zeros(4)) and torch.equal(rv, torch.ones(4))
    assert fo.cross_entropy(x.half(), target).dtype == torch.float16
    assert fo.batch_norm(x.half(), rm, rv, training=True).dtype == torch.float16


# --------------------------------------------------- errors name arguments ---

@pytest.mark.parametrize("call, error, name", [
    (lambda x, t: fo.cross_entropy(x.long(), t), TypeError, "input"),
    (lambda x, t: fo.cross_entropy(x.to(torch.complex64), t), TypeError, "input"),
    (lambda x, t: fo.cross_entropy(x[0, 0], t), IndexError, "input"),
    (lambda x, t: fo.cross_entropy(x.tolist(), t), TypeError, "input"),
    (lambda x, t: fo.cross_entropy(x.to_sparse(), t), TypeError, "input"),
    (lambda x, t: fo.cross_entropy(x, t.tolist()), TypeError, "target"),
    (lambda x, t: fo.cross_entropy(x, t[:3]), ValueError, "target"),
    (lambda x, t: fo.cross_entropy(x, t.int()), RuntimeError, "target"),
    (lambda x, t: fo.cross_entropy(x, t, weight=torch.ones(3, dtype=torch.float64)),
     RuntimeError, "weight"),
    (lambda x, t: fo.cross_entropy(x, t, weight=torch.ones(3).numpy()), TypeError, "weight"),
], ids=range(10))
def test_cross_entropy_errors_name_torchs_arguments(call, error, name):
    """`input` (the kernel's `logits`), `target`, `weight`."""
    x, t = torch.randn(4, 3), torch.zeros(4, dtype=torch.long)
    with pytest.raises(error) as info:
        call(x, t)
    assert re.search(rf"\b{name}\b", str(info.value)) and "logits" not in str(info.value)
