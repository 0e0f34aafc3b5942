"""``value.retain_grad()`` in a trace: after it, the saved value's ``.grad`` is its gradient.

In eager torch, ``h.retain_grad()`` makes every later ``backward()`` accumulate the
gradient with respect to ``h`` into ``h.grad``. In a trace nothing runs until the block
ends, so the call is kept here: each ``backward()`` recorded after it gets a gradient read
of that value (owned by that call), and when the trace has run, the value the caller's name
is bound to gets the sum of those gradients as its ``.grad``. A value that is not saved,
or no ``backward()`` after the call, leaves nothing to fill (its ``.grad`` stays ``None``,
as in torch).
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch

from .program import Node, Program
from .scope import Scope


class _Retained:
    __slots__ = ("proxy", "target", "scope", "line", "grads")

    def __init__(self, proxy: Any, target: Node, scope: Scope, line: Any):
        self.proxy = weakref.ref(proxy)
        self.target = target
        self.scope = scope
        self.line = line
        self.grads: list[Node] = []


class RetainedGrads:
    """The ``retain_grad()`` calls of one trace."""

    def __init__(self) -> None:
        self._entries: list[_Retained] = []

    def __bool__(self) -> bool:
        return bool(self._entries)

    def add(self, proxy: Any, target: Node, scope: Scope, line: Any) -> None:
        """``proxy.retain_grad()``: ``target`` is the value's node at that line."""
        if not any(entry.proxy() is proxy and entry.target is target
                   for entry in self._entries):
            self._entries.append(_Retained(proxy, target, scope, line))

    def read_for(self, program: Program, backward: Node) -> None:
        """A ``backward()`` call was recorded: a saved gradient read of each retained value,
        owned by that call."""
        for entry in self._entries:
            grad = program.grad(entry.target, entry.scope, entry.line)
            program.backward_blocks[grad] = backward
            program.save(grad)
            entry.grads.append(grad)

    def fill(self, resolve: Callable[[Any], "tuple[bool, Any]"],
             values: dict[Node, Any]) -> None:
        """After the run: each retained value that was saved gets its gradients' sum as
        its ``.grad`` (what torch's accumulation would have left there)."""
        for entry in self._entries:
            proxy = entry.proxy()
            found, value = resolve(proxy) if proxy is not None else (False, None)
            grads = [values[grad] for grad in entry.grads
                     if isinstance(values.get(grad), torch.Tensor)]
            if found and isinstance(value, torch.Tensor) and value.requires_grad and \
                    not value.is_leaf:
                value.retain_grad()  # (as in eager: a later backward() adds to it)
            if found and isinstance(value, torch.Tensor) and grads:
                total = grads[0]
                for grad in grads[1:]:
                    total = total + grad
                value.grad = total.detach()
        self._entries = []
