"""The Program: a trace's recorded interventions as an fx.Graph of their own.

Node kinds (``node.meta["kind"]``):

- ``"input"``: a placeholder for a real value the user brought into the block
  (a steering vector); its value lives in ``Program.input_values``.
- ``"read"``: a module's inputs or output (``meta["site"]``, ``meta["accessor"]``).
- ``"write"``: replaces a module's inputs or output with ``args[0]`` (``meta["skip"]``:
  ``env.skip(value)``, the module's computation is replaced and it does not run).
- ``"op"``: any recorded operation (torch function, tensor method, operator, ``apply``).
  ``meta["mutation"]`` is true when it changes its first argument in place.

Every node of a read, write or op also carries ``meta["invoke"]`` (the invoke it was
recorded in, ``None`` for the whole batch) and ``meta["line"]`` (the user's source line).
"""

from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from .sites import Site, module_label

INPUT_ACCESSORS = ("input", "inputs")


def READ(*_):  # noqa: N802 - sentinel target, never called
    raise RuntimeError("fxsight READ sentinel must be spliced, not run")


def WRITE(*_):  # noqa: N802
    raise RuntimeError("fxsight WRITE sentinel must be spliced, not run")


def SKIP(*_):  # noqa: N802 - a write that replaces a module's whole computation
    raise RuntimeError("fxsight SKIP sentinel must be spliced, not run")


def setitem(target, key, value):
    """``target[key] = value`` in place, returning ``target`` (so later uses depend on it)."""
    target[key] = value
    return target


_INPLACE_OPERATORS = {
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.imod, operator.ipow, operator.imatmul, operator.iand, operator.ior,
    operator.ixor, operator.ilshift, operator.irshift, setitem,
}

# Ops that return a view of their first argument: an in-place change through their result
# changes the argument too.
_VIEW_METHODS = {"view", "view_as", "reshape", "narrow", "select", "transpose", "permute",
                 "unsqueeze", "squeeze", "expand", "expand_as", "flatten", "unflatten",
                 "t", "T", "mT", "unfold", "split", "chunk", "unbind", "diagonal", "movedim"}
_VIEW_FUNCTIONS = {operator.getitem, torch.narrow, torch.select, torch.transpose,
                   torch.permute, torch.unsqueeze, torch.squeeze, torch.flatten,
                   torch.reshape, torch.split, torch.chunk, torch.unbind, torch.diagonal,
                   torch.movedim}


def is_mutation(op: str, target: Any) -> bool:
    """Whether a recorded operation changes its first argument in place."""
    if op == "call_method":
        return target.endswith("_") and not target.startswith("_")
    if target in _INPLACE_OPERATORS:
        return True
    name = getattr(target, "__name__", "")
    return getattr(target, "__module__", None) == "torch" and name.endswith("_") and \
        not name.startswith("_")


def is_view(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    return node.target in _VIEW_FUNCTIONS


class Program:
    """The recorded interventions of one trace."""

    def __init__(self) -> None:
        self.graph = fx.Graph()
        self.input_values: list[Any] = []
        self.saves: list[fx.Node] = []
        self.uses_gradients = False  # set by .grad, .grad = v and backward()
        self._input_ids: dict[int, fx.Node] = {}

    # --- building -------------------------------------------------------------------
    def input(self, value: Any) -> fx.Node:
        """A placeholder for a real value (deduplicated by identity)."""
        node = self._input_ids.get(id(value))
        if node is None:
            node = self.graph.placeholder(f"input_{len(self.input_values)}")
            node.meta["kind"] = "input"
            node.meta["index"] = len(self.input_values)
            self.input_values.append(value)
            self._input_ids[id(value)] = node
        return node

    def read(self, site: Site, accessor: str, invoke: int | None, line: str) -> fx.Node:
        node = self.graph.call_function(READ, ())
        node.meta.update(kind="read", site=site, accessor=accessor, invoke=invoke, line=line)
        node.name = _safe_name(site, accessor)
        return node

    def write(self, site: Site, accessor: str, value: Any, invoke: int | None,
              line: str) -> fx.Node:
        node = self.graph.call_function(WRITE, (value,))
        node.meta.update(kind="write", site=site, accessor=accessor, invoke=invoke, line=line)
        return node

    def skip(self, site: Site, value: Any, invoke: int | None, line: str) -> fx.Node:
        """``env.skip(value)``: a write of the module's output whose value may not depend
        on anything the module computes (meta ``skip``); the module does not run."""
        node = self.graph.call_function(SKIP, (value,))
        node.meta.update(kind="write", site=site, accessor="output", invoke=invoke,
                         line=line, skip=True)
        return node

    def op(self, op: str, target: Any, args: tuple, kwargs: dict, invoke: int | None,
           line: str) -> fx.Node:
        if op == "call_function" and not hasattr(target, "__name__"):
            target = Named(target)  # fx names nodes and code globals after __name__
        node = self.graph.create_node(op, target, args, kwargs)
        node.meta.update(kind="op", invoke=invoke, line=line,
                         mutation=is_mutation(op, target))
        if op == "call_method" and target == "backward":
            self.uses_gradients = True
        return node

    def save(self, node: fx.Node) -> None:
        if node not in self.saves:
            self.saves.append(node)

    # --- queries ----------------------------------------------------------------------
    @property
    def nodes(self):
        return self.graph.nodes

    def sites(self) -> set[Site]:
        return {n.meta["site"] for n in self.graph.nodes if n.meta["kind"] in ("read", "write")}

    def is_empty(self) -> bool:
        return len(self.graph.nodes) == 0

    def structure_key(self) -> tuple:
        """A hashable description of the Program's structure, blind to input values."""
        index = {}
        parts = []
        for i, node in enumerate(self.graph.nodes):
            index[node] = i
            meta = node.meta
            if meta["kind"] == "input":
                parts.append(("input", _value_key(self.input_values[meta["index"]])))
                continue
            args = _structure(node.args, index)
            kwargs = _structure(node.kwargs, index)
            parts.append((meta["kind"], node.op, _target_key(node.target), args, kwargs,
                          meta.get("site"), meta.get("accessor"), meta.get("invoke")))
        parts.append(("saves", tuple(index[n] for n in self.saves)))
        return tuple(parts)


class Named:
    """A callable without ``__name__`` (``operator.itemgetter(0)``, a ``functools.partial``,
    an object with ``__call__``) given one, so it can be an fx node target."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.__name__ = type(fn).__name__

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Named) and other.fn is self.fn

    def __hash__(self) -> int:
        return hash(id(self.fn))


def _safe_name(site: Site, accessor: str) -> str:
    name = (site.path or "model").replace(".", "_")
    return f"{name}_{accessor}" + (f"_{site.call}" if site.call else "")


def _target_key(target: Any) -> Any:
    try:
        hash(target)
        return target
    except TypeError:
        return id(target)


def _value_key(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device.type, value.requires_grad)
    return ("value", type(value).__name__)


_PLAIN = (int, str, type(None), type(Ellipsis))


def _structure(value: Any, index: dict) -> Any:
    kind = type(value)
    if kind is fx.Node:
        return ("node", index[value])
    if kind in _PLAIN:
        return value
    if kind is tuple or kind is list:
        return (kind.__name__, tuple([_structure(v, index) for v in value]))
    if kind is slice:
        return ("slice", _structure(value.start, index), _structure(value.stop, index),
                _structure(value.step, index))
    if kind is bool or kind is float:
        # tagged: ``True == 1 == 1.0`` would make ``x[:, True]`` share ``x[:, 1]``'s graph
        return (kind.__name__, value)
    if isinstance(value, fx.Node):
        return ("node", index[value])
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_structure(v, index) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, _structure(v, index)) for k, v in value.items()))
    try:
        hash(value)
        return (type(value), value)
    except TypeError:
        return ("id", id(value))


def origin(node: fx.Node) -> str:
    """The module boundaries a recorded value comes from, as users name them
    (``"model.layer1.output"``), for error messages; ``""`` when it reads none."""
    labels: list[str] = []
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        if current.meta.get("kind") == "read":
            site = current.meta["site"]
            label = f"{module_label(site.path)}.{current.meta['accessor']}" + \
                (f"#{site.call}" if site.call else "")
            if label not in labels:
                labels.append(label)
        stack.extend(reversed(current.all_input_nodes))
    return ", ".join(labels)


def map_nodes(value: Any, fn: Callable[[fx.Node], Any]) -> Any:
    """Replace every fx.Node inside ``value`` (tuples, lists, dicts, slices) by ``fn(node)``."""
    if isinstance(value, fx.Node):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(map_nodes(v, fn) for v in value)
    if isinstance(value, list):
        return [map_nodes(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: map_nodes(v, fn) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(map_nodes(value.start, fn), map_nodes(value.stop, fn),
                     map_nodes(value.step, fn))
    return value


def node_args(value: Any) -> list[fx.Node]:
    """Every fx.Node inside ``value``."""
    found: list[fx.Node] = []
    map_nodes(value, lambda n: found.append(n))
    return found


def execute(op: str, target: Any, args: tuple, kwargs: dict) -> Any:
    """Run one recorded operation on real (or meta) values."""
    if op == "call_method":
        self_value, *rest = args
        return getattr(self_value, target)(*rest, **kwargs)
    return target(*args, **kwargs)


# --- accessors: which part of a site's value the user means --------------------------
def select(value: Any, accessor: str) -> Any:
    """The part of a site's value an accessor names.

    Input sites hold ``(args, kwargs)``: ``"inputs"`` is all of it, ``"input"`` the first
    positional argument (or first keyword argument when there are none).
    """
    if accessor in ("output", "inputs"):
        return value
    args, kwargs = value
    if args:
        return args[0]
    if kwargs:
        return next(iter(kwargs.values()))
    raise IndexError("the module was called without arguments")


def replace(value: Any, accessor: str, new: Any) -> Any:
    """A site's value with the part named by ``accessor`` replaced by ``new``."""
    if accessor in ("output", "inputs"):
        return new
    args, kwargs = value
    if args:
        return ((new, *args[1:]), kwargs)
    key = next(iter(kwargs))
    return (args, {**kwargs, key: new})


def leaves(value: Any) -> list[Any]:
    return pytree.tree_leaves(value)
