"""Training a bfloat16 model with fastopt.torch.AdamW follows the float32 run;
torch.optim.AdamW on the same bfloat16 model strays from it (skipped without
torch or ml_dtypes).

An MLP 64-128-128-10 learns labels drawn by a random two-layer network, 16
batches of 64 cycled for 200 steps, with AdamW (lr 1e-3, weight decay 1e-2),
from the same initial weights (rounded to bfloat16 for the 16-bit runs) on the
same batches; the loss is computed in float32.  The runs are compared by the
largest gap between their loss and the float32 run's over the last 50 steps.
"""
import copy

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("ml_dtypes")
fo = pytest.importorskip("fastopt.torch")

STEPS = 200
LAST = 50


@pytest.fixture(autouse=True)
def one_thread():
    # Small matrices: one thread is as fast, and it keeps the run short when
    # other processes are busy on the cores (threads then wait for each other).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def mlp(d_in, hidden, classes):
    return torch.nn.Sequential(torch.nn.Linear(d_in, hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, classes))


def task(seed):
    """(initial float32 model, batches) for a seed."""
    torch.manual_seed(seed)
    xs = torch.randn(16, 64, 64)
    with torch.no_grad():
        ys = mlp(64, 64, 10)(xs).argmax(-1)
    return mlp(64, 128, 10), list(zip(xs, ys))


def losses(base, batches, dtype, make_opt, after_step=None):
    model = copy.deepcopy(base).to(dtype)
    opt = make_opt(model.parameters())
    out = []
    for t in range(STEPS):
        x, y = batches[t % len(batches)]
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x.to(dtype)).float(), y)
        loss.backward()
        opt.step()
        if after_step:
            after_step(model)
        out.append(loss.item())
    return out


def gap(run, ref):
    return max(abs(a - b) for a, b in zip(run[-LAST:], ref[-LAST:]))


def forget_masters(model):
    # An in-place write moves a parameter's version counter, so the next step
    # takes the master from the bfloat16 values: each step then starts from
    # the rounded weights, as if there were no master.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0)


def adamw(cls):
    return lambda ps: cls(ps, lr=1e-3, weight_decay=1e-2)


# The largest loss gap to the float32 run over the last 50 steps that a
# bfloat16 run with float32 masters may show, and that the runs without them
# exceed (measured: see the test's docstring).
TOL = 0.01


@pytest.mark.parametrize("seed", [0, 5])
def test_bfloat16_training_with_masters_follows_float32(seed):
    """Measured on seeds 0-7 (the same with one or two threads; a CPU with
    AVX-512 BF16): the largest loss gap to the float32 run over the last 50
    steps is 0.0019-0.0051 for fastopt.torch.AdamW with its float32 masters
    (seed 5 the largest); without masters it is 0.028-0.038 for
    torch.optim.AdamW on the bfloat16 model (bfloat16 weights and state) and
    0.0165-0.0285 for fastopt.torch.AdamW whose masters are reset from the
    bfloat16 weights after every step (float32 state).  The float32 run's
    loss falls from 2.2-2.4 to 0.11-0.52; the runs without masters end
    0.011-0.032 above it, the run with masters within 0.005."""
    base, batches = task(seed)
    ref = losses(base, batches, torch.float32, adamw(torch.optim.AdamW))
    ours = losses(base, batches, torch.bfloat16, adamw(fo.AdamW))
    theirs = losses(base, batches, torch.bfloat16, adamw(torch.optim.AdamW))
    no_master = losses(base, batches, torch.bfloat16, adamw(fo.AdamW), forget_masters)
    assert ref[-1] < 0.3 * ref[0]       # the float32 run learned
    assert gap(ours, ref) < TOL
    # The runs without masters stray further: what the masters are for.
    assert gap(theirs, ref) > TOL
    assert gap(no_master, ref) > TOL
