"""Compiled graphs called without dynamo's per-call wrapper, where fxsight checks what
dynamo's guards would.

``torch.compile(gm.forward)`` runs, at every call, dynamo's frame wrapper and its guards
(over the inputs, the graph's parameters, the globals its code reads and the global state)
before AOTAutograd's runtime wrappers. On a small model that is a third of a compiled call
(~400 µs of a tiny GPT-2's 1,150 µs decoding step on a 2-vCPU machine). A rewritten graph
made of torch operations only needs none of dynamo's tracing: it is already the graph. So it is
handed to inductor directly (``compile_fx``, what dynamo's inductor backend calls), on fake
inputs of a private ``ShapeEnv`` whose symbolic dimensions are the capture's, and called
after the checks dynamo would make:

- the global state (grad mode, autocast, deterministic algorithms, ...: dynamo's own
  ``GlobalStateGuard``), and no torch function mode, saved-tensor hooks or default device;
- every tensor input's dtype, device, ``requires_grad`` and dispatch keys, and every
  parameter's and buffer's also with its sizes and strides (dynamo's ``TensorGuards``: a
  parameter whose ``.data`` was replaced by one of another layout is seen);
- the inputs' sizes, strides and storage offsets against the compilation's shape guards
  (its ShapeEnv's, with what inductor added), once per new layout of the inputs;
- no two tensor inputs sharing storage; the non-tensor inputs' values, but for the
  integers of tensor keys (``splice.indices``): those are symbolic, and their values are
  checked by the shape guards (once per new layout and values). Where those guards alone
  refuse a call (inductor specializes an index first compiled at 0), the Executable makes
  another compilation for the new values (``executable.MAX_DIRECT`` in all).

A check that fails sends the call down the ``torch.compile`` path, as before (dynamo's own
guards decide there). Graphs with anything else in them (a user's function through
``fxsight.apply``, a module call, random draws), other backends and modes, and calls with
gradients enabled always take that path.
"""

from __future__ import annotations

import copy
import operator
import types
from typing import Any

import torch

from .._torch import (ambient_state_plain, global_state_guard, inductor_compile,
                      is_operator, tensor_guards)
from ..record.program import setitem
from ..splice.indices import select_at, setitem_at
from ..splice.rows import narrow_rows
from ..stats import bump
from .sources import release_source_when_collected

# input layouts whose shape guards were evaluated, per compilation
MAX_LAYOUTS = 256


def plain_target(target: Any) -> bool:
    """A call_function target that inductor traces as torch operations (ATen operators,
    torch's and Python's operators, fxsight's helpers)."""
    if is_operator(target):
        return True
    if isinstance(target, types.BuiltinFunctionType):
        module = getattr(target, "__module__", None) or ""
        return module == "_operator" or module == "torch" or module.startswith("torch.")
    # fxsight's own helpers (an in-place setitem, row narrowing): plain Python over tensors
    return isinstance(target, types.FunctionType) and \
        getattr(target, "__module__", "").startswith("fxsight.")


def eligible(gm: torch.fx.GraphModule, backend: Any, mode: Any) -> bool:
    """Whether ``gm`` can be compiled without dynamo: inductor in its default mode, and a
    graph of torch operations and fxsight's own helpers. (The caller leaves out graphs
    that draw random numbers.)"""
    if backend != "inductor" or mode is not None:
        return False
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "get_attr", "output", "call_method"):
            continue
        if node.op != "call_function" or not plain_target(node.target):
            return False
    return True


def _with_operators(graph: torch.fx.Graph) -> torch.fx.Graph:
    """``graph`` (a copy) with fxsight's helpers written as Python's operators where their
    meaning is fixed by the graph: AOTAutograd's disk cache refuses graphs that call
    functions it does not know, and would trace such a graph again in every new process.

    - ``setitem(t, key, v)`` (an in-place write that returns ``t``) becomes
      ``operator.setitem(t, key, v)`` at the same place, its users reading ``t``: nodes run
      in graph order, so they see the write as before;
    - ``narrow_rows(t, start, stop, total)`` of a tensor whose first size is known becomes
      ``t[start:stop]`` where that size is ``total`` (and ``t`` itself otherwise);
    - ``select_at`` and ``setitem_at`` (integers of tensor keys as inputs) become their
      ``torch.select`` calls, the latter then ``operator.setitem(view, ..., v)``, its
      users reading ``t``."""
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is select_at or node.target is setitem_at:
            _expand_selection(graph, node)
        elif node.target is setitem and len(node.args) == 3 and not node.kwargs:
            target = node.args[0]
            with graph.inserting_before(node):
                graph.call_function(operator.setitem, tuple(node.args))
            node.replace_all_uses_with(target)
            graph.erase_node(node)
        elif node.target is narrow_rows and len(node.args) == 4 and not node.kwargs:
            value, start, stop, total = node.args
            meta = value.meta.get("val") if isinstance(value, torch.fx.Node) else None
            if not isinstance(meta, torch.Tensor) or not all(
                    type(a) is int for a in (start, stop, total)):
                continue
            if meta.dim() == 0 or type(meta.shape[0]) is not int:
                continue
            if meta.shape[0] == total:
                with graph.inserting_before(node):
                    narrowed = graph.call_function(operator.getitem,
                                                   (value, slice(start, stop)))
                narrowed.meta.update(node.meta)
                node.replace_all_uses_with(narrowed)
            else:
                node.replace_all_uses_with(value)
            graph.erase_node(node)
    graph.lint()
    return graph


def _expand_selection(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
    """``select_at``/``setitem_at`` as the torch operations they run (see _with_operators)."""
    if node.target is select_at:
        value, dims, *indices = node.args
    else:
        value, dims, item, *indices = node.args
    target = value
    with graph.inserting_before(node):
        for dim, index in zip(dims, indices):
            value = graph.call_function(torch.select, (value, dim, index))
        if node.target is setitem_at:
            graph.call_function(operator.setitem, (value, Ellipsis, item))
            value = target
    node.replace_all_uses_with(value)
    graph.erase_node(node)


def _distinct_storages(tensors: list[torch.Tensor]) -> bool:
    return len({t.untyped_storage().data_ptr() for t in tensors}) == len(tensors)


def _layout(tensors: list[torch.Tensor]) -> tuple:
    return tuple([(t.shape, t.stride(), t.storage_offset()) for t in tensors])


class DirectCompiled:
    """One inductor compilation of a rewritten graph and the checks before each call."""

    def __init__(self, gm: torch.fx.GraphModule, flat: list[Any], dynamic: bool,
                 options: dict | None, index_inputs: int = 0):
        placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
        if len(placeholders) != len(flat):
            raise ValueError("the inputs do not match the graph's placeholders")
        self.positions = [i for i, v in enumerate(flat) if isinstance(v, torch.Tensor)]
        tensors = [flat[i] for i in self.positions]
        if not _distinct_storages(tensors):
            raise ValueError("two inputs share storage")
        # the integers of tensor keys (the last inputs): symbolic, guarded by value
        self.indices = list(range(len(flat) - index_inputs, len(flat)))
        if any(type(flat[i]) is not int for i in self.indices):
            raise ValueError("an index input is not an integer")
        self.values = [(i, v) for i, v in enumerate(flat)
                       if not isinstance(v, torch.Tensor) and i not in self.indices]
        # what the compiled code reads besides its inputs (the very tensors: in-place
        # changes are seen; a new layout is refused by the tensor guards)
        self.held = [t for _, t in gm.named_parameters(remove_duplicate=False)] + \
            [t for _, t in gm.named_buffers(remove_duplicate=False)]
        # a private ShapeEnv: the capture's symbolic dimensions stay symbolic, the others
        # are fixed; its guards (and inductor's) are this compilation's alone
        dynamic_dims: list[list[bool] | None] = [None] * len(flat)
        for i in self.positions:
            meta = placeholders[i].meta.get("val")
            sizes = meta.shape if dynamic and isinstance(meta, torch.Tensor) else flat[i].shape
            dynamic_dims[i] = [isinstance(s, torch.SymInt) for s in sizes]
        self.global_state = global_state_guard()
        # (compile_fx may change the graph it is given: a copy, sharing the tensors, whose
        # generated source goes when it does)
        owned = torch.fx.GraphModule(gm, _with_operators(copy.deepcopy(gm.graph)))
        release_source_when_collected(owned)
        self.compiled, self.shape_env, fakes = inductor_compile(owned, flat, dynamic_dims,
                                                                options, self.indices)
        self.shape_code = self.shape_env.produce_guards_expression(
            [fakes[i] for i in (*self.positions, *self.indices)], ignore_static=False)
        # dtype, device, requires_grad and dispatch keys of the inputs (their sizes and
        # strides: the shape guards); everything of the held tensors
        self.tensor_guards = tensor_guards(
            [*tensors, *self.held],
            [[None] * t.dim() for t in tensors] + [list(t.shape) for t in self.held],
            [[None] * t.dim() for t in tensors] + [list(t.stride()) for t in self.held])
        self._layouts: set[tuple] = set()
        self._tensor_layouts: set[tuple] = set()  # (of accepted layouts with indices)
        # whether the last refusal was the index integers' alone: the tensors' layout had
        # been accepted with other values (another compilation may take these)
        self.refused_indices = False

    def accepts(self, flat: list[Any]) -> bool:
        """Whether the compilation holds for these inputs (see the module's docstring)."""
        self.refused_indices = False
        if not self.global_state.check() or not ambient_state_plain():
            return False
        for i, value in self.values:
            if type(flat[i]) is not type(value) or flat[i] != value:
                return False
        tensors = [flat[i] for i in self.positions]
        if not self.tensor_guards.check(*tensors, *self.held) or \
                not _distinct_storages(tensors):
            return False
        indices = [flat[i] for i in self.indices]
        if any(type(v) is not int for v in indices):
            return False
        if self.shape_code is not None:
            tensor_layout = _layout(tensors)
            layout = (tensor_layout, *indices)
            if layout not in self._layouts:
                if not self.shape_env.evaluate_guards_expression(self.shape_code,
                                                                 [*tensors, *indices]):
                    self.refused_indices = tensor_layout in self._tensor_layouts
                    return False
                if len(self._layouts) >= MAX_LAYOUTS:
                    self._layouts.clear()
                    self._tensor_layouts.clear()
                self._layouts.add(layout)
                if indices:
                    self._tensor_layouts.add(tensor_layout)
        return True

    def __call__(self, flat: list[Any]) -> tuple[Any, ...]:
        return tuple(self.compiled(*flat))


def compile_direct(gm: torch.fx.GraphModule, flat: list[Any], dynamic: bool,
                   options: dict | None, index_inputs: int = 0) -> DirectCompiled | None:
    """A :class:`DirectCompiled` of ``gm`` for inputs like ``flat``, or ``None`` where one
    cannot be made here (the torch.compile path then runs, and reports its own errors).
    ``index_inputs``: how many of the last inputs are integers of tensor keys."""
    if torch.is_grad_enabled() or not ambient_state_plain():
        return None
    try:
        return DirectCompiled(gm, flat, dynamic, options, index_inputs)
    except Exception:  # noqa: BLE001 - any failure: the torch.compile path decides
        bump("direct_compile_failures")
        return None
