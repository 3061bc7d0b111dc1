"""The NumPy code fastopt's benchmarks compare against.

Two versions of every benchmarked computation, written once here so that
``python -m fastopt bench`` and the pytest-benchmark files in ``benchmarks/``
time the same baselines:

* ``*_numpy``: the straightforward code a course student writes: one
  expression per formula, new arrays on every call, optimizer state rebound
  rather than updated (``m = b1*m + (1-b1)*g``).  Functions return the new
  arrays.
* ``*_inplace``: careful NumPy: ``out=`` and in-place operators into state and
  preallocated scratch arrays, so a call allocates nothing the size of the
  data.  Scratch arrays are passed in (``work``) or kept in a caller-owned
  dict (``ws``) that is filled on the first call.

They cover the options the benchmarks use (PyTorch's defaults, plus weight
decay for Adam/AdamW), not every option of the fastopt kernels; the kernels'
own tests have full references.  Hyperparameter names follow the course
(beta1, beta2, epsilon -> ``b1``, ``b2``, ``eps``; Momentum's ``beta``).
"""
import math

import numpy as np


# -------------------------------------------------------------- optimizers ---

def adam_numpy(p, g, m, v, t, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
               decoupled=False):
    """Adam (AdamW if `decoupled`) at step `t` >= 1; returns the new ``(p, m, v)``."""
    if weight_decay and decoupled:
        p = p * (1 - lr * weight_decay)
    elif weight_decay:
        g = g + weight_decay * p
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g**2
    m_hat = m / (1 - b1**t)
    v_hat = v / (1 - b2**t)
    p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p, m, v


def adam_inplace(p, g, m, v, t, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0,
                 decoupled=False, *, work, work2=None):
    """`adam_numpy` in place (p, m, v updated; returned for convenience).

    `work` is a scratch array like `p`; L2 weight decay (not `decoupled`)
    also needs `work2`.
    """
    if weight_decay and decoupled:
        p *= 1 - lr * weight_decay
    elif weight_decay:
        np.multiply(p, weight_decay, out=work2)
        work2 += g
        g = work2
    m *= b1
    np.multiply(g, 1 - b1, out=work)
    m += work
    v *= b2
    np.multiply(g, g, out=work)
    work *= 1 - b2
    v += work
    # p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps): the scalars folded once
    np.sqrt(v, out=work)
    work *= 1 / math.sqrt(1 - b2**t)
    work += eps
    np.divide(m, work, out=work)
    work *= lr / (1 - b1**t)
    p -= work
    return p, m, v


def rmsprop_numpy(p, g, s, lr=1e-2, alpha=0.99, eps=1e-8):
    """RMSprop (PyTorch defaults, eps outside the sqrt); returns the new ``(p, s)``."""
    s = alpha * s + (1 - alpha) * g**2
    p = p - lr * g / (np.sqrt(s) + eps)
    return p, s


def rmsprop_inplace(p, g, s, lr=1e-2, alpha=0.99, eps=1e-8, *, work):
    """`rmsprop_numpy` in place (p, s updated); `work` is a scratch array like `p`."""
    s *= alpha
    np.multiply(g, g, out=work)
    work *= 1 - alpha
    s += work
    np.sqrt(s, out=work)
    work += eps
    np.divide(g, work, out=work)
    work *= lr
    p -= work
    return p, s


def momentum_numpy(p, g, v, lr=1e-2, beta=0.9):
    """The course's Momentum, ``v = beta*v + (1-beta)*g; p -= lr*v``; returns ``(p, v)``.

    This is ``fastopt.sgd_step(p, g, v, lr=lr, momentum=beta, dampening=beta)``.
    """
    v = beta * v + (1 - beta) * g
    p = p - lr * v
    return p, v


def momentum_inplace(p, g, v, lr=1e-2, beta=0.9, *, work):
    """`momentum_numpy` in place (p, v updated); `work` is a scratch array like `p`."""
    v *= beta
    np.multiply(g, 1 - beta, out=work)
    v += work
    np.multiply(v, lr, out=work)
    p -= work
    return p, v


# --------------------------------------------------------------- batchnorm ---

def _bn_axes(x, axis):
    axis = axis % x.ndim
    reduce = tuple(a for a in range(x.ndim) if a != axis)
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    return reduce, tuple(shape)


def batch_norm_numpy(x, gamma, beta, eps=1e-5, axis=1):
    """Training-mode BatchNorm forward, course style; returns ``(y, cache)``.

    Biased batch variance; `axis` is the channel axis (1: NCHW, -1: NHWC).
    """
    reduce, shape = _bn_axes(x, axis)
    mu = x.mean(axis=reduce, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=reduce, keepdims=True)
    x_hat = (x - mu) / np.sqrt(var + eps)
    y = gamma.reshape(shape) * x_hat + beta.reshape(shape)
    return y, (x_hat, gamma, var, eps, reduce, shape)


def batch_norm_backward_numpy(dy, cache):
    """Backward of `batch_norm_numpy`; returns ``(dx, dgamma, dbeta)``."""
    x_hat, gamma, var, eps, reduce, shape = cache
    m = dy.size // gamma.size
    dbeta = dy.sum(axis=reduce)
    dgamma = (dy * x_hat).sum(axis=reduce)
    dx = (gamma.reshape(shape) / np.sqrt(var + eps) / m) * (
        m * dy - dbeta.reshape(shape) - x_hat * dgamma.reshape(shape))
    return dx, dgamma, dbeta


def _buf(ws, name, shape, dtype):
    """The scratch array `name` of `ws`, allocated on first use."""
    a = ws.get(name)
    if a is None or a.shape != tuple(shape) or a.dtype != dtype:
        a = ws[name] = np.empty(shape, dtype)
    return a


def batch_norm_inplace(x, gamma, beta, eps=1e-5, axis=1, *, ws):
    """`batch_norm_numpy` into the buffers of the dict `ws`; returns ``y``.

    Keeps x_hat (one array like x) in `ws` for `batch_norm_backward_inplace`.
    """
    reduce, shape = _bn_axes(x, axis)
    c = gamma.size
    mu = _buf(ws, "mu", (c,), x.dtype)
    var = _buf(ws, "var", (c,), x.dtype)
    x_hat = _buf(ws, "x_hat", x.shape, x.dtype)
    y = _buf(ws, "y", x.shape, x.dtype)
    np.mean(x, axis=reduce, out=mu)
    np.subtract(x, mu.reshape(shape), out=x_hat)
    np.square(x_hat, out=y)
    np.mean(y, axis=reduce, out=var)
    invstd = _buf(ws, "invstd", (c,), x.dtype)
    np.add(var, eps, out=invstd)
    np.sqrt(invstd, out=invstd)
    np.reciprocal(invstd, out=invstd)
    x_hat *= invstd.reshape(shape)
    np.multiply(x_hat, gamma.reshape(shape), out=y)
    y += beta.reshape(shape)
    ws["gamma"], ws["shape"], ws["reduce"] = gamma, shape, reduce
    return y


def batch_norm_backward_inplace(dy, *, ws):
    """Backward of `batch_norm_inplace` (same `ws`); returns ``(dx, dgamma, dbeta)``.

    ``dx = gamma*invstd * (dy - (dbeta + x_hat*dgamma)/m)``.
    """
    gamma, shape, reduce, x_hat = ws["gamma"], ws["shape"], ws["reduce"], ws["x_hat"]
    c = gamma.size
    m = dy.size // c
    dgamma = _buf(ws, "dgamma", (c,), dy.dtype)
    dbeta = _buf(ws, "dbeta", (c,), dy.dtype)
    dx = _buf(ws, "dx", dy.shape, dy.dtype)
    np.sum(dy, axis=reduce, out=dbeta)
    np.multiply(dy, x_hat, out=dx)
    np.sum(dx, axis=reduce, out=dgamma)
    np.multiply(x_hat, (dgamma / m).reshape(shape), out=dx)
    dx += (dbeta / m).reshape(shape)
    np.subtract(dy, dx, out=dx)
    dx *= (gamma * ws["invstd"]).reshape(shape)
    return dx, dgamma, dbeta


# ------------------------------------------------ log-softmax, cross-entropy ---

def log_softmax_numpy(x):
    """log-softmax over the last axis, course style (max subtracted for stability)."""
    z = x - x.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def log_softmax_inplace(x, *, ws):
    """`log_softmax_numpy` into the buffers of the dict `ws`; returns the output."""
    rows = x.shape[:-1] + (1,)
    out = _buf(ws, "out", x.shape, x.dtype)
    e = _buf(ws, "exp", x.shape, x.dtype)
    r = _buf(ws, "row", rows, x.dtype)
    np.max(x, axis=-1, keepdims=True, out=r)
    np.subtract(x, r, out=out)
    np.exp(out, out=e)
    np.sum(e, axis=-1, keepdims=True, out=r)
    np.log(r, out=r)
    out -= r
    return out


def cross_entropy_numpy(logits, target):
    """Mean cross-entropy of integer class targets and its gradient, course style.

    Returns ``(loss, dlogits)`` with ``dlogits = (softmax - onehot) / N``.
    """
    n = logits.shape[0]
    rows = np.arange(n)
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    probs = e / e.sum(axis=1, keepdims=True)
    loss = -np.log(probs[rows, target]).mean()
    dlogits = probs.copy()
    dlogits[rows, target] -= 1
    dlogits /= n
    return loss, dlogits


def cross_entropy_inplace(logits, target, *, ws):
    """`cross_entropy_numpy` into the buffers of the dict `ws`; returns ``(loss, dlogits)``."""
    n = logits.shape[0]
    rows = _buf(ws, "rows", (n,), np.intp)
    if ws.get("n") != n:
        rows[:] = np.arange(n)
        ws["n"] = n
    d = _buf(ws, "dlogits", logits.shape, logits.dtype)
    r = _buf(ws, "row", (n, 1), logits.dtype)
    np.max(logits, axis=1, keepdims=True, out=r)
    np.subtract(logits, r, out=d)
    # loss_i = log(sum_j exp(z_ij)) - z_i,target  (z = logits - rowmax)
    picked = d[rows, target]
    np.exp(d, out=d)
    np.sum(d, axis=1, keepdims=True, out=r)
    d /= r
    np.log(r, out=r)
    loss = (r[:, 0] - picked).mean()
    d[rows, target] -= 1
    d *= 1 / n
    return loss, d
