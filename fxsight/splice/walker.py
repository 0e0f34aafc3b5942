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
from typing import Any, Callable

import torch
import torch.fx as fx
from .._torch import pytree, unflatten_keeping_sizes

from ..errors import (EDIT_CALL_HINT, NotOnGraph, OrderError, ShapeError, TraceError,
                      at_line)
from ..record.program import (Kind, Node, Program, draws_random, map_nodes, node_args,
                              NoArguments, own_rows, replace, select, set_attribute,
                              setitem)
from .rows import Rows, conform, dense_copy, narrow_rows, splice_rows
from .opaque_rows import batched_object
from ..capture.caches import CacheRef, is_cache, rows_of
from ..capture.fast_paths import fast_path_refusal
from .shared_memory import SharedMemory, memory_of, read_root, upstream
from .gradients import (backward_phase, grad_tap, grad_target, leaf_index,
                        picks_inside_a_tensor, tap_key, value_key, value_target)
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
        # (in the block's order: the first offending line is the one an error names)
        self.grad_nodes = [n for n in program.nodes if n in self.backward_nodes
                           and n.kind in (Kind.GRAD, Kind.GRAD_WRITE)]
        self.grad_keys: dict[Node, str] = {}
        # computed values whose gradient the trace uses (``residual.grad``) -> those reads
        # and writes; module reads' gradients are tapped at their sites (``_tapped``)
        self.value_grads = _value_grads(program, self.grad_nodes)
        # how many times each site's value has changed (whole writes, in-place changes): a
        # gradient read after a change is the changed value's (a tap of its own), as a
        # tensor hook registered after it sees it in torch
        self.tap_versions: dict[Site, int] = {}
        self.read_versions: dict[Node, int] = {}  # the version each read saw
        # in-place changes and raw writes (held apart from the walker: no reference cycle)
        self.shared = SharedMemory(site_aliases or _no_aliases)
        # where each invoke's block has reached (the latest position of its nodes so far):
        # a random draw runs no earlier, so draws keep the block's order (as nnsight runs
        # each line where the forward is); the draws held back, with the read they follow
        self.reached: dict[int | None, int] = {}
        self.held_draws: dict[Node, int] = {}

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
                site = None if value_target(node) is not None else grad_target(node)[0].site
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
        position = self.positions.get(node, BEFORE_ALL)
        if position > self.reached.get(node.invoke, BEFORE_ALL):
            self.reached[node.invoke] = position

    def position_of_site(self, node: Node, site: Site | None = None) -> int:
        site = node.site if site is None else site
        if site not in self.index:
            calls = sum(1 for s in self.index if s.path == site.path and s.kind == site.kind)
            if calls:
                times = "once" if calls == 1 else f"{calls} times"
                why = f"it runs {times} in it, from call #0"
            elif is_operation(site.path):
                why = fast_path_refusal(site.path, lambda path: any(
                    s.path == path for s in self.index)) or \
                    "its line is not reached with these inputs"
            else:
                why = "the module never runs with these inputs"
            hint = EDIT_CALL_HINT if node in self.program.from_edits and site.call else ""
            raise TraceError(at_line(
                f"{module_label(site.path)} has no {site.kind} call #{site.call} in this "
                f"forward pass ({why}){hint}", node.line))
        return self.index[site]

    def _current(self, site: Site, node: Node | None = None) -> Any:
        if site not in self.current:
            try:
                value = self.site_value(site)
            except TraceError as error:  # (a value the site cannot have: name the line)
                if node is None or "\n  at " in str(error):
                    raise
                raise type(error)(at_line(str(error), node.line)) from None
            self.current[site] = self._tapped(site, value)
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
            if value_target(node) is not None:
                continue  # (a computed value's: tapped where it is computed)
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

    def _tap_value(self, node: Node, position: int) -> None:
        """A grad tap on the computed value of ``node``, whose gradient the trace uses:
        the tensor's gradient from all its uses, as a hook registered on it sees it."""
        key = value_key(node)
        for grad in self.value_grads[node]:
            self.grad_keys[grad] = key
        if self.taps_gradients:
            self.values[node] = self.call(None, "call_function", grad_tap,
                                          (self.values[node], key), {}, position)

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
        value = _part(self._current(site, node), node.accessor, site, node)
        rows = self._rows(node)
        if not rows.whole:
            self._check_rows_of_object(node, site, value, rows)
            narrow = self.narrowing(site)
            value = self._leafwise(value, lambda leaf: self.call(
                None, "call_function", narrow,
                (leaf, rows.start, rows.stop, rows.total), {}, position))
            value = _caches_of_rows(value, rows)
        self.values[node] = value
        self.positions[node] = position
        self.read_versions[node] = self.tap_versions.get(site, 0)

    def _passed_through(self, value: Any, narrowed: Any, old: Any) -> Any:
        """``value``, made from the invoke's read ``narrowed`` of ``old`` by setting one of
        its items or attributes, with each object that is no runtime value (a KV cache,
        which the read gave the invoke's rows of) and that the write left as the read gave
        it put back as the whole batch's ``old`` one: it passes through the write
        unchanged, as a hook that sets the attribute on the model's own output leaves it."""
        new_leaves, spec = pytree.tree_flatten(value)
        read_leaves = pytree.tree_leaves(narrowed)
        old_leaves = pytree.tree_leaves(old)
        if not len(new_leaves) == len(read_leaves) == len(old_leaves):
            return value
        kept = [old_leaf if new_leaf is read_leaf and not self.is_value(old_leaf) and
                old_leaf is not read_leaf else new_leaf
                for new_leaf, read_leaf, old_leaf in zip(new_leaves, read_leaves, old_leaves)]
        if all(a is b for a, b in zip(kept, new_leaves)):
            return value
        return unflatten_keeping_sizes(kept, spec)

    def _check_rows_of_object(self, node: Node, site: Site, value: Any, rows: Rows) -> None:
        """Refuse an invoke's read or write of a value holding an object of batched tensors
        (a dataclass, an object of the user's class): it cannot be given the invoke's rows."""
        kind = batched_object(value, rows.total)
        if kind is not None:
            raise TraceError(at_line(
                f"{site.label} holds an object of class {kind} whose tensors are the whole batch of "
                f"{rows.total} rows; fxsight cannot give this invoke its own rows "
                f"({rows.start}:{rows.stop}) of an object that is not a tuple, list, dict "
                f"or registered pytree node. Trace each input on its own, or register "
                f"{kind} as a pytree node (torch.export.register_dataclass)",
                node.line))

    def _own_rows(self, node: Node) -> None:
        """A value computed for the whole batch, narrowed to the rows of ``node``'s invoke
        (as a read of a module's value is)."""
        position = self._arg_position(node.args)
        value = self.values[node.args[0]] if type(node.args[0]) is Node else node.args[0]
        rows = self._rows(node)
        if not rows.whole:
            value = self._leafwise(value, lambda leaf: self.call(
                None, "call_function", narrow_rows,
                (leaf, rows.start, rows.stop, rows.total), {}, position))
        self.values[node] = value
        self.positions[node] = position

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
                  value_position: int, recorded: Any = None, leafwise: bool = True,
                  narrowed: Any = None) -> None:
        """Replace ``accessor`` of ``site`` with ``value`` (for ``node``, the user's line;
        ``recorded``: the value as the Program has it, leaf for leaf where ``leafwise``;
        ``narrowed``: the invoke's read ``value`` was made from by setting one item or
        attribute, whose other Python objects, a KV cache, pass through as they were)."""
        position = self.position_of_site(node, site)
        if value_position > position:
            later = self._site_at(value_position)
            raise OrderError(at_line(
                f"the write to {site.label} depends on {later.label}, which is only "
                f"computed after {module_label(site.path)} has run"
                f"{self._why_late(recorded, value_position, self.positions)}",
                node.line))
        full = self._current(site, node)
        old = _part(full, accessor, site, node)
        rows = self._rows(node)
        if not rows.whole:
            self._check_rows_of_object(node, site, old, rows)
            if narrowed is not None:
                value = self._passed_through(value, narrowed, old)
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
        return self.call(None, "call_function", dense_copy, (value,), {}, position)

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
                       leafwise=False, narrowed=self.values[read])
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
                       leafwise=False, narrowed=self.values[read])
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
                f"{self._why_late(node.args[0], value_position, self.positions)}",
                node.line))

    def _op(self, node: Node) -> None:
        if node.target is set_attribute:
            self._set_attribute_of_read(node)
            return
        if node.target is own_rows:
            self._own_rows(node)
            return
        if node.target is setitem and type(node.args[0]) is Node and \
                node.args[0].kind is Kind.READ and \
                isinstance(self.values[node.args[0]], (dict, list)):
            self._set_item_of_read(node)
            return
        position = max(self._arg_position(node.args), self._arg_position(node.kwargs))
        reached = self.reached.get(node.invoke, BEFORE_ALL)
        if reached > position and draws_random(node):
            self.held_draws[node] = reached
            position = reached
        if node.mutation:
            self._check_mutation_order(node, position)
        if not node.at_read:
            position = self.shared.earliest(node, position)
        args = map_nodes(node.args, self.values.__getitem__)
        kwargs = map_nodes(node.kwargs, self.values.__getitem__)
        self.values[node] = self.call(node, node.op, node.target, args, kwargs, position)
        self.positions[node] = position
        if node in self.value_grads:
            self._tap_value(node, position)
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
                f"{self._why_late(node.args, position, self.positions)}",
                node.line))

    def _why_late(self, value: Any, position: int, positions: dict[Node, int]) -> str:
        """Why ``value`` comes at ``position`` (the end of an ``OrderError``'s message): a
        change of shared memory holds back an operation it depends on, or a random draw
        runs where the block had reached."""
        why = self.shared.why_late(value, position, positions)
        if why:
            return why
        for node in upstream(value):
            if self.held_draws.get(node) == position and positions.get(node) == position:
                if node.lenient:
                    return (f": the value is computed by fxsight.apply ({node.line}) after "
                            f"the block has read {self._site_at(position).label}; an "
                            f"applied function runs where the forward pass has reached the "
                            f"block, in the order it is written (it may draw random "
                            f"numbers, which are drawn in that order); apply it before "
                            f"that read")
                return (f": the value draws random numbers ({node.line}) after the block "
                        f"has read {self._site_at(position).label}, and random numbers "
                        f"are drawn in the order the block is written, where the forward "
                        f"pass has reached it; draw them before that read")
        return ""

    def _site_at(self, position: int) -> Site:
        for site, index in self.index.items():
            if index == position:
                return site
        raise KeyError(position)


def _value_grads(program: Program, grad_nodes: list[Node]) -> dict[Node, list[Node]]:
    """The computed values whose gradient ``grad_nodes`` read or replace, each with those
    nodes. A value changed in place before its gradient is read is refused: which version
    of it is meant (the hook sees the value before the change) would be a guess."""
    found: dict[Node, list[Node]] = {}
    for grad in grad_nodes:
        target = value_target(grad)
        if target is None:
            continue
        if target.mutation:
            raise TraceError(at_line(_CHANGED_IN_PLACE.format(line=target.line), grad.line))
        found.setdefault(target, []).append(grad)
    if found:
        order = {node: i for i, node in enumerate(program.nodes)}
        for node in program.nodes:
            if node.mutation and node.args and node.args[0] in found:
                grads = [g for g in found[node.args[0]] if order[g] > order[node]]
                if grads:
                    raise TraceError(at_line(_CHANGED_IN_PLACE.format(line=node.line),
                                             grads[0].line))
    return found


_CHANGED_IN_PLACE = (
    ".grad of a computed value changed in place before this line (at {line}) is not "
    "supported: which version of it is meant would be a guess; read `.grad` before the "
    "change, or of a copy made after it (`v = v.clone()`)")


def _no_aliases(site: Site) -> frozenset:
    return frozenset()


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


def _caches_of_rows(value: Any, rows: Rows) -> Any:
    """``value`` with each cache object in it (the object, or its fx reference) holding
    ``rows`` only: a cache read in an invoke is the invoke's own."""
    if isinstance(value, (torch.Tensor, fx.Node)):  # (the common read: nothing to do)
        return value
    flat, spec = pytree.tree_flatten(value, is_leaf=is_cache)
    if not any(type(leaf) is CacheRef or is_cache(leaf) for leaf in flat):
        return value
    return unflatten_keeping_sizes([
        leaf.of_rows(*rows) if type(leaf) is CacheRef
        else rows_of(leaf, *rows) if is_cache(leaf) else leaf for leaf in flat], spec)


def _part(full: Any, accessor: str, site: Site, node: Node) -> Any:
    """The part of ``site``'s value ``accessor`` names (:func:`select`); ``.input`` of a
    call made without arguments is a TraceError naming the site and the user's line."""
    try:
        return select(full, accessor)
    except NoArguments:
        what = "operation" if is_operation(site.path) else "module"
        raise TraceError(at_line(
            f"{module_label(site.path)}.input: the {what} was called without arguments, so "
            f"it has no first input to read or write; read .inputs (the empty "
            f"(args, kwargs)) or the {what}'s .output instead", node.line)) from None
