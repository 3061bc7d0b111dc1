"""fastopt's public API as a typed program uses it.

Checked by ``mypy --strict`` in CI (``.ci/run``), so the stubs and inline
annotations stay complete and precise; ``tests/test_typing.py`` also runs it,
so every line here is valid at run time.
"""
from __future__ import annotations

import io
from typing import Any, assert_type

import numpy as np
from numpy.typing import NDArray

import fastopt
from fastopt import lr_scheduler

F32 = NDArray[np.float32]
rng = np.random.default_rng(0)


def arrays(*shapes: tuple[int, ...]) -> list[F32]:
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


# --- functional kernels ------------------------------------------------------
p, g, m, v, vmax = arrays((10,), (10,), (10,), (10,), (10,))
m[:] = v[:] = vmax[:] = 0
assert_type(fastopt.adam_step(p, g, m, v, step=1, lr=1e-3, betas=(0.9, 0.999), amsgrad=True,
                              max_exp_avg_sq=vmax), None)
fastopt.adamw_step(p, g, m, v, step=2, betas=[0.9, 0.99])
fastopt.rmsprop_step(p, g, np.zeros_like(p), momentum=0.9, momentum_buffer=np.zeros_like(p))
fastopt.sgd_step(p, g, np.zeros_like(p), lr=0.1, momentum=0.9, first_step=True)
fastopt.adagrad_step(p, g, np.zeros_like(p), step=1, lr_decay=0.01)
fastopt.adamax_step(p, g, np.zeros_like(p), np.zeros_like(p), step=1)
mu_product: float = fastopt.nadam_step(p, g, np.zeros_like(p), np.zeros_like(p), step=1,
                                       mu_product=1.0, decoupled_weight_decay=True)
fastopt.radam_step(p, g, np.zeros_like(p), np.zeros_like(p), step=1, weight_decay=0.1)
fastopt.adadelta_step(p, g, np.zeros_like(p), np.zeros_like(p), rho=0.95)
eta, mu = fastopt.asgd_step(p, g, np.zeros_like(p), step=1, eta=1e-2, mu=1.0)
assert_type(eta, float)
fastopt.rprop_step(p, g, np.zeros_like(p), np.full_like(p, 1e-2), etas=(0.5, 1.2))
fastopt.lion_step(p, g, np.zeros_like(p), betas=[0.9, 0.99], maximize=True)
W2, G2 = arrays((4, 3), (4, 3))
fastopt.adafactor_step(W2, G2, step=1, row_var=np.zeros((4, 1), np.float32),
                       col_var=np.zeros((1, 3), np.float32), eps=(None, 1e-3))
fastopt.adafactor_step(p, g, step=1, variance=np.zeros_like(p), eps=[1e-30, 1e-3])
norm: float = fastopt.clip_grad_norm_([g, None], max_norm=1.0, norm_type=float("inf"))
fastopt.clip_grad_norm_(g, 1.0)
fastopt.clip_grad_value_([g], 0.5)

# --- optimizers, param groups, state dicts ----------------------------------
W, b = arrays((4, 3), (3,))
opt = fastopt.Adam([{"params": [W]}, {"params": [b], "weight_decay": 0.0}], lr=1e-2)
opt.step([np.ones_like(W), None])
extra = arrays((5,))
opt.add_param_group({"params": extra, "lr": 1e-3})
opt.step([np.ones_like(W), np.ones_like(b), np.ones_like(extra[0])])
state: dict[str, Any] = opt.state_dict()
opt.load_state_dict(state)
steps = opt.steps
assert_type(steps, np.ndarray[Any, np.dtype[np.int64]])
exp_avg: NDArray[np.floating[Any]] = opt.state[0]["exp_avg"]
sgd = fastopt.SGD(arrays((3,)), lr=0.1, momentum=0.9, nesterov=True)
sgd.lr = 0.05
lr: float = sgd.lr
fastopt.RMSprop(arrays((3,)), centered=True)
fastopt.AdamW(arrays((3,)), amsgrad=True, maximize=True)
flat, views = fastopt.flat_views(arrays((2, 3), (4,)))
assert_type(views, list[NDArray[np.floating[Any]]])

# --- low precision: 16-bit parameters, loss scaling ---------------------------
half = [rng.standard_normal(6).astype(np.float16)]
hopt = fastopt.Adam(half, lr=1e-3, state_rounding="nearest", seed=1)
hopt.step([np.ones(6, np.float32)], grad_scale=2.0)
assert_type(hopt.found_inf, bool)
assert_type(hopt.state_dtype, "str | None")
master: NDArray[np.floating[Any]] = hopt.state[0]["master_param"]
scaler = fastopt.GradScaler(init_scale=2.0**8, growth_interval=10)
grads16: list[NDArray[np.float16]] = [np.ones(6, np.float16)]
scaled = scaler.scale(grads16)
assert_type(scaled, list[NDArray[np.float16]])
scaler.unscale_(hopt, scaled)
scaler.step(hopt, scaled)
scaler.update()
assert_type(scaler.get_scale(), float)
scaler.load_state_dict(scaler.state_dict())

# --- learning-rate schedules -------------------------------------------------
schedules: list[lr_scheduler.LRScheduler] = [
    lr_scheduler.InverseTimeLR(sgd, decay_rate=0.5),
    lr_scheduler.ExponentialLR(sgd, gamma=0.95),
    lr_scheduler.StepLR(sgd, step_size=3),
    lr_scheduler.MultiStepLR(sgd, milestones=[2, 5], gamma=0.5),
    lr_scheduler.LambdaLR(sgd, lambda epoch: 0.9 ** epoch),
    lr_scheduler.CosineAnnealingLR(sgd, T_max=10),
    lr_scheduler.CosineAnnealingWarmRestarts(sgd, T_0=5, T_mult=2),
    lr_scheduler.LinearLR(sgd, start_factor=0.1, total_iters=4),
    lr_scheduler.OneCycleLR(sgd, max_lr=0.1, total_steps=20),
]
for sched in schedules:
    sched.step()
    last: list[float] = sched.get_last_lr()
warm = lr_scheduler.CosineAnnealingWarmRestarts(sgd, T_0=5)
warm.step(1.5)
seq = lr_scheduler.SequentialLR(sgd, [lr_scheduler.LinearLR(sgd), lr_scheduler.StepLR(sgd, 2)],
                                milestones=[5])
seq.load_state_dict(seq.state_dict())
plateau = lr_scheduler.ReduceLROnPlateau(sgd, mode="min", patience=2)
plateau.step(0.5)

# --- BatchNorm, softmax, cross-entropy ----------------------------------------
x = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
gamma, beta = np.ones(4, np.float32), np.zeros(4, np.float32)
y, ctx = fastopt.batch_norm_forward(x, gamma, beta, np.zeros(4, np.float32),
                                    np.ones(4, np.float32), momentum=0.1, axis=1)
assert_type(ctx, fastopt.BatchNormContext)
axis: int = ctx.axis
dx, dgamma, dbeta = fastopt.batch_norm_backward(np.ones_like(x), ctx)
logits = rng.standard_normal((6, 5)).astype(np.float32)
target = rng.integers(0, 5, 6)
assert_type(fastopt.cross_entropy(logits, target), float)
assert_type(fastopt.cross_entropy(logits, target, reduction="none"), NDArray[np.floating[Any]])
loss, dlogits = fastopt.cross_entropy(logits, target, return_grad=True, label_smoothing=0.1)
assert_type(loss, float)
rows, drows = fastopt.cross_entropy(logits, target, reduction="none", return_grad=True)
assert_type(rows, NDArray[np.floating[Any]])
probs = fastopt.softmax(logits, axis=-1)
logp = fastopt.log_softmax(logits, out=np.empty_like(logits))

# --- training utilities --------------------------------------------------------
X, Y = rng.standard_normal((10, 3)), np.arange(10)
for xb, yb in fastopt.minibatches(X, Y, 4, rng=rng, drop_last=True):
    assert_type(xb, NDArray[Any])
rows_f64 = fastopt.take_rows(X, np.array([3, 1]))
assert_type(rows_f64, NDArray[np.float64])
avg = np.zeros(3)
fastopt.ewa_update(avg, np.ones(3), 0.9)
assert_type(fastopt.bias_corrected(0.5, 0.9, 3), float)
assert_type(fastopt.bias_corrected(avg, 0.9, 3), NDArray[np.floating[Any]])
ema = fastopt.EWA(0.9)
value = ema.update(1.0)
assert_type(ema.value, NDArray[np.floating[Any]])
assert_type(fastopt.log_uniform(1e-4, 1.0), float)
assert_type(fastopt.log_uniform(1e-4, 1.0, size=3, rng=0), NDArray[np.float64])
assert_type(fastopt.sample_beta(), float)
assert_type(fastopt.sample_beta(size=(2, 2)), NDArray[np.float64])

# --- threads and configuration -----------------------------------------------------
fastopt.set_num_threads(1)
n: int = fastopt.get_num_threads()
fastopt.set_num_threads(None)
cfg: dict[str, Any] = fastopt.config()
fastopt.show_config(file=io.StringIO())
version: str = fastopt.__version__
