"""Objects at a module boundary that hold tensors out of the capture's sight.

A module may return (or take) an object that is not a pytree node: a dataclass or an
object of the model's own class holding tensors. ``torch.export`` traces through it, but
the boundary markers see it as one Python leaf, so the captured graph has no node for the
tensors inside it, and the object it kept is the one of the capture's own run, holding
fake tensors. A capture keeps a :class:`HiddenTensors` in its place: any use of it in a
trace is refused with :class:`NotOnGraph` (the hooks backend runs the trace instead, with
the run's real object), never the capture's fake values.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..errors import NotOnGraph

_DEPTH = 4  # how deep an object's attributes are searched for tensors


class HiddenTensors:
    """Stands for an object holding tensors at a module boundary of a captured graph
    (``where``: the site's label); every use of it raises :class:`NotOnGraph`."""

    __slots__ = ("kind", "where")

    def __init__(self, kind: str, where: str):
        self.kind = kind
        self.where = where

    def __repr__(self) -> str:
        return f"<{self.kind} at {self.where}>"

    def __eq__(self, other: object) -> bool:
        return type(other) is HiddenTensors and \
            (self.kind, self.where) == (other.kind, other.where)

    def __hash__(self) -> int:
        return hash((self.kind, self.where))

    def reason(self) -> str:
        """Why the fx backend cannot use the object (the message of its error)."""
        return (f"the {self.kind} object at {self.where} holds tensors that the captured "
                f"graph does not see ({self.kind} is not a pytree node): the fx backend "
                f"cannot read or write it or its tensors; the hooks backend can "
                f"(backend=\"hooks\")")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise NotOnGraph(self.reason())

    def __getitem__(self, key: Any) -> Any:
        raise NotOnGraph(self.reason())

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in HiddenTensors.__slots__:
            raise NotOnGraph(self.reason())
        object.__setattr__(self, name, value)


def hides_tensors(value: Any, depth: int = _DEPTH) -> bool:
    """Whether ``value``, a non-tensor pytree leaf, holds tensors in its fields or
    attributes (a module, holding its parameters, or a class is a plain Python value)."""
    if isinstance(value, torch.Tensor):
        return True
    if depth == 0 or isinstance(value, (type, torch.nn.Module)):
        return False
    if dataclasses.is_dataclass(value):
        items = [getattr(value, f.name, None) for f in dataclasses.fields(value)]
    elif isinstance(value, dict):
        items = list(value.values())
    elif isinstance(value, (tuple, list, set, frozenset)):
        items = list(value)
    elif callable(value):
        return False
    else:
        items = _attributes(value)
    return any(hides_tensors(item, depth - 1) for item in items)


def _attributes(value: Any) -> list[Any]:
    """The values of an object's attributes: its ``__dict__`` and its ``__slots__``."""
    items = list(vars(value).values()) if hasattr(value, "__dict__") else []
    for kind in type(value).__mro__:
        slots = kind.__dict__.get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if name not in ("__dict__", "__weakref__"):
                items.append(getattr(value, name, None))
    return items


def kept_constant(value: Any, where: str) -> Any:
    """What a capture keeps of the non-tensor leaf ``value`` at the site ``where``."""
    if isinstance(value, torch.Tensor) or not hides_tensors(value):
        return value
    return HiddenTensors(type(value).__name__, where)


class NestedTensor:
    """Stands for a tensor at a module boundary that ``torch.export`` put inside a nested
    graph: a module called in a ``torch.no_grad()``/``torch.enable_grad()`` or autocast
    block of another module's forward (a higher-order op such as
    ``wrap_with_set_grad_enabled`` whose subgraph holds the boundary's markers). The
    captured graph has no node for it at its top level, so the fx backend can neither read
    nor write it: any use raises :class:`NotOnGraph` (the hooks backend runs the trace)."""

    __slots__ = ("where", "meta")

    def __init__(self, where: str, meta: Any = None):
        self.where = where
        self.meta = meta  # (the nested marker's value: shapes for the checks, or None)

    def __repr__(self) -> str:
        return f"<nested tensor at {self.where}>"

    def __eq__(self, other: object) -> bool:
        return type(other) is NestedTensor and self.where == other.where

    def __hash__(self) -> int:
        return hash(("nested", self.where))

    def reason(self) -> str:
        """Why the fx backend cannot use the tensor (the message of its error)."""
        return (f"{self.where} is computed inside a nested region of the captured graph "
                f"(its module is called inside a `torch.no_grad()`, `torch.enable_grad()` "
                f"or autocast block of a forward, which torch.export captures as a "
                f"subgraph): the fx backend cannot read or write it; the hooks backend "
                f"can (backend=\"hooks\")")
