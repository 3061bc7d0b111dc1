# Type stub of the fused optimizer kernels (_optim.pyx), built once per SIMD
# level; `fastopt._dispatch` makes the chosen level importable under this name.
from collections.abc import Callable, Sequence
from typing import Any, SupportsIndex

import numpy as np
from numpy.typing import NDArray
from typing_extensions import disjoint_base

from ._typing import FloatArray

def adam_step(
    param: FloatArray, grad: FloatArray, exp_avg: FloatArray, exp_avg_sq: FloatArray, *,
    step: SupportsIndex, lr: float = 1e-3,
    betas: tuple[float, float] | list[float] = (0.9, 0.999), eps: float = 1e-8,
    weight_decay: float = 0.0, decoupled_weight_decay: bool = False, amsgrad: bool = False,
    max_exp_avg_sq: FloatArray | None = None, maximize: bool = False,
    master: FloatArray | None = None,
) -> None: ...
def adamw_step(
    param: FloatArray, grad: FloatArray, exp_avg: FloatArray, exp_avg_sq: FloatArray, *,
    step: SupportsIndex, lr: float = 1e-3,
    betas: tuple[float, float] | list[float] = (0.9, 0.999), eps: float = 1e-8,
    weight_decay: float = 1e-2, amsgrad: bool = False,
    max_exp_avg_sq: FloatArray | None = None, maximize: bool = False,
    master: FloatArray | None = None,
) -> None: ...
def rmsprop_step(
    param: FloatArray, grad: FloatArray, square_avg: FloatArray, *, lr: float = 1e-2,
    alpha: float = 0.99, eps: float = 1e-8, weight_decay: float = 0.0, momentum: float = 0.0,
    momentum_buffer: FloatArray | None = None, centered: bool = False,
    grad_avg: FloatArray | None = None, maximize: bool = False,
    master: FloatArray | None = None,
) -> None: ...
def sgd_step(
    param: FloatArray, grad: FloatArray, momentum_buffer: FloatArray | None = None, *,
    lr: float, momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False,
    weight_decay: float = 0.0, maximize: bool = False, first_step: bool = False,
    master: FloatArray | None = None,
) -> None: ...
def adagrad_step(
    param: FloatArray, grad: FloatArray, sum: FloatArray, *, step: SupportsIndex,
    lr: float = 1e-2, lr_decay: float = 0.0, weight_decay: float = 0.0, eps: float = 1e-10,
    maximize: bool = False, master: FloatArray | None = None,
) -> None: ...
def adamax_step(
    param: FloatArray, grad: FloatArray, exp_avg: FloatArray, exp_inf: FloatArray, *,
    step: SupportsIndex, lr: float = 2e-3,
    betas: tuple[float, float] | list[float] = (0.9, 0.999), eps: float = 1e-8,
    weight_decay: float = 0.0, maximize: bool = False, master: FloatArray | None = None,
) -> None: ...
def nadam_step(
    param: FloatArray, grad: FloatArray, exp_avg: FloatArray, exp_avg_sq: FloatArray, *,
    step: SupportsIndex, mu_product: float, lr: float = 2e-3,
    betas: tuple[float, float] | list[float] = (0.9, 0.999), eps: float = 1e-8,
    weight_decay: float = 0.0, momentum_decay: float = 4e-3,
    decoupled_weight_decay: bool = False, maximize: bool = False,
    master: FloatArray | None = None,
) -> float: ...
def radam_step(
    param: FloatArray, grad: FloatArray, exp_avg: FloatArray, exp_avg_sq: FloatArray, *,
    step: SupportsIndex, lr: float = 1e-3,
    betas: tuple[float, float] | list[float] = (0.9, 0.999), eps: float = 1e-8,
    weight_decay: float = 0.0, decoupled_weight_decay: bool = False, maximize: bool = False,
    master: FloatArray | None = None,
) -> None: ...
def adadelta_step(
    param: FloatArray, grad: FloatArray, square_avg: FloatArray, acc_delta: FloatArray, *,
    lr: float = 1.0, rho: float = 0.9, eps: float = 1e-6, weight_decay: float = 0.0,
    maximize: bool = False, master: FloatArray | None = None,
) -> None: ...
def asgd_step(
    param: FloatArray, grad: FloatArray, ax: FloatArray, *, step: SupportsIndex, eta: float,
    mu: float, lr: float = 1e-2, lambd: float = 1e-4, alpha: float = 0.75, t0: float = 1e6,
    weight_decay: float = 0.0, maximize: bool = False, master: FloatArray | None = None,
) -> tuple[float, float]: ...
def rprop_step(
    param: FloatArray, grad: FloatArray, prev: FloatArray, step_size: FloatArray, *,
    etas: tuple[float, float] | list[float] = (0.5, 1.2),
    step_sizes: tuple[float, float] | list[float] = (1e-6, 50),
    maximize: bool = False, master: FloatArray | None = None,
) -> None: ...
def lion_step(
    param: FloatArray, grad: FloatArray, exp_avg: FloatArray, *, lr: float = 1e-4,
    betas: tuple[float, float] | list[float] = (0.9, 0.99), weight_decay: float = 0.0,
    maximize: bool = False, master: FloatArray | None = None,
) -> None: ...
def adafactor_step(
    param: FloatArray, grad: FloatArray, *, step: SupportsIndex,
    row_var: FloatArray | None = None, col_var: FloatArray | None = None,
    variance: FloatArray | None = None, lr: float = 1e-2, beta2_decay: float = -0.8,
    eps: tuple[float | None, float] | list[float | None] = (None, 1e-3), d: float = 1.0,
    weight_decay: float = 0.0, maximize: bool = False, master: FloatArray | None = None,
) -> None: ...
def clip_grad_norm_(
    grads: FloatArray | Sequence[FloatArray | None], max_norm: float, norm_type: float = 2.0,
    error_if_nonfinite: bool = False, *,
    allgather: Callable[[float], Sequence[float]] | None = None,
) -> float: ...
def clip_grad_value_(
    grads: FloatArray | Sequence[FloatArray | None], clip_value: float,
) -> None: ...

@disjoint_base      # an extension type with C fields
class FusedStep:
    """The native half of the optimizer objects (see _optim.pyx)."""
    @property
    def kind(self) -> int: ...
    @property
    def n(self) -> int: ...
    @property
    def ngroups(self) -> int: ...
    @property
    def params(self) -> list[FloatArray]: ...
    @property
    def states(self) -> list[list[FloatArray | None]]: ...
    @property
    def masters(self) -> list[FloatArray | None]: ...
    @property
    def state_dtype(self) -> str | None: ...
    @property
    def state_rounding(self) -> str: ...
    @property
    def seed(self) -> int: ...
    found_inf: bool
    def __init__(self, kind: str, params: Sequence[FloatArray], group_of: Sequence[int],
                 ngroups: int, states: Sequence[Sequence[FloatArray | None]],
                 masters: Sequence[FloatArray | None],
                 steps: NDArray[Any] | Sequence[NDArray[Any]], *,
                 names: list[str] | None = None, state_dtype: str | None = None,
                 state_rounding: str = "nearest", seed: int = 0,
                 scalars: list[tuple[NDArray[Any], ...]] | None = None,
                 sr_keys: list[tuple[int, int]] | None = None) -> None: ...
    def array_name(self, i: int, slot: int) -> str: ...
    def hold(self, what: str) -> None: ...
    def release(self) -> None: ...
    def check_groups(self, groups: Sequence[dict[str, Any]]) -> None: ...
    def step(self, grads: Sequence[FloatArray | None], groups: Sequence[dict[str, Any]],
             grad_scale: float | None = None) -> None: ...
    def unscale_(self, grads: Sequence[FloatArray | None], grad_scale: float) -> bool: ...
    def set_rounding(self, state_rounding: str, seed: int) -> None: ...
    def sync_params(self) -> None: ...
    def step_addresses(self, groups: Sequence[dict[str, Any]], grad_addr: NDArray[np.uintp],
                       grad_scale: float | None = None) -> None: ...

@disjoint_base      # an extension type with C fields
class Written:
    """The memory a call writes (overlap checks; see _optim.pyx)."""
    def __new__(cls, cap: int) -> Written: ...

def state_dtype_of(state_dtype: Any) -> np.dtype[Any] | None: ...
def check_low_precision(state_dtype: Any, state_rounding: Any, seed: Any, kind: Any = None,
                        split_master: bool = False) -> None: ...

# Test hooks of the 16-bit conversions (tests/test_lowprec.py).
def _convert(src: NDArray[Any], dst: NDArray[Any], stochastic_key: int | None = None) -> None: ...
def _hash32(x: Any) -> NDArray[np.uint32]: ...
def _idle_after_fork() -> None: ...
# Test hook of the kernels' bfloat16-state and loss-scaling variants (_optim.pyx).
_STORED: tuple[Callable[..., Any], ...]
def _stored_step(kernel: Callable[..., Any], *args: Any, state: str | None = None, key: int = 0,
                 grad_scale: float | None = None, **kwargs: Any) -> Any: ...
