"""What a capture is: the captured forward pass (:class:`Captured`: its GraphModule with
boundary markers, its boundary events in order, a :class:`SiteSlot` per site, a view of a
dynamic-shape capture for concrete inputs) and how cache objects pass through its graph
(:class:`CacheLayout`). Made by :func:`~fxsight.capture.export.capture`."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from .._torch import holds_packed, pytree, unflatten_keeping_sizes
from ..errors import NotOnGraph
from ..stats import bump
from . import caches
from .hidden import NestedTensor
from .input_flow import NO_FLOW, InputReads, input_reads, output_flows
from ..record.sites import Site


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
        return unflatten_keeping_sizes(merged, self.spec)


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
    # dynamic-shape captures (see ``capture(..., dynamic=True)``): the graph holds symbolic
    # sizes; ``bind`` gives a view for concrete inputs whose ``bindings`` (symbol -> size)
    # make ``meta_value`` concrete
    dynamic: bool = False
    guards: Any = None
    dims: list = field(default_factory=list, repr=False)
    ranges: dict = field(default_factory=dict, repr=False)
    bindings: dict | None = None
    # where the model takes or returns cache objects (see ``caches``): how they pass
    caches: "CacheLayout | None" = None
    # operation sites (``capture.operations``): op path -> the function it called
    callees: dict = field(default_factory=dict, repr=False)
    # modules that run as ``fxsight::opaque`` calls (path -> why it could not be
    # captured), see ``capture/opaque.py``
    opaque: dict[str, str] = field(default_factory=dict)
    # operation sites whose values hold symbolic sizes in a dynamic-shape capture (a
    # call such as ``x.size(-1)``): a Program that uses one needs an exact-shape capture
    symbolic: frozenset = frozenset()
    # site -> the graph nodes whose memory its tensors are in (see ``capture.memory``)
    aliases: dict[Site, frozenset] = field(default_factory=dict, repr=False)
    # the boundary events are a submodule's (``capture(..., events_on=...)``: a decoding
    # step's model): the root site's output is that module's, not the captured forward's
    events_inside: bool = False
    # where an opaque call takes a tensor sized by data (a packed sequence's lengths):
    # (flat input index, its value at capture) of the integer inputs that decide such
    # sizes; the call's output shapes hold for these values only (``opaque.deciding_inputs``)
    decided_by: tuple = field(default=(), repr=False, compare=False)
    # site -> ``value_layout(site)``, made at its first use (a view shares it)
    layouts: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.index = {site: i for i, site in enumerate(self.events)}

    @property
    def input_reads(self) -> InputReads:
        """What the captured forward's outputs carry of each input (indices in
        ``captures.flat_inputs``, the graph's placeholders; see ``input_flow``): an
        output's entries by name (``logits``), a cache object's tensors aside."""
        reads = self.graph_module.meta.get("fxsight_input_reads")
        if reads is None:
            leaves, flows, inputs, attentions = output_flows(
                self.graph_module.graph, torch.ops.fxsight.boundary.default)
            output = pytree.tree_unflatten(leaves, self.out_spec)
            if self.caches is not None:  # (the graph's (leaves, finals): caches aside)
                layout, rest = self.caches, iter(output[0])
                output = pytree.tree_unflatten(
                    [None if i in layout.positions else next(rest)
                     for i in range(layout.model_spec.num_leaves)], layout.model_spec)
            bump("input_flows")
            reads = self.graph_module.meta["fxsight_input_reads"] = input_reads(
                output, lambda leaf: flows.get(leaf, NO_FLOW) if isinstance(leaf, fx.Node)
                else NO_FLOW,
                lambda leaf: leaf.meta.get("val") if isinstance(leaf, fx.Node) else None,
                inputs, attentions)
        return reads

    @property
    def unread_inputs(self) -> frozenset[int]:
        """The inputs that no output of the captured forward is computed from."""
        return self.input_reads.unread()

    def alias_keys(self, site: Site) -> frozenset:
        """What ``site``'s tensors share memory with, as keys: two sites whose keys meet
        hold the same tensor or views of one (a module's output and the next module's
        input, an identity module's input and output, a view taken inside the forward)."""
        return self.aliases.get(site, frozenset())

    def anchor(self, position: int) -> fx.Node:
        """The last graph node of the boundary events up to ``position``."""
        for site in reversed(self.events[: position + 1]):
            nodes = [n for n in self.slots[site].nodes if n is not None]
            if nodes:
                return nodes[-1]
        return [n for n in self.graph_module.graph.nodes if n.op == "placeholder"][-1]

    def meta_value(self, site: Site) -> Any:
        """``site``'s value as meta tensors (shapes, dtypes), for the checks of a trace.
        Raises :class:`NotOnGraph` where a size is known only when the graph runs (it
        depends on the values of the model's inputs: a packed sequence's length)."""
        slot = self.slots[site]
        try:
            metas = [_to_meta(n.meta.get("val"), self.bindings) if n is not None else
                     _nested_meta(c, self.bindings) if type(c) is NestedTensor else c
                     for n, c in zip(slot.nodes, slot.constants)]
        except _UnknownSize:
            raise NotOnGraph(_unknown_size_message(site, slot.spec)) from None
        return unflatten_keeping_sizes(metas, slot.spec)

    def fits_values(self, flat_inputs: list[Any]) -> bool:
        """Whether the integer inputs that decide the sizes of an opaque call's inputs
        (:attr:`decided_by`) have the values they had at capture (always, where none do);
        read with the user's modes suspended by the caller."""
        for index, kept in self.decided_by:
            value = flat_inputs[index] if index < len(flat_inputs) else None
            if not isinstance(value, torch.Tensor) or value.shape != kept.shape or \
                    value.dtype != kept.dtype or not torch.equal(value.cpu(), kept):
                return False
        return True

    def value_layout(self, site: Site) -> tuple[list[Any], pytree.TreeSpec]:
        """``pytree.tree_flatten(self.meta_value(site))`` but its tensor leaves: the leaves
        that are not tensors, and the layout. Neither depends on the sizes a dynamic-shape
        capture is bound to: made once per site (a value that has none raises each time)."""
        found = self.layouts.get(site)
        if found is None:
            leaves, spec = pytree.tree_flatten(self.meta_value(site))
            found = self.layouts[site] = (
                [leaf for leaf in leaves if not isinstance(leaf, torch.Tensor)], spec)
        return found

    def bind(self, flat_inputs: list[Any]) -> "Captured | None":
        """A view of this dynamic-shape capture for these (flat) inputs, or ``None`` where
        the captured graph is not valid for their shapes."""
        bindings: dict = {}
        derived = []
        for index, dim, expr in self.dims:
            value = flat_inputs[index]
            if not isinstance(value, torch.Tensor):
                return None
            if dim is None:  # the rank
                if value.dim() != expr:
                    return None
                continue
            size = value.shape[dim]
            if isinstance(expr, int):
                if size != expr:
                    return None
            elif expr.is_Symbol:
                if bindings.setdefault(expr, size) != size:
                    return None
                low, high = self.ranges.get(expr, (None, None))
                if (low is not None and size < low) or (high is not None and size > high):
                    return None
            else:
                derived.append((expr, size))
        for expr, size in derived:
            if int(expr.xreplace(bindings)) != size:
                return None
        if self.guards is not None:
            try:
                self.guards(*flat_inputs)
            except Exception:  # noqa: BLE001 - a failed guard: not valid for these inputs
                return None
        view = copy.copy(self)
        view.bindings = bindings
        return view


@dataclass
class CacheLayout:
    """How cache objects pass through a captured graph. The graph takes each input cache
    as its tensors (in ``caches.flatten`` order, in place of the cache among the inputs)
    and returns ``(leaves, finals)``: the model output's leaves but its caches, and for
    each cache ``k`` (the input caches first, then those the forward pass made) its
    tensors after the forward pass, laid out by ``skeletons[k]``."""

    skeletons: list
    n_inputs: int
    model_spec: Any  # the model output's pytree layout (caches as leaves)
    positions: dict  # leaf index in model_spec -> k

    def model_value(self, graph_output: Any) -> Any:
        """The model's output from the graph's ``(leaves, finals)``: ``CacheRef``s where
        its caches are."""
        rest = iter(graph_output[0])
        leaves = [caches.CacheRef(self.positions[i], (), "the model's output")
                  if i in self.positions else next(rest)
                  for i in range(self.model_spec.num_leaves)]
        return pytree.tree_unflatten(leaves, self.model_spec)


class _UnknownSize(Exception):
    """A size of a captured value that depends on the values of the model's inputs."""


def _concrete(sizes: Any, bindings: dict | None) -> list[int]:
    out = []
    for size in sizes:
        if isinstance(size, torch.SymInt):
            expr = size.node.expr
            size = expr.xreplace(bindings) if bindings is not None else size.node.hint
            if size is None or not getattr(size, "is_number", True):  # (an unbacked size)
                raise _UnknownSize()
        out.append(int(size))
    return out


def _unknown_size_message(site: Site, spec: pytree.TreeSpec) -> str:
    """Why the fx backend cannot check a trace that uses ``site``."""
    what = "the length of a PackedSequence, the sum of its sequence lengths" \
        if holds_packed(spec) else "a size computed from the values of a tensor"
    return (f"{site.label} has a size that depends on the values of the model's inputs "
            f"({what}): the captured graph knows it only when it runs, so the fx backend "
            f"cannot check this trace's use of it; the hooks backend can (backend='hooks', "
            f"or 'auto')")


def _nested_meta(nested: NestedTensor, bindings: dict | None) -> Any:
    """The meta value of a tensor in a nested graph, for the checks of a trace (its use
    on the fx backend raises :class:`NotOnGraph` when it is spliced)."""
    if not isinstance(nested.meta, torch.Tensor):
        raise NotOnGraph(nested.reason())
    return _to_meta(nested.meta, bindings)


def _to_meta(value: Any, bindings: dict | None = None) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.empty_strided(_concrete(value.shape, bindings),
                                   _concrete(value.stride(), bindings),
                                   dtype=value.dtype, device="meta")
    return value
