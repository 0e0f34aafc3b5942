"""Which module boundaries share memory.

A module's output is the next module's input, an identity module (dropout in eval) returns
its input, a module may return a view of what it was given: an in-place change at one of
these boundaries changes the others. A scan numbers the storage of every tensor it sees at
a boundary (:class:`MemoryNumbers`); a capture follows each boundary's graph node back to
the node whose memory it is (:func:`memory_roots`). Boundaries whose keys meet share memory
(see ``splice.shared_memory``: an operation recorded after an in-place change runs after
it).
"""

from __future__ import annotations

import operator
import weakref
from typing import Any

import torch
import torch.fx as fx

from .._torch import returns_alias

# operators that return their input itself when not training (``aten.dropout(x, p,
# False)`` is ``x``), though their schemas say nothing of it: (overload packet, the index
# of their ``train`` argument)
_IDENTITY_WHEN_NOT_TRAINING = {
    torch.ops.aten.dropout: 2, torch.ops.aten.feature_dropout: 2,
    torch.ops.aten.alpha_dropout: 2, torch.ops.aten.feature_alpha_dropout: 2,
}


class MemoryNumbers:
    """A number per storage (views share theirs), the same each time it is asked while the
    storage lives. Storages are held weakly (a scan with real tensors keeps no activation
    alive); a storage at the address of a dead one gets a new number."""

    def __init__(self) -> None:
        self._numbers: dict[int, tuple[weakref.ref, int]] = {}
        self._made = 0

    def __call__(self, tensor: torch.Tensor) -> int:
        try:
            memory: Any = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError, TypeError):  # (a subclass of its own)
            memory = tensor
        entry = self._numbers.get(id(memory))
        if entry is not None and entry[0]() is memory:
            return entry[1]
        number, self._made = self._made, self._made + 1
        self._numbers[id(memory)] = (weakref.ref(memory), number)
        return number


def memory_roots(nodes: list[fx.Node | None], marker: Any) -> frozenset:
    """The nodes whose memory the values of ``nodes`` are in, in a captured graph: back
    through boundary markers (``marker``: identities once the graph runs), views, in-place
    changes, the items of a multi-view result (``split``) and dropout when not training."""
    return frozenset(_root(node, marker) for node in nodes if node is not None)


def _root(node: fx.Node, marker: Any) -> fx.Node:
    while node.op == "call_function" and node.args and isinstance(node.args[0], fx.Node):
        target = node.target
        if not (target is marker or returns_alias(target) or _identity(node) or (
                target is operator.getitem and returns_alias(node.args[0].target))):
            break
        node = node.args[0]
    return node


def _identity(node: fx.Node) -> bool:
    """An operator that returns its input itself here (dropout, not training)."""
    index = _IDENTITY_WHEN_NOT_TRAINING.get(getattr(node.target, "overloadpacket", None))
    if index is None:
        return False
    train = node.args[index] if len(node.args) > index else node.kwargs.get("train")
    return train is False
