"""Walking a Program: the one place that gives reads, writes and ops their meaning.

A walker evaluates the Program's nodes in order in some value domain (meta tensors for
validation, graph nodes for splicing, real tensors for the hooks backend) and gives every
node a *position*: the index of the latest boundary event it depends on (-1 for none).
A node can run as soon as the forward pass reaches its position.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from .errors import OrderError, ShapeError, TraceError, at_line
from .program import Program, execute, is_view, map_nodes, node_args, replace, select
from .rows import Rows, conform, narrow_rows, splice_rows
from .sites import Site, module_label

BEFORE_ALL = -1


class Walker:
    """Evaluates Program nodes; subclasses choose the value domain via :meth:`call`."""

    def __init__(self, program: Program, rows: dict[Any, Rows], index: dict[Site, int]):
        self.program = program
        self.rows = rows
        self.index = index
        self.values: dict[fx.Node, Any] = {}
        self.positions: dict[fx.Node, int] = {}
        self.current: dict[Site, Any] = {}
        self.current_position: dict[Site, int] = {}

    # --- domain hooks -------------------------------------------------------------------
    def call(self, node: fx.Node | None, op: str, target: Any, args: tuple, kwargs: dict,
             position: int) -> Any:
        raise NotImplementedError

    def site_value(self, site: Site) -> Any:
        """The value of ``site`` before any write."""
        raise NotImplementedError

    def input_value(self, node: fx.Node) -> Any:
        raise NotImplementedError

    # --- walking ---------------------------------------------------------------------------
    def run(self, nodes=None) -> None:
        for node in self.program.nodes if nodes is None else nodes:
            if node not in self.values:
                self.visit(node)

    def visit(self, node: fx.Node) -> None:
        kind = node.meta["kind"]
        if kind == "input":
            self.values[node] = self.input_value(node)
            self.positions[node] = BEFORE_ALL
        elif kind == "read":
            self._read(node)
        elif kind == "write":
            self._write(node)
        else:
            self._op(node)

    def position_of_site(self, node: fx.Node) -> int:
        site: Site = node.meta["site"]
        if site not in self.index:
            raise TraceError(at_line(
                f"{module_label(site.path)} has no {site.kind} call #{site.call} in this "
                f"forward pass (the module never runs with these inputs)", node.meta["line"]))
        return self.index[site]

    def _current(self, site: Site) -> Any:
        if site not in self.current:
            self.current[site] = self.site_value(site)
        return self.current[site]

    def _rows(self, node: fx.Node) -> Rows:
        return self.rows[node.meta["invoke"]]

    def _read(self, node: fx.Node) -> None:
        site = node.meta["site"]
        position = max(self.position_of_site(node), self.current_position.get(site, BEFORE_ALL))
        value = select(self._current(site), node.meta["accessor"])
        rows = self._rows(node)
        if not rows.whole:
            value = self._leafwise(value, lambda leaf: self.call(
                None, "call_function", narrow_rows,
                (leaf, rows.start, rows.stop, rows.total), {}, position))
        self.values[node] = value
        self.positions[node] = position

    def _arg_position(self, value: Any) -> int:
        return max([self.positions[n] for n in node_args(value)], default=BEFORE_ALL)

    def _write(self, node: fx.Node) -> None:
        site: Site = node.meta["site"]
        position = self.position_of_site(node)
        value_position = self._arg_position(node.args[0])
        if value_position > position:
            later = self._site_at(value_position)
            raise OrderError(at_line(
                f"the write to {site.label} depends on {later.label}, which is only "
                f"computed after {module_label(site.path)} has run", node.meta["line"]))
        value = map_nodes(node.args[0], self.values.__getitem__)
        full = self._current(site)
        old = select(full, node.meta["accessor"])
        rows = self._rows(node)
        self.check_write(node, old, value, rows)
        old_leaves, spec = pytree.tree_flatten(old)
        new_leaves = pytree.tree_leaves(value) if isinstance(value, (tuple, list, dict)) \
            else [value]
        if len(new_leaves) != len(old_leaves):
            raise ShapeError(at_line(
                f"{site.label} holds {_describe(old)}; the written value is {_describe(value)}",
                node.meta["line"]))
        replaced = []
        for old_leaf, new_leaf in zip(old_leaves, new_leaves):
            if not self.is_value(old_leaf):
                replaced.append(new_leaf)
            elif rows.whole:
                replaced.append(self.call(None, "call_function", conform,
                                          (new_leaf, old_leaf), {}, position))
            else:
                replaced.append(self.call(None, "call_function", splice_rows,
                                          (old_leaf, new_leaf, rows.start, rows.stop,
                                           rows.total), {}, position))
        new = pytree.tree_unflatten(replaced, spec)
        self.current[site] = replace(full, node.meta["accessor"], new)
        self.current_position[site] = position
        self.values[node] = None
        self.positions[node] = position

    def _op(self, node: fx.Node) -> None:
        position = max(self._arg_position(node.args), self._arg_position(node.kwargs))
        if node.meta.get("mutation"):
            self._check_mutation_order(node, position)
        args = map_nodes(node.args, self.values.__getitem__)
        kwargs = map_nodes(node.kwargs, self.values.__getitem__)
        self.values[node] = self.call(node, node.op, node.target, args, kwargs, position)
        self.positions[node] = position

    def is_value(self, leaf: Any) -> bool:
        """Whether a leaf of a site's value is a runtime value (not a Python constant)."""
        return isinstance(leaf, (torch.Tensor, fx.Node))

    def _leafwise(self, value: Any, fn) -> Any:
        flat, spec = pytree.tree_flatten(value)
        return pytree.tree_unflatten([fn(v) if self.is_value(v) else v for v in flat], spec)

    def check_write(self, node: fx.Node, old: Any, value: Any, rows: Rows) -> None:
        """Domain hook: reject a value that cannot replace ``old``."""

    def _check_mutation_order(self, node: fx.Node, position: int) -> None:
        root = node.args[0]
        while isinstance(root, fx.Node) and root.meta["kind"] == "op" and (
                is_view(root) or root.meta.get("mutation")):
            root = root.args[0]
        if not isinstance(root, fx.Node) or root.meta["kind"] != "read":
            return
        site_position = self.positions[root]
        if position > site_position:
            later = self._site_at(position)
            raise OrderError(at_line(
                f"this in-place change of {root.meta['site'].label} depends on "
                f"{later.label}, which is only computed after "
                f"{module_label(root.meta['site'].path)} has run", node.meta["line"]))

    def _site_at(self, position: int) -> Site:
        for site, index in self.index.items():
            if index == position:
                return site
        raise KeyError(position)


class UnknownMeta:
    """The meta value of something that could not be computed without real data."""

    def __repr__(self) -> str:
        return "<unknown>"


UNKNOWN = UnknownMeta()


class MetaWalker(Walker):
    """Evaluates a Program on meta tensors: shapes, dtypes, positions, and every check
    that must happen before anything runs."""

    def __init__(self, program: Program, rows: dict[Any, Rows], source: Any):
        super().__init__(program, rows, source.index)
        self.source = source

    def site_value(self, site: Site) -> Any:
        return self.source.meta_value(site)

    def input_value(self, node: fx.Node) -> Any:
        value = self.program.input_values[node.meta["index"]]
        return pytree.tree_map_only(
            torch.Tensor, lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta"), value)

    def call(self, node, op, target, args, kwargs, position):
        if any(isinstance(v, UnknownMeta) for v in pytree.tree_leaves((args, kwargs))):
            return UNKNOWN
        try:
            return execute(op, target, args, kwargs)
        except Exception as error:  # noqa: BLE001
            if node is None or node.meta.get("lenient"):
                return UNKNOWN
            name = target if isinstance(target, str) else getattr(target, "__name__", target)
            raise ShapeError(at_line(f"{name} fails on these shapes: {error}",
                                     node.meta["line"])) from None

    def check_write(self, node, old, value, rows):
        site = node.meta["site"]
        old_leaves, old_spec = pytree.tree_flatten(old)
        new_leaves = [value] if isinstance(value, torch.Tensor) else pytree.tree_leaves(value)
        if isinstance(value, UnknownMeta):
            return
        if len(old_leaves) != len(new_leaves):
            raise ShapeError(at_line(
                f"{site.label} holds {_describe(old)}; the written value is {_describe(value)}",
                node.meta["line"]))
        for old_leaf, new_leaf in zip(old_leaves, new_leaves):
            if not isinstance(old_leaf, torch.Tensor) or isinstance(new_leaf, UnknownMeta):
                continue
            target_shape = old_leaf.shape
            if not rows.whole and old_leaf.dim() > 0 and old_leaf.shape[0] == rows.total:
                target_shape = (rows.stop - rows.start, *old_leaf.shape[1:])
            new_shape = new_leaf.shape if isinstance(new_leaf, torch.Tensor) else ()
            try:
                broadcast = torch.broadcast_shapes(new_shape, target_shape)
            except RuntimeError:
                broadcast = None
            if broadcast != torch.Size(target_shape):
                raise ShapeError(at_line(
                    f"a value of shape {tuple(new_shape)} cannot be written into "
                    f"{site.label} of shape {tuple(target_shape)}", node.meta["line"]))


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    return type(value).__name__
