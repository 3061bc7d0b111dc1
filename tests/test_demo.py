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


def test_main_search_and_float64(digits, capsys):
    assert demo.main(["--search", "2", "--epochs", "2", "--dtype", "float64"]) == 0
    out = capsys.readouterr().out
    assert out.count("validation accuracy") == 3 and "best: lr" in out


# ----------------------------------------------------- command line errors ---

def test_main_bad_options(capsys):
    assert demo.main(["--optimizers", "adam,nadam"]) == 2
    assert "unknown optimizer(s) ['nadam']" in capsys.readouterr().err
    assert demo.main(["--hidden", "64"]) == 2
    assert "--hidden must be two positive widths" in capsys.readouterr().err
    assert demo.main(["--batch-size", "1"]) == 2
    assert "--batch-size must be >= 2" in capsys.readouterr().err


def test_train_rejects_batches_batchnorm_cannot_use():
    X, y = np.zeros((10, 3), np.float32), np.arange(10) % 2
    for bad in (1, 11):
        with pytest.raises(ValueError, match="batch_size must be in"):
            demo.train("adam", (X, y, X, y), batch_size=bad)


def test_missing_matplotlib_is_a_clear_message(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)              # import fails
    assert demo.main(["--plot", "x.png"]) == 1
    assert 'needs matplotlib: pip install "fastopt[examples]"' in capsys.readouterr().err


def test_missing_sklearn_is_a_clear_message(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    assert demo.main([]) == 1
    assert "needs scikit-learn" in capsys.readouterr().err


def test_package_imports_without_the_extras():
    code = ("import sys; sys.modules['sklearn'] = None; sys.modules['matplotlib'] = None\n"
            "import fastopt, fastopt.demo, fastopt.training; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
