"""Bind: after a trace, the caller's names for saved proxies become the real values.

Saved proxies are replaced wherever the caller's frame can reach them: its variables, and
inside the lists, dicts, tuples and the user's own objects those hold (nested, a few levels
deep; objects of torch, transformers and other libraries are not walked). A saved proxy
kept somewhere else still stands for its value (see :mod:`fxsight.record.recorder`).

nnsight 0.4's ``h.value`` after the block: a variable whose ``.value`` the caller's code
reads after the line the trace ended at (``print(h.value)``) stays the saved proxy, whose
``.value`` is the real value (it stands for its value in operations too).
"""

from __future__ import annotations

import ctypes
import dis
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


def _references_counted() -> bool:
    """Whether ``sys.getrefcount`` counts references as the early stop of a binding walk
    needs: exactly, one per container slot (CPython before 3.14, which may leave
    references of the stack uncounted)."""
    if sys.implementation.name != "cpython" or sys.version_info >= (3, 14):
        return False
    probe, holder = object(), []
    before = sys.getrefcount(probe)
    holder.append(probe)
    return sys.getrefcount(probe) == before + 1


_COUNTED = _references_counted()


class _Walk:
    """One binding walk over what a frame can reach.

    Given the trace's live saved proxies (``proxies``), the walk stops as soon as nothing
    but the walk itself refers to any of them (``sys.getrefcount``, against a probe held
    the same way): every reference was replaced, and the rest of what the frame reaches
    (a list of earlier results, thousands long) cannot hold one. Containers are walked
    from their end (what the block appended comes last)."""

    def __init__(self, resolve: Resolve, proxies: list[Proxy] | None = None,
                 until: Callable[[], bool] | None = None, spreading: frozenset = frozenset()):
        self.resolve = resolve
        # ids of the lists whose entries of several steps become one entry per step (the
        # plain lists kept with ``fxsight.save(list())``, as ``fxsight.list()``)
        self.spreading = spreading
        self.seen: set[int] = set()
        # (the probe first: it is held exactly as the proxies are)
        self.held = [object(), *proxies] if proxies and _COUNTED else None
        self.until = until  # or: the walk may stop once ``until()`` (after a proxy)
        self.finished = False

    def done(self) -> bool:
        """Whether the walk may stop: ``until()``, or no reference to a live saved proxy
        is left outside the walk (never, where references are not counted)."""
        if self.until is not None:
            self.finished = self.until()
        elif self.held is not None:
            counts = list(map(sys.getrefcount, self.held))
            self.finished = max(counts) <= counts[0]
        return self.finished

    def bound(self, value: Any, depth: int) -> Any:
        """``value`` with saved proxies replaced (containers changed in place where they
        can be; a tuple holding one is rebuilt and returned)."""
        kind = type(value)
        if kind is Proxy:
            ok, real = self.resolve(value)
            if self.until is not None:
                self.done()
            return real if ok else value
        if kind in _LEAF_TYPES or depth == 0 or self.finished or id(value) in self.seen:
            return value
        if isinstance(value, _ATOMS):
            _leaf(kind)
            return value
        self.seen.add(id(value))
        if isinstance(value, list):
            spreads = getattr(kind, "spreads_steps", False) or id(value) in self.spreading
            for i in range(len(value) - 1, -1, -1):
                item = value[i]
                spread = spreads and type(item) is Proxy and _of_several_steps(item)
                new = self.bound(item, depth - 1)
                if new is not item:
                    if spread and isinstance(new, list):
                        value[i:i + 1] = new  # (one entry per step, as appended per step)
                    else:
                        value[i] = new
                    item = new = None  # (no reference of the walk's own left behind)
                    if self.done():
                        break
                if self.finished:
                    break
        elif isinstance(value, dict):
            self._bound_mapping(value, depth)
        elif isinstance(value, tuple):
            items = [self.bound(item, depth - 1) for item in value]
            if any(new is not old for new, old in zip(items, value)):
                return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
        elif hasattr(value, "__dict__") and \
                kind.__module__.partition(".")[0] not in _LIBRARIES:
            self._bound_mapping(vars(value), depth)
        else:  # (no attributes, or a library's object: never walked)
            _leaf(kind)
        return value

    def _bound_mapping(self, mapping: dict, depth: int) -> None:
        for key in reversed(list(mapping)):
            item = mapping[key]
            new = self.bound(item, depth - 1)
            if new is not item:
                mapping[key] = new
                item = new = None
                if self.done():
                    return
            if self.finished:
                return


# the instructions that load a variable (3.11 - 3.14)
_LOADS = frozenset({"LOAD_FAST", "LOAD_NAME", "LOAD_GLOBAL", "LOAD_DEREF", "LOAD_FAST_CHECK",
                    "LOAD_FAST_BORROW"})
# (code, offset) -> the names ``value_reads`` found; bounded
_VALUE_READS: dict[tuple[types.CodeType, int], frozenset[str]] = {}
_MAX_VALUE_READS = 256


def _of_several_steps(proxy: Proxy) -> bool:
    """Whether ``proxy`` was recorded inside ``with tracer.all():`` / ``tracer.iter[...]``
    (not a ``for step in ...`` loop's step): its value is a list, one entry per step."""
    steps = object.__getattribute__(proxy, "_node").steps
    return steps is not None and not steps.single


def value_reads(frame: types.FrameType) -> frozenset[str]:
    """The variables whose ``.value`` the code of ``frame`` reads after the instruction it
    runs now (``print(h.value)`` after a trace's block: nnsight 0.4's spelling)."""
    key = (frame.f_code, frame.f_lasti)
    found = _VALUE_READS.get(key)
    if found is None:
        names = set()
        previous = None
        for instruction in dis.get_instructions(frame.f_code):
            if instruction.opname == "EXTENDED_ARG":
                continue
            if instruction.offset > frame.f_lasti and instruction.opname == "LOAD_ATTR" \
                    and instruction.argval == "value" and previous is not None and \
                    previous.opname in _LOADS:
                names.add(previous.argval)
            previous = instruction
        found = frozenset(names)
        if len(_VALUE_READS) >= _MAX_VALUE_READS:
            _VALUE_READS.clear()
        _VALUE_READS[key] = found
    return found


def _write_back(frame: types.FrameType) -> None:
    """Write ``frame.f_locals`` into its variables now, and make the dict the frame's
    view again (CPython writes it back once per ``f_locals`` read: a later change of the
    dict needs a write of its own)."""
    _LOCALS_TO_FAST(frame, 0)
    frame.f_locals  # noqa: B018 - (read for its effect)


def bind_frame(frame: types.FrameType | None, resolve: Resolve,
               saved: Callable[[], list[Proxy]] | None,
               until: Callable[[], bool] | None = None,
               spreading: frozenset = frozenset()) -> None:
    """Replace the saved proxies reachable from ``frame``'s variables.

    ``resolve(proxy)`` returns ``(True, value)`` for a proxy to replace. ``saved()``
    returns the trace's saved proxies still alive (none: nothing to do), whose references
    the walk counts to stop early (a function, not the list: a caller's frame or a
    wrapper holding the list would hold them too); ``None`` walks everything the frame
    reaches, or until ``until()`` is true (checked after each proxy). In the lists whose
    ids are in ``spreading``, a value of several decoding steps becomes one entry per step.
    """
    proxies = saved() if saved is not None else None
    if frame is None or (proxies is not None and not proxies):
        return
    namespace = frame.f_locals
    # (names read as ``name.value`` later stay proxies: nnsight 0.4's spelling)
    kept = [namespace[name] for name in value_reads(frame)
            if type(namespace.get(name)) is Proxy and resolve(namespace[name])[0]]
    if kept and proxies is not None:
        proxies = [p for p in proxies if not any(p is k for k in kept)]
        if not proxies:
            return
    fast = namespace is not frame.f_globals and _LOCALS_TO_FAST is not None
    walk = _Walk(resolve, proxies, until, spreading)
    proxies = None  # (the walk holds them: counted against its probe)
    changed = False
    names = list(namespace)
    # the names bound to a proxy first (found in C; most blocks end here)
    kinds = list(map(type, namespace.values()))
    index = -1
    while True:
        try:
            index = kinds.index(Proxy, index + 1)
        except ValueError:
            break
        if kept and any(namespace[names[index]] is k for k in kept):
            continue
        ok, new = resolve(namespace[names[index]])
        if ok:
            namespace[names[index]] = new
            changed = True
    new = None
    if changed and fast:
        _LOCALS_TO_FAST(frame, 0)  # (the variables let go of the proxies too)
        changed = False
        if walk.done():
            return
        frame.f_locals  # noqa: B018 - (read again: see _write_back)
    elif walk.done():
        return
    for index in range(len(names) - 1, -1, -1):  # (from the last: the block's own names)
        kind = kinds[index]
        if kind is Proxy or kind in _LEAF_TYPES:
            continue
        name = names[index]
        value = namespace[name]
        new = walk.bound(value, _DEPTH)
        if new is not value:  # (a tuple, rebuilt)
            namespace[name] = new
            changed = True
            value = new = None
            if fast:
                _write_back(frame)
                changed = False
            if walk.done():
                break
        if walk.finished:
            break
    if changed and fast:
        _LOCALS_TO_FAST(frame, 0)


def bind_objects(objects: list, resolve: Resolve,
                 saved: Callable[[], list[Proxy]] | None = None,
                 until: Callable[[], bool] | None = None,
                 spreading: frozenset = frozenset()) -> None:
    """Replace the saved proxies inside ``objects`` (lists, dicts, the user's objects kept
    with ``fxsight.save(obj)``), in place; ``saved``, ``until`` and ``spreading`` as for
    :func:`bind_frame`."""
    proxies = saved() if saved is not None else None
    if proxies is not None and not proxies:
        return
    walk = _Walk(resolve, proxies, until, spreading)
    proxies = None
    if walk.done():
        return
    for value in objects:
        walk.bound(value, _DEPTH)
        if walk.finished:
            return
