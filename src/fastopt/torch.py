"""fastopt for PyTorch: drop-in optimizers and autograd functions for CPU training.

Change one import::

    import fastopt.torch as fo

    opt = fo.Adam(model.parameters(), lr=1e-3)     # was torch.optim.Adam
    for x, y in loader:
        opt.zero_grad()
        loss = fo.cross_entropy(model(x), y)        # was F.cross_entropy
        loss.backward()
        opt.step()

* `Adam`, `AdamW`, `SGD`, `RMSprop`, `Adagrad`, `Adamax`, `NAdam`,
  `RAdam`, `Adadelta`, `ASGD`, `Rprop`, `Adafactor` subclass their
  ``torch.optim`` classes (so they are ``torch.optim.Optimizer`` s, with the
  same constructor arguments, defaults, param groups, hooks,
  ``state_dict`` format and ``lr_scheduler`` support) but run ``step()``
  as one native call over every parameter: fastopt's fused step
  (`FusedStep`, the same as `fastopt.Adam`...), on the tensors' own
  memory.  `Lion` (not in ``torch.optim``) is a ``torch.optim.Optimizer``
  of the same kind.
* `cross_entropy`, `batch_norm` (and the `BatchNorm1d`, `BatchNorm2d`
  modules) are ``torch.autograd.Function`` s over fastopt's kernels with the
  signatures, shape rules, errors and gradients of ``torch.nn.functional``,
  on float32, float64, float16 and bfloat16 tensors.

This module is the only one in fastopt that imports torch.

How an optimizer step reads the tensors
---------------------------------------
Every parameter must be a float32, float64, float16 or bfloat16 CPU tensor
whose elements fill one block of memory in some order of dimensions
(contiguous, channels_last or any other permutation): the update is
elementwise, so it runs over that block in memory order, and each state
tensor is laid out exactly like its parameter.  `Adafactor`'s is not: it
factors each parameter's last two dimensions, so its parameters must be
contiguous (row-major), and its ``row_var`` and ``col_var`` have the shapes
torch gives them.  At each step a C loop
(`fastopt._tensors.GradReader`) reads every ``p.grad`` through DLPack's C
exchange API (data address, device, dtype, shape and strides in one call per
tensor) and checks it against its parameter; a gradient with other strides
(or a lazily negated view) is first copied into the parameter's layout; a
gradient or parameter that no longer lies within its storage
(``untyped_storage().resize_()``) raises.  Then one `FusedStep` call updates
everything with the GIL released, holding every gradient it read (another
thread may replace ``p.grad`` meanwhile), and the parameters' autograd
version counters are bumped, so a parameter modified between a forward and
its backward raises in backward, as with ``torch.optim``.

State
-----
The optimizer owns its state in torch's form: ``opt.state[p]`` holds torch
tensors (``"step"`` a 0-d float tensor, ``"exp_avg"``... with the
parameter's shape and strides), created at a parameter's first update as
torch does (their memory is allocated at construction, one buffer per kind
of state for all parameters), and the native step is bound to the memory of
those tensors.  ``opt.state`` is what the next step uses: it counts its
edits, and a step that sees a count it has not seen binds the native step
again to what the state holds: a cleared or removed
entry restarts from zero state and step 0 in new tensors, an assigned
tensor is used in place (or, laid out unlike its parameter, copied into one
laid out like it, which replaces it).  ``state_dict()`` returns references
to the live tensors, as torch does (deep-copy it to keep a snapshot), in
plain dicts; ``load_state_dict`` copies a checkpoint into fresh state (so a
``torch.optim.Adam`` checkpoint loads into `Adam` and the other way).

A float16/bfloat16 parameter is updated through a float32 master,
``state["master_param"]``, which the step updates and rounds into the
parameter; a parameter changed in place between steps (its version counter
moved) gives its values to its master first.  ``split_master=True`` keeps a
bfloat16 parameter's master split instead: the parameter holds its high 16
bits, ``state["master_low_bits"]`` (int16) the low ones.  ``state_dtype="bfloat16"``
keeps the state in bfloat16, as in the NumPy API.

Param groups may be edited between steps as with torch: hyperparameters,
``add_param_group``, turning on an option that needs a state tensor
(amsgrad, momentum, centered: it starts at zero, or for SGD's momentum
buffer at the first gradient, as torch does), even replacing a parameter's
data (``p.data = ...``); any of these rebuilds the native state, keeping
the values.  ``add_param_group`` and ``load_state_dict`` while another
thread is inside ``step()`` (and a step during either) raise RuntimeError;
a child forked during a step starts with its optimizers idle.  ``foreach``
and ``fused`` are accepted and kept in the groups for compatibility; the
step is always the fused one.  ``capturable=True`` raises at the step, as
torch.optim does for CPU tensors.  ``differentiable=True`` is not supported.
torch's ``GradScaler`` hands the step its scale and inf flag (the fused
contract, ``_step_supports_amp_scaling``).

Bad input raises TypeError/ValueError naming the parameter
(``param_groups[0]['params'][3]``) and changes nothing: a parameter or
gradient that is not a CPU tensor, sparse, complex, of an integer dtype,
not dense, overlapping another parameter in memory (a parameter listed
twice raises too, where torch.optim warns).  Do not let another thread
resize the storage of, or re-point (``set_``, ``.data =``), a gradient
while ``step()`` runs: the step holds the gradient tensors, not their
memory.
"""
import collections
import inspect
import math
import os
import re
import threading
import weakref
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.optim.optimizer as _torch_optimizer

from . import _kinds, _layout, _state, _tensors
from . import _batchnorm as _bn_kernels
from . import _optim as _optim_kernels
from . import _softmax as _softmax_kernels

__all__ = ["Adam", "AdamW", "SGD", "RMSprop", "Adagrad", "Adamax", "NAdam", "RAdam", "Adadelta",
           "ASGD", "Rprop", "Lion", "Adafactor", "cross_entropy", "batch_norm", "BatchNorm1d",
           "BatchNorm2d"]

# torch.optim's registries of hooks for all optimizers (the wrapped step is
# used whenever any hook is registered or the profiler runs).
_GLOBAL_PRE_HOOKS = getattr(_torch_optimizer, "_global_optimizer_pre_hooks", None)
_GLOBAL_POST_HOOKS = getattr(_torch_optimizer, "_global_optimizer_post_hooks", None)
_FLOAT_DTYPES = (torch.float32, torch.float64)
# Read tensors through DLPack's C exchange API where torch has it (tests
# switch it off to check the Python-attribute path older torch versions take).
_USE_EXCHANGE_API = True
# Every live optimizer of this module, for the fork handler below.
_LIVE: "weakref.WeakSet[_Fused]" = weakref.WeakSet()


def _after_fork_in_child():
    """A child forked while another thread was inside a step (or
    add_param_group, load_state_dict) has no such thread: its optimizers start
    idle.  (Their native steps are idle in the child too: fastopt._optim's
    own fork handler.)"""
    for opt in list(_LIVE):
        if opt._lock.locked():
            opt._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _step_dtype():
    """torch.optim's dtype for state["step"] (_get_scalar_dtype)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _memory_order_view(p):
    """A 1-d ndarray over the block of memory holding `p`'s elements, in memory
    order (p has already been checked to be dense and non-overlapping);
    bfloat16 as ml_dtypes.bfloat16."""
    return _numpy(p.detach().as_strided((p.numel(),), (1,)))


def _is_dense(p):
    """Whether p's elements fill one block of memory (some order of dimensions)."""
    dims = sorted((st, sz) for sz, st in zip(p.shape, p.stride()) if sz != 1)
    if p.numel() == 0:
        return True
    expected = 1
    for st, sz in dims:
        if st != expected:
            return False
        expected *= sz
    return True


class _Fused:
    """The fastopt half of `Adam`, `AdamW`, `SGD`, `RMSprop` (mixed in before
    the torch.optim class): native step, zero_grad, param-group and
    state-dict handling.

    The optimizer owns its state in torch's form, ``self.state``; the
    native step (`FusedStep`) is built over the memory of the tensors it
    holds.  Per parameter it keeps what the native step is bound to
    (`_bound`: torch's state names -> tensors); a step first compares, in
    O(1), whether ``self.state`` was edited since, and if so binds the
    native step to what it holds now (`_sync_state`)."""

    _decl: _kinds.Kind          # what the optimizer is (fastopt._kinds); from it:
    _kind: str | None = None    # FusedStep kind
    _slot_names: tuple[str | None, ...] = ()    # FusedStep's state slots, in torch's names
    _counts_steps = True        # torch keeps state["step"] (Adam, RMSprop)
    _required: tuple[str, ...] = ()     # state every stepped parameter has (besides "step")
    _shaped = False             # some state is shaped by the parameter's dimensions (Adafactor)
    _torch_base: type           # the torch.optim class, bound when the class is made
    _has_capturable = True      # the torch class takes capturable=

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        decl = cls.__dict__.get("_decl")
        if decl is not None:
            cls._kind = decl.native
            cls._slot_names = decl.slot_names + (None,) * (3 - len(decl.slots))
            cls._counts_steps = decl.steps_with is None
            cls._required = tuple(s.name for s in decl.slots if s.option is None)
            cls._shaped = decl.shaped

    def __new__(cls, *args, **kwargs):
        # The lock exists before torch's __init__ calls add_param_group, and
        # for copies made by pickle and deepcopy (which skip __init__).
        self = super().__new__(cls)
        self._lock = threading.Lock()
        self._lowp = (None, "stochastic", 0)
        self._split = False
        self._uncast = None
        _LIVE.add(self)
        return self

    def _slots(self, group):
        """Which of FusedStep's three state slots the parameters of `group` need."""
        return (self._decl.needs(group) + (False,) * 3)[:3]

    def _exclusive(self, what):
        """Hold the optimizer's lock for `what`; refused while another thread
        steps (or changes) this optimizer, as FusedStep refuses it."""
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(f"{what} called during a step of the same optimizer "
                               "(or another change to it) in another thread")
        return _Release(self._lock)

    def _init_fused(self, state_dtype, state_rounding, seed, split_master=False, **group_keys):
        # Keys that older torch versions do not put in the groups (Adam's
        # decoupled_weight_decay): FusedStep reads them.
        for key, value in group_keys.items():
            self.defaults.setdefault(key, value)
            for g in self.param_groups:
                g.setdefault(key, value)
        if self.defaults.get("differentiable"):
            raise ValueError(f"fastopt.torch.{type(self).__name__} does not support "
                             "differentiable=True (autograd through the step)")
        _optim_kernels.check_low_precision(state_dtype, state_rounding, seed, self._decl,
                                           split_master)
        self._lowp = (state_dtype, state_rounding, seed)
        self._split = bool(split_master)
        # torch's GradScaler hands the scale and its inf check to the step
        # (read as the gradients are, nothing written to them).
        self._step_supports_amp_scaling = True
        self._rebuild()

    @property
    def state_dtype(self):
        """None (state in the compute dtype) or "bfloat16"."""
        return self._lowp[0]

    @property
    def state_rounding(self):
        """How bfloat16 state is rounded: "stochastic" or "nearest"."""
        return self._lowp[1]

    @property
    def seed(self):
        """Seed of the stochastic rounding of bfloat16 state."""
        return self._lowp[2]

    # ------------------------------------------------------------- building

    def _layout(self):
        """The parameters of the param groups (checked), their names, groups
        and memory-order ndarray views, and their reader."""
        params, names, group_of = [], [], []
        for gi, g in enumerate(self.param_groups):
            for k, p in enumerate(g["params"]):
                params.append(p)
                names.append(f"param_groups[{gi}]['params'][{k}]")
                group_of.append(gi)
        _check_params(params, names)
        if self._shaped:
            for p, name in zip(params, names):
                if not p.is_contiguous():
                    raise ValueError(
                        f"{name} (shape {tuple(p.shape)}, strides {p.stride()}) is not "
                        f"contiguous: {type(self).__name__}'s state factors a parameter's last "
                        "two dimensions, so it updates contiguous (row-major) parameters only "
                        "(a channels_last weight: keep it in torch.contiguous_format)")
        # Checks that each parameter lies within its storage (before a view of it is made).
        reader = _tensors.GradReader(params, names, torch.Tensor, _USE_EXCHANGE_API)
        return params, names, group_of, [self._param_view(p) for p in params], reader

    def _param_view(self, p):
        """Parameter p as the native step takes it: a 1-d ndarray over its
        memory in memory order (an elementwise update runs over it whatever
        the layout), or, for a kind whose state is shaped by the parameter's
        dimensions (Adafactor's), the same in p's shape (p is contiguous)."""
        view = _memory_order_view(p)
        return view.reshape(tuple(p.shape)) if self._shaped else view

    def _state_view(self, arr, p):
        """A torch tensor over state array `arr` of parameter p (a split
        master's uint16 low bits as int16, the dtype torch computes with):
        an elementwise kind's array (p's memory order) shaped and strided
        like p; a shaped kind's array (row-major, in the shape its slot
        gives) as it is."""
        if arr.dtype == np.uint16:
            arr = arr.view(np.int16)
        t = _from_numpy(arr)
        return t if self._shaped else t.as_strided(p.shape, p.stride())

    def _slot_shapes(self, p, slots):
        """{k: shape} of the native state slots parameter p has when its group
        needs `slots`: those of the group's options that p's shape has
        (`fastopt._kinds.Slot.shape_for`), in the shape the declaration
        gives (p's own; Adafactor's: factors of its last two dimensions)."""
        shape = tuple(p.shape)
        shapes = {}
        for k, (slot, needed) in enumerate(zip(self._decl.slots, slots)):
            if needed and slot.shape_for(shape) is not None:
                shapes[k] = slot.shape_for(shape)
        return shapes

    def _rebuild(self):
        """(Re)make everything for the current param groups: fresh state
        arrays holding the values in `self.state` (ours or loaded), the
        native step over them.  Checks everything first."""
        groups = self.param_groups
        params, names, group_of, views, reader = self._layout()
        slots = [tuple(self._slots(g)) for g in groups]
        n = len(params)
        sdt = _optim_kernels.state_dtype_of(self._lowp[0])
        arrays, masters = _layout.state_arrays(views, [slots[g] for g in group_of], sdt,
                                               self._decl)
        masters = [self._split_master(p, m) for p, m in zip(params, masters)]
        steps = torch.zeros(n, dtype=_step_dtype()) if self._counts_steps else None
        counts = np.zeros(n, np.int64)          # SGD: momentum updates (torch keeps none)
        step_arrays = list(steps.numpy().reshape(n, 1)) if steps is not None else list(
            counts.reshape(n, 1))
        scalars = [self._new_scalars() for _ in range(n)]
        scalar_arrays = [tuple(_one(t) for t in sc) for sc in scalars]
        # Validate the carried-over state before changing anything.
        carried = {}
        for i, p in enumerate(params):
            old = dict.get(self.state, p)
            if old:
                carried[i] = self._check_state(old, p, names[i], slots[group_of[i]])
        fused = self._native(views, group_of, arrays, masters, step_arrays, scalar_arrays, names)
        fused.check_groups(groups)
        # Stage: the carried values into the fresh arrays (nothing visible yet).
        bound = [None] * n
        new_state = _state.StateMap()
        for i, p in enumerate(params):
            self._start(arrays[i], scalars[i], groups[group_of[i]])
            entry = self._tensors_of(i, p, arrays[i], masters[i],
                                     steps[i] if steps is not None else None, scalars[i])
            bound[i] = entry
            values = carried.get(i)
            if masters[i] is not None:
                _load_master(masters[i], views[i], values or {}, p)
            if values is None:
                continue
            if steps is not None:
                steps[i] = values.pop("step")
            if "momentum_buffer" in values and "momentum_buffer" in entry:
                counts[i] = 1           # SGD: the buffer exists, the next step uses it
            for name in [k for k in values if k in entry]:
                if name in self._decl.scalar_names:
                    entry[name].fill_(values.pop(name))
                else:
                    _copy_in(entry[name], values.pop(name))
            shown = dict(entry)
            if not self._counts_steps and counts[i] == 0:
                shown.pop("momentum_buffer", None)
            shown.update(values)            # keys fastopt does not use, kept as they are
            dict.__setitem__(new_state, p, _state.Entry(new_state, shown))
        reader.mark_seen(list(carried))
        # Commit.
        self._fused = fused
        self._reader = reader
        self._params = params
        self._names = names
        self._group_of = group_of
        self._views = views
        self._built_slots = slots
        self._arrays, self._masters, self._step_arrays = arrays, masters, step_arrays
        self._scalar_arrays = scalar_arrays
        self._steps, self._counts = steps, counts
        self._bound = bound
        self._half = [i for i in range(n) if masters[i] is not None]
        self._versions = [params[i]._version for i in self._half]
        self.state = new_state
        self._edits_seen = new_state.edits

    def _native(self, views, group_of, arrays, masters, step_arrays, scalar_arrays, names):
        state_dtype, rounding, seed = self._lowp
        return _optim_kernels.FusedStep(self._kind, views, group_of, len(self.param_groups),
                                        arrays, masters, step_arrays, names=names,
                                        state_dtype=state_dtype, state_rounding=rounding,
                                        seed=seed,
                                        scalars=scalar_arrays if self._decl.scalars else None)

    def _new_scalars(self):
        """A parameter's numbers besides its arrays (NAdam's mu_product, ASGD's
        eta and mu): 0-d tensors of torch's scalar dtype, as torch keeps them."""
        return tuple(torch.zeros((), dtype=_step_dtype()) for _ in self._decl.scalars)

    def _start(self, arrays, scalars, group):
        """A parameter's fresh state (of `group`, checked) set to what it starts at."""
        decl = self._decl
        for arr, slot in zip(arrays, decl.slots):
            if arr is not None and decl.start(slot, group) != 0:
                arr[...] = decl.start(slot, group)
        for t, x in zip(scalars, decl.scalars):
            t.fill_(decl.start(x, group))

    def _tensors_of(self, i, p, arrays, master, step, scalars=()):
        """torch's state names -> tensors over parameter i's arrays (shaped and
        strided like p) and numbers."""
        entry = {} if step is None else {"step": step}
        entry.update(zip(self._decl.scalar_names, scalars))
        for k, name in enumerate(self._slot_names):
            if name is not None and arrays[k] is not None:
                entry[name] = self._state_view(arrays[k], p)
        if master is not None:
            entry[_master_key(master)] = self._state_view(master, p)
        return entry

    def _split_master(self, p, master):
        """With split_master, a bfloat16 parameter's master: the uint16 low bits."""
        if master is None or not self._split or p.dtype != torch.bfloat16:
            return master
        return _layout.aligned_views([master.shape], [np.uint16])[1][0]

    def _check_state(self, old, p, name, slots):
        """The state values of one parameter to carry over, checked: {key: value}."""
        if not isinstance(old, dict):
            raise TypeError(f"the state of {name} must be a dict, got {type(old).__name__}")
        values = {k: v for k, v in old.items() if v is not None}    # torch's SGD may store None
        uncast = self._uncast.get(id(p)) if self._uncast else None
        if uncast:                  # load_state_dict: the tensors before torch cast them
            values.update((k, v) for k, v in uncast.items() if k in values)
        if self._counts_steps:
            if "step" not in values:
                raise ValueError(f"the state of {name} has no 'step'")
            values["step"] = _step_value(values["step"], name)
        # The state tensors p has (by its group's options and its shape), their shapes.
        shapes = {self._slot_names[k]: shape for k, shape in self._slot_shapes(p, slots).items()}
        required = [key for key in shapes if key in self._required]
        for key in required + list(self._decl.scalar_names):
            if key not in values:
                raise ValueError(f"the state of {name} has no {key!r}")
        for key in self._decl.scalar_names:
            values[key] = _number_value(values[key], key, name)
        if p.dtype in _HALF_DTYPES:
            shapes["master_param"] = tuple(p.shape)
        shapes["master_low_bits"] = tuple(p.shape)
        for key, shape in shapes.items():
            if key not in values:
                continue
            v = values[key]
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"state[{key!r}] of {name} must be a tensor, got "
                                f"{type(v).__name__}")
            if tuple(v.shape) != shape:
                raise _wrong_shape(f"state[{key!r}] of {name}", v, shape, p)
            if v.is_floating_point() != (key != "master_low_bits") or (
                    key == "master_low_bits" and v.dtype != torch.int16):
                raise TypeError(f"state[{key!r}] of {name} has dtype {v.dtype}")
        return values

    # -------------------------------------------------------- state edits

    def _sync_state(self):
        """``self.state`` was edited (or replaced) since the native step was
        bound to it: bind it to what the state holds now, as torch.optim
        reads its state at each step.  A parameter whose entry was cleared or
        removed starts again from zero state and step 0 in fresh tensors (the
        old ones are left as they are); a tensor assigned to an entry is
        used in place if it is laid out like the parameter, else its values
        are copied into a new tensor so laid out, which replaces it in the
        entry.  Everything is checked first: on an error nothing changes."""
        state = self.state
        if not isinstance(state, dict):
            raise TypeError(f"optimizer.state must be a dict, got {type(state).__name__}")
        plans = {}
        for i, p in enumerate(self._params):
            plan = self._plan(i, p, dict.get(state, p))
            if plan is not None:
                plans[i] = plan
        if plans:
            arrays = [list(a) for a in self._arrays]
            masters = list(self._masters)
            step_arrays = list(self._step_arrays)
            scalar_arrays = list(self._scalar_arrays)
            for i, plan in plans.items():
                for k, name in enumerate(self._slot_names):
                    if name in plan["use"]:
                        arrays[i][k] = plan["use"][name][1]
                key = _master_key(self._masters[i]) if self._masters[i] is not None else None
                if key in plan["use"]:
                    masters[i] = plan["use"][key][1]
                if "step" in plan["use"]:
                    step_arrays[i] = plan["use"]["step"][1]
                scalar_arrays[i] = tuple(plan["use"][k][1] if k in plan["use"] else a for k, a in
                                         zip(self._decl.scalar_names, scalar_arrays[i]))
            fused = self._native(self._views, self._group_of, arrays, masters, step_arrays,
                                 scalar_arrays, self._names)
            # Checked: commit.
            for i, plan in plans.items():
                p = self._params[i]
                bound = dict(self._bound[i])
                for name, (tensor, arr, entry_value) in plan["use"].items():
                    bound[name] = tensor
                    if entry_value is not None:
                        dict.__setitem__(dict.get(state, p), name, entry_value)
                if plan["widen"]:
                    _widen_into(masters[i], self._views[i])
                if plan["count"] is not None:
                    self._counts[i] = plan["count"]
                if plan["reset"]:
                    self._reader.mark_unseen([i])
                else:
                    self._reader.mark_seen([i])
                self._bound[i] = bound
            self._fused = fused
            self._arrays, self._masters, self._step_arrays = arrays, masters, step_arrays
            self._scalar_arrays = scalar_arrays
        if type(state) is not _state.StateMap:
            self.state = _state.StateMap(state.items())
        self._edits_seen = self.state.edits

    def _plan(self, i, p, entry):
        """What parameter i's native state must become for `entry` (its
        ``state[p]`` now), checked; None if it is what the step is bound to.

        Returns {"use": {name: (tensor, its array, value to put in the entry
        or None)}, "reset": bool, "widen":
        bool (the master from the parameter), "count": SGD's new count or
        None}."""
        name_i = self._names[i]
        bound = self._bound[i]
        gi = self._group_of[i]
        slots = self._built_slots[gi]
        plan = {"use": {}, "reset": False, "widen": False, "count": None}
        half = self._masters[i] is not None
        if not entry:
            if entry is not None and not isinstance(entry, dict):
                raise TypeError(f"the state of {name_i} must be a dict, got "
                                f"{type(entry).__name__}")
            if not self._reader.is_seen(i):
                return None             # no state yet, and none shown
            # Reset: fresh zero state and step 0, as torch's lazy init.
            fresh, fresh_master = _layout.state_arrays(
                [self._views[i]], [slots], _optim_kernels.state_dtype_of(self._lowp[0]),
                self._decl)
            for k, key in enumerate(self._slot_names):
                if key is not None and fresh[0][k] is not None:
                    plan["use"][key] = (self._state_view(fresh[0][k], p), fresh[0][k], None)
            if half:
                m = self._split_master(p, fresh_master[0])
                plan["use"][_master_key(m)] = (self._state_view(m, p), m, None)
            if self._counts_steps:
                step = torch.zeros((), dtype=_step_dtype())
                plan["use"]["step"] = (step, _one(step), None)
            scalars = self._new_scalars()
            self._start(fresh[0], scalars, self.param_groups[gi])
            for key, t in zip(self._decl.scalar_names, scalars):
                plan["use"][key] = (t, _one(t), None)
            plan["reset"] = True
            plan["widen"] = half
            plan["count"] = 0 if not self._counts_steps else None
            return plan
        if not isinstance(entry, dict):
            raise TypeError(f"the state of {name_i} must be a dict, got {type(entry).__name__}")
        if self._counts_steps:
            if "step" not in entry:
                raise ValueError(f"the state of {name_i} has no 'step'")
            v = entry["step"]
            if v is not bound.get("step"):
                plan["use"]["step"] = _adopt_step(v, name_i)
        for key in self._decl.scalar_names:
            v = entry.get(key)
            if v is None:
                raise ValueError(f"the state of {name_i} has no {key!r}")
            if v is not bound.get(key):
                plan["use"][key] = _adopt_number(v, key, name_i)
        for k, shape in self._slot_shapes(p, slots).items():
            key = self._slot_names[k]
            v = entry.get(key)
            if v is not None and v is bound.get(key):
                continue
            if v is None and not self._counts_steps and self._counts[i] == 0:
                continue                # SGD: no momentum buffer yet, as bound
            if v is None:
                if key in self._required or self._counts_steps:
                    raise ValueError(f"the state of {name_i} has no {key!r}")
                # SGD: no momentum buffer yet; the next momentum step sets it
                # to the gradient, as torch's does, in a fresh tensor.
                fresh, _ = _layout.state_arrays([self._views[i]], [slots],
                                                _optim_kernels.state_dtype_of(self._lowp[0]),
                                                self._decl)
                plan["use"][key] = (self._state_view(fresh[0][k], p), fresh[0][k], None)
                plan["count"] = 0
                continue
            dtype = (p.dtype if p.dtype == torch.float64 else
                     torch.bfloat16 if self._lowp[0] is not None else torch.float32)
            plan["use"][key] = _adopt(v, p, dtype, f"state[{key!r}] of {name_i}",
                                      shape if self._shaped else None)
            if not self._counts_steps:
                plan["count"] = 1       # SGD: the next momentum step uses this buffer
        if half:
            key = _master_key(self._masters[i])
            v = entry.get(key)
            if v is None:
                # (a torch.optim checkpoint has none: the master is the parameter)
                fresh, fresh_master = _layout.state_arrays([self._views[i]], [(False,) * 3],
                                                           kind=self._decl)
                m = self._split_master(p, fresh_master[0])
                plan["use"][key] = (self._state_view(m, p), m, self._state_view(m, p))
                plan["widen"] = True
            elif v is not bound.get(key):
                t, arr, value = _adopt(v, p, torch.int16 if key == "master_low_bits" else
                                       torch.float32, f"state[{key!r}] of {name_i}",
                                       tuple(p.shape) if self._shaped else None)
                plan["use"][key] = (t, arr.view(np.uint16) if key == "master_low_bits" else arr,
                                    value)
        if not plan["use"] and self._reader.is_seen(i):
            return None
        return plan

    # ----------------------------------------------------------------- step

    def _hooks_or_profiler(self):
        return bool(self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks
                    or _GLOBAL_PRE_HOOKS is None or _GLOBAL_PRE_HOOKS or _GLOBAL_POST_HOOKS
                    or torch.autograd._profiler_enabled())

    def step(self, closure=None, *, grad_scale=None, found_inf=None):
        """One optimization step over every parameter with a gradient, in one
        native call.

        Parameters
        ----------
        closure : callable, optional
            Re-evaluates the model and returns the loss (run with grad enabled
            before the update).
        grad_scale : tensor or float, optional
            The gradients are divided by it as the step reads them (nothing
            is written to them); torch's ``GradScaler`` passes it as the
            attribute ``grad_scale``.
        found_inf : tensor or float, optional
            Nonzero: skip the update (nothing changes), as torch's fused
            optimizers do; ``GradScaler`` passes it as the attribute
            ``found_inf``.

        Returns
        -------
        The closure's loss, or None.
        """
        if grad_scale is not None or found_inf is not None:
            return self._step(closure, grad_scale, found_inf)
        if self._hooks_or_profiler():
            # torch's wrapper: step pre/post hooks and the profiler's record.
            return self._wrapped_step() if closure is None else self._wrapped_step(closure)
        return self._step(closure)

    # torch.optim.Optimizer wraps the `step` of each subclass in its hook and
    # profiler wrapper (a profiler record per call, ~10 us) unless marked;
    # `step` above uses that wrapper only when a hook is registered or the
    # profiler runs.
    step.hooked = True          # type: ignore[attr-defined]

    def _step(self, closure=None, grad_scale=None, found_inf=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)
        # Two steps at once on one optimizer would read gradients into the
        # same addresses: refused, as FusedStep refuses it (and a step while
        # another thread rebuilds the native state).
        lock = self._lock       # the one acquired is the one released (see _after_fork_in_child)
        if not lock.acquire(blocking=False):
            raise RuntimeError("step() called concurrently with another step(), "
                               "add_param_group() or load_state_dict() of the same optimizer")
        try:
            self._update(grad_scale, found_inf)
        finally:
            lock.release()
        return loss

    def _update(self, grad_scale=None, found_inf=None):
        """The update of one step (the closure has run)."""
        groups = self.param_groups
        if self._has_capturable:
            _refuse_capturable(groups)
        built = self._built_slots
        if (built is None or len(groups) != len(built)
                or any(tuple(self._slots(g)) != s for g, s in zip(groups, built))
                or not self._reader.same_params(groups)):
            self._rebuild()
        state = self.state
        if type(state) is not _state.StateMap or state.edits != self._edits_seen:
            self._sync_state()
        scale = _scalar_arg(grad_scale, "grad_scale")
        skip = found_inf is not None and _scalar_arg(found_inf, "found_inf") != 0
        reader = self._reader
        # `grads` holds every gradient read until the native step is done: it
        # runs without the GIL, and another thread replacing `p.grad` must not
        # free a gradient under it.  (The parameters are held by the reader
        # and by the native step.)
        updated, grads = reader.read()
        if reader.moved is not None:            # p.data was replaced: check it, keep the state
            self._rebuild()
            reader = self._reader
            updated, grads = reader.read()
            if reader.moved is not None:
                raise RuntimeError("parameter data changed while step() read it")
        if skip:
            # torch's fused step made the state of a parameter's first step
            # (step 0) before it skipped.
            if reader.fresh is not None:
                self._expose(reader.fresh)
            return
        if self._half:
            self._refresh_masters()
        keep = _relayout(reader, self._params, grads) if reader.relayout is not None else None
        fused = self._fused
        fused.step_addresses(groups, reader.addr, scale)
        del keep, grads
        if fused.found_inf:
            return
        if updated:
            torch.autograd.graph.increment_version(updated)
            if self._half:
                self._versions = [p._version for p in (self._params[i] for i in self._half)]
        if reader.fresh is not None:
            self._expose(reader.fresh)

    def _refresh_masters(self):
        """A float16/bfloat16 parameter changed in place since the last step
        (``with torch.no_grad(): p.copy_(...)``, ``model.load_state_dict``:
        its version counter moved) takes its master from its new values, so
        the step continues from what the user wrote."""
        versions = self._versions
        for j, i in enumerate(self._half):
            v = self._params[i]._version
            if v != versions[j]:
                _widen_into(self._masters[i], self._views[i])
                versions[j] = v

    def _expose(self, indices):
        """torch's lazy state: after a parameter's first update, its state
        tensors appear in ``self.state``."""
        state = self.state
        for i in indices:
            p = self._params[i]
            entry = dict(self._bound[i])
            if not self._counts_steps and self._counts[i] == 0:
                entry.pop("momentum_buffer", None)      # (SGD without momentum yet)
            if entry:
                state[p].update(entry)
        self._reader.mark_seen(indices)
        self._edits_seen = state.edits

    def zero_grad(self, set_to_none=True):
        """As ``torch.optim.Optimizer.zero_grad``; ``set_to_none=True`` (the
        default) runs as one C loop."""
        if set_to_none and not torch.autograd._profiler_enabled():
            _tensors.clear_grads(self.param_groups)
        else:
            super().zero_grad(set_to_none)

    # ------------------------------------------------------- groups, state

    def add_param_group(self, param_group):
        with self._exclusive("add_param_group()"):
            super().add_param_group(param_group)
            if "_fused" in self.__dict__:
                try:
                    self._rebuild()
                except BaseException:
                    self.param_groups.pop()
                    raise

    def state_dict(self):
        """As ``torch.optim.Optimizer.state_dict`` (references to the live
        tensors; a float16/bfloat16 parameter's float32 master is its
        ``"master_param"``), with ``"fastopt"``: the low-precision options,
        when the state is bfloat16."""
        sd = super().state_dict()
        # Plain dicts (the same tensors), which torch.load(weights_only=True) reads.
        sd["state"] = {k: dict(v) if isinstance(v, dict) else v for k, v in sd["state"].items()}
        if self._lowp[0] is not None:
            sd["fastopt"] = {"state_dtype": self._lowp[0], "state_rounding": self._lowp[1],
                             "seed": self._lowp[2]}
        return sd

    def load_state_dict(self, state_dict):
        """As ``torch.optim.Optimizer.load_state_dict``; everything is checked
        before anything changes (a bad entry raises TypeError/ValueError naming
        the parameter).  float32 state and masters of float16/bfloat16
        parameters load as saved (torch would cast them to the parameter's
        dtype)."""
        with self._exclusive("load_state_dict()"):
            lowp = self._lowp
            if isinstance(state_dict, dict):
                self._uncast = self._check_state_tensors(state_dict)
                config = state_dict.get("fastopt")
                if config is not None:
                    if not isinstance(config, dict):
                        raise TypeError("state_dict['fastopt'] must be a dict")
                    rounding = config.get("state_rounding", lowp[1])
                    seed = config.get("seed", lowp[2])
                    _optim_kernels.check_low_precision(lowp[0], rounding, seed, self._decl)
                    self._lowp = (lowp[0], rounding, seed)
            try:
                super().load_state_dict(state_dict)
            except BaseException:
                self._lowp = lowp
                raise
            finally:
                self._uncast = None

    def _check_state_tensors(self, state_dict):
        """The state tensors of `state_dict` as given, before torch casts them to
        each parameter's dtype: a real floating dtype (torch would drop the
        imaginary part of a complex one, make an integer one a float).
        Returns, by id of parameter, the tensors torch would cast to a 16-bit
        parameter's dtype, to load them as they are."""
        saved = state_dict.get("param_groups")
        entries = state_dict.get("state")
        if not isinstance(saved, list) or not isinstance(entries, dict) or \
                len(saved) != len(self.param_groups):
            return None     # torch's own checks name the mismatch
        names, params = {}, {}
        for gi, (g, sg) in enumerate(zip(self.param_groups, saved)):
            if not isinstance(sg, dict) or len(sg.get("params", ())) != len(g["params"]):
                return None
            for k, pid in enumerate(sg["params"]):
                names[pid] = f"param_groups[{gi}]['params'][{k}]"
                params[pid] = g["params"][k]
        uncast = {}
        for pid, entry in entries.items():
            if pid not in names or not isinstance(entry, dict):
                continue
            for key, v in entry.items():
                if key not in ("step", "master_low_bits") and isinstance(v, torch.Tensor) \
                        and not v.is_floating_point():
                    raise TypeError(f"state[{key!r}] of {names[pid]} has dtype {v.dtype}; "
                                    "state tensors are floating point")
            if params[pid].dtype in _HALF_DTYPES:
                uncast[id(params[pid])] = {k: v for k, v in entry.items()
                                           if k != "step" and isinstance(v, torch.Tensor)}
        return uncast

    def __getstate__(self):
        return {**super().__getstate__(), "_lowp": self._lowp, "_split": self._split}

    def __setstate__(self, state):
        # Called by load_state_dict (after torch's checks and casts) and by
        # unpickling: the loaded state goes into fastopt's buffers.  What
        # torch's own __setstate__ would trip over is checked first.
        self._check_entries(state)
        state = dict(state)
        lowp = state.pop("_lowp", None)
        self._split = state.pop("_split", self._split)
        before = {k: self.__dict__[k] for k in ("state", "param_groups", "_lowp")
                  if k in self.__dict__}
        super().__setstate__(state)
        if lowp is not None:
            self._lowp = lowp
        if "_step_supports_amp_scaling" not in self.__dict__:
            self._step_supports_amp_scaling = True
        try:
            self._rebuild()
        except BaseException:
            self.__dict__.update(before)
            raise

    def _check_entries(self, state):
        """Each parameter's state entry in `state` (as given to __setstate__):
        empty, or a dict with a valid 'step' where this optimizer counts steps."""
        entries = state.get("state", {})
        for gi, g in enumerate(state.get("param_groups", ())):
            for k, p in enumerate(g["params"]):
                entry = entries.get(p)
                if entry is None or (isinstance(entry, (dict, list, tuple)) and not entry):
                    continue            # no state yet (torch skips it too)
                name = f"param_groups[{gi}]['params'][{k}]"
                if not isinstance(entry, dict):
                    raise TypeError(f"the state of {name} must be a dict, got "
                                    f"{type(entry).__name__}")
                if self._counts_steps:
                    if "step" not in entry:
                        raise ValueError(f"the state of {name} has no 'step'")
                    _step_value(entry["step"], name)


_Fused._wrapped_step = torch.optim.Optimizer.profile_hook_step(_Fused._step)  # type: ignore[attr-defined]


class _Release:
    """Releases a held lock on leaving a with block."""

    __slots__ = ("lock",)

    def __init__(self, lock):
        self.lock = lock

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.lock.release()


def _refuse_capturable(groups):
    """torch.optim's error for capturable=True on CPU tensors (raised at the
    step, as torch raises it; fastopt's step is never captured in a graph)."""
    for g in groups:
        if g.get("capturable"):
            devices = getattr(_torch_optimizer, "_get_capturable_supported_devices", None)
            supported = devices() if devices is not None else ["cuda"]
            raise AssertionError("If capturable=True, params and state_steps must be on "
                                 f"supported devices: {supported}.")


def _check_params(params, names):
    """Parameters fastopt can update in place: float32/float64/float16/
    bfloat16 dense CPU tensors, each once, none overlapping another."""
    seen = {}
    spans = []
    for p, name in zip(params, names):
        if id(p) in seen:
            raise ValueError(f"{seen[id(p)]} and {name} are the same tensor "
                             "(a parameter may appear only once)")
        seen[id(p)] = name
        if p.device.type != "cpu":
            raise TypeError(f"{name} is on {p.device}; fastopt.torch works on CPU tensors only")
        if p.layout != torch.strided:
            raise TypeError(f"{name} is a {p.layout} tensor; fastopt.torch updates dense "
                            "(strided) tensors only")
        if p.is_complex():
            raise TypeError(f"{name} is complex ({p.dtype}); fastopt.torch updates float32, "
                            "float64, float16 and bfloat16 parameters (torch.view_as_real "
                            "gives a real view)")
        if p.dtype not in _KERNEL_DTYPES:
            raise TypeError(f"{name} has dtype {p.dtype}; fastopt.torch updates float32, "
                            "float64, float16 and bfloat16 parameters")
        if p.dtype == torch.bfloat16:
            _bfloat16(f"{name} (bfloat16)")
        if p.is_neg() or p.is_conj():
            raise TypeError(f"{name} is a lazily negated view; pass a tensor with its own memory")
        if not _is_dense(p):
            raise ValueError(f"{name} (shape {tuple(p.shape)}, strides {p.stride()}) does not "
                             "fill one block of memory; fastopt.torch updates dense parameters "
                             "(contiguous, channels_last or any order of dimensions)")
        if p.numel():
            lo = p.data_ptr()
            spans.append((lo, lo + p.numel() * p.element_size(), name))
    spans.sort()
    for (lo0, hi0, a), (lo1, hi1, b) in zip(spans, spans[1:]):
        if lo1 < hi0:
            raise ValueError(f"{a} and {b} overlap in memory")


def _widen_into(master, view):
    """A float16/bfloat16 parameter's values (`view`, in memory order) into its
    master: exact (a split master's low bits are then zero)."""
    if master.dtype == np.uint16:
        master[...] = 0
    else:
        _optim_kernels._convert(view, master)


def _master_key(master):
    """The state key of a master array: a float32 master, or a split one's low bits."""
    return "master_low_bits" if master.dtype == np.uint16 else "master_param"


def _load_master(master, view, values, p):
    """A 16-bit parameter's master (`master`; `view`: parameter p in memory
    order) from the state `values` being loaded: "master_param" (float32) or
    "master_low_bits" (int16), whichever the checkpoint has, converted to
    the kind of master this optimizer keeps (a float32 master loaded into a
    split one writes its high bits into the parameter); none: the
    parameter's values."""
    full = values.pop("master_param", None)
    low = values.pop("master_low_bits", None)
    if full is None and low is None:
        _widen_into(master, view)
        return
    # (a shaped kind's arrays have the parameter's shape, which is contiguous)
    master, view = master.reshape(-1), view.reshape(-1)

    def laid_out(t, dtype):         # t's values in p's memory order
        tmp = torch.empty_like(p, dtype=dtype)
        _copy_in(tmp, t)
        return _memory_order_view(tmp)

    if low is not None:
        bits = (view.view(np.uint16).astype(np.uint32) << 16) | \
            laid_out(low, torch.int16).view(np.uint16)
    else:
        bits = laid_out(full, torch.float32).view(np.uint32)
    if master.dtype == np.uint16:
        view.view(np.uint16)[...] = bits >> 16
        master[...] = bits & 0xffff
    else:
        master[...] = bits.view(np.float32)


def _copy_in(tensor, src):
    with torch.no_grad():
        tensor.copy_(src)


def _same_layout(v, p):
    """Whether dense tensor v holds its elements in p's memory order."""
    return all(a == b for a, b, n in zip(v.stride(), p.stride(), p.shape) if n != 1)


def _adopt(v, p, dtype, name, shape=None):
    """A tensor assigned to ``state[p][key]`` (`name`), checked: (the tensor the
    step uses, its array, the value the entry must then hold or None).

    `shape` None: the tensor has p's shape and its array is in p's memory
    order (an elementwise kind's state); a shape: the tensor has that shape
    and its array is row-major in it (a shaped kind's state, Adafactor's).
    One so laid out (like p; row-major) is used in place (its NumPy view
    makes torch refuse to resize its storage, and the view holds the
    storage if the tensor is re-pointed); another's values are copied into
    a tensor so laid out, which replaces it in the entry."""
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(v).__name__}")
    if v.device.type != "cpu":
        raise TypeError(f"{name} is on {v.device}; fastopt.torch works on CPU tensors only")
    if v.layout != torch.strided:
        raise TypeError(f"{name} is a {v.layout} tensor; state tensors are dense")
    if v.dtype != dtype:
        raise TypeError(f"{name} has dtype {v.dtype}; this parameter's state is {dtype}")
    want = tuple(p.shape) if shape is None else tuple(shape)
    if tuple(v.shape) != want:
        raise _wrong_shape(name, v, want, p)

    def array(t):           # t (laid out as wanted) as the native step takes it
        return _memory_order_view(t) if shape is None else _memory_order_view(t).reshape(want)

    alias = v.detach()
    laid_out = (_is_dense(alias) and _same_layout(alias, p) if shape is None
                else alias.is_contiguous())
    if (not (alias.is_neg() or alias.is_conj()) and laid_out
            and alias.data_ptr() % alias.element_size() == 0):
        return v, array(alias), None
    copy = torch.empty_like(p, dtype=dtype) if shape is None else torch.empty(want, dtype=dtype)
    _copy_in(copy, v)
    return copy, array(copy), copy


def _wrong_shape(name, v, shape, p):
    """The error for state tensor `name` (v) of parameter p, whose shape must be `shape`."""
    if shape == tuple(p.shape):
        return ValueError(f"{name} has shape {tuple(v.shape)} but the parameter has shape "
                          f"{shape}")
    return ValueError(f"{name} has shape {tuple(v.shape)} but must have shape {shape} (its "
                      f"parameter's shape is {tuple(p.shape)})")


def _one(t):
    """A one-element ndarray over 0-d tensor t's memory."""
    return t.detach().reshape(1).numpy()


def _number_value(v, key, name):
    """A per-parameter number of the state (mu_product, eta, mu), as given: a
    finite float >= 0 (a tensor of one element, or a number)."""
    if isinstance(v, torch.Tensor):
        if v.numel() != 1 or not v.is_floating_point():
            raise TypeError(f"state[{key!r}] of {name} must be one floating-point number")
        v = v.item()
    if isinstance(v, (bool, str, bytes)) or not isinstance(v, (int, float, np.number)):
        raise TypeError(f"state[{key!r}] of {name} must be a number, got {type(v).__name__}")
    if not (math.isfinite(v) and v >= 0):
        raise ValueError(f"state[{key!r}] of {name} must be a finite number >= 0, got {v!r}")
    return float(v)


def _adopt_number(v, key, name):
    """A tensor assigned to ``state[p][key]`` (mu_product, eta, mu), used in place."""
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"state[{key!r}] of {name} must be a tensor, got {type(v).__name__}")
    if v.device.type != "cpu" or v.numel() != 1 or v.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"state[{key!r}] of {name} must be one float32 or float64 number on "
                        f"the CPU, got a {v.dtype} tensor of shape {tuple(v.shape)} on {v.device}")
    _number_value(v, key, name)
    return v, _one(v), None


def _adopt_step(v, name):
    """A tensor assigned to ``state[p]["step"]`` of parameter `name`, used in place."""
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"state['step'] of {name} must be a tensor, got {type(v).__name__}")
    if v.device.type != "cpu" or v.numel() != 1 or \
            v.dtype not in (torch.float32, torch.float64, torch.int64):
        raise TypeError(f"state['step'] of {name} must be one float32, float64 or int64 "
                        f"number on the CPU, got a {v.dtype} tensor of shape {tuple(v.shape)} "
                        f"on {v.device}")
    _step_value(v, name)
    return v, _one(v), None


def _scalar_arg(x, name):
    """grad_scale / found_inf: None, a number, or a one-element tensor, as a float."""
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"{name} must hold one number, got shape {tuple(x.shape)}")
        return float(x.item())
    if isinstance(x, (bool, str, bytes)) or not isinstance(x, (int, float, np.number)):
        raise TypeError(f"{name} must be a number or a tensor, got {type(x).__name__}")
    return float(x)


def _step_value(v, name):
    if isinstance(v, (str, bytes)):
        raise TypeError(f"state['step'] of {name} must be a number, got {type(v).__name__}")
    if isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"state['step'] of {name} must hold one number, got shape "
                             f"{tuple(v.shape)}")
        v = v.item()
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise TypeError(f"state['step'] of {name} must be a number, got {type(v).__name__}") \
            from None
    if not (f >= 0 and f == math.floor(f) and f <= 2.0**53):
        raise ValueError(f"state['step'] of {name} must be a whole number >= 0, got {v!r}")
    return f


def _relayout(reader, params, grads):
    """Copy the gradients `reader` could not take as they are (`grads`, as it
    read them) into buffers laid out like their parameters; returns the
    buffers (keep them for the step)."""
    keep = []
    with torch.no_grad():
        for i in reader.relayout:
            p = params[i]
            buf = torch.empty_like(p, memory_format=torch.preserve_format)
            buf.copy_(grads[i])
            reader.set_address(i, buf.data_ptr())
            keep.append(buf)
    return keep


# ------------------------------------------------------------- optimizers ---

def _torch_init(cls, self, params, **kwargs):
    """cls.__init__ with the keyword arguments this torch version has.  One it
    lacks may only be left at its default (None or False), except options
    fastopt implements itself (decoupled_weight_decay, set in the groups by
    `_init_fused`)."""
    accepted = inspect.signature(cls.__init__).parameters
    for key in list(kwargs):
        if key not in accepted:
            if kwargs[key] not in (None, False) and key != "decoupled_weight_decay":
                raise TypeError(f"{key}={kwargs[key]!r} needs a newer torch than "
                                f"{torch.__version__}")
            del kwargs[key]
    cls.__init__(self, params, **kwargs)


class Adam(_Fused, torch.optim.Adam):
    """``torch.optim.Adam`` with fastopt's fused step (see the module docstring).

    Same arguments and defaults as ``torch.optim.Adam``; ``foreach`` and
    ``fused`` are accepted and ignored (the step is always fused),
    ``capturable=True`` raises at the step as torch's does on the CPU,
    ``differentiable=True`` raises.
    """

    _decl = _kinds.ADAM
    _torch_base = torch.optim.Adam     # bound now: torch.optim.Adam may be reassigned

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False, fused=None, decoupled_weight_decay=False,
                 state_dtype=None, state_rounding="stochastic", seed=0, split_master=False):
        _torch_init(self._torch_base, self, params, lr=lr, betas=betas, eps=eps,
                    weight_decay=weight_decay, amsgrad=amsgrad, foreach=foreach,
                    maximize=maximize, capturable=capturable, differentiable=differentiable,
                    fused=fused, decoupled_weight_decay=decoupled_weight_decay)
        self._init_fused(state_dtype, state_rounding, seed, split_master,
                         decoupled_weight_decay=decoupled_weight_decay)



class AdamW(_Fused, torch.optim.AdamW):
    """``torch.optim.AdamW`` with fastopt's fused step (decoupled weight decay,
    default 1e-2); see `Adam`."""

    _decl = _kinds.ADAMW
    _torch_base = torch.optim.AdamW     # bound now: torch.optim.AdamW may be reassigned

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, foreach=None, capturable=False,
                 differentiable=False, fused=None, state_dtype=None, state_rounding="stochastic",
                 seed=0, split_master=False):
        _torch_init(self._torch_base, self, params, lr=lr, betas=betas, eps=eps,
                    weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                    foreach=foreach, capturable=capturable, differentiable=differentiable,
                    fused=fused)
        self._init_fused(state_dtype, state_rounding, seed, split_master,
                         decoupled_weight_decay=True)



class SGD(_Fused, torch.optim.SGD):
    """``torch.optim.SGD`` with fastopt's fused step: momentum, dampening,
    nesterov, weight decay, maximize.  ``state[p]["momentum_buffer"]`` appears
    at a parameter's first update with momentum != 0 (set to its gradient,
    as torch does)."""

    _decl = _kinds.SGD
    _torch_base = torch.optim.SGD     # bound now: torch.optim.SGD may be reassigned
    _has_capturable = False

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0,
                 nesterov=False, *, maximize=False, foreach=None, differentiable=False,
                 fused=None, state_dtype=None, state_rounding="stochastic", seed=0,
                 split_master=False):
        _torch_init(self._torch_base, self, params, lr=lr, momentum=momentum,
                    dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                    maximize=maximize, foreach=foreach, differentiable=differentiable,
                    fused=fused)
        self._init_fused(state_dtype, state_rounding, seed, split_master)



class RMSprop(_Fused, torch.optim.RMSprop):
    """``torch.optim.RMSprop`` with fastopt's fused step: alpha, centered,
    momentum, weight decay, maximize."""

    _decl = _kinds.RMSPROP
    _torch_base = torch.optim.RMSprop     # bound now: torch.optim.RMSprop may be reassigned

    def __init__(self, params, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0,
                 centered=False, capturable=False, foreach=None, maximize=False,
                 differentiable=False, *, state_dtype=None, state_rounding="stochastic", seed=0,
                 split_master=False):
        _torch_init(self._torch_base, self, params, lr=lr, alpha=alpha, eps=eps,
                    weight_decay=weight_decay, momentum=momentum, centered=centered,
                    capturable=capturable, foreach=foreach, maximize=maximize,
                    differentiable=differentiable)
        self._init_fused(state_dtype, state_rounding, seed, split_master)



class Adagrad(_Fused, torch.optim.Adagrad):
    """``torch.optim.Adagrad`` with fastopt's fused step (see `Adam`); its state
    (``step``, ``sum``) exists from construction, as torch's."""

    _decl = _kinds.ADAGRAD
    _torch_base = torch.optim.Adagrad
    _has_capturable = False

    def __init__(self, params, lr=1e-2, lr_decay=0, weight_decay=0, initial_accumulator_value=0,
                 eps=1e-10, foreach=None, *, maximize=False, differentiable=False, fused=None,
                 state_dtype=None, state_rounding="stochastic", seed=0, split_master=False):
        _torch_init(self._torch_base, self, params, lr=lr, lr_decay=lr_decay,
                    weight_decay=weight_decay,
                    initial_accumulator_value=initial_accumulator_value, eps=eps,
                    foreach=foreach, maximize=maximize, differentiable=differentiable,
                    fused=fused)
        self._init_fused(state_dtype, state_rounding, seed, split_master)


class Adamax(_Fused, torch.optim.Adamax):
    """``torch.optim.Adamax`` with fastopt's fused step (see `Adam`)."""

    _decl = _kinds.ADAMAX
    _torch_base = torch.optim.Adamax

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 foreach=None, *, maximize=False, differentiable=False, capturable=False,
                 state_dtype=None, state_rounding="stochastic", seed=0, split_master=False):
        _torch_init(self._torch_base, self, params, lr=lr, betas=betas, eps=eps,
                    weight_decay=weight_decay, foreach=foreach, maximize=maximize,
                    differentiable=differentiable, capturable=capturable)
        self._init_fused(state_dtype, state_rounding, seed, split_master)


class NAdam(_Fused, torch.optim.NAdam):
    """``torch.optim.NAdam`` with fastopt's fused step (see `Adam`);
    ``state["mu_product"]`` is torch's 0-d tensor."""

    _decl = _kinds.NADAM
    _torch_base = torch.optim.NAdam

    def __init__(self, params, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 momentum_decay=4e-3, decoupled_weight_decay=False, *, foreach=None,
                 maximize=False, capturable=False, differentiable=False, state_dtype=None,
                 state_rounding="stochastic", seed=0, split_master=False):
        _torch_init(self._torch_base, self, params, lr=lr, betas=betas, eps=eps,
                    weight_decay=weight_decay, momentum_decay=momentum_decay,
                    decoupled_weight_decay=decoupled_weight_decay, foreach=foreach,
                    maximize=maximize, capturable=capturable, differentiable=differentiable)
        self._init_fused(state_dtype, state_rounding, seed, split_master,
                         decoupled_weight_decay=decoupled_weight_decay)


class RAdam(_Fused, torch.optim.RAdam):
    """``torch.optim.RAdam`` with fastopt's fused step (see `Adam`)."""

    _decl = _kinds.RADAM
    _torch_base = torch.optim.RAdam

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 decoupled_weight_decay=False, *, foreach=None, maximize=False,
                 capturable=False, differentiable=False, state_dtype=None,
                 state_rounding="stochastic", seed=0, split_master=False):
        _torch_init(self._torch_base, self, params, lr=lr, betas=betas, eps=eps,
                    weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay,
                    foreach=foreach, maximize=maximize, capturable=capturable,
                    differentiable=differentiable)
        self._init_fused(state_dtype, state_rounding, seed, split_master,
                         decoupled_weight_decay=decoupled_weight_decay)


class Adadelta(_Fused, torch.optim.Adadelta):
    """``torch.optim.Adadelta`` with fastopt's fused step (see `Adam`)."""

    _decl = _kinds.ADADELTA
    _torch_base = torch.optim.Adadelta

    def __init__(self, params, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0, foreach=None, *,
                 capturable=False, maximize=False, differentiable=False, state_dtype=None,
                 state_rounding="stochastic", seed=0, split_master=False):
        _torch_init(self._torch_base, self, params, lr=lr, rho=rho, eps=eps,
                    weight_decay=weight_decay, foreach=foreach, capturable=capturable,
                    maximize=maximize, differentiable=differentiable)
        self._init_fused(state_dtype, state_rounding, seed, split_master)


class ASGD(_Fused, torch.optim.ASGD):
    """``torch.optim.ASGD`` with fastopt's fused step (see `Adam`);
    ``state["eta"]`` and ``state["mu"]`` are torch's 0-d tensors."""

    _decl = _kinds.ASGD
    _torch_base = torch.optim.ASGD

    def __init__(self, params, lr=1e-2, lambd=1e-4, alpha=0.75, t0=1e6, weight_decay=0,
                 foreach=None, maximize=False, differentiable=False, capturable=False, *,
                 state_dtype=None, state_rounding="stochastic", seed=0, split_master=False):
        _torch_init(self._torch_base, self, params, lr=lr, lambd=lambd, alpha=alpha, t0=t0,
                    weight_decay=weight_decay, foreach=foreach, maximize=maximize,
                    differentiable=differentiable, capturable=capturable)
        self._init_fused(state_dtype, state_rounding, seed, split_master)


class Rprop(_Fused, torch.optim.Rprop):
    """``torch.optim.Rprop`` with fastopt's fused step (see `Adam`)."""

    _decl = _kinds.RPROP
    _torch_base = torch.optim.Rprop

    def __init__(self, params, lr=1e-2, etas=(0.5, 1.2), step_sizes=(1e-6, 50), *,
                 capturable=False, foreach=None, maximize=False, differentiable=False,
                 state_dtype=None, state_rounding="stochastic", seed=0, split_master=False):
        _torch_init(self._torch_base, self, params, lr=lr, etas=etas, step_sizes=step_sizes,
                    capturable=capturable, foreach=foreach, maximize=maximize,
                    differentiable=differentiable)
        self._init_fused(state_dtype, state_rounding, seed, split_master)


class Lion(_Fused, torch.optim.Optimizer):
    """Lion (Chen et al. 2023; optax's ``lion``; not in torch.optim) as a
    ``torch.optim.Optimizer`` with fastopt's fused step: ``p *= 1 - lr*wd``;
    ``p -= lr * sign(b1*m + (1-b1)*g)``; ``m = b2*m + (1-b2)*g``.  State:
    ``step``, ``exp_avg``."""

    _decl = _kinds.LION
    _torch_base = torch.optim.Optimizer
    _has_capturable = False

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *,
                 maximize=False, state_dtype=None, state_rounding="stochastic", seed=0,
                 split_master=False):
        defaults = _kinds.LION.defaults()
        defaults.update(lr=lr, betas=tuple(betas), weight_decay=weight_decay,
                        maximize=maximize)
        torch.optim.Optimizer.__init__(self, params, defaults)
        self._init_fused(state_dtype, state_rounding, seed, split_master)


# torch.optim.Adafactor is new in torch 2.5 (fastopt.torch runs on 2.1 on).
_HAS_ADAFACTOR = hasattr(torch.optim, "Adafactor")
if TYPE_CHECKING:
    _AdafactorBase = torch.optim.Adafactor
else:
    _AdafactorBase = torch.optim.Adafactor if _HAS_ADAFACTOR else torch.optim.Optimizer


class Adafactor(_Fused, _AdafactorBase):
    """``torch.optim.Adafactor`` with fastopt's fused step (see `Adam`; torch
    2.5 or later).

    Same arguments and defaults: ``lr``, ``beta2_decay``, ``eps`` (eps[0]
    None is the machine epsilon of the dtype the update is computed in),
    ``d``, ``weight_decay``, ``maximize``; ``foreach`` is accepted and
    ignored.  State as torch's: ``step``, and for a parameter of 2 or more
    dimensions ``row_var`` and ``col_var`` (shapes ``shape[:-1] + (1,)``
    and ``shape[:-2] + (1, shape[-1])``), for a 0-d or 1-d one
    ``variance``; so checkpoints move both ways between this class and
    ``torch.optim.Adafactor``.  The step is `fastopt.Adafactor`'s: three
    threaded passes over the whole model, sums in double in a fixed order
    (the same bits on any number of threads).

    The update factors each parameter's last two dimensions: parameters
    must be contiguous (row-major; a channels_last one raises ValueError).
    A float16/bfloat16 parameter is updated through a float32 master and
    computes in float32 (eps[0] None: float32's epsilon, where torch would
    compute in the parameter's dtype).  ``state_dtype="bfloat16"`` and
    ``split_master=True`` raise ValueError: the factored statistics are
    already a small fraction of the parameters.
    """

    _decl = _kinds.ADAFACTOR
    _torch_base = _AdafactorBase
    _has_capturable = False

    def __init__(self, params, lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0,
                 weight_decay=0.0, *, foreach=None, maximize=False, state_dtype=None,
                 state_rounding="stochastic", seed=0, split_master=False):
        if not _HAS_ADAFACTOR:
            raise RuntimeError("fastopt.torch.Adafactor subclasses torch.optim.Adafactor, "
                               f"which needs torch 2.5 or later (this is {torch.__version__})")
        _torch_init(self._torch_base, self, params, lr=lr, beta2_decay=beta2_decay, eps=eps,
                    d=d, weight_decay=weight_decay, foreach=foreach, maximize=maximize)
        self._init_fused(state_dtype, state_rounding, seed, split_master)


# ------------------------------------------------------------- functions ---
#
# cross_entropy and batch_norm check their arguments as torch.nn.functional
# does, in its order and with its exception types: an argument torch refuses
# raises the same ValueError / RuntimeError / IndexError, with a message
# naming the argument as torch names it.  What fastopt alone refuses raises
# TypeError: a tensor not on the CPU or not strided, an input dtype the
# kernels do not compute in (torch raises NotImplementedError for the
# integer and complex ones); and batch_norm refuses running statistics it
# cannot update as torch would (see its docstring).  The kernels then run on
# NumPy views of the tensors' memory; what they do not compute (empty input,
# hyperparameters outside their domain) is left to torch.

_KERNEL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_HALF_DTYPES = (torch.float16, torch.bfloat16)
_REDUCTIONS = ("none", "mean", "sum")       # torch.nn._reduction's enum order


def _bfloat16(what):
    """NumPy's bfloat16 dtype, from ml_dtypes (fastopt's optional extra)."""
    try:
        import ml_dtypes
    except ImportError:
        raise ImportError(f"{what} needs the ml_dtypes package: "
                          "pip install 'fastopt[bf16]' (or pip install ml_dtypes)") from None
    return np.dtype(ml_dtypes.bfloat16)


def _numpy(t):
    """A NumPy array over a CPU tensor's values (no autograd), sharing its
    memory; bfloat16 as ml_dtypes.bfloat16 (the same bits).  A lazily
    negated or conjugated view is resolved first: its memory holds other
    values, so the array is then a copy (the kernels only write tensors
    made here, never such views)."""
    t = t.detach()
    if t.is_neg() or t.is_conj():
        t = t.resolve_conj().resolve_neg()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(_bfloat16("a bfloat16 tensor"))
    return t.numpy()


def _from_numpy(a):
    """A tensor sharing memory with a kernel's result (bfloat16 included)."""
    if a.dtype.type.__name__ == "bfloat16":         # (dtype.name is slow to compute)
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _tensor_arg(t, name):
    """`t`, checked to be a tensor fastopt can read: dense, on the CPU."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if not t.is_cpu:
        raise TypeError(f"{name} is on {t.device}; fastopt.torch works on CPU tensors only")
    if t.layout != torch.strided:
        raise TypeError(f"{name} is a {t.layout} tensor; fastopt.torch takes dense tensors")
    return t


def _float_arg(t, name):
    """`t` (a `_tensor_arg`), of a dtype the kernels compute in."""
    if t.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; fastopt.torch computes in float32, "
                        "float64, float16 and bfloat16")
    if t.dtype == torch.bfloat16:
        _bfloat16(f"{name} (bfloat16)")
    return t


def _int_arg(v, name):
    """`v` as a Python int in int64, as torch's argument parser takes an int:
    a Python or NumPy integer or a 0-d integer tensor, not a bool or float."""
    if isinstance(v, (bool, float)) or not hasattr(type(v), "__index__"):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    try:
        v = v.__index__()
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(v).__name__}") from None
    if not -2**63 <= v < 2**63:
        raise ValueError(f"{name} must fit in int64, got {v}")
    return v


def _real_arg(v, name):
    """`v` as a Python float, as torch's argument parser takes a float: a
    Python or NumPy real number or a 0-d real tensor, not a string or array."""
    if isinstance(v, torch.Tensor):
        ok = v.dim() == 0 and not v.is_complex()
    else:
        ok = isinstance(v, (int, float, np.integer, np.floating))
    if not ok:
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    try:
        return float(v)
    except OverflowError:
        raise OverflowError(f"{name} = {v} is too large for a float") from None


def _torch_names(exc):
    """A kernel's TypeError/ValueError with its names for the arguments
    replaced by torch's (x, logits: input; gamma: weight; beta: bias)."""
    names = {"x": "input", "logits": "input", "gamma": "weight", "beta": "bias"}
    return type(exc)(re.sub(r"\b(x|logits|gamma|beta)\b", lambda m: names[m.group(1)], str(exc)))


def _requires_grad_error(t, name, fn):
    """torch's refusal of an argument it does not differentiate (while
    autograd records)."""
    if t is not None and t.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(f"{fn} is not differentiable with respect to {name}; "
                           "this input cannot have requires_grad True")


class _CrossEntropy(torch.autograd.Function):
    """Cross-entropy over (M, C) logits: fastopt's fused loss and gradient.

    The forward pass computes d(loss)/d(logits) along with the loss (one
    kernel, two passes over the logits) and saves it; the backward pass
    scales it by the incoming gradient.  With probability targets, the
    gradients with respect to the targets and the class weights come from
    log_softmax(logits), saved when they are needed."""

    @staticmethod
    def forward(ctx, x, target, weight, ignore_index, reduction, label_smoothing):
        soft = target.is_floating_point()
        want_grad = ctx.needs_input_grad[0]
        xa = _numpy(x)
        try:
            out = _softmax_kernels.cross_entropy(
                xa, _numpy(target), weight=None if weight is None else _numpy(weight),
                ignore_index=ignore_index if not soft else -100, reduction=reduction,
                label_smoothing=label_smoothing, return_grad=want_grad)
        except (TypeError, ValueError) as e:
            raise _torch_names(e) from None
        loss, dlogits = out if want_grad else (out, None)
        ctx.reduction = reduction
        ctx.label_smoothing = label_smoothing
        ctx.dlogits = _from_numpy(dlogits) if want_grad else None
        if soft and (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]):
            ctx.save_for_backward(_from_numpy(_softmax_kernels.log_softmax(xa)), target, weight)
        # (for "none" the rows' losses in x's dtype, else a double, rounded once)
        return _from_numpy(np.asarray(loss, dtype=xa.dtype))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        dx = dt = dw = None
        scale = grad_loss.reshape(-1, 1) if ctx.reduction == "none" else grad_loss
        if ctx.needs_input_grad[0]:
            dx = ctx.dlogits * scale
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            # loss = -sum_ic w[c] q[i, c] logp[i, c] (/ M for mean),
            # q = (1 - eps) t + eps / C
            logp, target, weight = ctx.saved_tensors
            eps = ctx.label_smoothing
            if ctx.reduction == "mean":
                scale = scale / logp.shape[0]
            if ctx.needs_input_grad[1]:
                dt = logp * (-(1.0 - eps)) * scale
                if weight is not None:
                    dt = dt * weight
            if ctx.needs_input_grad[2]:
                q = target * (1.0 - eps) + eps / logp.shape[1]
                dw = -(q * logp * scale).sum(0)
        return dx, dt, dw, None, None, None


def _probability_targets(x, target, weight, ignore_index, smoothing):
    """torch's checks of probability targets (`target` has input's shape);
    returns input, target and weight in the dtype torch computes in (their
    promotion: float32 for float16 input and float32 target, say)."""
    if not target.is_floating_point():
        raise RuntimeError(f"target has the shape of input, {tuple(x.shape)}, so it holds class "
                           f"probabilities and must be floating point, got {target.dtype}")
    if ignore_index >= 0:
        raise RuntimeError(f"ignore_index={ignore_index} is not supported with probability "
                           "targets (target of the shape of input); use a negative value")
    if x.dim() == 0:
        raise IndexError("input must have at least one dimension (the classes), got a 0-d tensor")
    C = x.shape[0] if x.dim() == 1 else x.shape[1]
    dtype = torch.promote_types(x.dtype, target.dtype)
    if weight is not None:
        if weight.dim() != 1 or weight.numel() != C:
            raise RuntimeError(f"weight must have shape ({C},) (one value per class of input), "
                               f"got {tuple(weight.shape)}")
        if weight.is_complex():
            raise TypeError(f"weight has dtype {weight.dtype}; fastopt.torch computes real losses")
        dtype = torch.promote_types(dtype, weight.dtype)
        weight = weight.to(dtype)
    if smoothing > 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0, got {smoothing}")
    return x.to(dtype), target.to(dtype), weight


def _class_targets(x, target, weight, ignore_index, smoothing, mean):
    """torch's checks of class-index targets against input of shape (C,),
    (N, C) or (N, C, d1, ...): target of shape () or (1,), (N,) and
    (N, d1, ...) respectively, int64 (or, for 1-d and 2-d input, uint8);
    weight (C,) of input's dtype.  `mean`: reduction is "mean".
    (`_check_classes` checks the values.)"""
    if smoothing > 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0, got {smoothing}")
    if x.dim() == 0:
        raise IndexError("input must have at least one dimension (the classes), got a 0-d tensor")
    xs, ts = tuple(x.shape), tuple(target.shape)
    nd = len(xs)
    # (torch's exception types differ from case to case, and it counts a 0-d
    # target as a batch of 0)
    if nd > 1 and (ts[0] if ts else 0) != xs[0]:
        raise _target_shape_error(ValueError, xs, ts)
    if (nd <= 2 and len(ts) > 1 or nd == 4 and len(ts) != 3
            or nd not in (1, 2, 4) and ts[1:] != xs[2:]):
        raise _target_shape_error(RuntimeError, xs, ts)
    if not (target.dtype == torch.int64 or target.dtype == torch.uint8 and nd <= 2):
        raise RuntimeError(f"target holds class indices and must have dtype int64 (or uint8 "
                           f"for input of 1 or 2 dimensions), got {target.dtype}")
    if target.dtype == torch.uint8 and weight is not None and smoothing > 0 and mean:
        # (torch's label smoothing gathers the weights with the indices: int64 only)
        raise RuntimeError("target holds class indices of dtype uint8: with a weight, "
                           "label_smoothing > 0 and reduction='mean', they must be int64")
    if nd == 1 and ts not in ((), (1,)):
        raise _target_shape_error(ValueError, xs, ts)
    if nd == 2 and not ts:
        raise _target_shape_error(IndexError, xs, ts)
    if nd == 4 and ts[1:] != xs[2:]:
        raise _target_shape_error(RuntimeError, xs, ts)
    C = xs[0] if nd == 1 else xs[1]
    if weight is not None:
        # (torch takes C weights in any shape for input of 3 or more
        # dimensions, except where its label smoothing indexes them: by the
        # first dimension, and for "mean" with the targets not ignored)
        if weight.numel() != C or weight.dim() != 1 and (nd <= 2 or smoothing > 0 and (
                weight.shape[0] != C or mean and bool((target != ignore_index).any()))):
            raise RuntimeError(f"weight must have shape ({C},) (one value per class of input), "
                               f"got {tuple(weight.shape)}")
        if weight.dtype != x.dtype:
            raise RuntimeError(f"weight has dtype {weight.dtype} but input has dtype {x.dtype} "
                               "(with class-index targets they must match)")
        _requires_grad_error(weight, "weight", "cross_entropy with class-index targets")
    if nd == 1 and ts and smoothing > 0.0:
        # torch's label smoothing broadcasts a (1,) target against the 0-d loss and fails
        raise RuntimeError("label_smoothing > 0 with input of shape (C,) needs a 0-d target, "
                           f"got shape {ts}")


def _target_shape_error(error, xs, ts):
    """An `error` saying which target shapes input of shape `xs` takes."""
    if len(xs) == 1:
        want = f"shape () or (1,) (one class index) or {xs} (probabilities)"
    else:
        want = f"shape {(xs[0],) + xs[2:]} (class indices) or {xs} (probabilities)"
    return error(f"target must have {want} for input of shape {xs}, got shape {ts}")


def _check_classes(t, C, ignore_index, shape):
    """Every class index of `t` (int64 or uint8, any shape) is in [0, C) or
    equals ignore_index; else IndexError, as torch raises."""
    if t.numel() == 0:
        return
    lo, hi = torch.aminmax(t)
    if int(lo) >= 0 and int(hi) < C:
        return
    t = t.to(torch.int64)           # (torch compares uint8 indices as int64 too)
    bad = ((t < 0) | (t >= C)) & (t != ignore_index)
    if bad.any():
        i = int(bad.reshape(-1).nonzero()[0])
        at = np.unravel_index(i, shape) if shape else ()
        raise IndexError(f"target[{', '.join(map(str, at))}] = {int(t.reshape(-1)[i])} is out "
                         f"of range: class indices must be in [0, {C}) or equal ignore_index "
                         f"({ignore_index})")


def _kernel_weight(weight, t2, soft, ignore_index, reduction, smoothing):
    """Whether the kernel computes what torch computes with these class
    weights (C > 0 of them): they are finite and >= 0, and, with class
    indices, label smoothing and reduction "mean", their total over the rows
    not ignored is not 0 (torch divides by it: NaN; the kernel divides the
    smoothing term by it: an infinity)."""
    weight = weight.detach()
    lo, hi = torch.aminmax(weight)
    if not (bool(lo >= 0) and bool(hi < math.inf)):         # (NaN: False)
        return False
    if bool(lo > 0) or soft or not (smoothing > 0 and reduction == "mean"):
        return True
    return bool(weight[t2[t2 != ignore_index].long()].sum() > 0)


def cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100,
                  reduce=None, reduction="mean", label_smoothing=0.0):
    """``torch.nn.functional.cross_entropy`` computed by fastopt's fused kernel.

    Same arguments and results (class-index or probability targets, class
    weights, ``ignore_index``, ``reduction``, ``label_smoothing``; input of
    shape (C,), (N, C) or (N, C, d1, ...)), differentiable with respect to
    `input` and, with probability targets, to `target` and `weight`.  The
    forward pass computes the gradient along with the loss, in
    double-precision sums, and keeps it for the backward pass (torch keeps
    log-softmax, the same size).

    Arguments are checked as torch checks them, raising torch's exception
    types (a target of a wrong shape or dtype, a weight of another length or
    dtype, ``ignore_index`` >= 0 with probability targets, label smoothing
    above 1: RuntimeError, ValueError or IndexError as in torch, naming the
    argument); a target whose shape is input's holds probabilities, any
    other holds class indices (int64 or uint8), as in torch.  ``input`` is
    float32, float64, float16 or bfloat16 (bfloat16 needs ml_dtypes) on the
    CPU; 16-bit input is computed in float32 with double sums and its loss
    and gradient rounded once to its dtype.  Probability targets and weights
    of other dtypes are promoted as torch promotes them.  What the kernel
    does not compute is left to torch: input with no classes, weights that
    are negative or not finite, or that (with label smoothing and "mean")
    give every class index not ignored the weight 0.

    Differences from torch, with values that are not finite (see
    `fastopt.cross_entropy`): an ignored row gets a zero gradient even if
    its logits hold NaN or an infinity; a probability target 0 at a logit
    -inf adds 0 to the loss (torch: NaN); an infinite probability target
    gives NaN (torch: an infinite loss).  Where torch's forward takes a call
    its backward refuses ((C,) input with a target of shape (1,)), fastopt
    computes the gradient.
    """
    if size_average is not None or reduce is not None:
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    reduction = _REDUCTIONS[torch.nn._reduction.get_enum(reduction)]    # ValueError as torch
    x = _tensor_arg(input, "input")
    given = (input, _tensor_arg(target, "target"),
             weight if weight is None else _tensor_arg(weight, "weight"))
    ignore_index = _int_arg(ignore_index, "ignore_index")
    smoothing = _real_arg(label_smoothing, "label_smoothing")
    _float_arg(x, "input")
    soft = x.shape == target.shape
    if soft:
        x, target, weight = _probability_targets(x, target, weight, ignore_index, smoothing)
    else:
        _class_targets(x, target, weight, ignore_index, smoothing, reduction == "mean")
        if weight is not None:
            weight = weight.reshape(-1)
    if not smoothing > 0.0:
        smoothing = 0.0                     # torch ignores label_smoothing <= 0 (and NaN)
    C = x.shape[0] if x.dim() == 1 else x.shape[1]
    # To (M, C) rows, classes last; `out_shape` is the shape of reduction="none".
    if x.dim() == 1:
        x2, t2, out_shape = x.unsqueeze(0), target.reshape((1, -1) if soft else (1,)), ()
    elif x.dim() == 2:
        x2, t2, out_shape = x, target, (x.shape[0],)
    else:
        x2 = x.movedim(1, -1).reshape(-1, C)
        t2 = target.movedim(1, -1).reshape(-1, C) if soft else target.reshape(-1)
        out_shape = (x.shape[0],) + tuple(x.shape[2:])
    if not soft:
        _check_classes(t2, C, ignore_index, tuple(target.shape))
    if C == 0 or weight is not None and not _kernel_weight(weight, t2, soft, ignore_index,
                                                           reduction, smoothing):
        # No classes (torch's conventions for empty sums: NaN where it
        # divides by 0), or weights the kernel does not take as torch does.
        return torch.nn.functional.cross_entropy(*given, ignore_index=ignore_index,
                                                 reduction=reduction, label_smoothing=smoothing)
    loss = _CrossEntropy.apply(x2, t2, weight, ignore_index, reduction, smoothing)
    if reduction == "none":
        loss = loss.reshape(out_shape)
    return loss


class _BatchNorm(torch.autograd.Function):
    """Batch normalization with fastopt's forward and backward kernels."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps):
        last = _channels_last(x)
        y = torch.empty_like(x, memory_format=torch.preserve_format) if last \
            else torch.empty_like(x, memory_format=torch.contiguous_format)
        C = x.shape[1]
        # For 16-bit input, the kernels take float32 (or input's dtype) channel values.
        like = torch.float32 if x.dtype in _HALF_DTYPES else x.dtype
        np_like = np.float64 if like == torch.float64 else np.float32
        gamma = _numpy(weight).reshape(-1) if weight is not None else np.ones(C, np_like)
        beta = _numpy(bias).reshape(-1) if bias is not None else np.zeros(C, np_like)
        rm = rv = None
        if running_mean is not None:
            rm, rv = (_stat_buffer(running_mean, like, training),
                      _stat_buffer(running_var, like, training))
        try:
            _, bn = _bn_kernels.batch_norm_forward(
                _numpy(_to_channels_last(x) if last else x), gamma, beta,
                None if rm is None else _numpy(rm), None if rv is None else _numpy(rv),
                training=training, momentum=momentum, eps=eps, axis=-1 if last else 1,
                out=_numpy(_to_channels_last(y) if last else y))
        except (TypeError, ValueError) as e:
            raise _torch_names(e) from None
        if training and running_mean is not None:
            _copy_back(running_mean, rm)
            _copy_back(running_var, rv)
            torch.autograd.graph.increment_version([running_mean, running_var])
        ctx.bn = bn
        ctx.last = last
        ctx.params = weight, bias
        ctx.save_for_backward(x, weight)        # for autograd's in-place checks
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, _ = ctx.saved_tensors               # raises if x or weight was modified in place
        last = ctx.last
        dx = torch.empty_like(x, memory_format=torch.preserve_format) if last \
            else torch.empty_like(x, memory_format=torch.contiguous_format)
        _, dgamma, dbeta = _bn_kernels.batch_norm_backward(
            _numpy(_to_channels_last(dy) if last else dy), ctx.bn,
            dx_out=_numpy(_to_channels_last(dx) if last else dx))
        # (float32 for 16-bit input: to the parameter's dtype and shape)
        dw, db = [_from_numpy(g).to(p.dtype).reshape(p.shape) if ctx.needs_input_grad[k] else None
                  for k, g, p in ((1, dgamma, ctx.params[0]), (2, dbeta, ctx.params[1]))]
        return (dx if ctx.needs_input_grad[0] else None, dw, db, None, None, None, None, None)


def _stat_buffer(t, dtype, training):
    """A running statistic as the kernel takes it: in training (it updates
    it) `t` itself if it is a contiguous `dtype` tensor, else a contiguous
    `dtype` copy (copied back with `_copy_back`); in evaluation a copy (then
    it may share memory with other arguments)."""
    if training and t.dtype == dtype and t.is_contiguous() and not t.is_neg():
        return t
    # (torch 2.13's copy_ between dtypes ignores a lazy negation: resolve it first)
    return torch.empty(t.shape, dtype=dtype).copy_(t.detach().resolve_neg())


def _copy_back(t, buf):
    """t = buf, for a `_stat_buffer` copy of t."""
    if buf is not t:
        with torch.no_grad():
            t.copy_(buf.to(t.dtype))    # (converted first, for a lazily negated t)


def _channels_last(x):
    """Whether x's channel (dim 1) is its innermost dimension in memory and the
    rest are in order: channels_last (NHWC) and its 3-d/5-d analogues."""
    return x.dim() > 2 and x.shape[1] > 1 and _to_channels_last(x).is_contiguous()


def _to_channels_last(x):
    return x.movedim(1, -1)


def _batch_norm_params(x, training, params):
    """torch's checks of weight, bias, running_mean and running_var (a dict,
    None for absent) against input (N, C, ...), in torch's order."""
    C = x.shape[1]
    for name, t in params.items():
        if t is not None and t.numel() != C:
            raise RuntimeError(f"{name} should contain {C} elements (the channels of input) not "
                               f"{t.numel()}")
        if t is None and name.startswith("running") and not training:
            raise RuntimeError(f"{name} must be defined in evaluation mode")
    rm, rv = params["running_mean"], params["running_var"]
    _requires_grad_error(rm, "running_mean", "batch_norm")
    _requires_grad_error(rv, "running_var", "batch_norm")
    if (rm is None) != (rv is None):
        raise ValueError("running_mean and running_var must either both be None or neither "
                         "be None")
    given = [(name, t) for name, t in params.items() if t is not None]
    if x.dtype in _HALF_DTYPES:
        # 16-bit input: parameters all float32 or all of input's dtype (torch's mixed mode)
        for name, t in given:
            if t.dtype not in (torch.float32, x.dtype) or t.dtype != given[0][1].dtype:
                raise RuntimeError(f"{name} has dtype {t.dtype} but {given[0][0]} has dtype "
                                   f"{given[0][1].dtype}: with {x.dtype} input, weight, bias, "
                                   f"running_mean and running_var must all be float32 or all "
                                   f"{x.dtype}")
    else:
        for name, t in given:
            if t.dtype != x.dtype:
                raise RuntimeError(f"{name} has dtype {t.dtype} but input has dtype {x.dtype}")
    for name, t in (("running_mean", rm), ("running_var", rv)):
        if t is not None and t.dim() != 1:
            raise RuntimeError(f"{name} must be 1-d, of shape ({C},), got {tuple(t.shape)}")
        if training and t is not None and C > 1 and t.stride(0) == 0:
            raise RuntimeError(f"{name} is updated in place but holds one value for all "
                               "channels (an expanded tensor)")
    if training and rm is not None:
        # (torch's result would depend on the order of its reads and writes)
        spans = [(name, _span(t)) for name, t in (("running_mean", rm), ("running_var", rv),
                                                  ("input", x), ("weight", params["weight"]),
                                                  ("bias", params["bias"])) if t is not None]
        for i, (name, (lo, hi)) in enumerate(spans[:2]):
            for other, (lo2, hi2) in spans[i + 1:]:
                if lo < hi2 and lo2 < hi:
                    raise ValueError(f"{name} and {other} overlap in memory; {name} is updated "
                                     "in place: give it memory of its own")


def _span(t):
    """The addresses [lo, hi) of the bytes t's elements lie in (t not empty)."""
    start, size = t.data_ptr(), t.element_size()
    if t.is_contiguous():
        return start, start + t.numel() * size
    lo = sum(st * (n - 1) for n, st in zip(t.shape, t.stride()) if st < 0)
    hi = sum(st * (n - 1) for n, st in zip(t.shape, t.stride()) if st > 0) + 1
    return start + lo * size, start + hi * size


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5):
    """``torch.nn.functional.batch_norm`` computed by fastopt's fused kernels.

    Same arguments, results and gradients (for input, weight and bias);
    running statistics are updated in place in training (unbiased variance),
    as torch does.  Input is (N, C) or (N, C, *spatial), float32, float64,
    float16 or bfloat16 (bfloat16 needs ml_dtypes) on the CPU; with 16-bit
    input, weight, bias and the running statistics are all float32 or all of
    input's dtype, as in torch, and the output and input gradient are
    rounded once to input's dtype.  Statistics are computed in double with a
    stable two-pass method.  A channels_last input is normalized where it
    lies and gives a channels_last output, any other layout is made
    contiguous first.

    Arguments are checked as torch checks them, raising torch's exception
    types with messages naming the argument (``weight``, ``bias``,
    ``running_mean``, ``running_var``...).  What the kernels do not compute
    is left to ``torch.nn.functional.batch_norm``: input with no elements,
    momentum outside [0, 1] in training, eps = 0 (evaluation) or not finite.

    Differences from torch, in training: a running statistic that is an
    expanded tensor (one value for every channel) raises RuntimeError (torch
    writes every channel's value to it in turn), one sharing memory with
    another argument ValueError (torch's result depends on the order of its
    reads and writes); one that is a lazily negated view is updated through
    it (torch drops the update).  A weight or bias of C elements in another
    shape than (C,) gets a gradient of its shape (torch's backward raises).
    """
    x = _tensor_arg(input, "input")
    if training:                 # torch.nn.functional.batch_norm's own checks, in its order
        if x.dim() == 0:
            raise IndexError("input must have shape (N, C, ...), got a 0-d tensor")
        if math.prod(x.shape[:1] + x.shape[2:]) == 1:
            raise ValueError("Expected more than 1 value per channel when training, got input "
                             f"of shape {tuple(x.shape)}")
    eps = _real_arg(eps, "eps")
    if training and eps <= 0.0:
        raise ValueError(f"eps must be positive in training, got {eps}")
    if eps < 0.0:
        raise ValueError(f"eps must be non-negative, got {eps}")
    params = {"running_mean": running_mean, "running_var": running_var, "weight": weight,
              "bias": bias}
    for name, t in params.items():
        if t is not None:
            _tensor_arg(t, name)
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    momentum = _real_arg(momentum, "momentum")
    if x.dim() < 2:
        # (torch's exception type for this depends on the mode)
        raise (IndexError if training else RuntimeError)(
            f"input must have shape (N, C, ...), got {tuple(x.shape)}")
    _float_arg(x, "input")
    if x.numel() == 0 or not 0.0 < eps < math.inf or (
            training and running_mean is not None and not 0.0 <= momentum <= 1.0):
        return torch.nn.functional.batch_norm(input, running_mean, running_var, weight, bias,
                                              training, momentum, eps)
    _batch_norm_params(x, training, params)
    if not (_channels_last(x) or x.is_contiguous()):
        x = x.contiguous()
    return _BatchNorm.apply(x, weight, bias, running_mean, running_var, training,
                            momentum if training and running_mean is not None else 0.0, eps)


class _BatchNormModule:
    """The forward of ``torch.nn.BatchNorm1d/2d`` (torch's, line for line)
    with fastopt's `batch_norm`; mixed in before the torch class."""

    def forward(self, input):
        self._check_input_dim(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                      else self.momentum)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        return batch_norm(input, self.running_mean if track else None,
                          self.running_var if track else None, self.weight, self.bias,
                          bn_training, factor, self.eps)


class BatchNorm1d(_BatchNormModule, torch.nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` computed by `batch_norm` (fastopt's kernels).

    The same module in every other respect: arguments, parameters, buffers
    and ``state_dict`` keys (``weight``, ``bias``, ``running_mean``,
    ``running_var``, ``num_batches_tracked``), ``momentum=None`` for a
    cumulative average, eval mode, ``track_running_stats=False``, input
    (N, C) or (N, C, L), ``.half()`` / ``.bfloat16()``.
    """


class BatchNorm2d(_BatchNormModule, torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` computed by `batch_norm` (fastopt's kernels);
    see `BatchNorm1d`.  Input (N, C, H, W), contiguous or channels_last."""
