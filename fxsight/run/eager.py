"""Eager execution of a rewritten graph with less Python per ATen call.

fx's generated code calls every ATen operator as ``torch.ops.aten.add.Tensor(...)``: four
attribute lookups and ``OpOverload.__call__`` (a Python frame that only forwards to the
operator's C++ entry point) per call. For a small model that is a tenth of the eager
forward. :func:`fast_forward` runs the same code with each such call bound to the C++
entry point directly (the graph, its values and its order are unchanged).
"""

from __future__ import annotations

import re
import types
from typing import Callable

import torch
import torch.fx as fx

from .._torch import entry_point

_CALL = re.compile(r"\btorch\.ops\.(\w+)\.(\w+)\.(\w+)\(")


def _entry_point(namespace: str, packet: str, overload: str):
    """The C++ entry point of ``torch.ops.<namespace>.<packet>.<overload>``, or ``None``
    where calling the overload does more than forward to it."""
    try:
        target = getattr(getattr(getattr(torch.ops, namespace), packet), overload)
    except (AttributeError, RuntimeError):
        return None
    return entry_point(target)


def fast_forward(graph_module: fx.GraphModule) -> Callable:
    """``graph_module.forward`` with ATen calls bound to their entry points (the original
    ``forward`` where the code cannot be rewritten)."""
    bound: dict[str, object] = {}

    def rebind(match: re.Match) -> str:
        entry = _entry_point(*match.groups())
        if entry is None:
            return match.group(0)
        name = "_aten_" + "_".join(match.groups())
        bound[name] = entry
        return name + "("

    try:
        source = _CALL.sub(rebind, graph_module.code)
        namespace = {**graph_module.forward.__globals__, **bound}
        exec(compile(source, f"<fxsight rewritten forward {id(graph_module):x}>", "exec"),
             namespace)
        return types.MethodType(namespace["forward"], graph_module)
    except Exception:  # noqa: BLE001 - the generated forward is always a correct fallback
        return graph_module.forward
