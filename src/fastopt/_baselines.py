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


def _moments_inplace(g, m, v, b1, b2, work):
    """Adam's moments in place: ``m = b1*m + (1-b1)*g``, ``v = b2*v + (1-b2)*g*g``."""
    m *= b1
    np.multiply(g, 1 - b1, out=work)
    m += work
    v *= b2
    np.multiply(g, g, out=work)
    work *= 1 - b2
    v += work


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
    _moments_inplace(g, m, v, b1, b2, work)
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


# The rest of torch.optim, and Lion (torch's defaults, no weight decay).
# NAdam's mu_product and ASGD's eta and mu are kept in float32, as torch
# keeps them, in a caller-owned dict `ws` (they start at 1, lr and 1).

def adagrad_numpy(p, g, s, t, lr=1e-2, lr_decay=0.0, eps=1e-10):
    """Adagrad at step `t` >= 1; returns the new ``(p, s)``."""
    s = s + g**2
    p = p - lr / (1 + (t - 1) * lr_decay) * g / (np.sqrt(s) + eps)
    return p, s


def adagrad_inplace(p, g, s, t, lr=1e-2, lr_decay=0.0, eps=1e-10, *, work):
    """`adagrad_numpy` in place; `work` is a scratch array like `p`."""
    np.multiply(g, g, out=work)
    s += work
    np.sqrt(s, out=work)
    work += eps
    np.divide(g, work, out=work)
    work *= lr / (1 + (t - 1) * lr_decay)
    p -= work
    return p, s


def adamax_numpy(p, g, m, u, t, lr=2e-3, b1=0.9, b2=0.999, eps=1e-8):
    """Adamax (the infinity norm) at step `t` >= 1; returns the new ``(p, m, u)``."""
    m = b1 * m + (1 - b1) * g
    u = np.maximum(b2 * u, np.abs(g) + eps)
    p = p - lr / (1 - b1**t) * m / u
    return p, m, u


def adamax_inplace(p, g, m, u, t, lr=2e-3, b1=0.9, b2=0.999, eps=1e-8, *, work):
    """`adamax_numpy` in place; `work` is a scratch array like `p`."""
    m *= b1
    np.multiply(g, 1 - b1, out=work)
    m += work
    u *= b2
    np.abs(g, out=work)
    work += eps
    np.maximum(u, work, out=u)
    np.divide(m, u, out=work)
    work *= lr / (1 - b1**t)
    p -= work
    return p, m, u


def _nadam_coefs(t, lr, b1, momentum_decay, ws):
    """NAdam's two step sizes at step t (updates ws["mu_product"])."""
    mu = b1 * (1 - 0.5 * 0.96 ** (t * momentum_decay))
    mu_next = b1 * (1 - 0.5 * 0.96 ** ((t + 1) * momentum_decay))
    mu_product = float(np.float32(ws.get("mu_product", 1.0)) * np.float32(mu))
    ws["mu_product"] = mu_product
    return lr * (1 - mu) / (1 - mu_product), lr * mu_next / (1 - mu_product * mu_next)


def nadam_numpy(p, g, m, v, t, lr=2e-3, b1=0.9, b2=0.999, eps=1e-8, momentum_decay=4e-3, *,
                ws):
    """NAdam (Adam with Nesterov momentum) at step `t` >= 1; returns the new
    ``(p, m, v)``; `ws` keeps mu_product."""
    c_grad, c_avg = _nadam_coefs(t, lr, b1, momentum_decay, ws)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g**2
    denom = np.sqrt(v / (1 - b2**t)) + eps
    p = p - c_grad * g / denom - c_avg * m / denom
    return p, m, v


def nadam_inplace(p, g, m, v, t, lr=2e-3, b1=0.9, b2=0.999, eps=1e-8, momentum_decay=4e-3, *,
                  work, ws):
    """`nadam_numpy` in place; `work` is a scratch array like `p`, `ws` also
    keeps a second one."""
    c_grad, c_avg = _nadam_coefs(t, lr, b1, momentum_decay, ws)
    work2 = _buf(ws, "work2", p.shape, p.dtype)
    _moments_inplace(g, m, v, b1, b2, work)
    np.multiply(v, 1 / (1 - b2**t), out=work)
    np.sqrt(work, out=work)
    work += eps                                 # denom
    np.multiply(g, c_grad, out=work2)
    np.divide(work2, work, out=work2)
    p -= work2
    np.multiply(m, c_avg, out=work2)
    np.divide(work2, work, out=work2)
    p -= work2
    return p, m, v


def _radam_rect(t, b2):
    """RAdam's rectification at step t, or None while the variance is not tractable."""
    rho_inf = 2 / (1 - b2) - 1
    rho_t = rho_inf - 2 * t * b2**t / (1 - b2**t)
    if rho_t <= 5:
        return None
    return math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))


def radam_numpy(p, g, m, v, t, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8):
    """RAdam at step `t` >= 1; returns the new ``(p, m, v)``."""
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g**2
    m_hat = m / (1 - b1**t)
    rect = _radam_rect(t, b2)
    if rect is None:
        p = p - lr * m_hat
    else:
        p = p - lr * rect * m_hat * math.sqrt(1 - b2**t) / (np.sqrt(v) + eps)
    return p, m, v


def radam_inplace(p, g, m, v, t, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, *, work):
    """`radam_numpy` in place; `work` is a scratch array like `p`."""
    _moments_inplace(g, m, v, b1, b2, work)
    rect = _radam_rect(t, b2)
    if rect is None:
        np.multiply(m, lr / (1 - b1**t), out=work)
    else:
        np.sqrt(v, out=work)
        work += eps
        np.divide(m, work, out=work)
        work *= lr * rect * math.sqrt(1 - b2**t) / (1 - b1**t)
    p -= work
    return p, m, v


def adadelta_numpy(p, g, sq, acc, lr=1.0, rho=0.9, eps=1e-6):
    """Adadelta; returns the new ``(p, sq, acc)``."""
    sq = rho * sq + (1 - rho) * g**2
    delta = np.sqrt(acc + eps) / np.sqrt(sq + eps) * g
    acc = rho * acc + (1 - rho) * delta**2
    p = p - lr * delta
    return p, sq, acc


def adadelta_inplace(p, g, sq, acc, lr=1.0, rho=0.9, eps=1e-6, *, work, ws):
    """`adadelta_numpy` in place; `work` is a scratch array like `p`, `ws`
    keeps a second one."""
    work2 = _buf(ws, "work2", p.shape, p.dtype)
    sq *= rho
    np.multiply(g, g, out=work)
    work *= 1 - rho
    sq += work
    np.add(acc, eps, out=work)
    np.sqrt(work, out=work)
    np.add(sq, eps, out=work2)
    np.sqrt(work2, out=work2)
    np.divide(work, work2, out=work)
    work *= g                                   # delta
    acc *= rho
    np.multiply(work, work, out=work2)
    work2 *= 1 - rho
    acc += work2
    work *= lr
    p -= work
    return p, sq, acc


def _asgd_next(t, lr, lambd, alpha, t0, ws):
    """ASGD's eta and mu for step t (from ws), and those of step t + 1 into ws."""
    eta, mu = ws.get("eta", float(np.float32(lr))), ws.get("mu", 1.0)
    ws["eta"] = float(np.float32(lr / (1 + lambd * lr * t) ** alpha))
    ws["mu"] = float(np.float32(1 / max(1, t - t0)))
    return eta, mu


def asgd_numpy(p, g, ax, t, lr=1e-2, lambd=1e-4, alpha=0.75, t0=1e6, *, ws):
    """Averaged SGD at step `t` >= 1; returns the new ``(p, ax)``; `ws` keeps
    eta and mu."""
    eta, mu = _asgd_next(t, lr, lambd, alpha, t0, ws)
    p = p * (1 - lambd * eta) - eta * g
    ax = ax + mu * (p - ax) if mu != 1 else p.copy()
    return p, ax


def asgd_inplace(p, g, ax, t, lr=1e-2, lambd=1e-4, alpha=0.75, t0=1e6, *, work, ws):
    """`asgd_numpy` in place; `work` is a scratch array like `p`."""
    eta, mu = _asgd_next(t, lr, lambd, alpha, t0, ws)
    p *= 1 - lambd * eta
    np.multiply(g, eta, out=work)
    p -= work
    if mu != 1:
        np.subtract(p, ax, out=work)
        work *= mu
        ax += work
    else:
        np.copyto(ax, p)
    return p, ax


def rprop_numpy(p, g, prev, step_size, etaminus=0.5, etaplus=1.2, step_min=1e-6,
                step_max=50.0):
    """Rprop (signs only); returns the new ``(p, prev, step_size)``."""
    s = np.sign(g * prev)
    factor = np.where(s > 0, etaplus, np.where(s < 0, etaminus, 1.0)).astype(p.dtype)
    step_size = np.clip(step_size * factor, step_min, step_max)
    g = np.where(s < 0, 0, g)             # after a sign change: no move, no memory
    p = p - np.sign(g) * step_size
    return p, g, step_size


def rprop_inplace(p, g, prev, step_size, etaminus=0.5, etaplus=1.2, step_min=1e-6,
                  step_max=50.0, *, work, ws):
    """`rprop_numpy` in place; `work` is a scratch array like `p`, `ws`
    keeps a boolean one."""
    mask = _buf(ws, "mask", p.shape, np.bool_)
    np.multiply(g, prev, out=work)
    np.greater(work, 0, out=mask)
    np.multiply(step_size, etaplus, out=step_size, where=mask)
    np.less(work, 0, out=mask)
    np.multiply(step_size, etaminus, out=step_size, where=mask)
    np.clip(step_size, step_min, step_max, out=step_size)
    np.copyto(prev, g)
    np.copyto(prev, 0, where=mask)
    np.sign(prev, out=work)
    work *= step_size
    p -= work
    return p, prev, step_size


def lion_numpy(p, g, m, lr=1e-4, b1=0.9, b2=0.99):
    """Lion (signs of an interpolated momentum); returns the new ``(p, m)``."""
    p = p - lr * np.sign(b1 * m + (1 - b1) * g)
    m = b2 * m + (1 - b2) * g
    return p, m


def lion_inplace(p, g, m, lr=1e-4, b1=0.9, b2=0.99, *, work):
    """`lion_numpy` in place; `work` is a scratch array like `p`."""
    np.subtract(g, m, out=work)
    work *= 1 - b1
    work += m                                   # b1 * m + (1 - b1) * g
    np.sign(work, out=work)
    work *= lr
    p -= work
    m *= b2
    np.multiply(g, 1 - b2, out=work)
    m += work
    return p, m


def adafactor_numpy(p, g, row_var, col_var, t, lr=1e-2, beta2_decay=-0.8, eps1=None, eps2=1e-3,
                    d=1.0):
    """Adafactor on a matrix (torch.optim.Adafactor's formulas); returns the
    new ``(p, row_var, col_var)``.  eps1 None: the dtype's machine epsilon."""
    eps1 = float(np.finfo(p.dtype).eps) if eps1 is None else eps1
    w = t ** beta2_decay
    rho = min(lr, 1 / t ** 0.5)
    alpha = max(eps2, float(np.linalg.norm(p)) / p.size ** 0.5) * rho
    row_var = row_var + w * ((g * g).mean(axis=-1, keepdims=True) - row_var)
    col_var = col_var + w * ((g * g).mean(axis=-2, keepdims=True) - col_var)
    v = row_var * col_var / np.maximum(row_var.mean(axis=-2, keepdims=True), eps1)
    u = g / np.sqrt(np.maximum(v, eps1 * eps1))
    denom = max(1.0, float(np.linalg.norm(u)) / (u.size ** 0.5 * d))
    return p - (alpha / denom) * u, row_var, col_var


def adafactor_inplace(p, g, row_var, col_var, t, lr=1e-2, beta2_decay=-0.8, eps1=None,
                      eps2=1e-3, d=1.0, *, work):
    """`adafactor_numpy` in place; `work` is a scratch array like `p`."""
    eps1 = float(np.finfo(p.dtype).eps) if eps1 is None else eps1
    w = t ** beta2_decay
    rho = min(lr, 1 / t ** 0.5)
    alpha = max(eps2, float(np.linalg.norm(p)) / p.size ** 0.5) * rho
    np.multiply(g, g, out=work)
    row_var += w * (work.mean(axis=-1, keepdims=True) - row_var)
    col_var += w * (work.mean(axis=-2, keepdims=True) - col_var)
    np.multiply(row_var, col_var, out=work)
    work /= np.maximum(row_var.mean(axis=-2, keepdims=True), eps1)
    np.maximum(work, eps1 * eps1, out=work)
    np.sqrt(work, out=work)
    np.divide(g, work, out=work)
    denom = max(1.0, float(np.linalg.norm(work)) / (work.size ** 0.5 * d))
    work *= alpha / denom
    p -= work
    return p, row_var, col_var


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
