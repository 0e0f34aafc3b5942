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
from itertools import islice
from typing import Any, Callable, Iterable

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
_FIRST_LOOK = 64  # the items of each list or dict a walk's first pass looks at, from its end
_ATOMS = (str, bytes, int, float, bool, type(None), torch.Tensor, torch.nn.Module, type,
          types.ModuleType, types.FunctionType, types.MethodType, types.BuiltinFunctionType)
# packages whose objects hold no user values: their attributes are not walked
_LIBRARIES = frozenset({"builtins", "fxsight", "torch", "transformers", "tokenizers",
                        "accelerate", "numpy", "pandas", "matplotlib", "tqdm", "datasets"})

Resolve = Callable[[Proxy], "tuple[bool, Any]"]
Spreads = Callable[[list, Any], bool]

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
                 until: Callable[[], bool] | None = None, spreads: Spreads | None = None):
        self.resolve = resolve
        self.spreads = spreads  # (list, item) -> whether item's values are one entry each
        self.seen: set[int] = set()
        # (the probe first: it is held exactly as the proxies are)
        self.held = [object(), *proxies] if proxies and _COUNTED else None
        self.until = until  # or: the walk may stop once ``until()`` (after a proxy)
        self.finished = False
        # the items looked at in each list or dict, from its end (``None``: all of them)
        self.limit: int | None = None

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
            spreads = self.spreads
            last = -1 if self.limit is None else max(-1, len(value) - 1 - self.limit)
            for i in range(len(value) - 1, last, -1):
                item = value[i]
                spread = spreads is not None and type(item) is Proxy and spreads(value, item)
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
        keys = list(mapping) if self.limit is None or len(mapping) <= self.limit else \
            list(islice(reversed(mapping), self.limit))[::-1]
        for key in reversed(keys):
            item = mapping[key]
            new = self.bound(item, depth - 1)
            if new is not item:
                mapping[key] = new
                item = new = None
                if self.done():
                    return
            if self.finished:
                return


def reachable_lists(roots: Iterable[Any], depth: int = _DEPTH,
                    budget: int = 200_000) -> list[list]:
    """The lists reachable from ``roots`` through lists, dicts, tuples and the user's own
    objects, ``depth`` levels deep, as the binding walks them (no library's objects); at
    most ``budget`` values are looked at."""
    found: list[list] = []
    seen: set[int] = set()
    stack = [(root, depth) for root in roots]
    while stack and budget > 0:
        value, left = stack.pop()
        budget -= 1
        kind = type(value)
        if kind is Proxy or kind in _LEAF_TYPES or left == 0 or id(value) in seen:
            continue
        if isinstance(value, _ATOMS):
            _leaf(kind)
            continue
        seen.add(id(value))
        if isinstance(value, list):
            found.append(value)
            items: Iterable[Any] = value
        elif isinstance(value, dict):
            items = value.values()
        elif isinstance(value, tuple):
            items = value
        elif hasattr(value, "__dict__") and \
                kind.__module__.partition(".")[0] not in _LIBRARIES:
            items = vars(value).values()
        else:
            _leaf(kind)
            continue
        stack.extend((item, left - 1) for item in items)
    return found


# the instructions that load a variable (3.11 - 3.14)
_LOADS = frozenset({"LOAD_FAST", "LOAD_NAME", "LOAD_GLOBAL", "LOAD_DEREF", "LOAD_FAST_CHECK",
                    "LOAD_FAST_BORROW"})
# (code, offset) -> the names ``value_reads`` found; bounded
_VALUE_READS: dict[tuple[types.CodeType, int], frozenset[str]] = {}
_MAX_VALUE_READS = 256


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
               spreads: Spreads | None = None) -> None:
    """Replace the saved proxies reachable from ``frame``'s variables.

    ``resolve(proxy)`` returns ``(True, value)`` for a proxy to replace. ``saved()``
    returns the trace's saved proxies still alive (none: nothing to do), whose references
    the walk counts to stop early (a function, not the list: a caller's frame or a
    wrapper holding the list would hold them too); ``None`` walks everything the frame
    reaches, or until ``until()`` is true (checked after each proxy). ``spreads(list,
    proxy)``: whether the proxy's value, a list, is put into that list one entry each
    (appended per decoding step).
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
    walk = _Walk(resolve, proxies, until, spreads)
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
    # the containers the variables hold, from the last name on (the block's own), then
    # the module globals the frame's code names (changed in place, never rebound); first
    # the last items of each (what the block stored comes last), then all of them, so
    # that a long list of earlier results is not walked before a small dict
    reached = [names[i] for i in range(len(names) - 1, -1, -1)
               if kinds[i] is not Proxy and kinds[i] not in _LEAF_TYPES]
    named = _named_globals(frame) if namespace is not frame.f_globals else []
    early = walk.until is not None or walk.held is not None  # (the walk may end early)
    for limit in (_FIRST_LOOK, None) if early else (None,):
        walk.limit = limit
        walk.seen.clear()
        for name in reached:
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
        value = new = None
        for value in named:
            if walk.finished:
                break
            walk.bound(value, _DEPTH)
        value = None
        if walk.finished:
            break
    named = None
    if changed and fast:
        _LOCALS_TO_FAST(frame, 0)


def _named_globals(frame: types.FrameType) -> list[Any]:
    """The module globals ``frame``'s code names (``captured[k] = value`` in a function,
    ``captured`` a dict of its module) that a walk enters (no atoms)."""
    namespace = frame.f_globals
    found = [namespace[name] for name in frame.f_code.co_names if name in namespace]
    return [value for value in found
            if type(value) not in _LEAF_TYPES and not isinstance(value, _ATOMS)]


def bind_objects(objects: list, resolve: Resolve,
                 saved: Callable[[], list[Proxy]] | None = None,
                 until: Callable[[], bool] | None = None,
                 spreads: Spreads | None = None) -> None:
    """Replace the saved proxies inside ``objects`` (lists, dicts, the user's objects kept
    with ``fxsight.save(obj)``), in place; ``saved``, ``until`` and ``spreads`` as for
    :func:`bind_frame`."""
    proxies = saved() if saved is not None else None
    if proxies is not None and not proxies:
        return
    walk = _Walk(resolve, proxies, until, spreads)
    proxies = None
    if walk.done():
        return
    for value in objects:
        walk.bound(value, _DEPTH)
        if walk.finished:
            return


def _variable_references() -> int:
    """How many references a function's variable adds to its value once the frame's
    ``f_locals`` has been read: the variable's own, and the ``f_locals`` dict's where
    that is a copy (before 3.13)."""
    value = object()
    before = sys.getrefcount(value)
    sys._getframe().f_locals  # noqa: B018 - (read for its effect)
    return 1 + sys.getrefcount(value) - before


_VARIABLE_REFERENCES = _variable_references()
_OPTIMIZED = 0x1  # (a code flag: the function's variables live in the frame, not a dict)


def find_stored(frame: types.FrameType | None, waiting: Callable[[], list[Proxy]],
                found: Callable[[Proxy], None],
                held_elsewhere: Callable[[Proxy], int] = lambda proxy: 0,
                budget: int = 200_000) -> None:
    """Call ``found(proxy)`` once for each of the proxies ``waiting()`` returns that the
    block stored somewhere other than ``frame``'s variables (``captured[k] = value``,
    ``results.append(value)``, ``obj.attr = value`` in a trace's block).

    Where references are counted exactly, no walk is needed: a proxy referred to by more
    than ``frame``'s variables, this call and ``held_elsewhere(proxy)`` (fxsight's own
    holders) is held by some container, one the frame reaches or not (a module's list).
    Elsewhere the lists, dicts, tuples and user objects the frame's variables reach are
    walked, smaller containers first and each from its end, looking at no more than
    ``budget`` values.
    """
    proxies = waiting()
    if not proxies:
        return
    namespace = frame.f_locals if frame is not None else {}
    per_variable = _VARIABLE_REFERENCES if frame is not None and \
        namespace is not frame.f_globals and frame.f_code.co_flags & _OPTIMIZED else 1
    variables: dict[int, int] = {}
    for value in namespace.values():
        if type(value) is Proxy:
            variables[id(value)] = variables.get(id(value), 0) + 1
    value = None
    if _COUNTED:
        held = [object(), *proxies]  # (the probe first: held exactly as the proxies are)
        proxies = None
        counts = list(map(sys.getrefcount, held))
        stored = [proxy for proxy, count in zip(held[1:], counts[1:])
                  if count - counts[0] - per_variable * variables.get(id(proxy), 0)
                  - held_elsewhere(proxy) > 0]
        held = None
        for proxy in stored:
            found(proxy)
        return
    _walk_for(proxies, namespace, found, budget)


def _walk_for(proxies: list[Proxy], namespace: dict, found: Callable[[Proxy], None],
              budget: int) -> None:
    """:func:`find_stored` where references are not counted: call ``found`` for each of
    ``proxies`` inside what ``namespace``'s values reach (not the values themselves)."""
    index = {id(proxy): proxy for proxy in proxies}
    reported: set[int] = set()
    seen: set[int] = set()
    left = [budget]

    def visit(container: Any, depth: int) -> bool:
        """Walk ``container``; True once the walk may end."""
        kind = type(container)
        if isinstance(container, (list, tuple)):
            items: Iterable[Any] = reversed(container)
        elif isinstance(container, dict):
            items = reversed(container.values())
        elif hasattr(container, "__dict__") and \
                kind.__module__.partition(".")[0] not in _LIBRARIES:
            items = reversed(vars(container).values())
        else:
            _leaf(kind)
            return False
        nested = []
        for item in items:
            left[0] -= 1
            if left[0] < 0:
                return True
            kind = type(item)
            if kind is Proxy:
                if index.get(id(item)) is item and id(item) not in reported:
                    reported.add(id(item))
                    found(item)
                    if len(reported) == len(index):
                        return True
            elif depth > 1 and _enters(item, seen):
                nested.append(item)
        nested.sort(key=_size)
        return any(visit(item, depth - 1) for item in nested)

    roots = [value for value in reversed(namespace.values()) if _enters(value, seen)]
    roots.sort(key=_size)
    for root in roots:
        if visit(root, _DEPTH):
            return


def _enters(value: Any, seen: set[int]) -> bool:
    """Whether a walk for stored proxies goes into ``value`` (a container or object not
    seen yet; not a proxy, nor an atom), marking it seen."""
    kind = type(value)
    if kind is Proxy or kind in _LEAF_TYPES:
        return False
    if isinstance(value, _ATOMS):
        _leaf(kind)
        return False
    if id(value) in seen:
        return False
    seen.add(id(value))
    return True


def _size(container: Any) -> int:
    """How many items a walk of ``container`` looks at (objects: their attributes)."""
    if isinstance(container, (list, tuple, dict)):
        return len(container)
    attributes = getattr(container, "__dict__", None)
    return len(attributes) if isinstance(attributes, dict) else 0
