"""Gradients inside a trace: ``proxy.grad`` (read and assign) and ``loss.backward()``.

The forward pass runs as usual (fx or hooks backend) with one addition: every module value
whose gradient the trace touches passes through a *grad tap*, an identity autograd function
whose backward hands the gradient to the trace. Everything that depends on a gradient or on
``backward()`` forms the trace's *backward phase*: it runs after the forward pass, in
program order, each node as soon as its values exist (a gradient exists once its tap has
fired during ``backward()``). Gradient writes return a new gradient from the tap.
"""

from __future__ import annotations

import operator
import threading
from typing import Any

import torch
import torch.utils._pytree as pytree

from ..errors import TraceError, at_line
from ..record.program import Node, Program, execute, map_nodes, node_args, select
from ..splice.rows import Rows, conform, narrow_rows, splice_rows
from ..record.sites import Site, module_label

_STATE = threading.local()


def GRAD(*_):  # noqa: N802 - sentinel target of ``proxy.grad``, never called
    raise RuntimeError("fxsight GRAD sentinel must not run")


def GRAD_WRITE(*_):  # noqa: N802 - sentinel target of ``proxy.grad = v``, never called
    raise RuntimeError("fxsight GRAD_WRITE sentinel must not run")


def _active() -> "BackwardPhase | None":
    return getattr(_STATE, "phase", None)


class _GradTap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value: torch.Tensor, key: str) -> torch.Tensor:
        ctx.key = key
        return value.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        phase = _active()
        if phase is None:
            return grad, None
        return phase.on_grad(ctx.key, grad), None


@torch._dynamo.disable
def grad_tap(value: Any, key: str) -> Any:
    """Identity in the forward pass; in ``backward()``, reports the gradient under ``key``.

    Compiled graphs break around it (its backward must call back into the trace)."""
    if isinstance(value, torch.Tensor) and value.requires_grad:
        return _GradTap.apply(value, key)
    return value


def is_backward_root(node: Node) -> bool:
    kind = node.meta["kind"]
    return kind in ("grad", "grad_write") or (
        kind == "op" and node.op == "call_method" and node.target == "backward")


def backward_phase(program: Program) -> set[Node]:
    """The nodes that can only run after the forward pass (they need a gradient)."""
    phase: set[Node] = set()
    if not program.uses_gradients:
        return phase
    for node in program.nodes:
        if is_backward_root(node) or any(arg in phase for arg in node.all_input_nodes):
            phase.add(node)
    return phase


def grad_target(node: Node) -> tuple[Node, list[Any]]:
    """The module read whose gradient a grad node means, and the item keys on the way."""
    read, keys = node.args[0], []
    while read.meta["kind"] == "op" and read.target is operator.getitem and \
            not node_args(read.args[1]):
        keys.insert(0, read.args[1])
        read = read.args[0]
    if read.meta["kind"] != "read":
        raise TraceError(at_line(
            ".grad is available on a module's inputs and outputs (and items of them, like "
            "`.output[0]`), not on computed values", node.meta["line"]))
    return read, keys


def leaf_index(structure: Any, accessor: str, keys: list[Any]) -> int | None:
    """Which flat leaf of a site's value ``select(accessor)`` then ``[k1][k2]...`` picks."""
    flat, spec = pytree.tree_flatten(structure)
    try:
        picked = select(pytree.tree_unflatten(list(range(len(flat))), spec), accessor)
        for key in keys:
            picked = picked[key]
    except (TypeError, IndexError, KeyError):
        return None
    return picked if isinstance(picked, int) else None


def tap_key(site: Site, leaf: int) -> str:
    return f"{site.label}/{leaf}"


class BackwardPhase:
    """Runs a trace's backward-phase nodes on real values, driven by the grad taps."""

    def __init__(self, program: Program, rows: dict[Any, Rows], nodes: set[Node],
                 values: dict[Node, Any], keys: dict[Node, str]):
        self.program = program
        self.rows = rows
        self.pending = [n for n in program.nodes if n in nodes]
        self.values = dict(values)
        self.keys = keys
        self.grads: dict[str, torch.Tensor] = {}
        self.firing: str | None = None

    # --- driving -----------------------------------------------------------------------
    def run(self) -> dict[Node, Any]:
        if not torch.is_grad_enabled():
            node = self.pending[0]
            raise TraceError(at_line("gradients need autograd, but this trace runs under "
                                     "torch.no_grad()", node.meta["line"]))
        _STATE.phase = self
        try:
            self._pump(top_level=True)
        finally:
            _STATE.phase = None
        if self.pending:
            self._explain(self.pending[0])
        return self.values

    def on_grad(self, key: str, grad: torch.Tensor) -> torch.Tensor:
        self.grads[key] = grad.clone()
        previous, self.firing = self.firing, key
        try:
            self._pump(top_level=False)
        finally:
            self.firing = previous
        for node in self.pending:
            if node.meta["kind"] == "grad_write" and self.keys[node] == key:
                raise TraceError(at_line(
                    "this gradient write depends on a value that is only known later in "
                    "the backward pass", node.meta["line"]))
        return self.grads[key]

    def _pump(self, top_level: bool) -> None:
        progress = True
        while progress:
            progress = False
            for node in list(self.pending):
                if self._ready(node, top_level):
                    self._evaluate(node)
                    self.pending.remove(node)
                    progress = True

    def _ready(self, node: Node, top_level: bool) -> bool:
        if any(arg not in self.values for arg in node.all_input_nodes):
            return False
        kind = node.meta["kind"]
        if kind == "grad":
            return self.keys[node] in self.grads
        if kind == "grad_write":
            return self.firing == self.keys[node]
        if node.op == "call_method" and node.target == "backward":
            return top_level
        return True

    def _evaluate(self, node: Node) -> None:
        kind = node.meta["kind"]
        rows = self.rows[node.meta["invoke"]]
        if kind == "grad":
            grad = self.grads[self.keys[node]]
            self.values[node] = grad if rows.whole else narrow_rows(
                grad, rows.start, rows.stop, rows.total)
        elif kind == "grad_write":
            key = self.keys[node]
            value = map_nodes(node.args[1], self.values.__getitem__)
            old = self.grads[key]
            self.grads[key] = conform(value, old) if rows.whole else splice_rows(
                old, value, rows.start, rows.stop, rows.total)
            self.values[node] = None
        elif kind in ("read", "write"):
            raise TraceError(at_line(
                "a module's inputs and outputs cannot be read or written with values that "
                "depend on gradients: the forward pass is over", node.meta["line"]))
        else:
            args = map_nodes(node.args, self.values.__getitem__)
            kwargs = map_nodes(node.kwargs, self.values.__getitem__)
            self.values[node] = execute(node.op, node.target, args, kwargs)

    def _explain(self, node: Node) -> None:
        backwards = [n for n in self.program.nodes
                     if n.op == "call_method" and n.target == "backward"]
        if not backwards:
            raise TraceError(at_line("this gradient is read, but the trace never calls "
                                     "backward()", node.meta["line"]))
        grad = next((n for n in [node, *node.all_input_nodes] if n.meta["kind"] == "grad"),
                    node)
        where = grad.meta.get("grad_site")
        raise TraceError(at_line(
            f"the gradient of {where or 'this value'} was never computed: the loss passed "
            f"to backward() does not depend on it (or it does not require grad)",
            node.meta["line"]))


def forward_exports(program: Program, phase: set[Node]) -> list[Node]:
    """Forward values the backward phase uses: they must outlive the forward pass."""
    exports: list[Node] = []
    for node in program.nodes if phase else ():
        if node in phase:
            for arg in node.all_input_nodes:
                if arg not in phase and arg not in exports:
                    exports.append(arg)
    return exports


__all__ = ["grad_tap", "backward_phase", "grad_target", "leaf_index", "tap_key",
           "BackwardPhase", "forward_exports", "module_label", "node_args"]
