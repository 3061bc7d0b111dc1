"""fastopt.torch.cross_entropy, batch_norm and BatchNorm2d against torch (skipped
without torch): gradcheck in float64, torch.nn.functional in float32."""
import copy

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


@pytest.mark.parametrize("opts", XENT_OPTIONS, ids=XENT_IDS)
@pytest.mark.parametrize("shape, kind", [s for s in XENT_SHAPES if s[0][0]])
def test_cross_entropy_gradcheck_float64(shape, kind, opts):
    x, target, kw = xent_inputs(shape, kind, torch.float64, opts)
    assert torch.autograd.gradcheck(lambda x: fo.cross_entropy(x, target, **kw), (x,))
    if kind == "prob":      # also with respect to the probabilities
        t = target.clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda x, t: fo.cross_entropy(x, t, **kw), (x, t))


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


def test_cross_entropy_bad_input():
    x = torch.randn(4, 3)
    with pytest.raises(TypeError, match="dtype torch.float16"):
        fo.cross_entropy(x.half(), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="on meta"):
        fo.cross_entropy(torch.randn(4, 3, device="meta"), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="out of range"):
        fo.cross_entropy(x, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(RuntimeError, match="not differentiable with respect to weight"):
        fo.cross_entropy(x, torch.zeros(4, dtype=torch.long), weight=torch.ones(3, requires_grad=True))
    with pytest.raises(ValueError, match="reduction"):
        fo.cross_entropy(x, torch.zeros(4, dtype=torch.long), reduction="avg")


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
    with pytest.raises(ValueError, match="evaluation mode"):
        fo.batch_norm(x, None, None, w, b, False)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        fo.batch_norm(x[:1], None, None, w, b, True)
    with pytest.raises(TypeError, match="weight has dtype torch.float64"):
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
