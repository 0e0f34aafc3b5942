"""Cache objects (transformers' ``DynamicCache``, ``EncoderDecoderCache``, the layers of
hybrid and state-space models) as tensors, fxsight-locally.

``torch.export`` takes and returns pytrees of tensors only, and transformers registers
no pytree node for its caches on import (registering one would change the whole
process). Here a cache is taken apart into its tensors and a :class:`Skeleton` (its
classes and Python values), and built again from them, without any registration:
:func:`flatten` / :func:`build` / :func:`update` walk the object's attributes (lists,
tuples, dicts, and objects of transformers' cache classes); anything else inside a cache
makes it unsupported (:class:`Unsupported`).

At a module boundary a cache is not a tensor: the capture keeps a :class:`CacheRef`
there, which a run resolves to the cache the forward pass ends with (the same object a
hook would see, in the state a saved object has after the forward pass).
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from typing import Any

import torch

from .._torch import mark_static_address, pytree
from ..errors import NotOnGraph

# Python values a cache may hold (besides tensors and containers)
PLAIN_VALUES = (type(None), bool, int, float, str, torch.device, torch.dtype)


class Unsupported(Exception):
    """A cache holding something :func:`flatten` cannot take apart."""


def _cache_base() -> type | None:
    module = sys.modules.get("transformers.cache_utils")  # (never imported here)
    return getattr(module, "Cache", None)


def is_cache(value: Any) -> bool:
    """Whether ``value`` is a transformers cache object."""
    base = _cache_base()
    return base is not None and isinstance(value, base)


def _is_state_object(value: Any) -> bool:
    """An object inside a cache taken apart attribute by attribute (its layers)."""
    module = type(value).__module__
    return module.startswith("transformers.") and hasattr(value, "__dict__") and \
        not isinstance(value, (torch.Tensor, torch.nn.Module, type))


@dataclass(frozen=True)
class Skeleton:
    """A cache object without its tensors: ``kind`` is ``"tensor"``, ``"const"`` (``value``),
    ``"list"``/``"tuple"``/``"dict"`` (``value`` = keys for dicts) or ``"object"``
    (``value`` = the class, ``children`` = its attributes by name)."""

    kind: str
    value: Any = None
    names: tuple = ()
    children: tuple = ()

    def count(self) -> int:
        """How many tensors it takes."""
        if self.kind == "tensor":
            return 1
        return sum(child.count() for child in self.children)


def flatten(value: Any, symbolic_ok: bool = True) -> tuple[list[torch.Tensor], Skeleton]:
    """``value``'s tensors (in a fixed order) and its skeleton."""
    tensors: list[torch.Tensor] = []

    def walk(v: Any, depth: int) -> Skeleton:
        if depth > 16:
            raise Unsupported("a cache nested too deep")
        if isinstance(v, torch.Tensor):
            tensors.append(v)
            return Skeleton("tensor")
        if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            if not symbolic_ok:
                raise Unsupported("a cache holds a symbolic size")
            v = v.node.hint
        if type(v) in PLAIN_VALUES or (isinstance(v, type) and not isinstance(v, torch.Tensor)):
            return Skeleton("const", v)
        if type(v) in (list, tuple):
            return Skeleton(type(v).__name__, None, (),
                            tuple(walk(item, depth + 1) for item in v))
        if type(v) is dict:
            keys = tuple(v)
            if any(type(k) not in PLAIN_VALUES for k in keys):
                raise Unsupported("a cache holds a dict with unusual keys")
            return Skeleton("dict", keys, (), tuple(walk(v[k], depth + 1) for k in keys))
        if _is_state_object(v):
            names = tuple(vars(v))
            return Skeleton("object", type(v), names,
                            tuple(walk(getattr(v, n), depth + 1) for n in names))
        raise Unsupported(f"a cache holds a {type(v).__name__}")

    skeleton = walk(value, 0)
    return tensors, skeleton


def build(skeleton: Skeleton, tensors: list[Any]) -> Any:
    """A new object of ``skeleton``'s layout holding ``tensors``."""
    it = iter(tensors)

    def make(s: Skeleton) -> Any:
        if s.kind == "tensor":
            return next(it)
        if s.kind == "const":
            return s.value
        if s.kind == "list":
            return [make(c) for c in s.children]
        if s.kind == "tuple":
            return tuple(make(c) for c in s.children)
        if s.kind == "dict":
            return {k: make(c) for k, c in zip(s.value, s.children)}
        obj = object.__new__(s.value)
        for name, child in zip(s.names, s.children):
            obj.__dict__[name] = make(child)
        return obj

    return make(skeleton)


def update(target: Any, skeleton: Skeleton, tensors: list[Any],
           own_values: bool = False) -> None:
    """Give ``target`` (an object of a cache class) the state ``skeleton`` + ``tensors``
    describe, in place: its layer objects are kept where their classes match (as a
    forward pass updates them), replaced where not. ``own_values``: ``target`` is another
    object than the one ``skeleton`` was taken from (a cache made inside a graph, whose
    state goes into the one the caller holds): its own Python values at its top level
    (its options, attributes the other lacks) are kept; its layers take the new state."""
    it = iter(tensors)

    def make(s: Skeleton) -> Any:
        return build(s, [next(it) for _ in range(s.count())])

    def into(obj: Any, s: Skeleton, top: bool = False) -> None:
        state = obj.__dict__
        keep = top and own_values
        for name in [n for n in state if n not in s.names and not keep]:
            del state[name]
        static = _static_addresses(type(obj))
        renewed = False  # (a tensor of static address replaced: the layer was initialized)
        for name, child in zip(s.names, s.children):
            kind = child.kind
            if kind == "tensor":  # (the common leaves, without building through make)
                tensor = next(it)
                renewed = renewed or (name in static and state.get(name) is not tensor)
                state[name] = tensor
                continue
            if kind == "const":
                if not keep:
                    state[name] = child.value
                continue
            old = state.get(name)
            if kind == "object" and type(old) is child.value:
                into(old, child)
            elif child.kind == "list" and type(old) is list and len(old) == len(child.children):
                for index, item in enumerate(child.children):
                    if item.kind == "object" and type(old[index]) is item.value:
                        into(old[index], item)
                    else:
                        old[index] = make(item)
            elif child.kind == "dict" and type(old) is dict and tuple(old) == child.value:
                for key, item in zip(child.value, child.children):
                    old[key] = make(item)
            else:
                state[name] = make(child)
        if renewed:
            initialized.append((obj, static))

    initialized: list[tuple[Any, frozenset[str]]] = []
    try:
        into(target, skeleton, top=True)
    finally:
        into = None  # (a recursive closure refers to itself: garbage for the collector)
    if initialized and not torch.compiler.is_compiling():
        for obj, names in initialized:
            for name in names:
                value = obj.__dict__.get(name)
                if isinstance(value, torch.Tensor):
                    mark_static_address(value)


# transformers' static cache layers allocate their tensors once and update them in place;
# initializing outside a compiled region, they mark them as having a static address
# (``mark_static_address``), so that compiled code (CUDA graphs above all) takes them as
# they are and may update them in place. Initialized in a captured graph, a layer skips
# that (it is compiling): where :func:`update` gives such a layer new tensors, it marks
# them (all of the layer's marked attributes), as the plain forward pass would have.
# (class in ``transformers.cache_utils`` -> the attributes its initialization marks;
# checked transformers 5.17-5.24)
_MARKED_BY_TRANSFORMERS = {
    "StaticLayer": ("keys", "values", "cumulative_length"),
    "StaticIndexedLayer": ("indexer_keys", "indexer_cumulative_length"),
}


@functools.lru_cache(maxsize=256)
def _static_addresses(kind: type) -> frozenset[str]:
    """The attributes of a cache object of class ``kind`` that a plain forward pass gives
    a static address (see ``_MARKED_BY_TRANSFORMERS``)."""
    names: set[str] = set()
    for base in kind.__mro__:
        if base.__module__ == "transformers.cache_utils":
            names.update(_MARKED_BY_TRANSFORMERS.get(base.__name__, ()))
    return frozenset(names)


# --- inputs ----------------------------------------------------------------------------
def expand(args: tuple, kwargs: dict) -> tuple[tuple, dict, list[tuple[int, Any, Skeleton]]]:
    """``(args, kwargs)`` with every cache object replaced by the tuple of its tensors, and
    ``(leaf index, cache, skeleton)`` for each (leaf index in ``pytree`` order)."""
    flat, spec = pytree.tree_flatten((args, kwargs))
    found = []
    for index, leaf in enumerate(flat):
        if is_cache(leaf):
            tensors, skeleton = flatten(leaf)
            found.append((index, leaf, skeleton))
            flat[index] = tuple(tensors)
    if not found:
        return args, kwargs, found
    new_args, new_kwargs = pytree.tree_unflatten(flat, spec)
    return tuple(new_args), dict(new_kwargs), found


def rebuild(args: tuple, kwargs: dict, spec: Any,
            found: list[tuple[int, Any, Skeleton]]) -> tuple[tuple, dict, list[Any]]:
    """The inverse of :func:`expand` (``spec``: the layout of the original inputs), with
    new cache objects built from the tensors; also returns those objects."""
    flat = pytree.tree_leaves((args, kwargs))
    sizes = {index: skeleton for index, _, skeleton in found}
    leaves, built = [], []
    position = 0
    for index in range(spec.num_leaves):
        if index in sizes:
            skeleton = sizes[index]
            n = skeleton.count()
            cache = build(skeleton, flat[position:position + n])
            built.append(cache)
            leaves.append(cache)
            position += n
        else:
            leaves.append(flat[position])
            position += 1
    new_args, new_kwargs = pytree.tree_unflatten(leaves, spec)
    return tuple(new_args), dict(new_kwargs), built


def input_caches(args: tuple, kwargs: dict) -> list[Any]:
    """The cache objects among the inputs, in order."""
    return [leaf for leaf in pytree.tree_leaves((args, kwargs)) if is_cache(leaf)]


def copied(args: tuple, kwargs: dict, fn: Any) -> tuple[tuple, dict]:
    """``(args, kwargs)`` with every cache replaced by a new one holding ``fn(tensor)`` for
    each of its tensors (a scan's fake copies: the user's cache is not touched)."""
    flat, spec = pytree.tree_flatten((args, kwargs))
    if not any(is_cache(leaf) for leaf in flat):
        return args, kwargs
    for index, leaf in enumerate(flat):
        if is_cache(leaf):
            tensors, skeleton = flatten(leaf)
            flat[index] = build(skeleton, [fn(t) for t in tensors])
    new_args, new_kwargs = pytree.tree_unflatten(flat, spec)
    return tuple(new_args), dict(new_kwargs)


# --- at module boundaries ---------------------------------------------------------------
class CacheRef:
    """A cache object at a module boundary of a captured graph: the ``k``-th cache of the
    capture (``None``: one the forward pass neither takes nor returns), reached from it
    through ``path`` (attribute names and indices). A run resolves it to that object as
    the forward pass leaves it; anything else done with it in a trace is refused."""

    __slots__ = ("k", "path", "where", "rows")

    def __init__(self, k: int | None, path: tuple = (), where: str = "",
                 rows: tuple[int, int, int] | None = None):
        self.k = k
        self.path = path
        self.where = where
        self.rows = rows  # (an invoke's rows ``(start, stop, total)`` of the object)

    def __eq__(self, other: object) -> bool:
        return type(other) is CacheRef and \
            (self.k, self.path, self.rows) == (other.k, other.path, other.rows)

    def __hash__(self) -> int:
        return hash((self.k, self.path, self.rows))

    def of_rows(self, start: int, stop: int, total: int) -> "CacheRef":
        """This reference, resolved to a new object holding rows ``start:stop`` only."""
        return CacheRef(self.k, self.path, self.where, (start, stop, total))

    def __repr__(self) -> str:
        return f"<cache object at {self.where}>" if self.where else "<cache object>"

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise NotOnGraph(f"the trace uses the cache object at {self.where or 'a module'} "
                         f"(.{name}): on the fx backend a cache object at a module "
                         f"boundary can only be saved whole (its state after the "
                         f"forward pass); the hooks backend runs it")

    def resolve(self, caches: dict[int, Any]) -> Any:
        if self.k is None or self.k not in caches:
            raise NotOnGraph(f"the cache object at {self.where or 'a module'} is neither "
                             f"an input nor an output of the model: the fx backend cannot "
                             f"return it; the hooks backend can")
        value = caches[self.k]
        for how, step in self.path:
            value = getattr(value, step) if how == "attr" else value[step]
        return value if self.rows is None else rows_of(value, *self.rows, self.where)


def rows_of(cache: Any, start: int, stop: int, total: int, where: str = "") -> Any:
    """A new cache object of ``cache``'s kind holding its rows ``start:stop`` of ``total``
    (an invoke's cache, as a forward pass of its prompts alone returns it)."""
    try:
        tensors, skeleton = flatten(cache)
    except Unsupported as error:
        raise NotOnGraph(f"an invoke's rows of the {type(cache).__name__} at "
                         f"{where or 'a module'} cannot be taken ({error}): read it "
                         f"outside the invokes") from None
    return build(skeleton, [t[start:stop] if t.dim() > 0 and t.shape[0] == total else t
                            for t in tensors])


def find(obj: Any, roots: list[Any]) -> tuple[int, tuple] | None:
    """``(k, path)`` of ``obj`` inside ``roots[k]`` (by identity), or ``None``."""
    for k, root in enumerate(roots):
        stack = [(root, ())]
        seen = set()
        while stack:
            value, path = stack.pop()
            if value is obj:
                return k, path
            if id(value) in seen or len(path) > 8:
                continue
            seen.add(id(value))
            if type(value) in (list, tuple):
                stack.extend((v, path + (("item", i),)) for i, v in enumerate(value))
            elif type(value) is dict:
                stack.extend((v, path + (("item", key),)) for key, v in value.items())
            elif _is_state_object(value):
                stack.extend((v, path + (("attr", name),)) for name, v in vars(value).items()
                             if not isinstance(v, torch.Tensor))
    return None

