"""Eager execution of a rewritten graph with less Python per ATen call.

fx's generated code calls every ATen operator as ``torch.ops.aten.add.Tensor(...)``: four
attribute lookups, ``OpOverload.__call__`` (a Python frame that only forwards to the
operator's C++ entry point), and the entry point's generic argument parser: on a small
model, a large share of the eager forward. Two rewrites of the same code (the graph, its
values and its order unchanged):

- :func:`fast_forward` binds each such call to the operator's C++ entry point directly;
- :func:`bound_forward` binds it, where that is the same call, to torch's generated Python
  binding of the operator's name (``torch.add``, ``Tensor.view``: the functions the
  model's own forward calls, whose argument parsers are about twice as fast).

A binding picks the overload from its arguments' types, and may decompose into other
calls than the overload: it is used for an operator only where, for the argument types
of every call of it in the graph, it makes the very calls the overload makes (the
operators below autograd and their non-tensor arguments, recorded on fake tensors of the
call's devices and dtypes), and only for graphs of ATen operators and fxsight's helpers
with plain tensors as parameters. A binding also answers to ``__torch_function__`` where
an ``OpOverload`` does not, so the :class:`~fxsight.run.executable.Executable` runs the
bound forward only where no torch function mode is active and every input is a plain
tensor (:func:`plainly_bindable`).
"""

from __future__ import annotations

import re
import threading
import types
from collections import OrderedDict
from typing import Any, Callable

import torch
import torch.fx as fx

from .._torch import (FakeTensorMode, dispatch_modes_active, dispatched, entry_point,
                      fake_cache_unchanged, python_binding, pytree,
                      torch_function_modes_active)
from .direct import plain_target
_CALL = re.compile(r"\btorch\.ops\.(\w+)\.(\w+)\.(\w+)\(")
# a read of one of the graph's attributes (fx's code for a ``get_attr`` node)
_ATTRIBUTE = re.compile(r"(?<![\w.])self\.(\w+)\b(?![.(\w])")
# the names of the graph module's parameter and buffer dicts in its rewritten forward
_PARAMETERS, _BUFFERS = "_fxsight_parameters", "_fxsight_buffers"

# (operator, binding, the kinds of a call's arguments) -> whether the binding makes the
# operator's calls
MAX_CHECKED = 4096
_CHECKED: "OrderedDict[tuple, bool]" = OrderedDict()
_CHECKED_GUARD = threading.Lock()
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _overload(namespace: str, packet: str, overload: str) -> Any:
    try:
        return getattr(getattr(getattr(torch.ops, namespace), packet), overload)
    except (AttributeError, RuntimeError):
        return None


def _rewritten(graph_module: fx.GraphModule, bind: Callable[[Any], Any]) -> Callable:
    """``graph_module.forward`` with each ``torch.ops`` call bound to ``bind(overload)``
    (left as it is where that is ``None``) and its parameters and buffers read from their
    dicts; the original ``forward`` where the code cannot be rewritten."""
    bound: dict[str, object] = {}

    def rebind(match: re.Match) -> str:
        target = _overload(*match.groups())
        fn = bind(target) if target is not None else None
        if fn is None:
            return match.group(0)
        name = "_aten_" + "_".join(match.groups())
        bound[name] = fn
        return name + "("

    try:
        source = _ATTRIBUTE.sub(lambda match: _stored(graph_module, match),
                                _CALL.sub(rebind, graph_module.code))
        namespace = {**graph_module.forward.__globals__, **bound,
                     _PARAMETERS: graph_module._parameters, _BUFFERS: graph_module._buffers}
        exec(compile(source, f"<fxsight rewritten forward {id(graph_module):x}>", "exec"),
             namespace)
        return types.MethodType(namespace["forward"], graph_module)
    except Exception:  # noqa: BLE001 - the generated forward is always a correct fallback
        return graph_module.forward


def _stored(graph_module: fx.GraphModule, match: re.Match) -> str:
    """A read of a parameter or buffer of the graph module as a lookup in its dict (what
    ``Module.__getattr__`` finds there, without its Python frame: a call per parameter per
    run), the read as it is for any other attribute."""
    name = match.group(1)
    if name in vars(graph_module) or hasattr(type(graph_module), name):
        return match.group(0)  # (an attribute of its own: found before __getattr__)
    if name in graph_module._parameters:
        return f"{_PARAMETERS}[{name!r}]"
    if name in graph_module._buffers:
        return f"{_BUFFERS}[{name!r}]"
    return match.group(0)


def fast_forward(graph_module: fx.GraphModule) -> Callable:
    """``graph_module.forward`` with ATen calls bound to their entry points (the original
    ``forward`` where the code cannot be rewritten)."""
    return _rewritten(graph_module, entry_point)


def bound_forward(graph_module: fx.GraphModule) -> Callable | None:
    """``graph_module.forward`` with ATen calls bound to torch's Python bindings where
    each is the same call (:func:`fast_forward`'s entry points elsewhere), or ``None``
    where the graph is not one of ATen operators and fxsight's helpers (functions, and
    objects whose class says ``torch_operations_only``) over plain parameters, a dispatch mode is active, or no call could be bound."""
    tensors = [*graph_module.parameters(), *graph_module.buffers()]
    if any(type(t) not in _PLAIN_TENSORS for t in tensors) or dispatch_modes_active():
        return None  # (a mode active now would see the checks' calls on fake tensors)
    calls: dict[Any, list[fx.Node]] = {}
    for node in graph_module.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        if node.op != "call_function":
            return None
        if getattr(type(node.target), "torch_operations_only", False):
            continue  # (fxsight's helper object of torch operations: called as it is)
        if not plain_target(node.target):
            return None
        calls.setdefault(node.target, []).append(node)
    bindings = {}
    for target, nodes in calls.items():
        binding = python_binding(target)
        if binding is not None and all(_same_calls(target, binding, n) for n in nodes):
            bindings[target] = binding
    if not bindings:
        return None
    return _rewritten(graph_module, lambda target: bindings.get(target) or
                      entry_point(target))


def plainly_bindable(flat_inputs: list[Any]) -> bool:
    """Whether a run with these inputs may take :func:`bound_forward`'s forward: no torch
    function mode active, every tensor input a plain tensor."""
    if torch_function_modes_active():
        return False
    for value in flat_inputs:
        if isinstance(value, torch.Tensor) and type(value) not in _PLAIN_TENSORS:
            return False
    return True


# --- whether a binding makes the overload's calls ------------------------------------------
class _NoProbe(Exception):
    """A call's arguments cannot be made on fake tensors."""


def _kind(value: Any) -> Any:
    """What decides a binding's overload and its decomposition: Python types, and for
    tensors their device, dtype and dimensions."""
    if isinstance(value, fx.Node):
        value = value.meta.get("val")
        if value is None:
            raise _NoProbe
    if isinstance(value, torch.Tensor):
        return ("tensor", value.device, value.dtype, value.dim())
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return type(value).__name__
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_kind(v) for v in value))
    return type(value).__name__


def _hint(value: Any) -> Any:
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        hint = value.node.hint
        if hint is None:
            raise _NoProbe
        return hint
    return value


def _probe(value: Any, mode: FakeTensorMode) -> Any:
    """A fake stand-in of a call's argument (a node: its recorded value)."""
    if isinstance(value, fx.Node):
        value = value.meta.get("val")
        if value is None:
            raise _NoProbe
    if isinstance(value, torch.Tensor):
        with mode:
            return torch.empty_strided([_hint(s) for s in value.shape],
                                       [_hint(s) for s in value.stride()],
                                       dtype=value.dtype, device=value.device)
    if isinstance(value, (list, tuple)):
        return type(value)(_probe(v, mode) for v in value)
    return _hint(value)


def _shown(call: Any, args: tuple, kwargs: dict) -> tuple:
    """A recorded call with its tensor arguments as ``"tensor"`` and the rest as they are."""
    def show(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return ("tensor", value.dtype, tuple(value.shape))
        if isinstance(value, (list, tuple)):
            return tuple(show(v) for v in value)
        return value
    return call, show(args), show(kwargs)


def _same_calls(target: Any, binding: Callable, node: fx.Node) -> bool:
    """Whether ``binding`` called with ``node``'s arguments makes the calls ``target``
    makes (checked once per operator and kinds of arguments)."""
    try:
        key = (target, binding, _kind(list(node.args)),
               tuple((k, _kind(v)) for k, v in node.kwargs.items()))
    except (_NoProbe, TypeError):
        return False
    known = _CHECKED.get(key)
    if known is not None:
        return known
    same = False
    try:
        mode = FakeTensorMode()
        args = tuple(_probe(a, mode) for a in node.args)
        kwargs = {k: _probe(v, mode) for k, v in node.kwargs.items()}
        with fake_cache_unchanged(), mode:
            want = _recorded(target, args, kwargs)
            got = _recorded(binding, args, kwargs)
        same = want == got
    except Exception:  # noqa: BLE001 - no probe, or the binding refuses: keep the overload
        same = False
    with _CHECKED_GUARD:
        if len(_CHECKED) >= MAX_CHECKED:
            _CHECKED.popitem(last=False)
        _CHECKED[key] = same
    return same


def _recorded(fn: Callable, args: tuple, kwargs: dict) -> tuple:
    """The calls ``fn`` makes below autograd (with their non-tensor arguments), and its
    result's structure and layout."""
    calls, result = dispatched(fn, args, kwargs)
    leaves, structure = pytree.tree_flatten(result)  # (a list and a tuple differ)
    layout = [(tuple(t.shape), t.stride(), t.dtype, t.device) if isinstance(t, torch.Tensor)
              else t for t in leaves]
    return tuple(_shown(*call) for call in calls), structure, layout
