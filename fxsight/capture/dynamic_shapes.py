"""Dynamic-shape captures: every input dimension ``Dim.AUTO`` for ``torch.export``, and how
the captured graph's symbolic sizes bind to the inputs' sizes (a capture whose sites hold
sizes that no input size determines is refused)."""

from __future__ import annotations

from typing import Any

import torch

from .._torch import pytree
from .captured_forward import Captured
from ..record.sites import is_operation


def _auto_dynamic_shapes(model: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    """``dynamic_shapes`` for export: every dimension of every input tensor ``Dim.AUTO``
    (but sizes 0 and 1, which export would specialize anyway, with a warning)."""
    import inspect

    bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    auto = torch.export.Dim.AUTO
    return {name: pytree.tree_map(
        lambda v: {d: auto for d in range(v.dim()) if v.shape[d] > 1}
        if isinstance(v, torch.Tensor) else None, value) for name, value in bound.items()}


def _make_dynamic(captured: Captured, exported: Any, guards: Any) -> None:
    """Record how a dynamic capture's symbolic sizes bind to its inputs; refuse (raise
    ``ValueError``) a capture whose sites hold sizes that no input size determines."""
    placeholders = [n for n in captured.graph_module.graph.nodes if n.op == "placeholder"]
    dims = []
    symbols = set()
    for index, node in enumerate(placeholders):
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor):
            if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
                raise ValueError("a non-tensor input became symbolic")
            continue
        dims.append((index, None, value.dim()))
        for dim, size in enumerate(value.shape):
            if isinstance(size, torch.SymInt):
                expr = size.node.expr
                if expr.is_number:
                    dims.append((index, dim, int(expr)))
                else:
                    dims.append((index, dim, expr))
                    symbols |= expr.free_symbols
            else:
                dims.append((index, dim, int(size)))
    symbolic = set()
    for site, slot in captured.slots.items():
        for constant in slot.constants:
            if isinstance(constant, (torch.SymInt, torch.SymFloat, torch.SymBool)):
                if not is_operation(site.path):
                    raise ValueError("a module boundary carries a symbolic Python number")
                symbolic.add(site)
        for node in slot.nodes:
            value = node.meta.get("val") if node is not None else None
            if isinstance(value, torch.Tensor):
                for size in (*value.shape, *value.stride()):
                    if isinstance(size, torch.SymInt) and \
                            not size.node.expr.free_symbols <= symbols:
                        raise ValueError("a boundary size depends on data")
    ranges = {}
    for symbol, bounds in exported.range_constraints.items():
        low, high = bounds.lower, bounds.upper
        ranges[symbol] = (int(low) if getattr(low, "is_Integer", False) else None,
                          int(high) if getattr(high, "is_Integer", False) else None)
    captured.dynamic = bool(symbols)
    captured.symbolic = frozenset(symbolic)
    captured.guards = guards
    captured.dims = dims
    captured.ranges = ranges
