"""Walking a Program: the one place that gives reads, writes and ops their meaning.

A walker evaluates the Program's nodes in order in some value domain (meta tensors for
validation, graph nodes for splicing, real tensors for the hooks backend) and gives every
node a *position*: the index of the latest boundary event it depends on (-1 for none).
A node can run as soon as the forward pass reaches its position.

One exception keeps the order the block was written in: an operation recorded after an
in-place change of memory one of its reads shares runs no earlier than the change (see
:mod:`.shared_memory`; which boundaries share memory the walker's source says,
``site_aliases``).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import operator
from typing import Any, Callable

import torch
import torch.fx as fx
from .._torch import (DataDependentOutputException, DynamicOutputShapeException,
                      FakeTensorMode, autocast_cache_off, pytree,
                      unflatten_keeping_sizes)

from ..errors import (DataDependentError, ItemAssignmentError, NotOnGraph, OrderError,
                      ShapeError, ShapeIndexError, TraceError, at_line)
from ..record.program import (AUTOGRAD_GRAD, Kind, ModuleCall, Node, Program, execute,
                              map_nodes, node_args, origin, replace, select, set_attribute,
                              setitem)
from .rows import Rows, conform, narrow_rows, splice_rows
from .shared_memory import SharedMemory, memory_of, read_root
from .gradients import (backward_phase, grad_tap, grad_target, leaf_index,
                        picks_inside_a_tensor, tap_key)
from ..record.sites import Site, is_operation, module_label

BEFORE_ALL = -1


class Walker:
    """Evaluates Program nodes; subclasses choose the value domain via :meth:`call`."""

    def __init__(self, program: Program, rows: dict[Any, Rows], index: dict[Site, int],
                 site_aliases: Callable[[Site], frozenset] | None = None):
        """``site_aliases(site)``: keys of the memory a site's tensors are in, from the
        walk's source (sites whose keys meet share a tensor; none known: nothing is
        ordered by shared memory)."""
        self.program = program
        self.rows = rows
        self.index = index
        self.values: dict[Node, Any] = {}
        self.positions: dict[Node, int] = {}
        self.current: dict[Site, Any] = {}
        self.current_position: dict[Site, int] = {}
        # gradients: nodes that run after the forward pass, and the grad taps of sites
        self.backward_nodes = backward_phase(program)
        self.grad_nodes = [n for n in self.backward_nodes
                           if n.kind in (Kind.GRAD, Kind.GRAD_WRITE)]
        self.grad_keys: dict[Node, str] = {}
        # how many times each site's value has changed (whole writes, in-place changes): a
        # gradient read after a change is the changed value's (a tap of its own), as a
        # tensor hook registered after it sees it in torch
        self.tap_versions: dict[Site, int] = {}
        self.read_versions: dict[Node, int] = {}  # the version each read saw
        # in-place changes and raw writes (held apart from the walker: no reference cycle)
        self.shared = SharedMemory(site_aliases or _no_aliases)

    # --- domain hooks -------------------------------------------------------------------

    def call(self, node: Node | None, op: str, target: Any, args: tuple, kwargs: dict,
             position: int) -> Any:
        raise NotImplementedError

    def site_value(self, site: Site) -> Any:
        """The value of ``site`` before any write."""
        raise NotImplementedError

    def input_value(self, node: Node) -> Any:
        raise NotImplementedError

    # --- walking ---------------------------------------------------------------------------
    taps_gradients = True  # real values and graphs route gradients through grad taps

    def run(self, nodes=None) -> None:
        if nodes is None:
            nodes = [n for n in self.program.nodes if n not in self.backward_nodes]
        for node in nodes:
            if node not in self.values:
                self.visit(node)

    def visit(self, node: Node) -> None:
        kind = node.kind
        if kind in (Kind.GRAD, Kind.GRAD_WRITE):  # seen by the meta walker only
            target = node.args[0]
            self.values[node] = self.values[target] if kind is Kind.GRAD else None
            self.positions[node] = self.positions[target]
            if kind is Kind.GRAD_WRITE:
                rows = self._rows(node)
                value = map_nodes(node.args[1], self.values.__getitem__)
                site = grad_target(node)[0].site
                self.check_grad_write(node, site, self.values[target], value, rows)
            return
        if kind is Kind.INPUT:
            self.values[node] = self.input_value(node)
            self.positions[node] = BEFORE_ALL
        elif kind is Kind.READ:
            self._read(node)
        elif kind is Kind.WRITE:
            self._write(node)
        else:
            self._op(node)

    def position_of_site(self, node: Node, site: Site | None = None) -> int:
        site = node.site if site is None else site
        if site not in self.index:
            why = ("its line is not reached with these inputs" if is_operation(site.path)
                   else "the module never runs with these inputs")
            raise TraceError(at_line(
                f"{module_label(site.path)} has no {site.kind} call #{site.call} in this "
                f"forward pass ({why})", node.line))
        return self.index[site]

    def _current(self, site: Site) -> Any:
        if site not in self.current:
            self.current[site] = self._tapped(site, self.site_value(site))
        return self.current[site]

    def _tapped(self, site: Site, value: Any, leaves: set[int] | None = None,
                position: int | None = None) -> Any:
        """``value`` with a grad tap on every leaf whose gradient the trace uses.

        Only gradient reads not walked yet are tapped here (those walked saw an earlier
        value of the site); ``leaves``: only these leaves are new values (after a write),
        the others keep their taps. ``position``: where the taps go (the site's, unless
        they follow a later change)."""
        taps: dict[int, str] = {}
        version = self.tap_versions.get(site, 0)
        for node in self.grad_nodes:
            read, keys = grad_target(node)
            if read.site != site or read in self.values:
                continue
            leaf = leaf_index(value, read.accessor, keys)
            if leaf is None and picks_inside_a_tensor(value, read.accessor, keys):
                raise TraceError(at_line(
                    f".grad of a part of a tensor of {site.label} (an index or a slice "
                    f"of it) is not supported: take the gradient of the whole tensor and "
                    f"index it (`h.grad[0]` for `h[0].grad`)", node.line))
            if leaf is None:
                raise TraceError(at_line(
                    f".grad needs a single tensor of {site.label}; use an item of it "
                    f"(e.g. `.output[0]`)", node.line))
            if leaves is not None and leaf not in leaves:
                continue
            key = self.grad_keys[node] = tap_key(site, leaf, version)
            taps[leaf] = key
        if not taps or not self.taps_gradients:
            return value
        flat, spec = pytree.tree_flatten(value)
        position = self.index[site] if position is None else position
        for leaf, key in taps.items():
            flat[leaf] = self.call(None, "call_function", grad_tap, (flat[leaf], key), {},
                                   position)
        self.on_tapped(site)
        return unflatten_keeping_sizes(flat, spec)

    def _retapped(self, site: Site, old: Any, new: Any) -> Any:
        """``new``, the value a write gives ``site`` (``old`` before it), with a tap of
        its own on each new leaf whose gradient a later read uses."""
        if not self.grad_nodes:
            return new
        self.tap_versions[site] = self.tap_versions.get(site, 0) + 1
        old_leaves, new_leaves = pytree.tree_leaves(old), pytree.tree_leaves(new)
        changed = {i for i, leaf in enumerate(new_leaves)
                   if i >= len(old_leaves) or leaf is not old_leaves[i]}
        return self._tapped(site, new, changed)

    def _retapped_after_change(self, node: Node, position: int) -> None:
        """After ``node`` changed the memory of a read in place: gradient reads recorded
        after it are of the changed value, from taps registered after the change (as a
        tensor hook registered after an in-place change sees it; those before see the
        gradient of the value before the change)."""
        root = read_root(node.args[0]) if node.args else None
        if root is None:
            return
        site = root.site
        if site not in self.current or \
                self.read_versions.get(root) != self.tap_versions.get(site, 0):
            return  # (a value the site no longer holds)
        self.tap_versions[site] = self.tap_versions.get(site, 0) + 1
        self.current[site] = self._tapped(site, self.current[site], position=position)

    def on_tapped(self, site: Site) -> None:
        """Domain hook: ``site``'s value now carries a grad tap."""

    def _rows(self, node: Node) -> Rows:
        return self.rows[node.invoke]

    def narrowing(self, site: Site) -> Callable:
        """Domain hook: the function that takes an invoke's rows of a leaf read at
        ``site``, called as ``(leaf, start, stop, total)``."""
        return narrow_rows

    def _read(self, node: Node) -> None:
        site = node.site
        position = max(self.position_of_site(node), self.current_position.get(site, BEFORE_ALL))
        value = select(self._current(site), node.accessor)
        rows = self._rows(node)
        if not rows.whole:
            narrow = self.narrowing(site)
            value = self._leafwise(value, lambda leaf: self.call(
                None, "call_function", narrow,
                (leaf, rows.start, rows.stop, rows.total), {}, position))
        self.values[node] = value
        self.positions[node] = position
        self.read_versions[node] = self.tap_versions.get(site, 0)

    def _arg_position(self, value: Any) -> int:
        return max([self.positions[n] for n in node_args(value)], default=BEFORE_ALL)

    def _write(self, node: Node) -> None:
        value_position = self._arg_position(node.args[0])
        if node.skip:
            self._check_skip_value(node, value_position)
        value = map_nodes(node.args[0], self.values.__getitem__)
        self._write_at(node, node.site, node.accessor, value, value_position, node.args[0])
        self.values[node] = None

    def _write_at(self, node: Node, site: Site, accessor: str, value: Any,
                  value_position: int, recorded: Any = None, leafwise: bool = True) -> None:
        """Replace ``accessor`` of ``site`` with ``value`` (for ``node``, the user's line;
        ``recorded``: the value as the Program has it, leaf for leaf where ``leafwise``)."""
        position = self.position_of_site(node, site)
        if value_position > position:
            later = self._site_at(value_position)
            raise OrderError(at_line(
                f"the write to {site.label} depends on {later.label}, which is only "
                f"computed after {module_label(site.path)} has run"
                f"{self.shared.why_late(recorded, value_position, self.positions)}",
                node.line))
        full = self._current(site)
        old = select(full, accessor)
        rows = self._rows(node)
        self.check_write(node, site, old, value, rows)
        old_leaves, spec = pytree.tree_flatten(old)
        new_leaves = pytree.tree_leaves(value) if isinstance(value, (tuple, list, dict)) \
            else [value]
        if len(new_leaves) != len(old_leaves):
            raise ShapeError(at_line(_structure_mismatch(site, old, value), node.line))
        replaced = []
        brought_in = self._brought_in(recorded if leafwise else None, len(new_leaves))
        for old_leaf, new_leaf, caller_s in zip(old_leaves, new_leaves, brought_in):
            if not self.is_value(old_leaf):
                replaced.append(new_leaf)
                continue
            if rows.whole and node.skip:
                leaf = new_leaf  # a skipped module's value is taken as it is
            elif rows.whole:
                leaf = self.conformed(new_leaf, old_leaf, position)
            else:  # (a new tensor: the invoke's rows spliced into the batch)
                replaced.append(self.call(None, "call_function", splice_rows,
                                          (old_leaf, new_leaf, rows.start, rows.stop,
                                           rows.total), {}, position))
                continue
            replaced.append(self._copy(leaf, position) if caller_s else leaf)
        new = unflatten_keeping_sizes(replaced, spec)
        self.shared.note_write(site, recorded)
        self.current[site] = self._retapped(site, full, replace(full, accessor, new))
        self.current_position[site] = position
        self.positions[node] = position
        self.on_written(site)

    def _copy(self, value: Any, position: int) -> Any:
        """A dense copy of a tensor the caller brought in, written as a site's value: the
        run's in-place changes after the write go to the copy, and a broadcast value is a
        tensor of its own (an in-place change of an expanded view is an error in torch)."""
        return self.call(None, "call_function", torch.clone, (value,),
                         {"memory_format": torch.contiguous_format}, position)

    def _brought_in(self, recorded: Any, count: int) -> list[bool]:
        """For each of the ``count`` leaves of a written value (``recorded``: as the Program
        has it), whether it is the memory of a tensor the caller brought into the block:
        the model's and the block's later in-place changes of the site would change the
        caller's tensor (a steering vector, a value saved by an earlier trace, written
        again by the next trace)."""
        def caller_s(value: Any) -> bool:
            memory = memory_of(value)
            return isinstance(memory, Node) and memory.kind is Kind.INPUT and isinstance(
                self.program.input_values[memory.input_index], torch.Tensor)

        if isinstance(recorded, Node):
            return [caller_s(recorded)] * count
        leaves = pytree.tree_leaves(recorded) if recorded is not None else []
        if len(leaves) == count:
            return [caller_s(leaf) for leaf in leaves]
        return [any(map(caller_s, node_args(recorded)))] * count

    def conformed(self, new: Any, old: Any, position: int) -> Any:
        """``new`` written in place of the value ``old`` for every row: shaped like it and
        on its device (:func:`~fxsight.splice.rows.conform`)."""
        return self.call(None, "call_function", conform, (new, old), {}, position)

    def on_written(self, site: Site) -> None:
        """Domain hook: ``site``'s value was replaced."""

    def _set_item_of_read(self, node: Node) -> None:
        """``value[key] = v`` where ``value`` is a module's dict-like inputs or output (a
        ``ModelOutput``): a write of the site with that item replaced, so the model's
        later modules see it on every backend."""
        read, key, item = node.args
        value_position = max(self._arg_position(item), self._arg_position(key))
        value = map_nodes(item, self.values.__getitem__)
        if isinstance(item, Node) and self._brought_in(item, 1)[0]:
            value = self._copy(value, value_position)  # (as a whole write's: see there)
        new = _with_item(self.values[read], map_nodes(key, self.values.__getitem__), value)
        self._write_at(node, read.site, read.accessor, new, value_position, (key, item),
                       leafwise=False)
        self.values[node] = new

    def _set_attribute_of_read(self, node: Node) -> None:
        """``value.name = v`` where ``value`` is a module's output or inputs object (a
        dataclass, a ``ModelOutput``): a write of the site with a copy of it holding that
        attribute, so the model's later modules see it on every backend."""
        read, name, item = node.args
        value_position = self._arg_position(item)
        value = map_nodes(item, self.values.__getitem__)
        if isinstance(item, Node) and self._brought_in(item, 1)[0]:
            value = self._copy(value, value_position)  # (as a whole write's: see there)
        try:
            new = set_attribute(self.values[read], name, value)
        except NotOnGraph as error:  # (an object of hidden tensors: see capture.hidden)
            raise NotOnGraph(at_line(str(error), node.line)) from None
        except (AttributeError, TypeError, dataclasses.FrozenInstanceError) as error:
            raise TraceError(at_line(f"cannot set attribute {name!r} on {read.site.label} "
                                     f"({type(self.values[read]).__name__}): {error}",
                                     node.line)) from None
        self._write_at(node, read.site, read.accessor, new, value_position, (name, item),
                       leafwise=False)
        self.values[node] = new

    def _check_skip_value(self, node: Node, value_position: int) -> None:
        """A skipped module does not run: its value may not come from inside it."""
        site: Site = node.site
        start = self.index.get(Site(site.path, "input", site.call), BEFORE_ALL)
        if value_position > start:
            inner = self._site_at(value_position)
            raise OrderError(at_line(
                f"the value given to {module_label(site.path)}.skip(...) depends on "
                f"{inner.label}, which is computed inside {module_label(site.path)}; a "
                f"skipped module does not run"
                f"{self.shared.why_late(node.args[0], value_position, self.positions)}",
                node.line))

    def _op(self, node: Node) -> None:
        if node.target is set_attribute:
            self._set_attribute_of_read(node)
            return
        if node.target is setitem and type(node.args[0]) is Node and \
                node.args[0].kind is Kind.READ and \
                isinstance(self.values[node.args[0]], (dict, list)):
            self._set_item_of_read(node)
            return
        position = max(self._arg_position(node.args), self._arg_position(node.kwargs))
        if node.mutation:
            self._check_mutation_order(node, position)
        position = self.shared.earliest(node, position)
        args = map_nodes(node.args, self.values.__getitem__)
        kwargs = map_nodes(node.kwargs, self.values.__getitem__)
        self.values[node] = self.call(node, node.op, node.target, args, kwargs, position)
        self.positions[node] = position
        if node.mutation:
            self.shared.note_change(node, position)
            if self.grad_nodes:
                self._retapped_after_change(node, position)

    def is_value(self, leaf: Any) -> bool:
        """Whether a leaf of a site's value is a runtime value (not a Python constant)."""
        return isinstance(leaf, (torch.Tensor, fx.Node))

    def _leafwise(self, value: Any, fn) -> Any:
        flat, spec = pytree.tree_flatten(value)
        return unflatten_keeping_sizes([fn(v) if self.is_value(v) else v for v in flat], spec)

    def check_grad_write(self, node, site, old, value, rows) -> None:
        """Domain hook: reject a gradient that cannot replace ``old``'s."""

    def check_write(self, node: Node, site: Site, old: Any, value: Any, rows: Rows) -> None:
        """Domain hook: reject a value that cannot replace ``old`` at ``site``."""

    def _check_mutation_order(self, node: Node, position: int) -> None:
        root = read_root(node.args[0])
        if root is None:
            return
        site_position = self.positions[root]
        if position > site_position:
            later = self._site_at(position)
            raise OrderError(at_line(
                f"this in-place change of {root.site.label} depends on "
                f"{later.label}, which is only computed after "
                f"{module_label(root.site.path)} has run"
                f"{self.shared.why_late(node.args, position, self.positions)}",
                node.line))

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


def _no_aliases(site: Site) -> frozenset:
    return frozenset()


class MetaWalker(Walker):
    """Evaluates a Program on meta tensors: shapes, dtypes, positions, and every check
    that must happen before anything runs."""

    taps_gradients = False

    def __init__(self, program: Program, rows: dict[Any, Rows], source: Any):
        super().__init__(program, rows, source.index, getattr(source, "alias_keys", None))
        self.source = source

    def site_value(self, site: Site) -> Any:
        return self.source.meta_value(site)

    def run(self, nodes=None) -> None:
        self._check_inside_skips()
        super().run(list(self.program.nodes) if nodes is None else nodes)

    def check_grad_write(self, node, site, old, value, rows) -> None:
        if not isinstance(old, torch.Tensor) or isinstance(value, UnknownMeta):
            return
        shape = old.shape if rows.whole else (rows.stop - rows.start, *old.shape[1:])
        new_shape = value.shape if isinstance(value, torch.Tensor) else ()
        try:
            fits = torch.broadcast_shapes(new_shape, shape) == torch.Size(shape)
        except RuntimeError:
            fits = False
        if not fits:
            raise ShapeError(at_line(f"a gradient of shape {tuple(new_shape)} cannot replace "
                                     f"the gradient of {site.label}, of shape {tuple(shape)}",
                                     node.line))

    def _check_inside_skips(self) -> None:
        """Nothing may be read or written inside a module skipped for the whole batch."""
        spans = []
        for node in self.program.nodes:
            if node.skip and self._rows(node).whole:
                site = node.site
                start = self.index.get(Site(site.path, "input", site.call))
                end = self.index.get(site)
                if start is not None and end is not None:
                    spans.append((start, end, site))
        for node in self.program.nodes if spans else ():
            if node.kind not in (Kind.READ, Kind.WRITE) or node.skip:
                continue
            position = self.index.get(node.site)
            for start, end, skipped in spans:
                if position is not None and start < position < end:
                    raise TraceError(at_line(
                        f"{node.site.label} is inside {module_label(skipped.path)}, "
                        f"which is skipped (.skip(...)) and does not run",
                        node.line))

    def input_value(self, node: Node) -> Any:
        value = self.program.input_values[node.input_index]
        return pytree.tree_map_only(
            torch.Tensor, lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta"), value)

    def call(self, node, op, target, args, kwargs, position):
        if any(isinstance(v, UnknownMeta) for v in pytree.tree_leaves((args, kwargs))):
            return UNKNOWN
        if op == "call_method" and target == "backward" or target is AUTOGRAD_GRAD:
            return None
        try:
            if isinstance(target, ModuleCall):  # real weights: run it on meta copies
                return _module_call_meta(target, args, kwargs)
            if op == "call_method" and target in _DEVICE_MOVES:
                return _device_move_meta(target, args, kwargs)
            if target is operator.getitem or target is setitem:
                args = _meta_index(args)
            return execute(op, target, args, kwargs)
        except NotOnGraph as error:  # (a cache object at a boundary: see capture.caches)
            raise NotOnGraph(at_line(str(error), node.line if node is not None else None)) \
                from None
        except Exception as error:  # noqa: BLE001
            if node is None or node.lenient:
                return UNKNOWN
            name = target if isinstance(target, str) else getattr(target, "__name__", target)
            where = origin(node)
            where = f" (on values from {where})" if where else ""
            if target is setitem and isinstance(args[0], tuple):
                raise ItemAssignmentError(at_line(_tuple_item_message(node), node.line)) \
                    from None
            needs = _needs_data(error, op, target, args, kwargs)
            if needs is not None:
                source = origin(node)
                of = f" of {source}" if source else ""
                raise DataDependentError(at_line(
                    f"`{name}` {needs.format(of=of)}{_DATA_HINT}", node.line)) from None
            kind = ShapeIndexError if isinstance(error, IndexError) else ShapeError
            raise kind(at_line(f"{name} fails on these shapes{where}: {error}",
                               node.line)) from None

    def check_write(self, node, site, old, value, rows):
        if isinstance(value, UnknownMeta):
            return
        old_leaves = pytree.tree_leaves(old)
        new_leaves = [value] if isinstance(value, torch.Tensor) else pytree.tree_leaves(value)
        if len(old_leaves) != len(new_leaves):
            raise ShapeError(at_line(_structure_mismatch(site, old, value), node.line))
        for old_leaf, new_leaf in zip(old_leaves, new_leaves):
            if not isinstance(old_leaf, torch.Tensor) or isinstance(new_leaf, UnknownMeta):
                continue
            target_shape = old_leaf.shape
            if not rows.whole and old_leaf.dim() > 0 and old_leaf.shape[0] == rows.total:
                target_shape = (rows.stop - rows.start, *old_leaf.shape[1:])
            if type(new_leaf) in (int, float, bool) and not node.skip:
                continue  # a number fills the tensor
            if not isinstance(new_leaf, torch.Tensor):
                raise ShapeError(at_line(
                    f"{site.label} holds {_describe(old_leaf)}; the written value is "
                    f"{_describe(new_leaf)} (write a tensor, or a number to fill it)",
                    node.line))
            if new_leaf.dtype != old_leaf.dtype:
                raise ShapeError(at_line(
                    f"a {_dtype(new_leaf)} value cannot be written into {site.label}, which "
                    f"is {_dtype(old_leaf)}: convert it first (`.to({old_leaf.dtype})`)",
                    node.line))
            if node.skip and rows.whole and new_leaf.shape != old_leaf.shape:
                raise ShapeError(at_line(
                    f"{module_label(site.path)}.skip(...) needs a value shaped like the "
                    f"module's output, {tuple(old_leaf.shape)}; it got "
                    f"{_describe(new_leaf)}", node.line))
            if not _fits(new_leaf.shape, torch.Size(target_shape)):
                raise ShapeError(at_line(
                    f"a write keeps the site's shape (give every dimension, or fewer leading "
                    f"ones to repeat the value over them): a value of shape "
                    f"{tuple(new_leaf.shape)} cannot be written into {site.label} of shape "
                    f"{tuple(target_shape)}{_rows_note(node, rows)}", node.line))


_DEVICE_MOVES = ("cpu", "cuda", "to")
_DATA_HINT = (
    ", which are not known while the block is recorded (the graph, and every check of "
    "what comes after, need the shape before anything runs). Keep the shape instead, e.g. "
    "`torch.where(h > 0, h, 0)` or `h * (h > 0)` in place of `h[h > 0]`, or run it on the "
    "real values with fxsight.apply(fn, ...), e.g. `fxsight.apply(lambda h: h[h > 0], h)`"
)


def _is_index_scalar(value: Any) -> bool:
    """A 0-d integer tensor: as an index, torch selects at the integer it holds."""
    return isinstance(value, torch.Tensor) and value.dim() == 0 and \
        not value.dtype.is_floating_point and not value.dtype.is_complex and \
        value.dtype not in (torch.bool, torch.uint8)


def _meta_index(args: tuple) -> tuple:
    """``getitem``/``setitem`` arguments on meta values with a 0-d integer tensor in the
    key at 0: torch reads such an index with ``.item()`` (no data on meta); any integer
    gives the result's shape."""
    key = args[1]
    if type(key) is tuple and any(map(_is_index_scalar, key)):
        key = tuple(0 if _is_index_scalar(item) else item for item in key)
    elif _is_index_scalar(key):
        key = 0
    else:
        return args
    return (args[0], key, *args[2:])


def _needs_data(error: Exception, op: str, target: Any, args: tuple,
                kwargs: dict) -> str | None:
    """Why an operation that failed on meta values with ``error`` needs the data (its
    result's shape, or a number it reads, depends on the values), asked of fake tensors;
    ``None`` where it does not (the shapes do not fit)."""
    if not isinstance(error, NotImplementedError) and not (
            isinstance(error, RuntimeError) and "meta" in str(error)):
        return None  # (what meta kernels raise for data they lack; fake tensors log others)
    try:
        _fake_execute(op, target, args, kwargs, torch.device("cpu"))
    except DynamicOutputShapeException:
        return "gives a result whose shape depends on the values{of}"
    except DataDependentOutputException:
        return ("needs a number read out of the values{of} (`.item()`, a tensor used as a "
                "size)")
    except Exception:  # noqa: BLE001
        return None
    return None


def _tuple_item_message(node: Node) -> str:
    """Why ``value[i] = v`` fails on a tuple, and what to write instead."""
    target = node.args[0]
    if type(target) is Node and target.kind is Kind.READ:
        label = f"{module_label(target.site.path)}.{target.accessor}"
        return (f"'tuple' object does not support item assignment: {label} is a tuple. "
                f"Assign the whole value instead (`{label} = (new, *rest)`), or change a "
                f"tensor in it in place (`{label}[0][:] = new`)")
    return ("'tuple' object does not support item assignment: build a new tuple instead "
            "(`(new, *value[1:])`), or change a tensor in it in place (`value[0][:] = new`)")


def _device_move_meta(target: str, args: tuple, kwargs: dict) -> Any:
    """``value.cpu()``, ``.cuda()``, ``.to(device, ...)`` on a meta value: the result stays
    on meta (it has no data to copy), with the shape and any dtype the move asks for."""
    value, *rest = args
    if not isinstance(value, torch.Tensor):
        return execute("call_method", target, args, kwargs)
    if target != "to":
        return value
    kwargs = {k: v for k, v in kwargs.items() if k != "device"}
    rest = [a for a in rest if not isinstance(a, (str, torch.device, int))
            or isinstance(a, bool)]
    if not rest and "dtype" not in kwargs:
        return value
    return value.to(*rest, **kwargs)


def _module_call_meta(call: ModuleCall, args: tuple, kwargs: dict) -> Any:
    """A module applied to meta values: with meta copies of its weights (fast), else, for
    modules that need real devices or data, on fake tensors."""
    module = call.module
    try:
        state = {name: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
                 for name, t in itertools.chain(module.named_parameters(),
                                                module.named_buffers())}
        return call.collect(
            lambda: torch.func.functional_call(module, state, tuple(args), kwargs))
    except Exception:  # noqa: BLE001
        return _fake_execute("call_function", call, args, kwargs, call.device())


def _fake_execute(op: str, target: Any, args: tuple, kwargs: dict,
                  device: torch.device) -> Any:
    """Run an operation that touches real tensors (a module's weights) on fake tensors made
    from the meta ones, on ``device``; the result is given back as meta tensors. Autocast's
    cache of weight casts is off meanwhile: a fake cast of a weight would stay in it."""
    def to_meta(t: torch.Tensor) -> torch.Tensor:
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")

    with autocast_cache_off(), FakeTensorMode(allow_non_fake_inputs=True):
        args, kwargs = pytree.tree_map_only(
            torch.Tensor, lambda t: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype,
                                                        device=device) if t.is_meta else t,
            (args, kwargs))
        result = execute(op, target, args, kwargs)
    return pytree.tree_map_only(torch.Tensor, to_meta, result)


def _rows_note(node: Node, rows: Rows) -> str:
    """Which invoke's rows a write targets, for error messages."""
    invoke = node.invoke
    if invoke is None:
        return f" (the whole batch of {rows.total} rows)"
    return f" (invoke #{invoke}: rows {rows.start}:{rows.stop} of a batch of {rows.total})"


def _fits(new: torch.Size, old: torch.Size) -> bool:
    """Whether a written value of shape ``new`` can take the place of one of shape ``old``:
    the same shape, or fewer dimensions repeated over the leading ones (a row written into
    every row). A size-1 dimension is not stretched: ``h[:1]`` written where ``h`` was
    would change the batch under a forward hook, so it is an error, not a broadcast."""
    if len(new) == len(old):
        return new == old
    if len(new) > len(old):
        return False
    try:
        return torch.broadcast_shapes(new, old) == old and new == old[len(old) - len(new):]
    except RuntimeError:
        return False


def _dtype(value: torch.Tensor) -> str:
    return str(value.dtype).replace("torch.", "")


def _with_item(container: Any, key: Any, item: Any) -> Any:
    """A shallow copy of a dict-like or list ``container`` with ``container[key] = item``."""
    new = copy.copy(container) if isinstance(container, dict) else list(container)
    new[key] = item
    return new


def _leaf_count(value: Any) -> int:
    return 1 if isinstance(value, torch.Tensor) else len(pytree.tree_leaves(value))


def _structure_mismatch(site: Site, old: Any, new: Any) -> str:
    """Why ``new`` cannot be written where ``site`` holds ``old``: where their structures
    first differ (``.inputs = ((h,), kwargs)`` for a module called with four arguments:
    the arguments' tuple, not the outer pair)."""
    path = ""
    while (isinstance(old, dict) and isinstance(new, dict) and old.keys() == new.keys()) \
            or (isinstance(old, (tuple, list)) and isinstance(new, (tuple, list)) and
                len(new) == len(old)):
        keys = list(old) if isinstance(old, dict) else range(len(old))
        key = next((k for k in keys if _leaf_count(old[k]) != _leaf_count(new[k])), None)
        if key is None:
            break
        path, old, new = f"{path}[{key!r}]", old[key], new[key]
    if not path:
        return f"{site.label} holds {_describe(old)}; the written value is {_describe(new)}"
    return (f"the written value does not fit {site.label} at {path}: {_describe(new)} "
            f"where it holds {_describe(old)}")


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return f"a {type(value).__name__} with keys {sorted(map(str, value))}"
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}"
    return type(value).__name__
