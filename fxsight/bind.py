"""Bind: after a trace, the caller's names for saved proxies become the real values.

Saved proxies are replaced wherever the caller's frame can reach them: its variables, and
inside the lists, dicts, tuples and the user's own objects those hold (nested, a few levels
deep; objects of torch, transformers and other libraries are not walked). A saved proxy
kept somewhere else still stands for its value (see :mod:`fxsight.record.recorder`).
"""

from __future__ import annotations

import ctypes
import sys
import types
from typing import Any, Callable

import torch

from .record.proxy import Proxy

def _locals_to_fast() -> Callable[[types.FrameType, int], None] | None:
    """CPython's ``PyFrame_LocalsToFast`` (writes a frame's ``f_locals`` back into its
    variables; before 3.13), as a function object of fxsight's own with its argument
    types declared (``ctypes.pythonapi``'s shared one is left as it is)."""
    if sys.version_info >= (3, 13) or not hasattr(ctypes.pythonapi, "PyFrame_LocalsToFast"):
        return None
    prototype = ctypes.PYFUNCTYPE(None, ctypes.py_object, ctypes.c_int)
    return prototype(("PyFrame_LocalsToFast", ctypes.pythonapi))


_LOCALS_TO_FAST = _locals_to_fast()
_DEPTH = 4  # how deep into containers and objects the walk goes
_ATOMS = (str, bytes, int, float, bool, type(None), torch.Tensor, torch.nn.Module, type,
          types.ModuleType, types.FunctionType, types.MethodType, types.BuiltinFunctionType)
# packages whose objects hold no user values: their attributes are not walked
_LIBRARIES = frozenset({"builtins", "fxsight", "torch", "transformers", "tokenizers",
                        "accelerate", "numpy", "pandas", "matplotlib", "tqdm", "datasets"})

Resolve = Callable[[Proxy], "tuple[bool, Any]"]

# types whose values the walk never enters (atoms, objects of libraries or without a
# ``__dict__``), learned as it goes: one set lookup each next time (bounded)
_LEAF_TYPES: set[type] = set()
_MAX_LEAF_TYPES = 512


def _leaf(kind: type) -> None:
    if len(_LEAF_TYPES) < _MAX_LEAF_TYPES:
        _LEAF_TYPES.add(kind)


class _Walk:
    """One binding walk over what a frame can reach."""

    def __init__(self, resolve: Resolve):
        self.resolve = resolve
        self.seen: set[int] = set()

    def bound(self, value: Any, depth: int) -> Any:
        """``value`` with saved proxies replaced (containers changed in place where they
        can be; a tuple holding one is rebuilt and returned)."""
        kind = type(value)
        if kind is Proxy:
            ok, real = self.resolve(value)
            return real if ok else value
        if kind in _LEAF_TYPES or depth == 0 or id(value) in self.seen:
            return value
        if isinstance(value, _ATOMS):
            _leaf(kind)
            return value
        self.seen.add(id(value))
        if isinstance(value, list):
            for i, item in enumerate(value):
                new = self.bound(item, depth - 1)
                if new is not item:
                    value[i] = new
        elif isinstance(value, dict):
            for key, item in list(value.items()):
                new = self.bound(item, depth - 1)
                if new is not item:
                    value[key] = new
        elif isinstance(value, tuple):
            items = [self.bound(item, depth - 1) for item in value]
            if any(new is not old for new, old in zip(items, value)):
                return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
        elif hasattr(value, "__dict__") and \
                kind.__module__.partition(".")[0] not in _LIBRARIES:
            attributes = vars(value)
            for key, item in list(attributes.items()):
                new = self.bound(item, depth - 1)
                if new is not item:
                    attributes[key] = new
        else:  # (no attributes, or a library's object: never walked)
            _leaf(kind)
        return value


def bind_frame(frame: types.FrameType | None, resolve: Resolve, saved: int) -> None:
    """Replace the saved proxies reachable from ``frame``'s variables (``saved``: how many
    the trace has; none, nothing to do).

    ``resolve(proxy)`` returns ``(True, value)`` for a proxy to replace.
    """
    if frame is None or saved == 0:
        return
    namespace = frame.f_locals
    walk = _Walk(resolve)
    changed = False
    for name, value in list(namespace.items()):
        kind = type(value)
        if kind is Proxy:  # (the common cases without a call: a saved name, a leaf)
            ok, new = resolve(value)
            if not ok:
                continue
        elif kind in _LEAF_TYPES:
            continue
        else:
            new = walk.bound(value, _DEPTH)
            if new is value:
                continue
        namespace[name] = new
        changed = True
    if changed and namespace is not frame.f_globals and _LOCALS_TO_FAST is not None:
        _LOCALS_TO_FAST(frame, 0)


def bind_objects(objects: list, resolve: Resolve) -> None:
    """Replace the saved proxies inside ``objects`` (lists, dicts, the user's objects kept
    with ``fxsight.save(obj)``), in place."""
    walk = _Walk(resolve)
    for value in objects:
        walk.bound(value, _DEPTH)
