"""The attribute values a model-state snapshot (:mod:`.state`) compares by value: plain
values (scalars, enums, small containers of those and of tensors), settings objects
(a config: a ``__dict__`` or slots of plain values, tensors, functions), how a snapshot
copies them and holds other objects weakly, and how it compares them."""

from __future__ import annotations

import collections
import enum
import sys
import types
import weakref
from typing import Any

import torch
from .dispatch import is_accelerate_hook


_SCALARS = frozenset({type(None), bool, int, float, complex, str, bytes, torch.dtype,
                      torch.device, torch.layout, torch.memory_format})
_MAX_CONTAINER = 64  # elements of a plain list, dict or set compared by value each trace
# containers of plain values compared by value (a snapshot holds a copy of the mutable ones)
_SEQUENCES = frozenset({tuple, list, set, frozenset, torch.Size, collections.deque})
_MAPPINGS = frozenset({dict, collections.OrderedDict, collections.defaultdict})
_CONTAINERS = _SEQUENCES | _MAPPINGS
_MUTABLE = frozenset({list, set, collections.deque, *_MAPPINGS})


def _plain(value: Any, budget: list[int] | None = None, inner: bool = False) -> bool:
    """A value compared by equality: scalars, enums and small containers of those, whose
    elements may be tensors too (``inner``: a steering module's dict of vectors; a
    container's copy holds the same tensors, so replacing one shows, by identity or, for
    one element, by value; a tensor changed in place is the one the graph reads)."""
    kind = type(value)
    if kind in _SCALARS or isinstance(value, enum.Enum) or \
            (inner and isinstance(value, torch.Tensor)):
        return True
    if budget is None:
        budget = [_MAX_CONTAINER]
    if kind in _SEQUENCES:
        budget[0] -= len(value)
        return budget[0] >= 0 and all(_plain(v, budget, True) for v in value)
    if kind in _MAPPINGS:
        if kind is collections.defaultdict and not (
                value.default_factory is None or isinstance(value.default_factory, type)):
            return False  # (a factory function could lead back to the model)
        budget[0] -= len(value)
        return budget[0] >= 0 and all(_plain(k, budget) and _plain(v, budget, True)
                                      for k, v in value.items())
    return False


def _copy(value: Any) -> Any:
    """A plain value as it is now (mutable containers copied: an in-place change shows)."""
    kind = type(value)
    if kind is list:
        return [_copy(v) for v in value]
    if kind in _MAPPINGS:
        items = {k: _copy(v) for k, v in value.items()}
        if kind is collections.defaultdict:
            return collections.defaultdict(value.default_factory, items)
        return items if kind is dict else kind(items)
    if kind is set:
        return set(value)
    if kind is collections.deque:
        return collections.deque(map(_copy, value), value.maxlen)
    return value


def _weak(value: Any) -> Any:
    """A weak proxy of ``value`` where it can be: it compares equal to its referent alone
    (through the referent's own comparison) and keeps nothing alive."""
    if value is None or type(value) in _SCALARS:
        return value
    try:
        return weakref.proxy(value)
    except TypeError:
        return value


def _plain_any_size(value: Any) -> bool:
    """A container of plain values of any size (a config's ``id2label`` of 1000 labels, its
    ``layer_types`` of 80 layers): a settings object holds it, compared by identity (its
    contents changed in place are not seen, as a module's large containers)."""
    return type(value) in _CONTAINERS and _plain(value, [sys.maxsize])


def _named_function(value: Any) -> bool:
    """A function or class a settings object may hold (its ``act_fn``), compared by
    identity: a class, a builtin function of a module or class (``torch.relu``), or a
    Python function with no closure and plain defaults (a module's ``def``); none of
    them leads back to a model."""
    kind = type(value)
    if isinstance(value, type):
        return True
    if kind is types.BuiltinFunctionType:
        owner = getattr(value, "__self__", None)
        return owner is None or isinstance(owner, (types.ModuleType, type))
    return kind is types.FunctionType and value.__closure__ is None and \
        _plain(value.__defaults__ or ()) and _plain(value.__kwdefaults__ or {})


def _data(value: Any, depth: int = 2) -> bool:
    """A settings object (a config, a steering helper): attributes in a ``__dict__`` that
    are plain (small containers of plain values compared by value, larger ones by
    identity), tensors (by identity), functions (:func:`_named_function`, by identity) or
    settings objects themselves; held strongly, it cannot lead back to a model."""
    if isinstance(value, (type, torch.nn.Module, torch.Tensor, dict, list, tuple, set,
                          frozenset)) or callable(value) or is_accelerate_hook(value):
        return False
    attributes = getattr(value, "__dict__", None)
    if type(attributes) is not dict or depth == 0:
        return False
    return all(_plain(v, None, True) or _plain_any_size(v) or _named_function(v) or
               _data(v, depth - 1) for v in attributes.values())


def _slots(value: Any) -> tuple[str, ...] | None:
    """The attribute names of a settings object without a ``__dict__`` (a dataclass made
    with ``slots=True``) whose attributes are all set and plain, else ``None``."""
    kind = type(value)
    if kind in _SCALARS or kind in _CONTAINERS or "__slots__" not in kind.__dict__ or \
            isinstance(value, (type, torch.nn.Module, torch.Tensor)) or callable(value):
        return None
    try:
        if hasattr(value, "__dict__"):
            return None
        names = []
        for base in kind.__mro__:
            declared = base.__dict__.get("__slots__", ())
            names += [declared] if isinstance(declared, str) else list(declared)
        names = tuple(n for n in dict.fromkeys(names) if n not in ("__weakref__", "__dict__"))
        plain = names and all(_plain(v) or _plain_any_size(v) or _named_function(v)
                              for v in (getattr(value, n) for n in names))
    except Exception:  # noqa: BLE001 - a slot never set, an object's own __getattr__
        return None
    return names if plain else None


def _slot_values(value: Any, names: tuple[str, ...]) -> tuple:
    """The values of ``value``'s slots ``names``."""
    return tuple(getattr(value, n) for n in names)


def _holds_mutable(value: Any) -> bool:
    """Whether a snapshot's value is or holds a list, dict, set or deque (changed in
    place, the dict that holds it keeps its version)."""
    kind = type(value)
    if kind in _MUTABLE:
        return True
    if kind is tuple or kind is frozenset or kind is torch.Size:
        return any(map(_holds_mutable, value))
    return False


def _same(now: Any, old: Any) -> bool:
    if now is old:
        return True
    try:
        return type(now) is old.__class__ and bool(now == old)
    except Exception:  # noqa: BLE001 - tensors compared, a dead proxy
        return False
