"""Optimizer objects: SGD, RMSprop, Adam, AdamW over a list of NumPy arrays.

Each optimizer updates *every* parameter array in one native call with one
parallel region per ``step`` (the work is split by elements across arrays),
giving exactly the results of the functional kernels (`adam_step`, ...)
applied array by array.  Constructor names and defaults follow
``torch.optim``::

    opt = fastopt.Adam([W1, b1, W2, b2], lr=1e-3)
    opt = fastopt.AdamW([{"params": weights},
                         {"params": biases, "weight_decay": 0.0}], lr=1e-3)
    for X, y in batches:
        grads = backward(X, y)          # [dW1, db1, dW2, db2], same order
        opt.step(grads)

Differences from PyTorch, because NumPy arrays carry no ``.grad``:

* ``step(grads)`` takes the gradients, in the order of the parameters
  (groups in order, then parameters in order within a group).  An entry may
  be None: that parameter is skipped (its state and step count do not move),
  as PyTorch skips parameters whose ``.grad`` is None.
* ``opt.state`` is a list with one dict of state arrays per parameter
  (PyTorch keys it by tensor).  The arrays are owned by the optimizer and
  updated in place; do not replace them (``load_state_dict`` copies into
  them).
* Hyperparameters in ``opt.param_groups`` may be changed between steps and
  are validated at every step (a bad value raises and nothing is updated).
  The arrays in a group's ``"params"`` are the ones the optimizer holds
  state for: one replaced in, removed from or appended to the list is
  refused at the next step (ValueError naming it, nothing updated; update
  an array in place instead, or use ``add_param_group``).
  Options that need a state array (``amsgrad``, RMSprop's ``momentum`` and
  ``centered``, SGD's ``momentum``) must be on at construction (or when the
  group is added) to be turned on later.
* ``add_param_group(group)`` adds parameters later, as in PyTorch (e.g. a
  layer unfrozen for fine-tuning); the state arrays are reallocated then,
  so take ``opt.state`` again afterwards.
* Parameters may mix float32 and float64; each array is updated in its own
  precision (scalars in double), all in the same call.

Low precision (see the user guide's "Low precision" page):

* float16 and bfloat16 (``ml_dtypes.bfloat16``) parameters get a float32
  master copy, ``state[i]["master_param"]``, and float32 state.  A step
  reads the gradient (the parameter's dtype or float32), updates the master
  and the state in float32 and writes the parameter rounded to nearest, in
  one pass: exactly a float32 step on the master followed by rounding.  The
  master is the parameter's true value: to change a parameter, change its
  master.
* ``state_dtype="bfloat16"`` keeps the state in bfloat16 (half the memory
  and traffic), computed in float32 and rounded when stored:
  ``state_rounding="stochastic"`` (the default; unbiased, with a
  counter-based generator seeded by `seed`, the same on any number of
  threads) or ``"nearest"``.
* ``step(grads, grad_scale=s)`` divides the gradients by s inside the step
  (loss scaling); if any gradient holds an inf or NaN nothing changes and
  ``opt.found_inf`` is True.  `fastopt.GradScaler` drives it.

State dicts are flat dicts of NumPy arrays and numbers, so they save with
``np.savez``::

    np.savez(path, **opt.state_dict())
    opt.load_state_dict(dict(np.load(path)))

Keys: ``"optimizer"`` (the class name), ``"param_groups.<g>.<name>"`` for
every hyperparameter of group g (``"param_groups.<g>.params"`` holds the
parameter indices), ``"state.<i>.step"`` and ``"state.<i>.<state name>"``
for parameter i (``master_param`` included), and with bfloat16 state
``"state_dtype"``, ``"state_rounding"`` and ``"seed"``.  Loading checks
everything first and changes nothing when the dict does not match (another
optimizer, parameter list, state dtype, or array shape or dtype).  ``np.load``
returns bfloat16 arrays as raw 2-byte voids; loading accepts them.
"""
from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _kinds, _layout, _state
from . import _optim as _kernels

if TYPE_CHECKING:
    from numpy.typing import DTypeLike
    from typing_extensions import Self

    from ._typing import FloatArray, Params

__all__ = ["Optimizer", "SGD", "RMSprop", "Adam", "AdamW", "Adagrad", "Adamax", "NAdam",
           "RAdam", "Adadelta", "ASGD", "Rprop", "Lion", "Adafactor", "flat_views"]

def flat_views(arrays: Iterable[FloatArray | tuple[int, ...]], dtype: DTypeLike | None = None,
               copy: bool = True) -> tuple[FloatArray, list[FloatArray]]:
    """One contiguous buffer holding every array, and views of it shaped like them.

    A flat-buffer layout for a model: make the parameters (and the
    gradients) views into one array, so a step streams through memory in
    one pass and `clip_grad_norm_` can take the flat gradient buffer::

        flat_p, params = fastopt.flat_views(initial_params)
        flat_g, grads = fastopt.flat_views(params, copy=False)   # zeros
        opt = fastopt.Adam(params)
        ...                         # backward writes into grads (out=...)
        fastopt.clip_grad_norm_(flat_g, 1.0)
        opt.step(grads)

    The optimizer's state arrays are laid out the same way already (each
    state kind in one buffer, in parameter order), so the whole update is
    contiguous streams.  Each view starts at a 64-byte boundary; the few
    padding elements between views are zero and never written by fastopt
    (they add nothing to a norm).

    Parameters
    ----------
    arrays : sequence of ndarray (or of shapes, with `dtype` and copy=False)
    dtype : dtype, optional
        Of the buffer; default: the arrays' common dtype (float32/float64),
        in native byte order (arrays of the other byte order are converted).
    copy : bool
        Copy the arrays' values in (default) or leave the buffer zeroed.

    Returns
    -------
    flat : ndarray, 1-d
    views : list of ndarray
        ``views[i]`` has the shape of ``arrays[i]`` and shares memory with `flat`.
    """
    if isinstance(arrays, np.ndarray):
        raise TypeError("arrays must be a sequence of arrays (or of shapes), not one array")
    try:
        arrays = list(arrays)
    except TypeError:
        raise TypeError(f"arrays must be a sequence of arrays (or of shapes), "
                        f"got {type(arrays).__name__}") from None
    shapes = [np.shape(a) if isinstance(a, np.ndarray) else _shape(a, f"arrays[{i}]")
              for i, a in enumerate(arrays)]
    if dtype is None:
        # The buffer is updated in place: native byte order whatever the
        # inputs' (their values are converted when copied in).
        dtypes = {a.dtype.newbyteorder("=") for a in arrays if isinstance(a, np.ndarray)}
        if len(dtypes) != 1:
            raise ValueError("arrays must share one dtype (or pass dtype=...), got "
                             f"{sorted(str(d) for d in dtypes) or 'shapes only'}")
        dtype = dtypes.pop()
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64 in native byte order, got {dtype.str!r}")
    if copy and not all(isinstance(a, np.ndarray) for a in arrays):
        raise TypeError("copy=True needs arrays, not shapes")
    buf, views = _layout.aligned_views(shapes, [dtype] * len(shapes))
    flat = buf.view(dtype)
    if copy:
        for v, a in zip(views, arrays):
            v[...] = a
    return flat, views


def _entry_array(entry: dict[str, Any], name: str, i: int) -> Any:
    if name not in entry:
        raise ValueError(f"state[{i}] has no {name!r} (an empty dict restarts the parameter "
                         "from zero state)")
    return entry[name]


class Optimizer:
    """Base class: param groups, native state, state dicts.

    Subclasses set `_kind`, what the optimizer is (its hyperparameters with
    their ranges, its state arrays: `fastopt._kinds`).  Every optimizer
    takes the keyword arguments:

    state_dtype : None or "bfloat16"
        None: the state in the compute dtype (float64 for float64
        parameters, else float32).  "bfloat16" (needs ml_dtypes,
        ``pip install "fastopt[bf16]"``; not with float64 parameters): half
        the state memory and traffic, computed in float32 and rounded when
        stored.  float16 is refused: exp_avg_sq (squared gradients) leaves
        its range.
    state_rounding : {"stochastic", "nearest"}
        Rounding of bfloat16 state.  Stochastic rounding is unbiased: an
        update below half a bfloat16 ulp (exp_avg_sq's (1 - beta2) g^2 with
        beta2 = 0.999) still moves the state on average, where rounding to
        nearest drops it.
    seed : int in [0, 2**32)
        Of the counter-based generator of stochastic rounding: the random
        bits of an element depend on (seed, parameter, step, element) only,
        so results are the same on any number of threads and SIMD level.
    """

    _kind: _kinds.Kind

    defaults: dict[str, Any]
    param_groups: list[dict[str, Any]]
    state: list[dict[str, FloatArray]]
    _fused: _kernels.FusedStep
    _steps: np.ndarray[Any, np.dtype[np.int64]]
    _group_of: list[int]
    _bound_state: _state.StateList
    _seen_edits: int

    def __init__(self, params: Params, defaults: dict[str, Any], *,
                 state_dtype: str | None = None, state_rounding: str = "stochastic",
                 seed: int = 0, slots: list[tuple[bool, bool, bool]] | None = None,
                 sr_keys: list[tuple[int, int]] | None = None) -> None:
        self._sr_keys = sr_keys         # FusedStep's sr_keys (`with_params`); None: the default
        self.defaults = _check_hypers(self._kind, defaults)
        self.param_groups = [self._with_defaults(g) for g in _as_groups(params)]
        self._commit(*self._build(self.param_groups, slots, (state_dtype, state_rounding, seed)))

    def _commit(self, fused: _kernels.FusedStep, state: _state.StateList,
                steps: np.ndarray[Any, np.dtype[np.int64]]) -> None:
        """Make `fused`, over `state` and `steps`, this optimizer's step."""
        self._fused, self.state, self._steps = fused, state, steps
        self._bound_state, self._seen_edits = state, state.edits

    def _bound(self) -> _kernels.FusedStep:
        """The native step, bound to what `state` holds now (`_sync_state` if
        it was edited or replaced since)."""
        state = self.state
        if state is not self._bound_state or self._bound_state.edits != self._seen_edits:
            self._sync_state()
        return self._fused

    def _sync_state(self) -> None:
        """`state` was edited (or replaced) since the native step was bound
        to it: bind it to what `state` holds now.  An emptied entry
        (``opt.state[i] = {}``, ``opt.state[i].clear()``) restarts parameter
        i from zero state and step 0 in new arrays (the old ones are left as
        they are); an array assigned to a key is used in place, and must be
        laid out as the state is (the parameter's shape, the state's dtype,
        C-contiguous, aligned, writeable).  Everything is checked first: on
        an error (TypeError/ValueError naming the entry) nothing changes."""
        current = self._fused
        state = self.state
        n = current.n
        if not isinstance(state, list) or len(state) != n:
            raise ValueError(f"state must be a list of {n} dicts, one per parameter "
                             f"(an empty dict restarts a parameter), got {type(state).__name__}")
        arrays = [list(st) for st in current.states]
        masters = list(current.masters)
        names = self._kind.scalar_names
        scalars: list[Any] = [None] * n
        resets = []
        for i, entry in enumerate(state):
            if not isinstance(entry, dict):
                raise TypeError(f"state[{i}] must be a dict, got {type(entry).__name__}")
            if not entry:
                resets.append(i)
                continue
            for k, name in enumerate(self._slot_names):
                if arrays[i][k] is not None:
                    arrays[i][k] = _entry_array(entry, name, i)
            if masters[i] is not None:
                masters[i] = _entry_array(entry, "master_param", i)
            scalars[i] = tuple(_entry_array(entry, name, i) for name in names)
            for name, a in zip(names, scalars[i]):
                if isinstance(a, np.ndarray) and a.dtype != np.float32:
                    raise TypeError(f"state[{i}][{name!r}] must be a float32 array of one "
                                    f"number (torch keeps it in float32), got {_describe(a)}")
        if resets:
            fresh, fresh_masters = _layout.state_arrays(
                [current.params[i] for i in resets],
                [tuple(a is not None for a in arrays[i]) for i in resets],
                _kernels.state_dtype_of(self.state_dtype), self._kind)
            started = self._new_scalars(len(resets))
            self._start(fresh, started, [self.param_groups[self._group_of[i]] for i in resets])
            for j, i in enumerate(resets):
                arrays[i], masters[i] = fresh[j], fresh_masters[j]
                if names:
                    scalars[i] = started[j]
        current.hold("step()")
        try:
            fused = _kernels.FusedStep(self._kind.native, current.params, self._group_of,
                                       len(self.param_groups), arrays, masters, self._steps,
                                       state_dtype=self.state_dtype,
                                       state_rounding=self.state_rounding, seed=self.seed,
                                       scalars=scalars if names else None,
                                       sr_keys=self._sr_keys)
            # Checked: commit.
            for i in resets:
                values = {name: arr for name, arr in zip(self._slot_names, arrays[i])
                          if arr is not None}
                values.update(zip(names, scalars[i] or ()))
                master = masters[i]
                if master is not None:
                    _kernels._convert(current.params[i], master)
                    values["master_param"] = master
                dict.update(state[i], values)
                self._steps[i] = 0
            tracked = state if type(state) is _state.StateList else _state.StateList(state)
            self._commit(fused, tracked, self._steps)
        finally:
            current.release()

    def _with_defaults(self, group: dict[str, Any]) -> dict[str, Any]:
        group = {**self.defaults, **group}
        for h in self._kind.hypers:
            if h.kind == "pair" and isinstance(group.get(h.name), list):
                group[h.name] = tuple(group[h.name])
        return group

    def _build(self, groups: list[dict[str, Any]],
               slots: list[tuple[bool, bool, bool]] | None = None,
               config: tuple[str | None, str, int] | None = None,
               ) -> tuple[_kernels.FusedStep, _state.StateList,
                          np.ndarray[Any, np.dtype[np.int64]]]:
        """Zeroed state (the state arrays each group has are `slots`, by
        default as its options ask; `config` the low-precision options, by
        default this optimizer's), the native step over it and `groups`,
        and the step counts.  Raises (and builds nothing) on a bad
        parameter or hyperparameter."""
        flat, group_of = [], []
        for gi, group in enumerate(groups):
            flat.extend(group["params"])
            group_of.extend([gi] * len(group["params"]))
        if not flat:
            raise ValueError("optimizer got an empty parameter list")
        if slots is None:
            slots = [self._slots(g) for g in groups]
        if config is None:
            config = (self.state_dtype, self.state_rounding, self.seed)
        states, masters = _layout.state_arrays(flat, [slots[g] for g in group_of],
                                               _kernels.state_dtype_of(config[0]), self._kind)
        steps = np.zeros(len(flat), np.int64)
        scalars = self._new_scalars(len(flat))
        self._group_of = group_of
        fused = _kernels.FusedStep(self._kind.native, flat, group_of, len(groups), states,
                                   masters, steps, state_dtype=config[0],
                                   state_rounding=config[1], seed=config[2],
                                   scalars=scalars or None,
                                   sr_keys=self._sr_keys)
        # Reject bad hyperparameters now, as PyTorch does, not at the first step.
        fused.check_groups(groups)
        self._start(states, scalars, [groups[g] for g in group_of])
        state = _state.StateList()
        for i, (p, st, master) in enumerate(zip(flat, states, masters)):
            entry = {name: arr for name, arr in zip(self._slot_names, st) if arr is not None}
            if scalars:
                entry.update(zip(self._kind.scalar_names, scalars[i]))
            if master is not None:
                _kernels._convert(p, master)        # exact: float32 holds every 16-bit value
                entry["master_param"] = master
            list.append(state, _state.Entry(state, entry))
        return fused, state, steps

    def _new_scalars(self, n: int) -> list[tuple[FloatArray, ...]]:
        """Per parameter, its numbers besides the arrays (NAdam's mu_product,
        ASGD's eta and mu: one 0-d float32 array each, as torch keeps them)."""
        return [tuple(np.zeros((), np.float32) for _ in self._kind.scalars)
                for _ in range(n)] if self._kind.scalars else []

    def _start(self, states: list[list[Any]], scalars: list[tuple[FloatArray, ...]],
               groups: list[dict[str, Any]]) -> None:
        """Set each parameter's state (of group ``groups[i]``, checked) to what
        it starts at."""
        kind = self._kind
        for i, group in enumerate(groups):
            for arr, slot in zip(states[i], kind.slots):
                if arr is not None and kind.start(slot, group) != 0:
                    arr[...] = kind.start(slot, group)
            for arr, x in zip(scalars[i] if scalars else (), kind.scalars):
                arr[...] = kind.start(x, group)

    @property
    def _slot_names(self) -> tuple[str, ...]:
        """The state arrays, in the native kernel's slot order."""
        return self._kind.slot_names

    def _slots(self, group: dict[str, Any]) -> tuple[bool, bool, bool]:
        """Which of the three native state slots the parameters of `group` need."""
        needs = self._kind.needs(group) + (False,) * 3
        return (needs[0], needs[1], needs[2])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group, as ``torch.optim.Optimizer.add_param_group``.

        `param_group` is a dict with ``"params"`` (an array or a list of
        arrays) and any hyperparameters; the others come from the
        optimizer's defaults.  Its parameters start with zero state and step
        count 0; the existing parameters keep their state values and step
        counts exactly, so training continues as if the group had been in
        the optimizer from the start (skipped until now).  `state_dict` and
        `load_state_dict` then cover the new group.

        Everything is validated first (the arrays, that none of them is
        already a parameter, the hyperparameters): on an error nothing
        changes.  The state arrays are reallocated (the native step keeps
        each state kind in one buffer), so arrays taken from ``opt.state``
        before this call no longer follow the optimizer.
        """
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        (group,) = _as_groups([param_group])
        group = self._with_defaults(group)
        where = {id(p): gi for gi, g in enumerate(self.param_groups) for p in g["params"]}
        for k, p in enumerate(group["params"]):
            if id(p) in where:
                raise ValueError(f"param_group['params'][{k}] is already in "
                                 f"param_groups[{where[id(p)]}]")
        groups = self.param_groups + [group]
        # No step may run meanwhile (its update would be lost in the copy).
        current = self._bound()
        group_of = self._group_of
        current.hold("add_param_group()")
        try:
            try:
                fused, state, steps = self._build(groups)
            except BaseException:
                self._group_of = group_of
                raise
            # Built and checked: carry the existing state over, then commit.
            for old, new in zip(self.state, state):
                for name, arr in old.items():
                    np.copyto(new[name], arr)
            steps[:len(self._steps)] = self._steps
            self._commit(fused, state, steps)
            self.param_groups = groups
        finally:
            current.release()

    def with_params(self, params: Sequence[FloatArray], *,
                    _sr_keys: list[tuple[int, int]] | None = None) -> Self:
        """A fresh optimizer of this class over other arrays, one per parameter.

        It has this optimizer's param groups (the same hyperparameters, as
        they are now, and the same parameters per group, with ``params[i]``
        in place of parameter i) and the same state arrays per parameter,
        zeroed, at step 0.  `fastopt.distributed` builds its per-process
        optimizer this way, over 1-D views of slices of the parameters.

        Parameters
        ----------
        params : sequence of ndarray
            As many as this optimizer has parameters, each of the dtype of
            the one it replaces (any size).
        _sr_keys : list of (int, int), optional
            Private: FusedStep's sr_keys, each array's (parameter index, first element).
        """
        self._bound()
        params = list(params)
        n = sum(len(g["params"]) for g in self.param_groups)
        if len(params) != n:
            raise ValueError(f"expected {n} arrays (one per parameter), got {len(params)}")
        groups: list[dict[str, Any]] = []
        slots: list[tuple[bool, bool, bool]] = []
        i = 0
        for g in self.param_groups:
            k = len(g["params"])
            groups.append({**g, "params": params[i:i + k]})
            # The state arrays this group has, whatever its options say now
            # (FusedStep takes three flags per group, unused slots False).
            if k:
                have = [name in self.state[i] for name in self._slot_names]
                have += [False] * (3 - len(have))
                slots.append((have[0], have[1], have[2]))
            else:
                slots.append(self._slots(g))
            i += k
        new = object.__new__(type(self))
        Optimizer.__init__(new, groups, self.defaults, slots=slots, state_dtype=self.state_dtype,
                           state_rounding=self.state_rounding, seed=self.seed, sr_keys=_sr_keys)
        return new

    # ------------------------------------------------------------------ step

    def step(self, grads: Sequence[FloatArray | None], grad_scale: float | None = None,
             found_inf: bool = False) -> None:
        """Update every parameter in place from `grads` (one per parameter, in
        order; None skips a parameter).  Everything is validated first: on an
        error nothing is updated.

        A gradient has the parameter's dtype, or float32 for a float16 or
        bfloat16 parameter.  With `grad_scale` (a finite number > 0) the
        gradients are multiplied by ``1/grad_scale`` (rounded to float32,
        float64 for float64 parameters) as they are read; they are checked
        first, and if any holds an inf or NaN, nothing changes (parameters,
        state, step counts) and `found_inf` becomes True.

        ``found_inf=True`` (what `unscale_` returned) skips the step: nothing
        changes and `found_inf` becomes True, as a fused ``torch.optim`` step
        given ``found_inf``.  With `grad_scale` and `unscale_` this is the
        whole interface `fastopt.GradScaler` uses.
        """
        fused = self._bound()
        if found_inf:
            fused.found_inf = True
            return
        fused.step(grads, self.param_groups, grad_scale)

    def unscale_(self, grads: Sequence[FloatArray | None], grad_scale: float) -> bool:
        """Multiply `grads` (as for `step`) by ``1/grad_scale`` in place, in their
        own dtypes, and return whether any holds an inf or NaN (checked first,
        in one parallel pass over the same chunks as a step).  Every array
        given must be C-contiguous, aligned, writeable and disjoint from the
        others and from the optimizer's arrays.  `fastopt.GradScaler.unscale_`
        calls it; pass what it returns to ``step(..., found_inf=)``."""
        return bool(self._bound().unscale_(grads, grad_scale))

    @property
    def found_inf(self) -> bool:
        """True if the last `step` with a grad_scale found an inf or NaN
        gradient and skipped the update (False after any other step)."""
        return self._fused.found_inf

    @property
    def state_dtype(self) -> str | None:
        """None (state in the compute dtype) or "bfloat16"."""
        return self._fused.state_dtype

    @property
    def state_rounding(self) -> str:
        """How bfloat16 state is rounded: "stochastic" or "nearest"."""
        return self._fused.state_rounding

    @property
    def seed(self) -> int:
        """Seed of the stochastic rounding of bfloat16 state."""
        return self._fused.seed

    def check_param_groups(self) -> None:
        """Validate every group's hyperparameters now, as `step` does first
        (TypeError/ValueError naming the group and the key)."""
        self._fused.check_groups(self.param_groups)

    @property
    def lr(self) -> float:
        """The learning rate of every group (setting it sets every group's)."""
        lrs = {g["lr"] for g in self.param_groups}
        if len(lrs) != 1:
            raise ValueError("param groups have different learning rates; "
                             "read them from opt.param_groups")
        lr: float = self.param_groups[0]["lr"]
        return lr

    @lr.setter
    def lr(self, value: float) -> None:
        for g in self.param_groups:
            g["lr"] = value

    @property
    def steps(self) -> np.ndarray[Any, np.dtype[np.int64]]:
        """Per-parameter step counts (int64 array, a copy)."""
        return self._steps.copy()

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for gi, g in enumerate(self.param_groups):
            lines.append(f"Parameter Group {gi}")
            for k in sorted(g):
                if k != "params":
                    lines.append(f"    {k}: {g[k]}")
        return "\n".join(lines + [")"])

    # ------------------------------------------------------------ state dict

    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state as a flat dict of NumPy arrays and numbers.

        Arrays are copies.  See the module docstring for the keys; the dict
        saves with ``np.savez(path, **opt.state_dict())``.
        """
        self._bound()
        out: dict[str, Any] = {"optimizer": type(self).__name__}
        index = 0
        for gi, g in enumerate(self.param_groups):
            for k, v in g.items():
                if k == "params":
                    v = np.arange(index, index + len(v), dtype=np.int64)
                    index += len(g["params"])
                elif isinstance(v, tuple) and None in v:    # Adafactor's eps: None as NaN
                    v = np.array([math.nan if x is None else x for x in v])
                out[f"param_groups.{gi}.{k}"] = v
        for i, st in enumerate(self.state):
            out[f"state.{i}.step"] = int(self._steps[i])
            for name, arr in st.items():
                out[f"state.{i}.{name}"] = arr.copy()
        if self.state_dtype is not None:
            out.update(state_dtype=self.state_dtype, state_rounding=self.state_rounding,
                       seed=self.seed)
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state from `state_dict` (as made by `state_dict`, possibly
        through ``np.savez``/``np.load``).  Everything is checked before
        anything changes: a dict for another optimizer type, another number of
        groups or parameters, missing or extra keys, bad hyperparameters,
        state arrays of another shape or dtype (either byte order is fine:
        values are copied), or step counts that are not integers in
        [0, 2**63 - 2] raise ValueError (TypeError if `state_dict` is not a
        mapping) and leave this optimizer as it was."""
        current = self._bound()
        new_groups, steps, staged, rounding = self.check_state_dict(state_dict)
        # All checked: commit (nothing below can fail), with no step running
        # (refused if one is; a step that starts meanwhile is refused).
        current.hold("load_state_dict()")
        try:
            for i, st in enumerate(self.state):
                for name, arr in st.items():
                    np.copyto(arr, staged[f"state.{i}.{name}"])
            self._steps[...] = steps
            current.set_rounding(*rounding)
            current.sync_params()      # float16/bfloat16 parameters from their masters
            for g, new in zip(self.param_groups, new_groups):
                g.clear()
                g.update(new)
        finally:
            current.release()

    def check_state_dict(self, state_dict: Mapping[str, Any]) -> tuple[
            list[dict[str, Any]], np.ndarray[Any, np.dtype[np.int64]], dict[str, FloatArray],
            tuple[str, int]]:
        """Check `state_dict` as `load_state_dict` does, without loading it.

        Returns
        -------
        param_groups : list of dict
            Its param groups, with this optimizer's parameter arrays.
        steps : ndarray of int64
            Its step count per parameter.
        arrays : dict
            Private copies of its state arrays (by key, in this optimizer's
            dtypes and native byte order): what was checked is what loads.
        rounding : tuple
            Its (state_rounding, seed) of bfloat16 state (this optimizer's
            own when it keeps none).
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError("state_dict must be a mapping (a dict as made by state_dict()), "
                            f"got {type(state_dict).__name__}")
        sd = dict(state_dict)
        bad_keys = [k for k in sd if not isinstance(k, str)]
        if bad_keys:
            raise ValueError(f"state dict keys must be strings, got {bad_keys[:5]!r}")
        kind = _scalar(sd.get("optimizer"), "optimizer")
        if kind != type(self).__name__:
            raise ValueError(f"state dict is for optimizer {kind!r}, not {type(self).__name__!r}")
        expected = {"optimizer"}
        rounding = self._load_state_config(sd, expected)
        # Param groups: same number, same parameter indices, same keys.
        none_ok = {h.name: [b.none_ok for b in h.each] for h in self._kind.hypers
                   if h.each is not None and any(b.none_ok for b in h.each)}
        new_groups = []
        index = 0
        for gi, g in enumerate(self.param_groups):
            prefix = f"param_groups.{gi}."
            keys = {k[len(prefix):] for k in sd if k.startswith(prefix)}
            if not keys:
                raise ValueError(f"state dict has no param group {gi} "
                                 f"(this optimizer has {len(self.param_groups)})")
            required = set(self.defaults) | {"params"}
            missing = required - keys
            if missing:
                raise ValueError(f"state dict is missing {sorted(prefix + k for k in missing)}")
            idx = np.asarray(sd[prefix + "params"])
            want = np.arange(index, index + len(g["params"]))
            if idx.shape != want.shape or not np.array_equal(idx, want):
                raise ValueError(f"{prefix}params holds parameters {idx.tolist()} but this "
                                 f"optimizer's group {gi} has parameters {want.tolist()}")
            index += len(g["params"])
            new = {"params": g["params"]}
            for k in keys - {"params"}:
                new[k] = _value(sd[prefix + k], prefix + k)
                if isinstance(new[k], tuple) and k in none_ok:
                    new[k] = tuple(None if isinstance(x, float) and math.isnan(x) and none_ok[k][e]
                                   else x for e, x in enumerate(new[k]))
            new_groups.append(new)
            expected |= {prefix + k for k in keys}
        extra_groups = {k for k in sd if k.startswith("param_groups.") and k not in expected}
        if extra_groups:
            raise ValueError(f"state dict has param groups this optimizer lacks: "
                             f"{sorted(extra_groups)[:5]}")
        self._fused.check_groups(new_groups)
        # Per-parameter state: the same arrays, shapes and dtypes; step counts
        # that a step can still increment.
        steps = np.zeros(len(self.state), dtype=np.int64)
        staged: dict[str, FloatArray] = {}   # private copies: no other thread can reshape them before the commit
        for i, st in enumerate(self.state):
            key = f"state.{i}.step"
            if key not in sd:
                raise ValueError(f"state dict is missing {key!r}")
            steps[i] = _step_count(sd[key], key)
            expected.add(key)
            for name, arr in st.items():
                key = f"state.{i}.{name}"
                if key not in sd:
                    raise ValueError(f"state dict is missing {key!r}")
                v = _stored(sd[key], arr.dtype)
                if (not isinstance(v, np.ndarray) or v.shape != arr.shape
                        or v.dtype.newbyteorder("=") != arr.dtype):
                    raise ValueError(f"{key} must be an array of shape {arr.shape} and dtype "
                                     f"{arr.dtype}, got {_describe(v)}")
                staged[key] = np.array(v, dtype=arr.dtype)
                if staged[key].shape != arr.shape:
                    raise ValueError(f"{key} changed shape while it was loaded")
                expected.add(key)
        extra = set(sd) - expected
        if extra:
            raise ValueError(f"state dict has keys this optimizer lacks: {sorted(extra)[:5]}")
        return new_groups, steps, staged, rounding

    def _load_state_config(self, sd: dict[str, Any], expected: set[str]) -> tuple[str, int]:
        """Check the state dict's state_dtype against this optimizer's; return
        the (state_rounding, seed) to load."""
        saved = _scalar(sd["state_dtype"], "state_dtype") if "state_dtype" in sd else None
        if saved != self.state_dtype:
            raise ValueError(f"state dict has state_dtype {saved!r} but this optimizer keeps "
                             f"state_dtype={self.state_dtype!r}")
        if saved is None:
            return self.state_rounding, self.seed
        for key in ("state_rounding", "seed"):
            if key not in sd:
                raise ValueError(f"state dict is missing {key!r}")
        expected |= {"state_dtype", "state_rounding", "seed"}
        rounding = _scalar(sd["state_rounding"], "state_rounding")
        seed = _scalar(sd["seed"], "seed")
        if rounding not in ("nearest", "stochastic"):
            raise ValueError(f"state_rounding must be 'nearest' or 'stochastic', got {rounding!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) \
                or not 0 <= seed < 2**32:
            raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}")
        return rounding, int(seed)


def _stored(v: Any, dtype: np.dtype[Any]) -> Any:
    """A state array from a state dict as `dtype`: np.load gives bfloat16
    arrays back as raw 2-byte voids (their dtype is not NumPy's own)."""
    if (isinstance(v, np.ndarray) and v.dtype.kind == "V" and v.dtype.fields is None
            and v.dtype.itemsize == dtype.itemsize and dtype.name == "bfloat16"):
        return v.view(dtype)
    return v


# A step count must leave room for the next step to count itself.
_STEP_LIMIT = 2**63 - 2


def _step_count(v: Any, key: str) -> int:
    """A saved step count: an integer (Python, NumPy or 0-d array) in [0, 2**63 - 2]."""
    if isinstance(v, np.ndarray) and v.ndim == 0:
        v = v[()]
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise ValueError(f"{key} must be a non-negative integer, got {_describe(v)}")
    v = int(v)
    if not 0 <= v <= _STEP_LIMIT:
        raise ValueError(f"{key} must be a non-negative integer <= 2**63 - 2, got {v}")
    return v


def _as_groups(params: Any) -> list[dict[str, Any]]:
    """params (arrays or dicts) -> list of group dicts with a "params" list."""
    if isinstance(params, np.ndarray):
        raise TypeError("params must be a list of arrays or of param-group dicts, "
                        "not a single array (wrap it in a list)")
    try:
        params = list(params)
    except TypeError:
        raise TypeError("params must be a list of arrays or of param-group dicts, "
                        f"got {type(params).__name__}") from None
    if not params:
        raise ValueError("optimizer got an empty parameter list")
    if all(isinstance(p, dict) for p in params):
        groups = []
        for gi, g in enumerate(params):
            if "params" not in g:
                raise ValueError(f"param_groups[{gi}] has no 'params'")
            bad = [k for k in g if not isinstance(k, str)]
            if bad:
                raise TypeError(f"param_groups[{gi}] keys must be strings, got {bad[:5]!r}")
            ps = g["params"]
            try:
                ps = [ps] if isinstance(ps, np.ndarray) else list(ps)
            except TypeError:
                raise TypeError(f"param_groups[{gi}]['params'] must be a list of arrays, "
                                f"got {type(ps).__name__}") from None
            groups.append({**g, "params": ps})
        return groups
    if any(isinstance(p, dict) for p in params):
        raise TypeError("params must be all arrays or all param-group dicts")
    return [{"params": params}]


def _shape(s: Any, name: str) -> tuple[int, ...]:
    """A shape: a tuple of non-negative integers."""
    try:
        shape = tuple(int(operator.index(d)) for d in s)
    except TypeError:
        raise TypeError(f"{name} must be an array or a shape (a tuple of integers), "
                        f"got {s!r}") from None
    if any(d < 0 for d in shape):
        raise ValueError(f"{name} must not have negative dimensions, got {shape}")
    return shape


def _scalar(v: Any, key: str) -> Any:
    if v is None:
        raise ValueError(f"state dict has no {key!r}")
    if isinstance(v, np.ndarray):
        if v.ndim != 0:
            raise ValueError(f"{key!r} must be a single value, got {_describe(v)}")
        return v.item()
    return v


def _value(v: Any, key: str) -> Any:
    """A hyperparameter from a state dict (0-d arrays -> numbers, 1-d -> tuples)."""
    if isinstance(v, np.ndarray):
        if v.ndim == 0:
            return v.item()
        if v.ndim == 1:
            return tuple(v.tolist())
        raise ValueError(f"{key} must be a number or a 1-d tuple, got an array of shape {v.shape}")
    if isinstance(v, list):
        return tuple(v)
    return v


def _describe(v: Any) -> str:
    if isinstance(v, np.ndarray):
        return f"an array of shape {v.shape} and dtype {v.dtype}"
    return type(v).__name__


def _check_hypers(kind: _kinds.Kind, values: dict[str, Any]) -> dict[str, Any]:
    """Validate constructor arguments against the ranges `kind` declares
    (PyTorch raises "Invalid ..." at construction too); returns them, pairs
    as tuples."""
    values = dict(values)
    for h in kind.hypers:
        if h.name not in values:
            continue
        v = values[h.name]
        if h.kind == "number":
            _number(h.name, v, h.lo, h.hi, h.closed)
        elif h.kind == "pair":
            if not isinstance(v, (tuple, list)) or len(v) != 2:
                raise TypeError(f"{h.name} must be a tuple of two numbers, got {v!r}")
            for k in range(2):
                b = h.each[k] if h.each is not None else _kinds.Bound(h.lo, h.hi, h.closed)
                if v[k] is None and b.none_ok:
                    continue
                _number(f"{h.name}[{k}]", v[k], b.lo, b.hi, b.closed, b.lo_open)
            values[h.name] = tuple(v)
    return values


def _number(name: str, value: float, lo: float = 0.0, hi: float = math.inf,
            hi_closed: bool = False, lo_open: bool = False) -> float:
    """Validate a constructor argument (PyTorch raises "Invalid ..." here too)."""
    if isinstance(value, (str, bytes, bytearray)) or (
            isinstance(value, np.ndarray) and value.ndim != 0):
        raise TypeError(f"{name} must be a real number, got {_describe(value)}")
    try:
        v = float(value)
    except OverflowError:
        raise ValueError(f"{name} must be finite, got a number too large for a float") from None
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {_describe(value)}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if not ((lo < v or (not lo_open and lo == v)) and (v < hi or (hi_closed and v == hi))):
        low = f"{'>' if lo_open else '>='} {lo:g}"
        rng = (low if hi == math.inf else
               f"{'<=' if hi_closed else '<'} {hi:g}" if lo == -math.inf else
               f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{']' if hi_closed else ')'}")
        raise ValueError(f"{name} must be {rng}, got {value!r}")
    return value


class SGD(Optimizer):
    """Stochastic gradient descent with momentum, as ``torch.optim.SGD``.

    With g the gradient (negated if `maximize`)::

        g += weight_decay * param
        b = g                                    (momentum > 0, first update)
        b = momentum * b + (1 - dampening) * g   (momentum > 0, later updates)
        g = g + momentum * b if nesterov else b
        param -= lr * g

    The course's Momentum ``v = beta*v + (1 - beta)*dW`` is
    ``momentum=beta, dampening=beta`` (apart from the first update, where
    PyTorch and fastopt set ``b = g``).  ``state[i]["momentum_buffer"]``
    exists when momentum > 0 at construction; the step count of SGD counts
    momentum updates (0: the next one initializes the buffer).
    """

    _kind = _kinds.SGD

    def __init__(self, params: Params, lr: float = 1e-3, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False, *,
                 maximize: bool = False, state_dtype: str | None = None,
                 state_rounding: str = "stochastic", seed: int = 0) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov,
                                      maximize=maximize),
                         state_dtype=state_dtype, state_rounding=state_rounding, seed=seed)



class RMSprop(Optimizer):
    """RMSprop, as ``torch.optim.RMSprop`` (see `fastopt.rmsprop_step`).

    State per parameter: ``square_avg``; ``momentum_buffer`` if momentum > 0
    and ``grad_avg`` if centered (at construction).
    """

    _kind = _kinds.RMSPROP

    def __init__(self, params: Params, lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.0, centered: bool = False, *,
                 maximize: bool = False, state_dtype: str | None = None,
                 state_rounding: str = "stochastic", seed: int = 0) -> None:
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                                      momentum=momentum, centered=centered, maximize=maximize),
                         state_dtype=state_dtype, state_rounding=state_rounding, seed=seed)



class Adam(Optimizer):
    """Adam, as ``torch.optim.Adam`` (see `fastopt.adam_step` for the formulas).

    State per parameter: ``exp_avg``, ``exp_avg_sq`` and, with amsgrad,
    ``max_exp_avg_sq``; bias corrections use the parameter's own step count.
    ``decoupled_weight_decay=True`` is AdamW.
    """

    _kind = _kinds.ADAM

    def __init__(self, params: Params, lr: float = 1e-3,
                 betas: tuple[float, float] | list[float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False, *, maximize: bool = False,
                 decoupled_weight_decay: bool = False, state_dtype: str | None = None,
                 state_rounding: str = "stochastic", seed: int = 0) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps,
                                      weight_decay=weight_decay, amsgrad=amsgrad,
                                      maximize=maximize,
                                      decoupled_weight_decay=decoupled_weight_decay),
                         state_dtype=state_dtype, state_rounding=state_rounding, seed=seed)



class AdamW(Adam):
    """AdamW, as ``torch.optim.AdamW``: Adam with decoupled weight decay
    (``param *= 1 - lr * weight_decay``), default weight_decay 1e-2."""

    _kind = _kinds.ADAMW

    def __init__(self, params: Params, lr: float = 1e-3,
                 betas: tuple[float, float] | list[float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 maximize: bool = False, state_dtype: str | None = None,
                 state_rounding: str = "stochastic", seed: int = 0) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, maximize=maximize, decoupled_weight_decay=True,
                         state_dtype=state_dtype, state_rounding=state_rounding, seed=seed)


# The rest of torch.optim, and Lion: each class is its declaration
# (fastopt._kinds) and torch's constructor; the formulas are those of the
# functional kernels (`fastopt.adagrad_step`...).

class Adagrad(Optimizer):
    """Adagrad, as ``torch.optim.Adagrad`` (see `fastopt.adagrad_step`).

    State per parameter: ``sum``, starting at `initial_accumulator_value`.
    """

    _kind = _kinds.ADAGRAD

    def __init__(self, params: Params, lr: float = 1e-2, lr_decay: float = 0.0,
                 weight_decay: float = 0.0, initial_accumulator_value: float = 0.0,
                 eps: float = 1e-10, *, maximize: bool = False, state_dtype: str | None = None,
                 state_rounding: str = "stochastic", seed: int = 0) -> None:
        super().__init__(params, dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                                      initial_accumulator_value=initial_accumulator_value,
                                      eps=eps, maximize=maximize),
                         state_dtype=state_dtype, state_rounding=state_rounding, seed=seed)


class Adamax(Optimizer):
    """Adamax, as ``torch.optim.Adamax`` (see `fastopt.adamax_step`).

    State per parameter: ``exp_avg``, ``exp_inf``.
    """

    _kind = _kinds.ADAMAX

    def __init__(self, params: Params, lr: float = 2e-3,
                 betas: tuple[float, float] | list[float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, maximize: bool = False,
                 state_dtype: str | None = None, state_rounding: str = "stochastic",
                 seed: int = 0) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      maximize=maximize),
                         state_dtype=state_dtype, state_rounding=state_rounding, seed=seed)


class NAdam(Optimizer):
    """NAdam, as ``torch.optim.NAdam`` (see `fastopt.nadam_step`).

    State per parameter: ``exp_avg``, ``exp_avg_sq`` and ``mu_product`` (a
    0-d float32 array, as torch keeps it).
    """

    _kind = _kinds.NADAM

    def __init__(self, params: Params, lr: float = 2e-3,
                 betas: tuple[float, float] | list[float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum_decay: float = 4e-3,
                 decoupled_weight_decay: bool = False, *, maximize: bool = False,
                 state_dtype: str | None = None, state_rounding: str = "stochastic",
                 seed: int = 0) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      momentum_decay=momentum_decay,
                                      decoupled_weight_decay=decoupled_weight_decay,
                                      maximize=maximize),
                         state_dtype=state_dtype, state_rounding=state_rounding, seed=seed)


class RAdam(Optimizer):
    """RAdam, as ``torch.optim.RAdam`` (see `fastopt.radam_step`).

    State per parameter: ``exp_avg``, ``exp_avg_sq``.
    """

    _kind = _kinds.RADAM

    def __init__(self, params: Params, lr: float = 1e-3,
                 betas: tuple[float, float] | list[float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, decoupled_weight_decay: bool = False, *,
                 maximize: bool = False, state_dtype: str | None = None,
                 state_rounding: str = "stochastic", seed: int = 0) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      decoupled_weight_decay=decoupled_weight_decay,
                                      maximize=maximize),
                         state_dtype=state_dtype, state_rounding=state_rounding, seed=seed)


class Adadelta(Optimizer):
    """Adadelta, as ``torch.optim.Adadelta`` (see `fastopt.adadelta_step`).

    State per parameter: ``square_avg``, ``acc_delta``.
    """

    _kind = _kinds.ADADELTA

    def __init__(self, params: Params, lr: float = 1.0, rho: float = 0.9, eps: float = 1e-6,
                 weight_decay: float = 0.0, *, maximize: bool = False,
                 state_dtype: str | None = None, state_rounding: str = "stochastic",
                 seed: int = 0) -> None:
        super().__init__(params, dict(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay,
                                      maximize=maximize),
                         state_dtype=state_dtype, state_rounding=state_rounding, seed=seed)


class ASGD(Optimizer):
    """Averaged SGD, as ``torch.optim.ASGD`` (see `fastopt.asgd_step`).

    State per parameter: ``ax`` (the average), and ``eta``, ``mu`` (0-d
    float32 arrays, as torch keeps them).  With ``state_dtype="bfloat16"``
    the average is kept in bfloat16 too.
    """

    _kind = _kinds.ASGD

    def __init__(self, params: Params, lr: float = 1e-2, lambd: float = 1e-4,
                 alpha: float = 0.75, t0: float = 1e6, weight_decay: float = 0.0, *,
                 maximize: bool = False, state_dtype: str | None = None,
                 state_rounding: str = "stochastic", seed: int = 0) -> None:
        super().__init__(params, dict(lr=lr, lambd=lambd, alpha=alpha, t0=t0,
                                      weight_decay=weight_decay, maximize=maximize),
                         state_dtype=state_dtype, state_rounding=state_rounding, seed=seed)


class Rprop(Optimizer):
    """Rprop, as ``torch.optim.Rprop`` (see `fastopt.rprop_step`).

    State per parameter: ``prev`` (the last gradient) and ``step_size``
    (starting at `lr`).  With ``state_dtype="bfloat16"`` both are bfloat16:
    the step sizes then keep 3 significant digits and drift from float32
    state's over many steps (tens of percent after 100); use float32 state
    where Rprop's step sizes matter.
    """

    _kind = _kinds.RPROP

    def __init__(self, params: Params, lr: float = 1e-2,
                 etas: tuple[float, float] | list[float] = (0.5, 1.2),
                 step_sizes: tuple[float, float] | list[float] = (1e-6, 50), *,
                 maximize: bool = False, state_dtype: str | None = None,
                 state_rounding: str = "stochastic", seed: int = 0) -> None:
        super().__init__(params, dict(lr=lr, etas=etas, step_sizes=step_sizes,
                                      maximize=maximize),
                         state_dtype=state_dtype, state_rounding=state_rounding, seed=seed)


class Lion(Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization
    Algorithms"; optax's ``lion``), see `fastopt.lion_step`.  Not in
    torch.optim.

    State per parameter: ``exp_avg``, half of Adam's state.
    """

    _kind = _kinds.LION

    def __init__(self, params: Params, lr: float = 1e-4,
                 betas: tuple[float, float] | list[float] = (0.9, 0.99),
                 weight_decay: float = 0.0, *, maximize: bool = False,
                 state_dtype: str | None = None, state_rounding: str = "stochastic",
                 seed: int = 0) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay,
                                      maximize=maximize),
                         state_dtype=state_dtype, state_rounding=state_rounding, seed=seed)


class Adafactor(Optimizer):
    """Adafactor, as ``torch.optim.Adafactor`` (Shazeer and Stern 2018; see
    `fastopt.adafactor_step`).

    State per parameter: for one of 2 or more dimensions, ``row_var`` and
    ``col_var`` (shapes ``shape[:-1] + (1,)`` and ``shape[:-2] + (1,
    shape[-1])``: a row and a column per matrix of its last two axes,
    8192 floats for a 4096 x 4096 weight instead of Adam's 33.5 M); for a
    0-d or 1-d one, ``variance`` (its shape).  Not elementwise: a step is
    three threaded passes over the whole model (the norms, and the row and
    column sums, in double, in a fixed order: the same bits on any number
    of threads).  ``eps=(None, 1e-3)``: eps[0] None is the machine epsilon
    of the compute dtype (float32 for float16/bfloat16 parameters, which
    have float32 masters).  No ``state_dtype="bfloat16"`` (the factored
    statistics are already a small fraction of the parameters).  In
    `state_dict`, eps[0] None is saved as NaN (so that the dict saves with
    ``np.savez`` without pickling) and loads back as None.
    """

    _kind = _kinds.ADAFACTOR

    def __init__(self, params: Params, lr: float = 1e-2, beta2_decay: float = -0.8,
                 eps: tuple[float | None, float] | list[float | None] = (None, 1e-3),
                 d: float = 1.0, weight_decay: float = 0.0, *, maximize: bool = False,
                 state_dtype: str | None = None, state_rounding: str = "stochastic",
                 seed: int = 0) -> None:
        super().__init__(params, dict(lr=lr, beta2_decay=beta2_decay, eps=eps, d=d,
                                      weight_decay=weight_decay, maximize=maximize),
                         state_dtype=state_dtype, state_rounding=state_rounding, seed=seed)
