"""Capture: a model's forward pass as a GraphModule whose module boundaries are nodes.

Every tensor that enters or leaves a module passes through ``fxsight::boundary`` while
``torch.export`` traces the model, so the captured graph alone says where each module's
inputs and outputs are. The markers are identities: the splicer attaches interventions to
them and then removes them all.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from . import counters as stats
from .errors import CaptureError
from .module_events import ModuleEvents
from .sites import Site


@torch.library.custom_op("fxsight::boundary", mutates_args=())
def boundary(x: torch.Tensor, site: str, leaf: int) -> torch.Tensor:
    """Identity marker of a module boundary (only ever seen while capturing)."""
    return x.clone()


@boundary.register_fake
def _boundary_fake(x, site, leaf):
    return torch.empty_like(x)


BOUNDARY = torch.ops.fxsight.boundary.default

_DROPPED_TARGETS = {
    torch.ops.aten._assert_tensor_metadata.default,
    torch.ops.aten._assert_scalar.default,
    torch.ops.aten.sym_constrain_range_for_size.default,
}


@dataclass
class SiteSlot:
    """What a capture knows about one site: its pytree layout and the graph nodes of its
    tensors (``None`` at non-tensor leaves, whose values are kept in ``constants``)."""

    spec: pytree.TreeSpec
    nodes: list[fx.Node | None]
    constants: list[Any]

    def value(self, leaf_values: list[Any] | None = None) -> Any:
        values = leaf_values if leaf_values is not None else self.nodes
        merged = [v if n is not None else c for v, n, c in zip(values, self.nodes, self.constants)]
        return pytree.tree_unflatten(merged, self.spec)


@dataclass
class Captured:
    """A captured forward pass (boundary markers still in place)."""

    graph_module: fx.GraphModule
    in_spec: pytree.TreeSpec
    out_spec: pytree.TreeSpec
    events: list[Site]
    slots: dict[Site, SiteSlot]
    seconds: float
    index: dict[Site, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.index = {site: i for i, site in enumerate(self.events)}

    def anchor(self, position: int) -> fx.Node:
        """The last graph node of the boundary events up to ``position``."""
        for site in reversed(self.events[: position + 1]):
            nodes = [n for n in self.slots[site].nodes if n is not None]
            if nodes:
                return nodes[-1]
        return [n for n in self.graph_module.graph.nodes if n.op == "placeholder"][-1]

    def meta_value(self, site: Site) -> Any:
        slot = self.slots[site]
        metas = [_to_meta(n.meta.get("val")) if n is not None else None for n in slot.nodes]
        return slot.value(metas)


def _to_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")
    return value


def capture(model: torch.nn.Module, args: tuple, kwargs: dict) -> Captured:
    """Capture ``model(*args, **kwargs)`` into a GraphModule with boundary markers.

    Raises :class:`CaptureError` naming the innermost module that could not be captured.
    """
    start = time.perf_counter()
    layouts: dict[Site, tuple[pytree.TreeSpec, list[Any]]] = {}

    def mark(site: Site, value: Any) -> Any:
        flat, spec = pytree.tree_flatten(value)
        layouts[site] = (spec, [None if isinstance(v, torch.Tensor) else v for v in flat])
        label = site.label
        marked = [boundary(v, label, i) if isinstance(v, torch.Tensor) else v
                  for i, v in enumerate(flat)]
        return pytree.tree_unflatten(marked, spec)

    events = ModuleEvents(model, mark)
    try:
        with events.installed():
            exported = torch.export.export(model, tuple(args), dict(kwargs), strict=False)
    except Exception as error:  # noqa: BLE001 - any failure means: fall back to hooks
        culprit = events.stack[-1] if events.stack else None
        where = f"module {culprit or 'model'!r}" if culprit is not None else "the model"
        reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        raise CaptureError(f"could not capture {where}: {reason}", culprit) from error

    gm = exported.module()
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
        elif node.op == "call_function" and node.target in _DROPPED_TARGETS:
            graph.erase_node(node)
    in_spec, out_spec = gm._in_spec, gm._out_spec
    graph._codegen = fx.graph.CodeGen()
    for name in ("_guards_fn",):
        if hasattr(gm, name):
            delattr(gm, name)
    marks: dict[str, dict[int, fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_function" and node.target is BOUNDARY:
            marks.setdefault(node.args[1], {})[node.args[2]] = node
    slots = {}
    for site in events.order:
        spec, constants = layouts[site]
        found = marks.get(site.label, {})
        nodes = [found.get(i) if constants[i] is None else None for i in range(len(constants))]
        slots[site] = SiteSlot(spec, nodes, constants)
    module = fx.GraphModule(gm, graph, class_name="CapturedForward")
    _drop_forward_hooks(module)
    stats.bump("captures")
    return Captured(module, in_spec, out_spec, list(events.order), slots,
                    time.perf_counter() - start)


def _drop_forward_hooks(module: torch.nn.Module) -> None:
    module._forward_hooks.clear()
    module._forward_pre_hooks.clear()


# --- the capture cache ---------------------------------------------------------------
_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def signature(model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple:
    """What a capture depends on: input shapes and types, non-tensor inputs, model state."""
    flat, spec = pytree.tree_flatten((args, kwargs))
    parts = []
    for value in flat:
        if isinstance(value, torch.Tensor):
            parts.append(("T", tuple(value.shape), value.dtype, value.device))
        else:
            try:
                hash(value)
                parts.append(("V", value))
            except TypeError:
                parts.append(("V", repr(value)))
    first = next(model.parameters(), None)
    state = (model.training, None if first is None else (first.dtype, first.device))
    return (str(spec), tuple(parts), state, torch.is_grad_enabled())


def cached_capture(model: torch.nn.Module, args: tuple, kwargs: dict) -> Captured:
    """Capture once per (model, signature); failures are remembered too."""
    per_model = _CACHE.setdefault(model, {})
    key = signature(model, args, kwargs)
    hit = per_model.get(key)
    if hit is None:
        try:
            hit = capture(model, args, kwargs)
        except CaptureError as error:
            hit = error
            stats.bump("capture_failures")
        per_model[key] = hit
    if isinstance(hit, CaptureError):
        raise hit
    return hit


def forget(model: torch.nn.Module) -> None:
    """Drop every cached capture of ``model`` (after changing its structure)."""
    _CACHE.pop(model, None)
