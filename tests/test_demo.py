"""The digits example: its model's gradients (finite differences through
fastopt's BatchNorm and cross-entropy kernels), its accuracy, its command line."""
import subprocess
import sys

import numpy as np
import pytest

import fastopt
from fastopt import demo


# ------------------------------------------------------------ gradient check ---

def numeric_grads(loss, params, h=1e-6):
    """Central differences of loss() with respect to every element of params."""
    grads = []
    for p in params:
        g = np.empty_like(p)
        for i in np.ndindex(p.shape):
            old = p[i]
            p[i] = old + h
            up = loss()
            p[i] = old - h
            down = loss()
            p[i] = old
            g[i] = (up - down) / (2 * h)
        grads.append(g)
    return grads


@pytest.mark.parametrize("labels", ["indices", "one-hot"])
def test_mlp_gradients_match_finite_differences(labels):
    """Linear -> BatchNorm -> ReLU -> Linear -> BatchNorm -> ReLU -> Linear ->
    cross-entropy, every parameter, float64."""
    rng = np.random.default_rng(0)
    model = demo.MLP((5, 7, 6, 4), rng, dtype=np.float64)
    for p in model.params:                       # move BatchNorm's gamma/beta off 1/0
        p += 0.1 * rng.standard_normal(p.shape)
    x = rng.standard_normal((9, 5))
    y = rng.integers(0, 4, size=9)
    target = y if labels == "indices" else np.eye(4)[y]

    def loss():
        logits, _ = model.forward(x, training=True)
        return float(fastopt.cross_entropy(logits, target))

    logits, cache = model.forward(x, training=True)
    value, dlogits = fastopt.cross_entropy(logits, target, return_grad=True)
    analytic = model.backward(dlogits, cache)
    assert float(value) == pytest.approx(loss(), rel=1e-12)
    numeric = numeric_grads(loss, model.params)
    names = ["W1", "gamma1", "beta1", "W2", "gamma2", "beta2", "W3", "b3"]
    for name, a, n, p in zip(names, analytic, numeric, model.params):
        assert a.shape == p.shape and a.dtype == p.dtype, name
        np.testing.assert_allclose(a, n, rtol=1e-5, atol=1e-8, err_msg=name)


def test_layer_helpers_against_formulas():
    """The NumPy layers the model composes with fastopt's kernels."""
    rng = np.random.default_rng(1)
    x, W, b = rng.standard_normal((4, 3)), rng.standard_normal((3, 2)), rng.standard_normal(2)
    z = demo.linear_forward(x, W, b)
    np.testing.assert_allclose(z, np.einsum("ij,jk->ik", x, W) + b, rtol=1e-13)
    dz = rng.standard_normal((4, 2))
    dx, dW, db = demo.linear_backward(dz, x, W)
    np.testing.assert_allclose(dx, np.einsum("ik,jk->ij", dz, W), rtol=1e-13)
    np.testing.assert_allclose(dW, np.einsum("ij,ik->jk", x, dz), rtol=1e-13)
    np.testing.assert_allclose(db, dz.sum(0), rtol=1e-13)
    z = np.array([[-1.0, 0.0, 2.0]])
    np.testing.assert_array_equal(demo.relu_forward(z), [[0.0, 0.0, 2.0]])
    np.testing.assert_array_equal(demo.relu_backward(np.array([[5.0, 6.0, 7.0]]), z), [[0.0, 0.0, 7.0]])


def test_split_is_stratified_and_disjoint():
    y = np.repeat(np.arange(4), [10, 20, 30, 40])
    X = np.arange(100.0)[:, None]
    Xa, ya, Xb, yb = demo.split(X, y, 0.25, seed=3)
    np.testing.assert_array_equal(np.bincount(yb), [2, 5, 8, 10])      # round(0.25 * count)
    np.testing.assert_array_equal(np.sort(np.concatenate([Xa[:, 0], Xb[:, 0]])), X[:, 0])
    np.testing.assert_array_equal(y[Xb[:, 0].astype(int)], yb)


# ----------------------------------------------------------- digits training ---

@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn")
    return demo.load_data(seed=0)


def test_digits_data(digits):
    X_train, y_train, X_test, y_test = digits
    assert X_train.shape == (1347, 64) and X_test.shape == (450, 64)
    assert X_train.dtype == np.float32 and 0 <= X_train.min() and X_train.max() <= 1
    assert set(np.unique(y_test)) == set(range(10))


def test_adam_reaches_95_percent_on_digits(digits):
    h = demo.train("adam", digits, epochs=10, seed=0, verbose=False)
    assert h["test_acc"][-1] >= 0.95
    assert h["epoch_loss"][-1] < h["epoch_loss"][0] / 5


@pytest.mark.parametrize("name", demo.OPTIMIZERS)
def test_every_optimizer_learns_digits(digits, name):
    h = demo.train(name, digits, epochs=8, seed=1, verbose=False)
    assert h["test_acc"][-1] >= 0.9, h["test_acc"]


def test_main_prints_epochs_and_plots(digits, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "costs.png"
    assert demo.main(["--epochs", "1", "--plot", str(path)]) == 0
    out = capsys.readouterr().out
    for name in demo.OPTIMIZERS:
        assert f"{name:>8}  epoch   1  loss" in out
    assert "test accuracy" in out
    assert path.stat().st_size > 10_000                              # a real PNG chart


def test_plot_draws_costs_and_accuracy_with_legends():
    """Left: raw and smoothed mini-batch cost per run (a legend tells which is
    which); right: test accuracy per epoch, one line per optimizer."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt
    hist = {name: {"costs": list(np.linspace(2.0, 0.1, 40) + k), "test_acc": [0.5, 0.7, 0.8, 0.9]}
            for k, name in enumerate(["sgd", "adam"])}
    fig = demo.history_figure(hist)
    try:
        cost, acc = fig.axes
        assert len(cost.lines) == 4                                   # raw + smoothed, 2 runs
        raw, smooth = cost.lines[:2]
        np.testing.assert_allclose(raw.get_ydata(), hist["sgd"]["costs"])
        np.testing.assert_allclose(raw.get_xdata()[[0, -1]], [0.1, 4.0])   # in epochs
        assert smooth.get_color() == raw.get_color() and raw.get_alpha() < 1
        assert [t.get_text() for t in cost.get_legend().get_texts()] == [
            "mini-batch cost", "smoothed (EWA, beta = 0.9)"]
        assert [t.get_text() for t in acc.get_legend().get_texts()] == ["sgd", "adam"]
        np.testing.assert_array_equal(acc.lines[1].get_ydata(), [0.5, 0.7, 0.8, 0.9])
        np.testing.assert_array_equal(acc.lines[1].get_xdata(), [1, 2, 3, 4])
        assert acc.get_ylabel() == "test accuracy"
    finally:
        plt.close(fig)


def test_main_search_and_float64(digits, capsys):
    assert demo.main(["--search", "2", "--epochs", "2", "--dtype", "float64"]) == 0
    out = capsys.readouterr().out
    assert out.count("validation accuracy") == 3 and "best: lr" in out


# ----------------------------------------------------- command line errors ---

def run_main(args, capsys):
    """(exit status, stdout, stderr) of demo.main(args), argparse's exits included."""
    try:
        code = demo.main(args)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


BAD_OPTIONS = [
    (["--optimizers", "adam,nadam"], "--optimizers: unknown optimizer 'nadam'"),
    (["--optimizers", ","], "--optimizers: no optimizer named"),
    (["--hidden", "64"], "--hidden must be two positive widths"),
    (["--hidden", "64,0"], "--hidden must be two positive widths"),
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--epochs", "two"], "argument --epochs: invalid int value: 'two'"),
    (["--batch-size", "0"], "--batch-size must be >= 2 (BatchNorm needs two examples"),
    (["--batch-size", "1"], "--batch-size must be >= 2"),
    (["--decay", "-1"], "--decay must be in (0, 1] (lr0 * decay**epoch), got -1"),
    (["--decay", "0"], "--decay must be in (0, 1]"),
    (["--decay", "1.5"], "--decay must be in (0, 1]"),
    (["--decay", "nan"], "--decay must be in (0, 1]"),
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
    (["--search", "-2"], "--search must be >= 0, got -2"),
    (["--dtype", "float16"], "argument --dtype: invalid choice: 'float16'"),
    (["--search-optimizer", "nadam"], "argument --search-optimizer: invalid choice"),
    (["--plot", "/nonexistent-dir/x/curves.png"], "--plot: cannot write /nonexistent-dir/x/"),
    (["--plot", "curves.txt"], "--plot: curves.txt: '.txt' is not an image format"),
    (["--plot", "curves"], "--plot: curves: no file extension"),
    (["--plot", "c.png", "--search", "2"], "--plot draws the optimizer comparison"),
    (["--frobnicate"], "unrecognized arguments: --frobnicate"),
]


@pytest.mark.parametrize("args,words", BAD_OPTIONS, ids=[" ".join(a) for a, _ in BAD_OPTIONS])
def test_bad_options_are_one_line_errors_before_any_work(args, words, capsys, monkeypatch):
    """Exit 2, one line naming the option, nothing trained or loaded (each check
    comes before the data is loaded: loading it would fail here)."""
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(demo, "load_data", lambda *a, **k: pytest.fail("data loaded"))
    code, out, err = run_main(args, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m fastopt demo: error: "), err
    assert words in lines[0]
    assert out == ""


def test_batch_size_above_the_training_set(digits, capsys):
    code, out, err = run_main(["--batch-size", "5000"], capsys)
    assert code == 2 and out == ""
    assert err.strip() == ("python -m fastopt demo: error: --batch-size must be at most 1347 "
                           "(the training set), got 5000")
    trial = len(demo.split(digits[0], digits[1], 0.2, 1)[1])        # seed 0 + 1
    code, out, err = run_main(["--search", "1", "--batch-size", str(trial + 1)], capsys)
    assert code == 2 and f"at most {trial} (the training set of a search trial)" in err


def test_help_documents_every_option_with_its_default():
    parser = demo._parser("demo")
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help and "default" in action.help, action.option_strings
    text = parser.format_help()
    for option in ("--optimizers", "--epochs", "--batch-size", "--decay", "--hidden", "--dtype",
                   "--seed", "--plot", "--search", "--search-optimizer"):
        assert option in text
    assert "(default 15)" in " ".join(text.split())          # --epochs, defaults filled in


def test_train_rejects_batches_batchnorm_cannot_use():
    X, y = np.zeros((10, 3), np.float32), np.arange(10) % 2
    for bad in (1, 11):
        with pytest.raises(ValueError, match="batch_size must be in"):
            demo.train("adam", (X, y, X, y), batch_size=bad)


def test_missing_matplotlib_is_a_clear_message(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)              # import fails
    monkeypatch.setitem(sys.modules, "matplotlib.backend_bases", None)
    code, out, err = run_main(["--plot", "x.png"], capsys)
    assert code == 2 and out == ""
    assert err == ("python -m fastopt demo: error: --plot needs matplotlib: pip install "
                   "matplotlib (or pip install 'fastopt[examples]')\n")


def test_missing_sklearn_is_a_clear_message(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    assert demo.main([]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "needs scikit-learn" in err


def test_package_imports_without_the_extras():
    code = ("import sys; sys.modules['sklearn'] = None; sys.modules['matplotlib'] = None\n"
            "import fastopt, fastopt.demo, fastopt.training; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
