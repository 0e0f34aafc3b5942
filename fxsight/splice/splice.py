"""Splice: a Program's nodes inserted into a captured graph, ready to run.

Reads connect to the boundary markers, writes re-route the boundary's users to the new
value, saves become extra graph outputs; then the markers are removed and everything no
output needs is pruned.
"""

from __future__ import annotations

import inspect
import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
from .._torch import (changes_first_argument, holds_packed, holds_size, is_unused_random, pytree,
                      rename_node, unflatten_keeping_sizes)

from ..errors import NotOnGraph, at_line
from ..stats import bump
from ..capture.caches import CacheRef
from ..capture.hidden import HiddenTensors, NestedTensor
from ..capture.export import BOUNDARY, Captured
from ..capture.opaque import OPAQUE
from ..record.program import Kind, Node, Program
from .indices import Lifted, as_selection, count
from .rows import Rows, conform_to
from ..record.sites import INPUT, OUTPUT, Site, is_operation, module_label
from .walker import BEFORE_ALL, Walker


@dataclass
class OutputPlan:
    """How to rebuild a Python value from the graph's flat outputs.

    ``spec`` is its pytree layout; each leaf is ``("out", k)`` (the k-th graph output),
    ``("const", value)`` or ``("cache", ref)`` (a :class:`CacheRef`: the run's cache
    object, from ``caches``).
    """

    spec: pytree.TreeSpec
    leaves: list[tuple[str, Any]]
    sized: bool = False  # the layout holds a torch.Size (rebuilt as one, not a tuple)

    def build(self, outputs: list[Any], caches: dict | None = None) -> Any:
        values = [outputs[v] if kind == "out" else v.resolve(caches) if kind == "cache"
                  else v for kind, v in self.leaves]
        if self.sized:
            return unflatten_keeping_sizes(values, self.spec)
        return pytree.tree_unflatten(values, self.spec)


@dataclass
class Spliced:
    """A rewritten forward pass: ``graph_module(*model_inputs, *program_inputs,
    *index_inputs)`` (the last: the integers of tensor keys, see :mod:`.indices`)."""

    graph_module: fx.GraphModule
    model_output: OutputPlan | None
    saves: list[OutputPlan]
    grad_keys: dict[int, str] = field(default_factory=dict)  # Program node index -> tap
    # cache objects (see ``capture.caches``): k -> the graph outputs of its tensors after
    # the forward pass (every input cache, and those a plan returns), and its skeleton
    cache_outputs: dict[int, list[int]] = field(default_factory=dict)
    cache_skeletons: list = field(default_factory=list)
    input_caches: int = 0
    index_inputs: int = 0  # the last placeholders: integers of tensor keys (.indices)
    # Python values the model was called with that writes set to the same value (a no-op
    # the graph, which holds them as constants, honours): (position of the Program input
    # from the end of the Program's inputs, the constant, what wrote it, its line). A later
    # Program of the same structure runs this graph only where its value is the same
    pinned: list[tuple[int, Any, str, Any]] = field(default_factory=list)

    def refused(self, flat_inputs: list[Any]) -> str | None:
        """Why this graph cannot run these inputs (the model's, then the Program's): a
        write of a Python value the graph holds as a constant to another value; else
        ``None``."""
        for position, constant, written, line in self.pinned:
            value = flat_inputs[position]
            if not _same_constant(constant, value):
                return at_line(_constant_message(written, constant, repr(value)), line)
        return None


class _SpliceWalker(Walker):
    def __init__(self, program: Program, rows: dict[Any, Rows], captured: Captured,
                 graph: fx.Graph, node_map: dict[fx.Node, fx.Node], inputs: list[fx.Node],
                 indices: Lifted, index_inputs: dict[int, list[fx.Node]]):
        super().__init__(program, rows, captured.index, captured.alias_keys)
        self.captured = captured
        self.graph = graph
        self.node_map = node_map
        self.inputs = inputs
        self.indices = indices  # (see .indices: integers of tensor keys as inputs)
        self.index_inputs = index_inputs
        # (nodes that depend on no boundary go after the last placeholder)
        self.anchors: dict[int, fx.Node] = {BEFORE_ALL: captured_anchor(graph)}
        self.inserted: set[fx.Node] = set()
        self._visiting: Node | None = None  # (the node whose line an error names)
        self.pinned: list[tuple[int, Any, str, Any]] = []  # (see Spliced.pinned)

    def visit(self, node: Node) -> None:
        self._visiting = node
        super().visit(node)

    def site_value(self, site: Site) -> Any:
        slot = self.captured.slots[site]
        for constant in slot.constants:
            if type(constant) is NestedTensor:
                node = self._visiting
                raise NotOnGraph(at_line(constant.reason(), node.line if node else None))
        return slot.value([self.node_map[n] if n is not None else None for n in slot.nodes])

    def input_value(self, node: fx.Node) -> Any:
        return self.inputs[node.input_index]

    def check_write(self, node, site, old, value, rows) -> None:
        """A Python value at a boundary (a flag, a scale) is a constant of the captured
        graph: a write that changes one cannot be honoured here (the hooks backend can)."""
        new_leaves = [value] if not isinstance(value, (tuple, list, dict)) \
            else pytree.tree_leaves(value)
        for old_leaf, new_leaf in zip(pytree.tree_leaves(old), new_leaves):
            if isinstance(old_leaf, fx.Node):
                continue
            given = self._given(new_leaf)
            if given is not None and _same_constant(old_leaf, given[1]):
                # (a value given in the trace is an input of the graph: a later trace of
                # this structure may give another one, refused then, see Spliced.refused)
                self.pinned.append((given[0] - len(self.inputs), old_leaf,
                                    _written(node, site), node.line))
                continue
            if isinstance(new_leaf, fx.Node) or not _same_constant(old_leaf, new_leaf):
                raise NotOnGraph(at_line(_constant_message(
                    _written(node, site), old_leaf, self._shown(new_leaf)), node.line))

    def _given(self, leaf: Any) -> tuple[int, Any] | None:
        """``(its index, its value)`` where a written leaf is a Python value given in the
        trace (an input of the rewritten graph), else ``None``."""
        if not isinstance(leaf, fx.Node):
            return None
        given = [k for k, placeholder in enumerate(self.inputs) if placeholder is leaf]
        if not given or isinstance(self.program.input_values[given[0]], torch.Tensor):
            return None
        return given[0], self.program.input_values[given[0]]

    def _shown(self, value: Any) -> str:
        """A written leaf as the message shows it: a Python value given in the trace is an
        input of the rewritten graph (its value shown), others are computed in it."""
        if isinstance(value, fx.Node):
            given = [k for k, placeholder in enumerate(self.inputs) if placeholder is value]
            if given and not isinstance(self.program.input_values[given[0]], torch.Tensor):
                return repr(self.program.input_values[given[0]])
            return "a value computed in the trace"
        return repr(value)

    def conformed(self, new: Any, old: Any, position: int) -> Any:
        """A tensor written over a captured value of static shape needs only that shape
        and device, not the value: what only computes it is pruned."""
        value = old.meta.get("val") if isinstance(old, fx.Node) else None
        if isinstance(new, (fx.Node, torch.Tensor)) and isinstance(value, torch.Tensor) and \
                all(type(size) is int for size in value.shape):
            return self.call(None, "call_function", conform_to,
                             (new, tuple(value.shape), value.device, value.dtype), {},
                             position)
        return super().conformed(new, old, position)

    def _anchor(self, position: int) -> fx.Node:
        if position not in self.anchors:
            self.anchors[position] = self.node_map[self.captured.anchor(position)]
        return self.anchors[position]

    def call(self, node, op, target, args, kwargs, position):
        if op == "call_function" and _static(target, args) or _size_method(op, args, kwargs):
            if op == "call_method":
                target = getattr(args[0], target)
                args = args[1:]
            try:
                return target(*args, **kwargs)
            except NotOnGraph as error:  # (an object of hidden tensors: see capture.hidden)
                raise NotOnGraph(at_line(str(error), node.line if node is not None else None)) \
                    from None
        if node is not None and node.index in self.indices:
            target, args = as_selection(target, args, self.indices[node.index],
                                        self.index_inputs[node.index])
        if op == "call_function":
            target = representable(target)
        op, target, args, kwargs = _flattened_packed(op, target, args, kwargs)
        with self.graph.inserting_after(self._anchor(position)):
            new = self.graph.create_node(op, target, args, kwargs,
                                         name=node.name if node is not None else None)
        new.meta["fxsight"] = True
        if node is not None:
            new.line = node.line
            new.meta["mutation"] = node.mutation
            if node.lenient:  # (a function of the user's, ``fxsight.apply``: it may draw
                # random numbers, so it runs, used or not, as a forward hook's call would)
                new.meta["fxsight_draw"] = True
        self.anchors[position] = new
        self.inserted.add(new)
        return new

    def after_stop(self) -> set[fx.Node]:
        """The nodes of the model's forward after the last event the Program uses (graph
        order is the forward's order): where ``tracer.stop()`` ends the forward pass."""
        last = max((self.positions[node] for node in self.program.nodes
                    if node in self.positions and node not in self.backward_nodes),
                   default=BEFORE_ALL)
        ends = {self._anchor(last), *self.inserted}
        late: set[fx.Node] = set()
        for node in reversed(self.graph.nodes):
            if node in ends:
                break
            late.add(node)
        return late

    def inside_skips(self) -> set[fx.Node]:
        """The model's nodes computed inside a module call skipped for the whole batch
        (``.skip(v)``): between the call's input and output events in graph order (the
        forward's order), in that module (its ``nn_module_stack``)."""
        inside: set[fx.Node] = set()
        for node in self.program.nodes:
            if not (node.skip and self._rows(node).whole):
                continue
            site = node.site
            start = self.captured.index.get(Site(site.path, INPUT, site.call))
            end = self.captured.index.get(site)
            if start is None or end is None:
                continue
            first = self.node_map[self.captured.anchor(start)]
            last = self.node_map[self.captured.anchor(end)]
            between = False
            for model_node in self.graph.nodes:
                if model_node is last:
                    break
                if between and model_node not in self.inserted and \
                        _computed_in(model_node, site.path):
                    inside.add(model_node)
                between = between or model_node is first
        return inside


def _constant_message(written: str, old: Any, new: str) -> str:
    return (f"the write to {written} sets a Python value the model was called with "
            f"({old!r} -> {new}), which the captured graph holds as a constant: the fx "
            f"backend cannot set it (the hooks backend can)")


def _written(node: Node, site: Site) -> str:
    """What a write set, as the user wrote it: ``model.source.torch_pow_0.inputs``."""
    call = f" (call {site.call})" if site.call else ""
    return f"{module_label(site.path)}.{node.accessor or site.kind}{call}"


def _same_constant(old: Any, new: Any) -> bool:
    try:
        return type(old) is type(new) and bool(old == new)
    except Exception:  # noqa: BLE001 - not comparable: not the same
        return False


def captured_anchor(graph: fx.Graph) -> fx.Node:
    return [n for n in graph.nodes if n.op == "placeholder"][-1]


def representable(target: Any) -> Any:
    """``target`` as a graph's generated code can name it: a lambda whose source cannot be
    read (defined in a REPL or by ``exec``; torch.fx names a lambda by its source text and
    raises "Unable to represent lambda"), a bound method or a callable object without a
    name is called through a function of fxsight's own;
    anything else as it is. (Graphs are still keyed by the user's function: see
    ``record.program``.)"""
    if not callable(target):
        return target
    # (a bound method, ``model.zero_grad``: torch.fx names a torch object by its module
    # and name, ``torch.nn.modules.module.zero_grad``, which names nothing; an object
    # without a name)
    if not inspect.ismethod(target) and hasattr(target, "__name__"):
        if target.__name__ != "<lambda>":
            return target
        try:
            inspect.getsource(target)
            return target
        except (OSError, TypeError):
            pass

    def applied(*args: Any, **kwargs: Any) -> Any:
        return target(*args, **kwargs)

    return applied


def _flattened_packed(op: str, target: Any, args: tuple, kwargs: dict
                      ) -> tuple[str, Any, tuple, dict]:
    """A call whose arguments hold a ``PackedSequence`` of graph values (a packed RNN's
    output, cached or given to ``fxsight.apply``): torch.fx rebuilds a named tuple in a
    node's arguments through its constructor, which refuses graph values, so the node takes
    the arguments' leaves and a function of fxsight's own rebuilds them (unchecked, as the
    named tuple they were) before the call. Other calls as they are."""
    flat, spec = pytree.tree_flatten((args, kwargs))
    if not holds_packed(spec):
        return op, target, args, kwargs

    def packed_call(*leaves: Any) -> Any:
        call_args, call_kwargs = unflatten_keeping_sizes(list(leaves), spec)
        if op == "call_method":
            return getattr(call_args[0], target)(*call_args[1:], **call_kwargs)
        return target(*call_args, **call_kwargs)

    return "call_function", packed_call, tuple(flat), {}


def _static(target: Any, args: tuple) -> bool:
    """getitem/getattr on a Python container of graph values resolves now, not at run time;
    so does joining or repeating such containers (``(v,) + out[1:]``, ``out[:1] * 2``)."""
    if target in (operator.add, operator.mul) and len(args) == 2:
        return all(isinstance(a, (tuple, list, int)) and not isinstance(a, bool)
                   for a in args) and any(isinstance(a, (tuple, list)) for a in args)
    return target in (operator.getitem, getattr) and not isinstance(args[0], fx.Node) and \
        not isinstance(args[0], torch.Tensor)


def _size_method(op: str, args: tuple, kwargs: dict) -> bool:
    """A method of a ``torch.Size`` the capture holds as a constant (``numel``, ``index``)
    resolves now: a graph node would see it as a plain tuple (fx keeps no ``torch.Size``
    in a node's arguments)."""
    return op == "call_method" and type(args[0]) is torch.Size and \
        not any(isinstance(v, (fx.Node, torch.Tensor)) for v in pytree.tree_leaves((args, kwargs)))


def splice(captured: Captured, program: Program, rows: dict[Any, Rows],
           keep_output: bool, flat_attributes: bool = True,
           update_caches: bool = True, indices: Lifted | None = None,
           stopped: bool = False) -> Spliced:
    """Build the rewritten GraphModule of ``program`` over ``captured``.

    ``indices``: the integers of tensor keys that are graph inputs (see :mod:`.indices`):
    placeholders after the Program's inputs, one per integer, in order.

    ``flat_attributes``: the module holds the parameters under flat names (faster to run);
    without it, under the model's own dotted names (its ``state_dict`` keys).
    ``update_caches``: the cache objects among the inputs are updated (as a plain forward
    would); without it (a stopped trace) their updates are not outputs, so what only fed
    them is pruned.
    ``stopped``: ``tracer.stop()`` ended the forward pass after the last event the Program
    uses, as the hooks backend stops the model there: nothing after it runs, not even what
    a pruned forward keeps for its side effects (running statistics, random draws, a
    buffer or an input changed in place)."""
    graph = fx.Graph()
    node_map: dict[fx.Node, fx.Node] = {}
    graph.graph_copy(captured.graph_module.graph, node_map)  # no output node copied
    old_output = next(n for n in captured.graph_module.graph.nodes if n.op == "output")
    # a placeholder's name is its argument name in the generated code: it must clash with
    # no node name (`input_1 = input` of the model's own placeholder would shadow it)
    add_placeholder = _placeholder_maker(graph)
    inputs = [add_placeholder(f"fxsight_{node.name}") for node in program.nodes
              if node.kind is Kind.INPUT]
    indices = indices or {}
    index_inputs = {index: [add_placeholder(f"fxsight_index_{index}_{k}")
                            for k in range(count(positions))]
                    for index, positions in indices.items()}
    walker = _SpliceWalker(program, rows, captured, graph, node_map, inputs, indices,
                           index_inputs)
    walker.run()
    # the model's nodes that do not run: after a stop, inside a skipped module (pruned
    # even where a forward would keep them for their side effects)
    idle = walker.after_stop() if stopped else set()
    idle |= walker.inside_skips()

    # writes: the model's own users of a boundary see the value written there
    written: dict[fx.Node, Any] = {}  # (the graph's output is no user: see below)
    for site, value in walker.current.items():
        slot = captured.slots[site]
        new_leaves = pytree.tree_leaves(value) if not isinstance(value, fx.Node) else [value]
        old_nodes = [node_map[n] if n is not None else None for n in slot.nodes]
        tensor_old = [n for n in old_nodes if n is not None]
        new_nodes = [v for v, o in zip(new_leaves, old_nodes) if o is not None] \
            if len(new_leaves) == len(old_nodes) else new_leaves
        _check_one_value_per_tensor(site, tensor_old, new_nodes, program)
        for old, new in zip(tensor_old, new_nodes):
            if isinstance(new, fx.Node) and new is not old:
                written[old] = new
                dropped = _copies_back(old) \
                    if site.kind != OUTPUT and is_operation(site.path) else []
                old.replace_all_uses_with(
                    new, delete_user_cb=lambda user: user not in walker.inserted)
                for copy in dropped:  # (the argument is replaced: the model's is unchanged)
                    copy.replace_all_uses_with(copy.args[0])
                    graph.erase_node(copy)

    outputs: list[fx.Node] = []
    # (a forward's output that is a boundary's value written over is the value written:
    # a decoding step's model output, whose boundary events are the model's, inside)
    old_flat = [written.get(node_map[a], node_map[a]) if isinstance(a, fx.Node) else a
                for a in pytree.tree_leaves(old_output.args[0])]
    graph_output = pytree.tree_unflatten(old_flat, captured.out_spec)
    layout = captured.caches
    cache_outputs: dict[int, list[int]] = {}

    def cache_output(k: int) -> None:
        if k not in cache_outputs:
            cache_outputs[k] = list(range(len(outputs), len(outputs) + len(graph_output[1][k])))
            outputs.extend(graph_output[1][k])

    def plan(value: Any, line: Any = None) -> OutputPlan:
        flat, spec = pytree.tree_flatten(value)
        leaves = []
        for leaf in flat:
            if isinstance(leaf, fx.Node):
                leaves.append(("out", len(outputs)))
                outputs.append(leaf)
            elif type(leaf) is CacheRef:
                if leaf.k is None or layout is None:
                    leaf.resolve({})  # (raises NotOnGraph: nothing has run)
                cache_output(leaf.k)
                leaves.append(("cache", leaf))
            elif type(leaf) is HiddenTensors:
                raise NotOnGraph(at_line(leaf.reason(), line))
            else:
                leaves.append(("const", leaf))
        return OutputPlan(spec, leaves, holds_size(spec))

    if layout is not None and update_caches:
        for k in range(layout.n_inputs):  # the user's caches are updated (unless stopped)
            cache_output(k)
    root = Site("", OUTPUT, 0)
    model_output = None
    if keep_output:
        # (a written model output is the forward's, unless the events are a submodule's)
        if root in walker.current and not captured.events_inside:
            model_output = plan(walker.current[root])
        elif layout is not None:
            model_output = plan(layout.model_value(graph_output))
        else:
            model_output = plan(graph_output)
    saves = [plan(walker.values[node], node.line) for node in program.saves
             if node not in walker.backward_nodes]
    graph.output(tuple(outputs))

    named: set[fx.Node] = set()
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target is BOUNDARY:
            source = node.args[0]
            # the model's node a boundary marked keeps the boundary's name, so the code
            # reads `layer1_output = ...` next to the interventions spliced there
            if isinstance(source, fx.Node) and source.op == "call_function" and \
                    source not in named and not source.meta.get("fxsight"):
                named.add(source)
                rename_node(source, _boundary_name(node.args[1], node.args[2]))
            node.replace_all_uses_with(source)
            graph.erase_node(node)
    twins = _twin_random_draws(graph)
    idle.update(twin for node, made in twins.items() if node in idle for twin in made)
    _unchain_idle_changes(graph, idle)
    graph.eliminate_dead_code(
        is_impure_node=lambda node: node not in idle and _is_impure(node))
    _drop_needless_twins(graph, twins)
    graph.lint()
    root = _flat_attributes(captured.graph_module, graph) if flat_attributes \
        else captured.graph_module
    module = fx.GraphModule(root, graph, class_name="RewrittenForward")
    bump("splices")
    order = {node: i for i, node in enumerate(program.nodes)}
    grad_keys = {order[node]: key for node, key in walker.grad_keys.items()}
    return Spliced(module, model_output, saves, grad_keys, cache_outputs,
                   layout.skeletons if layout is not None else [],
                   layout.n_inputs if layout is not None else 0,
                   sum(map(len, index_inputs.values())), walker.pinned)


_COPY = torch.ops.aten.copy_.default


def _unchain_idle_changes(graph: fx.Graph, idle: set[fx.Node]) -> None:
    """An in-place change that does not run (``num_batches_tracked += 1`` in a skipped
    BatchNorm) leaves its tensor as it was: its users (the next call's change, which the
    captured graph chains to it) read its first argument instead, so it can be pruned."""
    for node in graph.nodes:
        if node in idle and node.op == "call_function" and \
                changes_first_argument(node.target) and isinstance(node.args[0], fx.Node):
            node.replace_all_uses_with(node.args[0])


def _computed_in(node: fx.Node, path: str) -> bool:
    """Whether the model computes ``node`` in the module at ``path`` (or one inside it)."""
    stack = node.meta.get("nn_module_stack") or {}
    return any(entry[0] == path for entry in stack.values())


def _copies_back(marker: fx.Node) -> list[fx.Node]:
    """The copies into the model's tensor of what an operation did in place to the
    boundary marker's copy of its argument at ``marker`` (``capture.events`` makes them
    while capturing: ``F.relu(h, inplace=True)`` changes ``h``). Where the argument is
    replaced by a written value, the operation changes that value, not the model's tensor,
    so these copies go."""
    source = marker.args[0] if marker.args else None
    if not isinstance(source, fx.Node):
        return []
    return [user for user in source.users
            if user.op == "call_function" and user.target is _COPY and
            user.args[0] is source and _made_from(user.args[1], marker)]


def _made_from(node: Any, marker: fx.Node, steps: int = 8) -> bool:
    """Whether ``node`` is ``marker`` or what the operation did to it (first arguments
    back, through the input markers of modules it calls), not a value the operation
    returned (which passes its output marker first: the model's own code)."""
    for _ in range(steps):
        if node is marker:
            return True
        if not isinstance(node, fx.Node) or node.op != "call_function" or not node.args:
            return False
        if node.target is BOUNDARY and \
                str(node.args[1]).split("#")[0].endswith(f".{OUTPUT}"):
            return False
        node = node.args[0]
    return False


def _placeholder_maker(graph: fx.Graph) -> Callable[[str], fx.Node]:
    """``add(name)``: a new placeholder after the graph's last one, named ``name`` (with
    ``_`` appended until it clashes with no node's name or target)."""
    used = {n.name for n in graph.nodes} | {str(n.target) for n in graph.nodes}
    last = [captured_anchor(graph)]

    def add(name: str) -> fx.Node:
        while name in used:
            name += "_"
        used.add(name)
        with graph.inserting_after(last[0]):
            last[0] = graph.placeholder(name)
        return last[0]

    return add


def _flat_attributes(root: torch.nn.Module, graph: fx.Graph) -> dict[str, Any]:
    """Give every ``get_attr`` node a flat name (``transformer_h_0_attn_c_attn_weight``) and
    return the objects by those names: the rewritten module holds its parameters and
    buffers itself, and its code reads each with one attribute lookup, not one per level
    of the model's module tree (``self.transformer.h[0].attn.c_attn.weight``)."""
    attributes: dict[str, Any] = {}
    by_target: dict[str, str] = {}
    for node in graph.nodes:
        if node.op != "get_attr":
            continue
        target = node.target
        if target not in by_target:
            value = root
            for part in target.split("."):
                value = getattr(value, part)
            name = target.replace(".", "_")
            while name in attributes or hasattr(fx.GraphModule, name):  # (`graph`, `code`)
                name += "_"
            by_target[target] = name
            attributes[name] = value
        node.target = by_target[target]
    return attributes


def _is_impure(node: fx.Node) -> bool:
    if node.op == "placeholder":
        return True
    if node.op == "call_function" and node.target is OPAQUE:
        return True  # (what a module that could not be captured changes is unknown: its
        # running statistics, random draws, Python state; it runs as in a plain forward)
    if node.meta.get("mutation") or node.meta.get("fxsight_draw"):
        return True
    random = node.meta.get("fxsight_random")
    if random is not None:
        return random == "kept"
    return _updates_running_stats(node) or node.is_impure()


_ATEN = torch.ops.aten
# operators that update the running statistics they are given in training, though their
# schemas do not say so (the index of their ``training`` argument): pruned, a trace would
# leave BatchNorm's running mean and variance where a forward would not
_STATISTICS = {_ATEN.batch_norm.default: 5, _ATEN.native_batch_norm.default: 5,
               _ATEN.instance_norm.default: 5}


def _updates_running_stats(node: fx.Node) -> bool:
    index = _STATISTICS.get(node.target) if node.op == "call_function" else None
    if index is None:
        return False
    if len(node.args) <= index:
        return True  # (keyword arguments: not read, kept to be safe)
    return node.args[index] is not False and \
        (node.args[3] is not None or node.args[4] is not None)


# random operators whose draws from the generator depend on their arguments' shapes alone
# (not their values), and the position and name of the argument that turns drawing off
_DROPOUTS = (_ATEN.dropout.default, _ATEN.native_dropout.default,
             _ATEN.feature_dropout.default, _ATEN.alpha_dropout.default,
             _ATEN.feature_alpha_dropout.default)
_SHAPE_BLIND_RANDOM = {
    **{op: ((1, "p"), (2, "train")) for op in _DROPOUTS},
    _ATEN.scaled_dot_product_attention.default: ((4, "dropout_p"),),
    _ATEN.bernoulli.p: (), _ATEN.rand_like.default: (), _ATEN.randn_like.default: (),
}


def _draws(node: fx.Node) -> bool:
    """Whether a random node draws from a generator (dropout in eval mode does not)."""
    for index, name in _SHAPE_BLIND_RANDOM.get(node.target, ()):
        if len(node.args) > index:
            value = node.args[index]
        elif name in node.kwargs:
            value = node.kwargs[name]
        else:  # (left out: the operator's default, scaled_dot_product_attention's 0.0)
            value = node.target._schema.arguments[index].default_value
        if value is False or value == 0:
            return False
    return True


def _twin_random_draws(graph: fx.Graph) -> dict[fx.Node, list[fx.Node]]:
    """Before pruning: each random node that draws numbers gets a twin right before it, the
    same operator on zeros of the same shapes, which pruning keeps: where the node itself
    is pruned (nothing needs a later dropout), its twin draws what it would have, so the
    generators end where a forward leaves them and later draws (another trace, a kept
    dropout) are the forward's. Where the node stays, its twin goes
    (:func:`_drop_needless_twins`). A random operator whose draws may depend on values,
    or whose shapes are symbolic, is kept with everything it needs."""
    twins: dict[fx.Node, list[fx.Node]] = {}
    for node in list(graph.nodes):
        if node.op != "call_function" or not is_unused_random(node.target):
            continue
        if node.target in _SHAPE_BLIND_RANDOM and not _draws(node):
            node.meta["fxsight_random"] = "none"  # draws nothing: pruned when unused
            continue
        inputs = [a for a in node.all_input_nodes]
        values = [a.meta.get("val") for a in inputs]
        if node.target not in _SHAPE_BLIND_RANDOM or not all(
                isinstance(v, torch.Tensor) and all(type(d) is int for d in v.shape)
                for v in values):
            node.meta["fxsight_random"] = "kept"
            continue
        node.meta["fxsight_random"] = "twinned"
        made = []
        with graph.inserting_before(node):
            zeros = {}
            for a, v in zip(inputs, values):
                zeros[a] = graph.call_function(_ATEN.zeros.default, (list(v.shape),),
                                               {"dtype": v.dtype, "device": v.device})
                made.append(zeros[a])
            twin = graph.call_function(node.target,
                                       fx.node.map_arg(node.args, zeros.__getitem__),
                                       fx.node.map_arg(node.kwargs, zeros.__getitem__))
        twin.meta["fxsight_draw"] = True
        twins[node] = [twin, *made]
    return twins


def _drop_needless_twins(graph: fx.Graph, twins: dict[fx.Node, list[fx.Node]]) -> None:
    alive = set(graph.nodes)
    for node, made in twins.items():
        if node in alive:  # it draws itself
            for twin in made:
                graph.erase_node(twin)


def _check_one_value_per_tensor(site: Site, old: list, new: list, program: Program) -> None:
    """Raise :class:`NotOnGraph` where a write gives different values to leaves of
    ``site`` that are one tensor object in the forward (``attn(h, h, h)``, one boundary
    marker for all three: see ``capture.export``): the graph holds the path the model's
    Python takes for one object (``query is key``), which it would not take for the
    values written."""
    given: dict[fx.Node, Any] = {}
    for old_node, new_value in zip(old, new):
        if given.setdefault(old_node, new_value) is not new_value:
            lines = [n.line for n in program.nodes if n.kind is Kind.WRITE and n.site == site]
            raise NotOnGraph(at_line(
                f"{site.label}: the model passes one tensor object as several of these "
                f"values, and the write gives them values of their own; the captured graph "
                f"holds the path its Python takes for one tensor object (an attention's "
                f"`query is key`), not the one it takes for different tensors (the hooks "
                f"backend runs that forward)",
                lines[-1] if lines else None))


def _boundary_name(label: str, leaf: int) -> str:
    """``transformer.h.0.output#1`` -> ``transformer_h_0_output_1`` (a Python name); the
    tensors after the first of a site get their leaf index: ``transformer_h_0_input_leaf2``."""
    name = label.replace(".", "_").replace("#", "_")
    return f"{name}_leaf{leaf}" if leaf else name

