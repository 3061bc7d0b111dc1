"""The training-loop toolkit: mini-batches, exponentially weighted averages,
and log-scale sampling of hyperparameters for random search.

These follow the course's weeks 2-3 (mini-batch gradient descent with
shuffling, exponentially weighted averages with bias correction, choosing
hyperparameters on a log scale).  The heavy lifting is in two kernels of
``fastopt._train``: `take_rows` (a parallel row gather into reused buffers)
and `ewa_update` (a fused, parallel EWA update).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Optional, Union, overload

import numpy as np

from . import _train as _kernels

if TYPE_CHECKING:
    from numpy.typing import ArrayLike, NDArray

    from ._typing import FloatArray

    _Seed = Optional[Union[int, np.random.Generator, np.random.SeedSequence]]
    _Shape = Union[int, tuple[int, ...]]

take_rows = _kernels.take_rows
ewa_update = _kernels.ewa_update

__all__ = ["minibatches", "take_rows", "ewa_update", "bias_corrected", "EWA",
           "log_uniform", "sample_beta"]


# ---------------------------------------------------------------- batches ---

def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def _to_float(value: Any, name: str) -> float:
    """float(value) for a real number; too large for a float is a ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{name} must be finite, got a number too large for a float") from None


def _gatherable(a: NDArray[Any]) -> bool:
    """take_rows copies raw rows: it needs C-contiguous data without objects."""
    return a.flags.c_contiguous and not a.dtype.hasobject


def minibatches(X: ArrayLike, Y: ArrayLike, batch_size: int, *, shuffle: bool = True,
                rng: _Seed = None, drop_last: bool = False,
                copy: bool = False, indices: ArrayLike | None = None,
                ) -> Iterator[tuple[NDArray[Any], NDArray[Any]]]:
    """Yield ``(X_batch, Y_batch)`` over one epoch of mini-batches.

    Rows (examples) are along the first axis of `X` and `Y`.  The rows are
    visited in a random order (the course's "shuffle, then partition"), each
    exactly once per epoch; the last batch is smaller when `batch_size` does
    not divide the number of rows, unless `drop_last`.

    Batches are gathered with `take_rows` (parallel memcpy per row) into two
    buffers allocated once per call.

    .. warning::
       With ``copy=False`` (the default) every batch is a view of the same
       buffers: the next batch overwrites it.  A training loop that uses each
       batch before asking for the next is fine; to keep batches (a list of
       them, a prefetch queue), pass ``copy=True`` or copy them yourself.

    Parameters
    ----------
    X : array_like, shape (m, ...)
        Inputs, one example per row.
    Y : array_like, shape (m,) or (m, ...)
        Targets: 1-D labels or 2-D one-hot/probability rows (any shape whose
        first axis has length m).
    batch_size : int
        Rows per batch, >= 1 (the course's powers of two: 64, 128, 256, 512).
    shuffle : bool, default True
        Visit rows in a random order; False keeps the original order.
    rng : None, int, numpy.random.Generator or SeedSequence, optional
        Source of the shuffle, passed to ``numpy.random.default_rng``: an
        integer seed gives the same order on every call; a Generator gives
        a new order each epoch while staying reproducible.
    drop_last : bool, default False
        Skip the last batch if it has fewer than `batch_size` rows.
    copy : bool, default False
        Yield new arrays instead of views of the reused buffers.
    indices : 1-D array of int, optional
        Visit only these rows, in this order (shuffled if `shuffle`), e.g.
        this process's share of an epoch from
        `fastopt.distributed.DistributedSampler` (with ``shuffle=False``: the
        sampler has shuffled them already).

    Yields
    ------
    X_batch, Y_batch : ndarray
        C-contiguous, ``(k,) + X.shape[1:]`` and ``(k,) + Y.shape[1:]`` with
        ``k <= batch_size``, dtypes of `X` and `Y`.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> for epoch in range(num_epochs):                        # doctest: +SKIP
    ...     for xb, yb in fastopt.minibatches(X, y, 64, rng=rng):
    ...         loss, grads = model.loss_and_grads(xb, yb)
    ...         opt.step(grads)
    """
    X = np.asarray(X)
    Y = np.asarray(Y)
    if X.ndim < 1:
        raise ValueError("X must have at least one dimension (examples along axis 0)")
    if Y.ndim < 1:
        raise ValueError("Y must have at least one dimension (examples along axis 0)")
    if len(X) != len(Y):
        raise ValueError(f"X and Y must have the same number of rows, got {len(X)} and {len(Y)}")
    batch_size = _positive_int(batch_size, "batch_size")
    m = len(X)
    if indices is not None:
        order = _row_indices(indices, m)
        if shuffle:
            order = np.random.default_rng(rng).permutation(order)
    elif shuffle:
        order = np.random.default_rng(rng).permutation(m)
    else:
        order = np.arange(m, dtype=np.int64)
    # Validation ends here; the generator below starts with the first batch.
    return _batches(X, Y, order, batch_size, drop_last, copy)


def _row_indices(indices: ArrayLike, m: int) -> NDArray[np.int64]:
    """A private int64 copy of `indices`, checked to be row numbers of range(m)."""
    a = np.array(indices)      # copied first: what is checked is what is used
    if a.ndim != 1 or (a.dtype.kind not in "iu" and a.size):
        raise TypeError(f"indices must be a 1-D array of integers, got "
                        f"{a.ndim}-D {a.dtype}")
    if a.size and (a.min() < 0 or a.max() >= m):
        raise ValueError(f"indices must be row numbers in [0, {m}), got values in "
                         f"[{a.min()}, {a.max()}]")
    return a.astype(np.int64, copy=False)


def _batches(X: NDArray[Any], Y: NDArray[Any], order: NDArray[np.integer[Any]],
             batch_size: int, drop_last: bool,
             copy: bool) -> Iterator[tuple[NDArray[Any], NDArray[Any]]]:
    m = len(order)
    stop_at = m - m % batch_size if drop_last else m
    size = min(batch_size, m)
    if not copy:
        xbuf = np.empty((size,) + X.shape[1:], dtype=X.dtype)
        ybuf = np.empty((size,) + Y.shape[1:], dtype=Y.dtype)
    for start in range(0, stop_at, batch_size):
        idx = order[start:start + batch_size]
        k = len(idx)
        if copy:
            xb = np.empty((k,) + X.shape[1:], dtype=X.dtype)
            yb = np.empty((k,) + Y.shape[1:], dtype=Y.dtype)
        else:
            xb, yb = xbuf[:k], ybuf[:k]
        yield _gather(X, idx, xb), _gather(Y, idx, yb)


def _gather(a: NDArray[Any], idx: NDArray[np.integer[Any]], out: NDArray[Any]) -> NDArray[Any]:
    if _gatherable(a):
        return take_rows(a, idx, out)
    # Strided or object arrays: NumPy's gather, still without a new array.
    return np.take(a, idx, axis=0, out=out)


# ------------------------------------------------ exponentially weighted ---

# Update counts are int64 (as step counts): beta**t is 0 long before.
_T_MAX = 2**63 - 1


def _beta(beta: Any) -> float:
    b = _to_float(beta, "beta")
    if not 0.0 <= b < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {b!r}")
    return b


@overload
def bias_corrected(avg: float, beta: float, t: int, out: None = None) -> float: ...
@overload
def bias_corrected(avg: FloatArray, beta: float, t: int,
                   out: FloatArray | None = None) -> FloatArray: ...
def bias_corrected(avg: float | FloatArray, beta: float, t: int,
                   out: FloatArray | None = None) -> float | FloatArray:
    """The course's bias-corrected average ``avg / (1 - beta**t)``.

    An EWA started at zero underestimates early on (after one update it is
    ``(1-beta)*x``); dividing by ``1 - beta**t`` after `t` updates removes
    that bias.

    Parameters
    ----------
    avg : array_like or float
        The running average after `t` calls of `ewa_update` from zero.
    beta : float
        The average's beta, in [0, 1).
    t : int
        Number of updates so far, >= 1.
    out : ndarray, optional
        Where to write the result (may be `avg` itself).

    Returns
    -------
    ndarray or float
    """
    beta = _beta(beta)
    t = _positive_int(t, "t")
    if t > _T_MAX:
        raise ValueError(f"t must be at most 2**63 - 1, got {t}")
    result: float | FloatArray = np.divide(avg, 1.0 - beta ** t, out=out)
    return result


class EWA:
    """An exponentially weighted average with the course's bias correction.

    ``v_t = beta*v_{t-1} + (1-beta)*x_t`` from ``v_0 = 0``;
    `value` is ``v_t / (1 - beta**t)``.  Works on numbers (the course's daily
    temperatures) and on float arrays (a moving average of weights, i.e.
    Polyak averaging: ``ema.update(W)`` after each optimizer step, evaluate
    with ``ema.value``).  Array updates run the fused `ewa_update` kernel.

    Parameters
    ----------
    beta : float
        In [0, 1); the average covers roughly the last ``1/(1-beta)`` values.
    bias_correction : bool, default True
        Whether `value` divides by ``1 - beta**t``.

    Attributes
    ----------
    avg : ndarray or None
        The raw average ``v_t`` (None before the first update).  Float64
        for numbers; the dtype of the first array for arrays.
    t : int
        Number of updates.

    Examples
    --------
    >>> ema = EWA(0.9)
    >>> for theta in [10.0, 12.0, 11.0]:
    ...     _ = ema.update(theta)
    >>> round(float(ema.value), 4)
    11.0332
    """

    def __init__(self, beta: float, *, bias_correction: bool = True) -> None:
        self.beta = _beta(beta)
        self.bias_correction = bool(bias_correction)
        self.avg: FloatArray | None = None
        self.t = 0

    def update(self, x: float | ArrayLike) -> FloatArray:
        """Fold `x` into the average and return the (bias-corrected) value."""
        if self.avg is None:
            x = np.asarray(x)
            # float32 input keeps float32 (either byte order: the average is
            # updated in place, so it is native); anything else averages in float64.
            native = x.dtype.newbyteorder("=")
            dtype = native if native in (np.float32, np.float64) else np.float64
            avg = np.zeros(x.shape, dtype=dtype)
        else:
            avg = self.avg
        x = np.asarray(x, dtype=avg.dtype)
        ewa_update(avg, x, self.beta)     # validates shape; avg unchanged on error
        self.avg = avg
        self.t += 1
        return self.value

    @property
    def value(self) -> FloatArray:
        """The current estimate: ``avg / (1 - beta**t)`` (or `avg` without
        bias correction); a new array (a 0-d array for numbers)."""
        if self.avg is None:
            raise ValueError("EWA.value is undefined before the first update")
        if not self.bias_correction:
            return self.avg.copy()
        return bias_corrected(self.avg, self.beta, self.t)

    def reset(self) -> None:
        """Forget every update (start again from v_0 = 0)."""
        self.avg = None
        self.t = 0

    def __repr__(self) -> str:
        shape = None if self.avg is None else self.avg.shape
        return f"EWA(beta={self.beta!r}, t={self.t}, shape={shape})"


# --------------------------------------------------------------- sampling ---

def _positive_finite(value: Any, name: str) -> float:
    v = _to_float(value, name)
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be positive and finite, got {v!r}")
    return v


@overload
def log_uniform(low: float, high: float, size: None = None, rng: _Seed = None) -> float: ...
@overload
def log_uniform(low: float, high: float, size: _Shape,
                rng: _Seed = None) -> NDArray[np.float64]: ...
def log_uniform(low: float, high: float, size: _Shape | None = None,
                rng: _Seed = None) -> float | NDArray[np.float64]:
    """Samples whose base-10 logarithm is uniform: ``10**U(log10 low, log10 high)``.

    The course's way to search a learning rate: every decade between `low`
    and `high` gets the same share of the samples (``r = -4*rand(); lr = 10**r``
    is ``log_uniform(1e-4, 1)``).

    Parameters
    ----------
    low, high : float
        Positive, finite, ``low < high``.
    size : int or tuple of ints, optional
        Output shape; a single float when None.
    rng : None, int, numpy.random.Generator or SeedSequence, optional
        Passed to ``numpy.random.default_rng``.

    Returns
    -------
    float or ndarray of float64
        In ``[low, high]``.
    """
    low = _positive_finite(low, "low")
    high = _positive_finite(high, "high")
    if not low < high:
        raise ValueError(f"low must be < high, got low={low!r}, high={high!r}")
    r = np.random.default_rng(rng).uniform(np.log10(low), np.log10(high), size)
    # 10**log10(x) can round just outside [low, high].
    s: NDArray[np.float64] = np.clip(10.0 ** r, low, high)
    return float(s) if size is None else s


@overload
def sample_beta(low: float = 0.9, high: float = 0.999, size: None = None,
                rng: _Seed = None) -> float: ...
@overload
def sample_beta(low: float, high: float, size: _Shape,
                rng: _Seed = None) -> NDArray[np.float64]: ...
@overload
def sample_beta(low: float = 0.9, high: float = 0.999, *, size: _Shape,
                rng: _Seed = None) -> NDArray[np.float64]: ...
def sample_beta(low: float = 0.9, high: float = 0.999, size: _Shape | None = None,
                rng: _Seed = None) -> float | NDArray[np.float64]:
    """Sample an averaging beta in [low, high] with ``1 - beta`` log-uniform.

    The course's search over beta: ``r = U(-3, -1)``, ``beta = 1 - 10**r``
    (the defaults), so that 0.9 .. 0.99 and 0.99 .. 0.999 are searched
    equally often, where 1/(1-beta), the number of values averaged, changes
    most.

    Parameters
    ----------
    low, high : float
        ``0 <= low < high < 1``.
    size, rng
        As in `log_uniform`.

    Returns
    -------
    float or ndarray of float64
    """
    low, high = _to_float(low, "low"), _to_float(high, "high")
    for name, v in (("low", low), ("high", high)):
        if not 0.0 <= v < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {v!r}")
    if not low < high:
        raise ValueError(f"low must be < high, got low={low!r}, high={high!r}")
    s: NDArray[np.float64] = np.clip(1.0 - log_uniform(1.0 - high, 1.0 - low, size, rng),
                                     low, high)
    return float(s) if size is None else s
