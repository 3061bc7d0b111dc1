"""End-to-end example: an MLP with BatchNorm trained on handwritten digits.

A 2-hidden-layer network written in NumPy with fastopt's kernels::

    Linear -> BatchNorm -> ReLU -> Linear -> BatchNorm -> ReLU -> Linear -> cross-entropy

trained on scikit-learn's bundled 8x8 digits (1797 images, no download) with
shuffled mini-batches, once with each of SGD, Momentum, RMSprop and Adam,
with exponential learning-rate decay.  It prints the loss and test accuracy
per epoch; ``--plot curves.png`` draws the training cost (every mini-batch,
raw and smoothed) and the test accuracy per epoch of the four runs;
``--search N`` runs a random search over the learning rate (log
scale) and beta (``1 - beta`` log-scale), scored on a validation split.

Run it with ``python -m fastopt demo`` or ``python examples/train_digits.py``;
it needs the ``examples`` extra (``pip install "fastopt[examples]"``:
scikit-learn, and matplotlib for ``--plot``).

The layer math is in small functions (``linear_*``, ``relu_*``) and the
`MLP` class, so it reads like the course's NumPy code; fastopt supplies
BatchNorm, cross-entropy, the optimizers, the schedule and the batches.
"""
import sys
import time

import numpy as np

import fastopt
from fastopt._cli import Parser, UsageError, check_plot

OPTIMIZERS = ("sgd", "momentum", "rmsprop", "adam")
# Learning rates that work for this model and data with batches of 64.
DEFAULT_LR = {"sgd": 0.1, "momentum": 0.5, "rmsprop": 1e-3, "adam": 3e-3}
DEFAULT_BETA = {"sgd": None, "momentum": 0.9, "rmsprop": 0.99, "adam": 0.9}
# Learning-rate ranges of the random search (sampled on a log scale).
SEARCH_LR = {"sgd": (1e-3, 1.0), "momentum": (1e-3, 1.0), "rmsprop": (1e-4, 1e-1), "adam": (1e-4, 1e-1)}


# ------------------------------------------------------------------ data ---

def load_data(seed=0, test_fraction=0.25, dtype=np.float32):
    """The digits, pixels scaled to [0, 1], split into train and test sets.

    The split is stratified (each class keeps its share in both sets) and
    depends only on `seed`.

    Returns
    -------
    X_train, y_train, X_test, y_test : ndarray
        X is (m, 64) of `dtype`; y holds int64 class labels 0..9.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("the digits example needs scikit-learn: "
                          'pip install "fastopt[examples]" (or pip install scikit-learn)') from None
    X, y = load_digits(return_X_y=True)
    return split(np.asarray(X / 16.0, dtype=dtype), y.astype(np.int64), test_fraction, seed)


def split(X, y, fraction, seed):
    """Stratified split: `fraction` of every class goes to the second set."""
    rng = np.random.default_rng(seed)
    second = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == c))
        second[rows[:int(round(fraction * len(rows)))]] = True
    return X[~second], y[~second], X[second], y[second]


# ---------------------------------------------------------------- layers ---

def linear_forward(x, W, b=None):
    """z = x W (+ b); rows of x are examples."""
    z = x @ W
    if b is not None:
        z += b
    return z


def linear_backward(dz, x, W):
    """Gradients of a linear layer: dx = dz W^T, dW = x^T dz, db = sum(dz)."""
    return dz @ W.T, x.T @ dz, dz.sum(axis=0)


def relu_forward(z):
    return np.maximum(z, 0)


def relu_backward(da, z):
    return np.where(z > 0, da, 0)


# ----------------------------------------------------------------- model ---

class MLP:
    """Linear -> BatchNorm -> ReLU (twice) -> Linear -> softmax cross-entropy.

    The hidden linear layers have no bias: the BatchNorm after them subtracts
    the batch mean, which would cancel it (BatchNorm's beta plays its role).

    Parameters
    ----------
    sizes : sequence of 4 ints
        Inputs, two hidden widths, classes, e.g. ``(64, 128, 64, 10)``.
    rng : numpy.random.Generator
        For the initial weights (He initialisation for ReLU layers).
    dtype : float32 or float64

    Attributes
    ----------
    params : list of ndarray
        ``[W1, gamma1, beta1, W2, gamma2, beta2, W3, b3]``, updated in place
        by the optimizer; `backward` returns gradients in this order.
    running : list of (running_mean, running_var)
        BatchNorm's running statistics, used at inference.
    """

    def __init__(self, sizes, rng, dtype=np.float32, bn_momentum=0.1, bn_eps=1e-5):
        n0, n1, n2, n3 = sizes
        he = lambda n_in, n_out: (rng.standard_normal((n_in, n_out)) * np.sqrt(2.0 / n_in)).astype(dtype)
        self.params = [
            he(n0, n1), np.ones(n1, dtype), np.zeros(n1, dtype),
            he(n1, n2), np.ones(n2, dtype), np.zeros(n2, dtype),
            (rng.standard_normal((n2, n3)) * np.sqrt(1.0 / n2)).astype(dtype), np.zeros(n3, dtype),
        ]
        self.running = [(np.zeros(n, dtype), np.ones(n, dtype)) for n in (n1, n2)]
        self.bn_momentum = bn_momentum
        self.bn_eps = bn_eps

    def forward(self, x, training):
        """Logits for the batch x, and what `backward` needs."""
        W1, g1, b1, W2, g2, b2, W3, b3 = self.params
        cache = {"x": x}
        a = x
        for k, (W, g, b) in enumerate(((W1, g1, b1), (W2, g2, b2))):
            mean, var = self.running[k]
            z = linear_forward(a, W)
            zn, ctx = fastopt.batch_norm_forward(z, g, b, mean, var, training=training,
                                                 momentum=self.bn_momentum, eps=self.bn_eps)
            cache[k] = (a, ctx, zn)
            a = relu_forward(zn)
        cache["a2"] = a
        return linear_forward(a, W3, b3), cache

    def backward(self, dlogits, cache):
        """Gradients of the loss for every parameter, in the order of `params`."""
        W1, g1, b1, W2, g2, b2, W3, b3 = self.params
        da, dW3, db3 = linear_backward(dlogits, cache["a2"], W3)
        grads = [None] * 6 + [dW3, db3]
        for k, W in ((1, W2), (0, W1)):
            a_in, ctx, zn = cache[k]
            dz, dgamma, dbeta = fastopt.batch_norm_backward(relu_backward(da, zn), ctx)
            da, dW, _ = linear_backward(dz, a_in, W)
            grads[3 * k:3 * k + 3] = [dW, dgamma, dbeta]
        return grads

    def loss_and_grads(self, x, y):
        """Mean cross-entropy of the batch (training mode) and its gradients."""
        logits, cache = self.forward(x, training=True)
        loss, dlogits = fastopt.cross_entropy(logits, y, return_grad=True)
        return float(loss), self.backward(dlogits, cache)

    def predict(self, x):
        """Class labels at inference (BatchNorm uses its running statistics)."""
        logits, _ = self.forward(x, training=False)
        return np.argmax(logits, axis=1)

    def accuracy(self, x, y):
        return float(np.mean(self.predict(x) == y))


# -------------------------------------------------------------- training ---

def make_optimizer(name, params, lr, beta=None, **state):
    """The course's four optimizers with fastopt's PyTorch-style classes.

    `beta` is the averaging beta of each method: Momentum's beta (the
    course's ``v = beta*v + (1-beta)*dW``: momentum=dampening=beta), RMSprop's
    alpha, Adam's beta1 (beta2 stays 0.999).  `state` may hold
    ``state_dtype``, ``state_rounding`` and ``seed`` (half-size state).
    """
    if name == "sgd":
        return fastopt.SGD(params, lr=lr, **state)
    beta = DEFAULT_BETA[name] if beta is None else beta
    if name == "momentum":
        return fastopt.SGD(params, lr=lr, momentum=beta, dampening=beta, **state)
    if name == "rmsprop":
        return fastopt.RMSprop(params, lr=lr, alpha=beta, **state)
    if name == "adam":
        return fastopt.Adam(params, lr=lr, betas=(beta, 0.999), **state)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")


def train(name, data, *, epochs=15, batch_size=64, lr=None, beta=None, decay=0.95,
          hidden=(128, 64), seed=0, verbose=True, out=None, state=None):
    """Train a fresh MLP on `data` with optimizer `name`.

    Parameters
    ----------
    name : {"sgd", "momentum", "rmsprop", "adam"}
    data : tuple
        ``(X_train, y_train, X_test, y_test)`` as from `load_data`.
    epochs, batch_size : int
    lr : float, optional
        Initial learning rate (`DEFAULT_LR` of the optimizer if None); it is
        multiplied by `decay` after every epoch.
    beta : float, optional
        The optimizer's averaging beta (see `make_optimizer`).
    decay : float
        Exponential learning-rate decay per epoch (``lr0 * decay**epoch``).
    hidden : (int, int)
        Widths of the hidden layers.
    seed : int
        Initial weights and batch order.
    verbose : bool
        Print one line per epoch to `out` (default stdout).
    state : dict, optional
        Optimizer options for its state (``state_dtype``, ``state_rounding``,
        ``seed``), e.g. ``{"state_dtype": "bfloat16"}``.

    Returns
    -------
    dict
        ``costs`` (every mini-batch's loss), ``epoch_loss`` and ``test_acc``
        per epoch, ``seconds``, the trained ``model`` and its ``optimizer``.
    """
    X_train, y_train, X_test, y_test = data
    if not 2 <= batch_size <= len(X_train):
        raise ValueError(f"batch_size must be in [2, {len(X_train)}] (BatchNorm needs "
                         f"two examples per batch), got {batch_size}")
    out = sys.stdout if out is None else out
    lr = DEFAULT_LR[name] if lr is None else lr
    rng = np.random.default_rng(seed)
    n_classes = int(max(y_train.max(), y_test.max())) + 1
    model = MLP((X_train.shape[1], *hidden, n_classes), rng, dtype=X_train.dtype)
    opt = make_optimizer(name, model.params, lr, beta, **(state or {}))
    from fastopt import lr_scheduler
    sched = lr_scheduler.ExponentialLR(opt, gamma=decay)
    hist = {"costs": [], "epoch_loss": [], "test_acc": [], "model": model, "optimizer": opt}
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        epoch_costs = []
        # drop_last: BatchNorm needs more than one example per batch, and a
        # tiny last batch would give noisy batch statistics.
        for xb, yb in fastopt.minibatches(X_train, y_train, batch_size, rng=rng, drop_last=True):
            loss, grads = model.loss_and_grads(xb, yb)
            opt.step(grads)
            epoch_costs.append(loss)
        sched.step()
        hist["costs"] += epoch_costs
        hist["epoch_loss"].append(float(np.mean(epoch_costs)))
        hist["test_acc"].append(model.accuracy(X_test, y_test))
        if verbose:
            print(f"{name:>8}  epoch {epoch:3d}  loss {hist['epoch_loss'][-1]:.4f}  "
                  f"test accuracy {hist['test_acc'][-1]:6.2%}", file=out)
    hist["seconds"] = time.perf_counter() - start
    return hist


def random_search(n, data, *, optimizer="adam", seed=0, lr_range=None,
                  beta_range=(0.9, 0.999), out=None, **train_kw):
    """The course's random search: lr log-uniform, 1 - beta log-uniform.

    Each trial trains on part of the training set and is scored on the rest
    (a validation split), never on the test set.

    Parameters
    ----------
    lr_range : (float, float), optional
        Defaults to `SEARCH_LR` of the optimizer.
    beta_range : (float, float)
        The course's r in [-3, -1]: beta = 1 - 10**r in [0.9, 0.999].
    **train_kw
        Passed to `train` (``epochs`` defaults to 8 here).

    Returns
    -------
    list of dict
        ``lr``, ``beta``, ``val_acc`` per trial, best first.
    """
    out = sys.stdout if out is None else out
    lr_range = SEARCH_LR[optimizer] if lr_range is None else lr_range
    train_kw.setdefault("epochs", 8)
    X_train, y_train = data[0], data[1]
    search_data = split(X_train, y_train, 0.2, seed + 1)
    rng = np.random.default_rng(seed)
    trials = []
    for i in range(n):
        lr = fastopt.log_uniform(*lr_range, rng=rng)
        beta = fastopt.sample_beta(*beta_range, rng=rng) if optimizer != "sgd" else None
        h = train(optimizer, search_data, lr=lr, beta=beta, seed=seed, verbose=False, **train_kw)
        trials.append({"lr": lr, "beta": beta, "val_acc": h["test_acc"][-1]})
        shown = "-" if beta is None else f"{beta:.4f}"
        print(f"trial {i + 1:3d}/{n}  {optimizer}  lr {lr:.2e}  beta {shown:>6}  "
              f"validation accuracy {trials[-1]['val_acc']:6.2%}", file=out)
    trials.sort(key=lambda t: -t["val_acc"])
    return trials


# ------------------------------------------------------------------ plot ---

def history_figure(histories, smoothing=0.9):
    """The training curves of several runs as one matplotlib figure.

    Left: every mini-batch's cost, raw (faint: the course's noisy
    mini-batch cost) and smoothed with a bias-corrected exponentially
    weighted average (`smoothing` is its beta), against the epoch.  Right:
    the test accuracy after each epoch.  `histories` maps a run's name to
    the dict `train` returns.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
    except ImportError:
        raise ImportError("--plot needs matplotlib: "
                          'pip install "fastopt[examples]" (or pip install matplotlib)') from None
    fig, (ax_cost, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, h in histories.items():
        costs = np.asarray(h["costs"])
        epochs = len(h["test_acc"])
        x = np.arange(1, len(costs) + 1) * (epochs / len(costs))     # in epochs
        ema = fastopt.EWA(smoothing)
        smooth = [float(ema.update(c)) for c in costs]
        line, = ax_cost.plot(x, costs, alpha=0.25, linewidth=0.8)
        ax_cost.plot(x, smooth, color=line.get_color())
        ax_acc.plot(np.arange(1, epochs + 1), h["test_acc"], marker="o", markersize=3,
                    color=line.get_color(), label=name)
    ax_cost.set_yscale("log")
    ax_cost.set_xlabel("epoch")
    ax_cost.set_ylabel("cost (cross-entropy)")
    ax_cost.set_title("training cost")
    ax_cost.legend(handles=[
        Line2D([], [], color="gray", alpha=0.35, linewidth=0.8, label="mini-batch cost"),
        Line2D([], [], color="gray", label=f"smoothed (EWA, beta = {smoothing:g})")])
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("test accuracy")
    ax_acc.set_title("test accuracy after each epoch")
    ax_acc.legend(title="optimizer")
    fig.suptitle("Digits MLP with BatchNorm, trained with fastopt")
    fig.tight_layout()
    return fig


def plot_history(histories, path, smoothing=0.9):
    """Save `history_figure` to `path` (the format follows the extension)."""
    import matplotlib.pyplot as plt
    fig = history_figure(histories, smoothing)
    try:
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)


# ------------------------------------------------------------------- CLI ---

def _parser(prog):
    p = Parser(
        prog=prog,
        description="Train a BatchNorm MLP on scikit-learn's digits with SGD, Momentum, "
                    "RMSprop and Adam (fastopt kernels).",
        epilog="exit status: 0 done, 1 scikit-learn is missing, 2 bad options")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS), metavar="NAME,...",
                   help="comma-separated subset of the optimizers to train "
                        "(default %(default)s)")
    p.add_argument("--epochs", type=int, default=15, metavar="N",
                   help="passes over the training set (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=64, metavar="N",
                   help="examples per mini-batch, at least 2 for BatchNorm "
                        "(default %(default)s)")
    p.add_argument("--decay", type=float, default=0.95, metavar="GAMMA",
                   help="learning-rate decay per epoch, in (0, 1]: lr0 * decay**epoch "
                        "(default %(default)s)")
    p.add_argument("--hidden", default="128,64", metavar="N1,N2",
                   help="widths of the two hidden layers (default %(default)s)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="dtype of the data and the parameters (default %(default)s)")
    p.add_argument("--state-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="dtype of the optimizer state (bfloat16: half the memory, needs "
                        "ml_dtypes; default %(default)s)")
    p.add_argument("--state-rounding", choices=("stochastic", "nearest"), default="stochastic",
                   help="rounding of bfloat16 state (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, metavar="N",
                   help="seed of the train/test split, the initial weights and the "
                        "batch order, >= 0 (default %(default)s)")
    p.add_argument("--plot", metavar="PATH.png",
                   help="save the training cost and the test accuracy curves to this "
                        "image (.png, .svg, .pdf...; needs matplotlib; default: no plot)")
    p.add_argument("--search", type=int, metavar="N", default=0,
                   help="run N random-search trials over lr and beta instead of the "
                        "comparison (default %(default)s: no search)")
    p.add_argument("--search-optimizer", choices=OPTIMIZERS, default="adam",
                   help="the optimizer whose lr and beta --search tunes (default %(default)s)")
    return p


def check_options(args):
    """The validated options as a dict (raises `UsageError` naming the option)."""
    names = [s.strip() for s in args.optimizers.split(",") if s.strip()]
    unknown = [s for s in names if s not in OPTIMIZERS]
    if unknown or not names:
        what = f"unknown optimizer {unknown[0]!r}" if unknown else "no optimizer named"
        raise UsageError(f"--optimizers: {what} (choose from {', '.join(OPTIMIZERS)})")
    try:
        hidden = tuple(int(s) for s in args.hidden.split(","))
    except ValueError:
        hidden = ()
    if len(hidden) != 2 or min(hidden) < 1:
        raise UsageError(f"--hidden must be two positive widths like 128,64, got {args.hidden!r}")
    if args.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {args.epochs}")
    if args.batch_size < 2:
        raise UsageError(f"--batch-size must be >= 2 (BatchNorm needs two examples per "
                         f"batch), got {args.batch_size}")
    if not 0 < args.decay <= 1:       # also rejects NaN
        raise UsageError(f"--decay must be in (0, 1] (lr0 * decay**epoch), got {args.decay:g}")
    if args.seed < 0:
        raise UsageError(f"--seed must be >= 0, got {args.seed}")
    if args.search < 0:
        raise UsageError(f"--search must be >= 0, got {args.search}")
    if args.plot:
        if args.search:
            raise UsageError("--plot draws the optimizer comparison; it cannot be "
                             "combined with --search")
        check_plot(args.plot, "--plot", extra="examples")
    return dict(names=names, hidden=hidden)


def main(argv=None, prog="python -m fastopt demo"):
    """Command-line entry point (``python -m fastopt demo [options]``).

    Parameters
    ----------
    argv : list of str, optional
        The options (``sys.argv[1:]`` if None).
    prog : str
        The program name shown by ``--help`` and in error messages.

    Returns
    -------
    int
        The exit status: 0 on success, 1 if scikit-learn is missing, 2 for
        bad options (a one-line message naming the option).
    """
    args = _parser(prog).parse_args(argv)
    try:
        opts = check_options(args)
        data = load_data(args.seed, dtype=np.dtype(args.dtype))
        # BatchNorm needs the batch from one training set: the search trains
        # on 80% of it.
        smallest = len(split(data[0], data[1], 0.2, args.seed + 1)[1]) if args.search \
            else len(data[1])
        if args.batch_size > smallest:
            raise UsageError(f"--batch-size must be at most {smallest} (the training set"
                             f"{' of a search trial' if args.search else ''}), "
                             f"got {args.batch_size}")
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    names, hidden = opts["names"], opts["hidden"]
    print(f"digits: {len(data[1])} training and {len(data[3])} test images, "
          f"{data[0].shape[1]} pixels; fastopt {fastopt.__version__}, "
          f"{fastopt.get_num_threads()} threads")

    if args.search:
        trials = random_search(args.search, data, optimizer=args.search_optimizer,
                               seed=args.seed, batch_size=args.batch_size, decay=args.decay,
                               hidden=hidden)
        best = trials[0]
        h = train(args.search_optimizer, data, epochs=args.epochs, batch_size=args.batch_size,
                  lr=best["lr"], beta=best["beta"], decay=args.decay, hidden=hidden,
                  seed=args.seed, verbose=False)
        shown = "" if best["beta"] is None else f", beta {best['beta']:.4f}"
        print(f"best: lr {best['lr']:.2e}{shown} (validation accuracy {best['val_acc']:.2%}); "
              f"trained on the whole training set: test accuracy {h['test_acc'][-1]:.2%}")
        return 0

    state = None
    if args.state_dtype == "bfloat16":
        if args.dtype == "float64":
            print("error: --state-dtype bfloat16 needs --dtype float32", file=sys.stderr)
            return 2
        state = {"state_dtype": "bfloat16", "state_rounding": args.state_rounding}
    histories = {}
    for name in names:
        try:
            histories[name] = train(name, data, epochs=args.epochs, batch_size=args.batch_size,
                                    decay=args.decay, hidden=hidden, seed=args.seed, state=state)
        except ImportError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    print("\noptimizer   final loss   test accuracy   seconds")
    for name, h in histories.items():
        print(f"{name:>9}   {h['epoch_loss'][-1]:10.4f}   {h['test_acc'][-1]:13.2%}   "
              f"{h['seconds']:7.2f}")
    if args.plot:
        plot_history(histories, args.plot)
        print(f"training curves saved to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
