"""Other libraries doing the same work (``--peers``): PyTorch and numba.

Each function returns an implementation factory ``impl(inputs) -> step``
(see the package docstring); the libraries are imported when an
implementation is built, so that the benchmark runs without them.
"""
import math
import warnings

from .settings import EPS_BN


def _import(name):
    try:
        return __import__(name)
    except ImportError:
        return None


def available_peers(threads):
    """{name: module} of the importable peer libraries, set to `threads` threads."""
    peers = {}
    torch = _import("torch")
    if torch is not None:
        torch.set_num_threads(threads)
        peers["torch"] = torch
    numba = _import("numba")
    if numba is not None:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        peers["numba"] = numba
    return peers


def _tensor(a):
    """A torch tensor sharing `a`'s memory (read-only inputs too: torch warns
    about those, but the peers never write to them)."""
    import torch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


def _torch_stepper(s, make_opt, slots):
    """A step of the optimizer `make_opt(params)` on torch tensors sharing the
    parameters' memory, the gradients assigned each step as a training loop's
    backward does; returns the parameters, then the state arrays named
    `slots` of the first one (for one-array cases, to compare them too)."""
    ps = [_tensor(p).requires_grad_() for p in s["p"]]
    gs = [[_tensor(g) for g in grads] for grads in s["g"]]
    opt = make_opt(ps)
    t = 0

    def step():
        nonlocal t
        t += 1
        for p, g in zip(ps, gs[t & 1]):
            p.grad = g
        opt.step()
        out = tuple(p.detach().numpy() for p in ps)
        if slots:
            st = opt.state[ps[0]]
            out += tuple(st[k].numpy() for k in slots)
        return out
    return step


def torch_optimizer(name, hp, slots=(), options=None):
    """``torch.optim.<name>(params, **hp, **options)`` (options: ``fused=True``
    by default); the step returns the parameters and the state arrays named
    `slots` (see `_torch_stepper`)."""
    options = {"fused": True} if options is None else options

    def impl(s):
        import torch
        cls = getattr(torch.optim, name)
        return _torch_stepper(s, lambda ps: cls(ps, **hp, **options), slots)
    return impl


def fastopt_torch(name, hp, slots=()):
    """``fastopt.torch.<name>(params, **hp)``, the bridge: it reads ``p.grad``
    and makes one native step; the step returns the parameters and the state
    arrays named `slots` (see `_torch_stepper`)."""
    def impl(s):
        import fastopt.torch as fo
        return _torch_stepper(s, lambda ps: getattr(fo, name)(ps, **hp), slots)
    return impl


def numba_adam(hp):
    """Adam (AdamW with ``hp["decoupled"]``) on one array as a numba parallel
    loop; `hp` as `fastopt._baselines.adam_numpy` names them."""
    def impl(s):
        import numba

        @numba.njit(parallel=True, cache=False)      # compiled at its first call
        def kernel(p, g, m, v, decay, b1, b2, step_size, bc2_sqrt, eps):
            for i in numba.prange(p.size):
                p[i] *= decay
                m[i] = b1 * m[i] + (1 - b1) * g[i]
                v[i] = b2 * v[i] + (1 - b2) * g[i] * g[i]
                p[i] -= step_size * m[i] / (math.sqrt(v[i]) / bc2_sqrt + eps)

        p, g0, g1 = s["p"][0], s["g"][0][0], s["g"][1][0]
        m, v = (st[0] for st in s["s"])
        lr, b1, b2, eps = hp["lr"], hp["b1"], hp["b2"], hp["eps"]
        decay = 1 - lr * hp["weight_decay"] if hp["decoupled"] else 1.0
        t = 0

        def step():
            nonlocal t
            t += 1
            kernel(p, g1 if t & 1 else g0, m, v, decay, b1, b2, lr / (1 - b1**t),
                   math.sqrt(1 - b2**t), eps)
            return p, m, v
        return step
    return impl


def torch_batchnorm(axis):
    """``F.batch_norm`` training forward and backward (autograd) over `axis`."""
    def impl(s):
        import torch
        import torch.nn.functional as F
        # the inputs are read-only: autograd needs leaves of its own for x, w, b
        x = _tensor(s["x"]).clone().requires_grad_()
        w = _tensor(s["gamma"]).clone().requires_grad_()
        b = _tensor(s["beta"]).clone().requires_grad_()
        dy = _tensor(s["dy"])
        if axis == -1:      # NHWC array -> channels_last NCHW view, no copy
            to_nchw = (0, 3, 1, 2)
            xin, dy = x.permute(to_nchw), dy.permute(to_nchw)
        else:
            xin = x

        def step():
            y = F.batch_norm(xin, None, None, w, b, training=True, eps=EPS_BN)
            dx, dw, db = torch.autograd.grad(y, (x, w, b), dy)
            if axis == -1:
                y = y.permute(0, 2, 3, 1)
            return y.detach().numpy(), dx.numpy(), dw.numpy(), db.numpy()
        return step
    return impl


def torch_softmax(family):
    """``F.log_softmax``, or ``F.cross_entropy`` forward and backward."""
    def impl(s):
        import torch
        import torch.nn.functional as F
        x = _tensor(s["x"])
        if family == "log_softmax":
            def step():
                with torch.no_grad():
                    return (F.log_softmax(x, dim=-1).numpy(),)
            return step
        x = x.clone().requires_grad_()
        target = _tensor(s["target"])

        def step():
            loss = F.cross_entropy(x, target)
            (d,) = torch.autograd.grad(loss, x)
            return loss.detach().numpy(), d.numpy()
        return step
    return impl
