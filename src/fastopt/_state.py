"""Optimizer state containers that count their edits.

An optimizer's ``state`` belongs to its user, who may clear it, drop an
entry or assign new arrays (tensors) to it between steps; the next step must
use what it then holds.  Comparing every entry at every step would cost a
dictionary lookup per array per step, so the containers count instead:
every edit of the container or of one of its entries adds one to the
container's ``edits``, and a step that sees a count it has not seen binds
its native step again to what the state holds.  In-place writes into the
arrays need no count: the native step uses their memory.

`StateMap` is torch's ``defaultdict(dict)`` (``fastopt.torch``), `StateList`
the NumPy API's list of dicts; their entries are `Entry` dicts.  They pickle
and copy as the plain containers.
"""
from __future__ import annotations

import collections
from typing import Any


class Entry(dict):  # type: ignore[type-arg]
    """One parameter's state: a dict that counts its edits in its owner's."""

    __slots__ = ("_owner",)

    def __init__(self, owner: Any, values: Any = ()) -> None:
        super().__init__(values)
        self._owner = owner

    def _edit(self) -> None:
        self._owner.edits += 1

    def __setitem__(self, key: Any, value: Any) -> None:
        self._edit()
        super().__setitem__(key, value)

    def __delitem__(self, key: Any) -> None:
        self._edit()
        super().__delitem__(key)

    def clear(self) -> None:
        self._edit()
        super().clear()

    def pop(self, *args: Any) -> Any:
        self._edit()
        return super().pop(*args)

    def popitem(self) -> Any:
        self._edit()
        return super().popitem()

    def setdefault(self, key: Any, default: Any = None) -> Any:
        self._edit()
        return super().setdefault(key, default)

    def update(self, *args: Any, **kwargs: Any) -> None:
        self._edit()
        super().update(*args, **kwargs)

    def __ior__(self, other: Any) -> Entry:  # type: ignore[misc]
        self.update(other)
        return self

    def copy(self) -> dict[Any, Any]:
        return dict(self)

    def __reduce__(self) -> Any:
        return (dict, (dict(self),))


def _entry(owner: Any, value: Any) -> Any:
    """`value` as an entry of `owner` (a dict is copied into one; anything
    else is kept, for the next step to refuse)."""
    if type(value) is Entry and value._owner is owner:
        return value
    if isinstance(value, dict):
        return Entry(owner, value)
    return value


class StateMap(collections.defaultdict):  # type: ignore[type-arg]
    """torch's ``opt.state``: a ``defaultdict(dict)`` of `Entry` dicts keyed
    by parameter, counting edits."""

    def __init__(self, items: Any = ()) -> None:
        super().__init__(self._new_entry)
        self.edits = 0
        for key, value in items:
            super().__setitem__(key, _entry(self, value))

    def _new_entry(self) -> Entry:
        return Entry(self)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.edits += 1
        super().__setitem__(key, _entry(self, value))

    def __delitem__(self, key: Any) -> None:
        self.edits += 1
        super().__delitem__(key)

    def clear(self) -> None:
        self.edits += 1
        super().clear()

    def pop(self, *args: Any) -> Any:
        self.edits += 1
        return super().pop(*args)

    def popitem(self) -> Any:
        self.edits += 1
        return super().popitem()

    def setdefault(self, key: Any, default: Any = None) -> Any:
        self.edits += 1
        return super().setdefault(key, _entry(self, default))

    def update(self, *args: Any, **kwargs: Any) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __ior__(self, other: Any) -> StateMap:  # type: ignore[misc]
        self.update(other)
        return self

    def copy(self) -> collections.defaultdict[Any, Any]:  # type: ignore[override]
        return collections.defaultdict(dict, self)

    def __reduce__(self) -> Any:
        return (collections.defaultdict, (dict,), None, None,
                iter([(k, dict(v) if isinstance(v, dict) else v) for k, v in self.items()]))


class StateList(list):  # type: ignore[type-arg]
    """The NumPy API's ``opt.state``: a list of `Entry` dicts, one per
    parameter, counting edits."""

    def __init__(self, items: Any = ()) -> None:
        self.edits = 0
        super().__init__(_entry(self, v) for v in items)

    def __setitem__(self, index: Any, value: Any) -> None:
        self.edits += 1
        if isinstance(index, slice):
            value = [_entry(self, v) for v in value]
        else:
            value = _entry(self, value)
        super().__setitem__(index, value)

    def __delitem__(self, index: Any) -> None:
        self.edits += 1
        super().__delitem__(index)

    def append(self, value: Any) -> None:
        self.edits += 1
        super().append(_entry(self, value))

    def extend(self, values: Any) -> None:
        self.edits += 1
        super().extend(_entry(self, v) for v in values)

    def insert(self, index: Any, value: Any) -> None:
        self.edits += 1
        super().insert(index, _entry(self, value))

    def pop(self, *args: Any) -> Any:
        self.edits += 1
        return super().pop(*args)

    def remove(self, value: Any) -> None:
        self.edits += 1
        super().remove(value)

    def clear(self) -> None:
        self.edits += 1
        super().clear()

    def sort(self, *args: Any, **kwargs: Any) -> None:
        self.edits += 1
        super().sort(*args, **kwargs)

    def reverse(self) -> None:
        self.edits += 1
        super().reverse()

    def __iadd__(self, values: Any) -> StateList:  # type: ignore[misc]
        self.extend(values)
        return self

    def __imul__(self, n: Any) -> StateList:  # type: ignore[misc]
        self.edits += 1
        super().__imul__(n)
        return self

    def copy(self) -> list[Any]:
        return list(self)

    def __reduce__(self) -> Any:
        return (list, ([dict(v) if isinstance(v, dict) else v for v in self],))
