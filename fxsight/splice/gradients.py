"""Gradients inside a trace: ``proxy.grad`` (read and assign) and ``loss.backward()``.

The forward pass runs as usual (fx or hooks backend) with one addition: every module value
whose gradient the trace touches passes through a *grad tap*, which registers a tensor hook
on it (the value itself flows on, no copy) that hands the tensor's gradient, from all its
uses, to the trace, as a hook registered in torch (or by nnsight) sees it. Everything that
depends on a gradient or on ``backward()`` forms the trace's *backward phase*: it runs after
the forward pass, in program order, each node as soon as its values exist (a gradient
exists once its tap has fired during ``backward()``). Gradient writes return a new gradient
from the tap. The hooks are removed when the backward phase ends.
"""

from __future__ import annotations

import functools
import operator
import threading
from typing import Any, Protocol

import torch

from .._torch import pytree, user_modes_suspended
from ..errors import TraceError, at_line
from ..record.program import Kind, Node, Program, is_backward, node_args, select
from ..record.sites import Site

_STATE = threading.local()


class GradientSink(Protocol):
    """Where grad taps report gradients during ``backward()`` (a running backward phase)."""

    def on_grad(self, key: str, grad: torch.Tensor) -> torch.Tensor:
        """Take the gradient reported under ``key``; return the gradient to pass on."""


class TapHooks:
    """One run's grad taps: ``with TapHooks():`` around a run that taps gradients. The
    tensor hooks its taps register report to its ``sink`` (the run's backward phase, once
    it runs) from whichever thread autograd calls them on (a CUDA backward calls them on
    its device thread, where this thread's state is not seen), and are removed when it
    ends (no hook is left on a tensor the caller keeps, such as an input that requires
    grad)."""

    def __init__(self) -> None:
        self.handles: list[Any] = []
        self.tensors: dict[str, torch.Tensor] = {}  # key -> the tapped tensor
        self.sink: GradientSink | None = None
        self.previous: TapHooks | None = None

    def __enter__(self) -> "TapHooks":
        self.previous = getattr(_STATE, "taps", None)
        _STATE.taps = self
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        self.tensors.clear()
        self.sink = None
        _STATE.taps = self.previous


def set_active_sink(sink: GradientSink | None) -> None:
    """Make ``sink`` (or nothing) the receiver of the running taps' gradients: those of
    the innermost ``TapHooks`` open in this thread."""
    taps = getattr(_STATE, "taps", None)
    if taps is not None:
        taps.sink = sink


def _report(taps: TapHooks | None, key: str, grad: torch.Tensor) -> torch.Tensor | None:
    """A grad tap's tensor hook: the run's backward phase takes the gradient (and may
    return another); outside it, the gradient passes unchanged."""
    sink = taps.sink if taps is not None else None
    if sink is None:
        return None
    with user_modes_suspended():  # (fxsight's own work: no user mode sees it)
        return sink.on_grad(key, grad)


@torch.compiler.disable
def grad_tap(value: Any, key: str) -> Any:
    """``value`` itself; in ``backward()``, its gradient is reported under ``key``.

    The gradient is the tensor's, from all its uses, as a hook registered on it in torch
    sees it (a block's input is also the residual the block adds back): a tensor hook of
    the run's :class:`TapHooks`, removed when the trace's backward phase ends. Compiled
    graphs break around it (it must run on the real tensor)."""
    if isinstance(value, torch.Tensor) and value.requires_grad:
        taps = getattr(_STATE, "taps", None)
        with user_modes_suspended():
            handle = value.register_hook(functools.partial(_report, taps, key))
        if taps is not None:
            taps.handles.append(handle)
            taps.tensors[key] = value
    return value


def tapped_tensor(key: str) -> torch.Tensor | None:
    """The tensor the running taps tapped under ``key`` (``None``: not tapped, as a
    tensor that does not require grad is not)."""
    taps = getattr(_STATE, "taps", None)
    return None if taps is None else taps.tensors.get(key)


def is_backward_root(node: Node) -> bool:
    return node.kind in (Kind.GRAD, Kind.GRAD_WRITE) or is_backward(node)


def backward_phase(program: Program) -> set[Node]:
    """The nodes that can only run after the forward pass: those that need a gradient,
    and the functions applied after a ``backward()`` (``fxsight.apply(model.zero_grad)``:
    they run where the block calls them, after that backward pass, as the block's Python
    would)."""
    phase: set[Node] = set()
    if not program.uses_gradients:
        return phase
    for node in program.nodes:
        if is_backward_root(node) or any(arg in phase for arg in node.all_input_nodes) or \
                (node.lenient and phase):
            phase.add(node)
    return phase


class Field(str):
    """A key on the way from a module read to a gradient that is an attribute (the
    ``.logits`` of a model output), not an item."""


def grad_target(node: Node) -> tuple[Node, list[Any]]:
    """The module read whose gradient a grad node means, and the item keys (and
    :class:`Field` attribute names) on the way (a computed value's gradient has no module
    read: see :func:`value_target`)."""
    read, keys = _read_and_keys(node)
    if read.kind is not Kind.READ:
        raise TraceError(at_line(
            ".grad is available on a module's inputs and outputs (and items of them, like "
            "`.output[0]` or `.output.logits`) and on values computed from them in the "
            "block, not on a value brought in (a tensor of yours: read its own `.grad` "
            "after the trace)", node.line))
    return read, keys


def value_target(node: Node) -> Node | None:
    """The computed value (an operation of the block: ``x - x_hat``, an SAE's features)
    whose gradient a grad node means, or ``None`` where it means a module read's (an item
    of one: ``.output[0]``). Its gradient is tapped on the tensor the operation gives, as
    a tensor hook registered on it in torch (or by nnsight) sees it."""
    read, _ = _read_and_keys(node)
    target = node.args[0]
    if read.kind is Kind.READ or type(target) is not Node or target.kind is not Kind.OP:
        return None
    return target


def value_key(target: Node) -> str:
    """The key a grad tap on the computed value ``target`` reports under (never a
    module site's: those are ``label/leaf``)."""
    return f"={target.index}"


def is_value_key(key: str) -> bool:
    """Whether a tap's key is a computed value's (its gradient is of the value as the
    block has it, an invoke's rows already: it is not narrowed to them)."""
    return key.startswith("=")


def _read_and_keys(node: Node) -> tuple[Node, list[Any]]:
    """Follow a grad node's target up through item and field picks: the node reached
    (a module read, or the computed value the picks start from) and the keys."""
    read, keys = node.args[0], []
    while read.kind is Kind.OP and (
            (read.target is operator.getitem and not node_args(read.args[1])) or
            (read.target is getattr and type(read.args[1]) is str and
             not hasattr(torch.Tensor, read.args[1]))):  # (`.T`, `.real`: computed)
        key = read.args[1]
        keys.insert(0, Field(key) if read.target is getattr else key)
        read = read.args[0]
    return read, keys


def leaf_index(structure: Any, accessor: str, keys: list[Any]) -> int | None:
    """Which flat leaf of a site's value ``select(accessor)`` then ``[k1][k2]...`` picks."""
    flat, spec = pytree.tree_flatten(structure)
    try:
        picked = select(pytree.tree_unflatten(list(range(len(flat))), spec), accessor)
        for key in keys:
            picked = getattr(picked, key) if type(key) is Field else picked[key]
    except (TypeError, IndexError, KeyError, AttributeError):
        return None
    return picked if isinstance(picked, int) else None


def picks_inside_a_tensor(structure: Any, accessor: str, keys: list[Any]) -> bool:
    """Whether ``select(accessor)`` then ``[k1][k2]...`` indexes into one of the site's
    tensors (a row, a slice) rather than picking a whole tensor of its value."""
    flat, spec = pytree.tree_flatten(structure)
    try:
        picked = select(pytree.tree_unflatten(list(range(len(flat))), spec), accessor)
        for key in keys:
            if isinstance(picked, int):
                return True
            picked = getattr(picked, key) if type(key) is Field else picked[key]
    except (TypeError, IndexError, KeyError, AttributeError):
        return False
    return False


def tap_key(site: Site, leaf: int, version: int = 0) -> str:
    """The key a grad tap reports under: the site's leaf, and after ``version`` changes
    of the site's value (whole writes, in-place changes), that version of it."""
    return f"{site.label}/{leaf}" + (f"@{version}" if version else "")
