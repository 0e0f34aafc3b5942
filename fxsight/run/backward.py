"""The backward phase of a trace: what runs after the forward pass, driven by grad taps.

Everything that depends on a gradient or on ``backward()`` runs here, in program order,
each node as soon as its values exist (a gradient exists once its tap has fired during
``backward()``); gradient writes return a new gradient from the tap. See
:mod:`fxsight.splice.gradients` for the taps.
"""

from __future__ import annotations

from typing import Any

import torch

from .._torch import user_modes_resumed
from ..errors import TraceError, at_line
from ..record.program import (AUTOGRAD_GRAD, Kind, Node, Program, execute, is_backward,
                              map_nodes)
from ..splice.gradients import (grad_target, is_value_key, set_active_sink, tapped_tensor,
                                value_target)
from ..splice.rows import Rows, conform, narrow_rows, splice_rows


class BackwardPhase:
    """Runs a trace's backward-phase nodes on real values, driven by the grad taps."""

    def __init__(self, program: Program, rows: dict[Any, Rows], nodes: set[Node],
                 values: dict[Node, Any], keys: dict[Node, str]):
        self.program = program
        self.rows = rows
        self.pending = [n for n in program.nodes if n in nodes]
        self.values = dict(values)
        self.keys = keys
        self.owners = _backward_owners(program)
        # (the backward() call, the tap's key) -> the gradient that call gave the tap
        self.grads: dict[tuple[Node, str], torch.Tensor] = {}
        self.firing: str | None = None
        self.running: Node | None = None  # the backward() call running now

    # --- driving -----------------------------------------------------------------------
    def run(self) -> dict[Node, Any]:
        if not torch.is_grad_enabled():
            node = self.pending[0]
            mode = "torch.inference_mode()" if torch.is_inference_mode_enabled() \
                else "torch.no_grad()"
            raise TraceError(at_line(f"gradients need autograd, but this trace runs under "
                                     f"{mode}", node.line))
        set_active_sink(self)
        try:
            self._pump(top_level=True)
        finally:
            set_active_sink(None)
        if self.pending:
            self._explain(self.pending[0])
        return self.values

    def on_grad(self, key: str, grad: torch.Tensor) -> torch.Tensor:
        slot = (self.running, key)
        self.grads[slot] = grad.clone()
        previous, self.firing = self.firing, key
        try:
            self._pump(top_level=False)
        finally:
            self.firing = previous
        for node in self.pending:
            if node.kind is Kind.GRAD_WRITE and self.keys[node] == key and \
                    self.owners.get(node) is self.running:
                raise TraceError(at_line(
                    "this gradient write depends on a value that is only known later in "
                    "the backward pass", node.line))
        return self.grads[slot]

    def _pump(self, top_level: bool) -> None:
        progress = True
        while progress:
            progress = False
            for node in list(self.pending):
                # evaluating backward() pumps the nodes its taps make ready (nested, in
                # on_grad): those are no longer pending when this loop reaches them
                if node in self.pending and self._ready(node, top_level):
                    self._evaluate(node)
                    self.pending.remove(node)
                    progress = True

    def _ready(self, node: Node, top_level: bool) -> bool:
        if any(arg not in self.values for arg in node.all_input_nodes):
            return False
        kind = node.kind
        if kind is Kind.GRAD:
            return (self.owners.get(node), self.keys[node]) in self.grads
        if kind is Kind.GRAD_WRITE:
            return self.firing == self.keys[node] and self.owners.get(node) is self.running
        if is_backward(node):
            return top_level
        return True

    def _evaluate(self, node: Node) -> None:
        kind = node.kind
        rows = self.rows[node.invoke]
        if kind is Kind.GRAD:
            key = self.keys[node]
            grad = self.grads[self.owners.get(node), key]
            # (a computed value's gradient is already of the invoke's rows)
            self.values[node] = grad if rows.whole or grad is None or is_value_key(key) \
                else narrow_rows(grad, rows.start, rows.stop, rows.total)
        elif kind is Kind.GRAD_WRITE:
            slot = (self.running, self.keys[node])
            value = map_nodes(node.args[1], self.values.__getitem__)
            old = self.grads[slot]
            self.grads[slot] = conform(value, old) \
                if rows.whole or is_value_key(self.keys[node]) else splice_rows(
                    old, value, rows.start, rows.stop, rows.total)
            self.values[node] = None
        elif kind in (Kind.READ, Kind.WRITE):
            raise TraceError(at_line(
                "a module's inputs and outputs cannot be read or written with values that "
                "depend on gradients: the forward pass is over", node.line))
        else:
            args = map_nodes(node.args, self.values.__getitem__)
            kwargs = map_nodes(node.kwargs, self.values.__getitem__)
            if is_backward(node):
                _check_loss(node, args[0])
                self.running = node
                try:
                    if node.target is AUTOGRAD_GRAD:
                        self.values[node] = self._autograd_grad(node, args, kwargs)
                    else:
                        self.values[node] = _execute_at_line(node, args, kwargs)
                finally:
                    self.running = None
            else:
                self.values[node] = _execute_at_line(node, args, kwargs)

    def _autograd_grad(self, node: Node, args: tuple, kwargs: dict) -> None:
        """``torch.autograd.grad(loss, inputs)``: a backward pass from ``loss`` to the
        tapped tensors of its inputs' grad reads only (nothing is accumulated into a
        parameter's ``.grad``); their taps report the gradients, as in ``backward()``. An
        input it does not reach is ``None`` where the call allows unused inputs."""
        loss, grad_outputs = args
        reads = [g for g in self.program.nodes if self.owners.get(g) is node]
        tensors = {self.keys[g]: tapped_tensor(self.keys[g]) for g in reads}
        reached = [t for t in tensors.values() if t is not None]
        if reached:
            try:
                with user_modes_resumed():  # (the user's backward, in the user's modes)
                    torch.autograd.grad(loss, reached, grad_outputs=grad_outputs,
                                        retain_graph=kwargs["retain_graph"],
                                        create_graph=kwargs["create_graph"],
                                        allow_unused=True)
            except Exception as error:
                if not isinstance(error, TraceError):
                    error.add_note(f"  at {node.line}")
                raise
        if kwargs["allow_unused"]:
            for key in tensors:
                self.grads.setdefault((node, key), None)

    def _explain(self, node: Node) -> None:
        backwards = [n for n in self.program.nodes if is_backward(n)]
        if not backwards:
            raise TraceError(at_line("this gradient is read, but the trace never calls "
                                     "backward()", node.line))
        grad = next((n for n in [node, *node.all_input_nodes] if n.kind is Kind.GRAD),
                    node)
        where = grad_target(grad)[0].site.label \
            if grad.kind is Kind.GRAD and value_target(grad) is None else None
        owner = self.owners.get(grad)
        call = "torch.autograd.grad (allow_unused=True makes it None)" \
            if owner is not None and owner.target is AUTOGRAD_GRAD else "backward()"
        raise TraceError(at_line(
            f"the gradient of {where or 'this value'} was never computed: the loss passed "
            f"to {call} does not depend on it (or it does not require grad)", node.line))


def _execute_at_line(node: Node, args: tuple, kwargs: dict) -> Any:
    """Run an operation of the backward phase; an error torch raises there names the
    user's line (a note: its type is torch's, as in eager code). It runs in the user's
    modes (see ``user_modes_resumed``)."""
    try:
        with user_modes_resumed():
            return execute(node.op, node.target, args, kwargs)
    except Exception as error:
        if not isinstance(error, TraceError):
            error.add_note(f"  at {node.line}")
        raise


def _check_loss(node: Node, loss: Any) -> None:
    """``loss.backward()`` needs a tensor that requires grad: say so at the user's line,
    and why it may not (torch's own error names neither)."""
    if isinstance(loss, torch.Tensor) and not loss.requires_grad:
        raise TraceError(at_line(
            "backward() was called on a value that does not require grad: nothing it is "
            "computed from requires grad (are the model's parameters frozen, "
            "`requires_grad_(False)`, and its inputs plain tensors?). Make the input "
            "require grad, or a module's value: `m.output = m.output.detach()"
            ".requires_grad_()` (its `.grad` is then read after that line)", node.line))


def _backward_owners(program: Program) -> dict[Node, Node]:
    """The ``backward()`` call each gradient read and write belongs to: the one whose
    ``with`` block it is in; otherwise the next call after it in the trace, or (after the
    last call) the last one. Two ``backward()`` calls give two gradients of one value."""
    owners: dict[Node, Node] = {}
    waiting: list[Node] = []
    last = None
    for node in program.nodes:
        if is_backward(node) and node.target is not AUTOGRAD_GRAD:
            owners.update((grad, node) for grad in waiting)
            waiting.clear()
            last = node
        elif node.kind is Kind.GRAD or node.kind is Kind.GRAD_WRITE:
            block = program.backward_blocks.get(node)
            if block is not None:
                owners[node] = block
            else:
                waiting.append(node)
    owners.update((grad, last) for grad in waiting)
    return owners


def forward_exports(program: Program, phase: set[Node]) -> list[Node]:
    """Forward values the backward phase uses: they must outlive the forward pass."""
    exports: list[Node] = []
    for node in program.nodes if phase else ():
        if node in phase:
            for arg in node.all_input_nodes:
                if arg not in phase and arg not in exports:
                    exports.append(arg)
    return exports
