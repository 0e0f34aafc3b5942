"""Capture: a model's forward pass as a GraphModule whose module boundaries are nodes.

Every tensor that enters or leaves a module passes through ``fxsight::boundary`` while
``torch.export`` traces the model, so the captured graph alone says where each module's
inputs and outputs are. The markers are identities: the splicer attaches interventions to
them and then removes them all.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import inspect
import logging
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from .._torch import (export_leaves_no_buffer_hook, forget_generated_source,
                      generated_source_key, generated_source_keys, parametrization_cache_on,
                      plain_codegen, pytree, unflatten_keeping_sizes)

from ..locks import exclusive_export
from ..stats import bump
from ..errors import CaptureError
from . import caches, dispatch, state
from .events import ModuleEvents
from .hidden import kept_constant
from .input_flow import unread_placeholders
from .memory import memory_roots
from . import opaque as opaque_calls
from ..record.sites import Site, is_operation


@torch.library.custom_op("fxsight::boundary", mutates_args=())
def boundary(x: torch.Tensor, site: str, leaf: int) -> torch.Tensor:
    """Identity marker of a module boundary (only ever seen while capturing)."""
    return x.clone()


@boundary.register_fake
def _boundary_fake(x, site, leaf):
    return torch.empty_like(x)


BOUNDARY = torch.ops.fxsight.boundary.default

# the run-time checks export inserts: fxsight validates inputs itself (signatures, guards)
DROPPED_TARGETS = {
    torch.ops.aten._assert_tensor_metadata.default,
    torch.ops.aten._assert_scalar.default,
    torch.ops.aten.sym_constrain_range_for_size.default,
}


def strip_export_checks(gm: fx.GraphModule) -> Any:
    """Remove the guard call and the run-time asserts ``ExportedProgram.module()`` adds to
    ``gm``'s graph; return the guard function (``None`` if there was none)."""
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
        elif node.op == "call_function" and node.target in DROPPED_TARGETS:
            graph.erase_node(node)
    guards = getattr(gm, "_guards_fn", None)
    if guards is not None:
        delattr(gm, "_guards_fn")
    return guards


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

    def __post_init__(self) -> None:
        self.index = {site: i for i, site in enumerate(self.events)}

    @property
    def unread_inputs(self) -> frozenset[int]:
        """The inputs (indices in ``captures.flat_inputs``, the graph's placeholders) that
        no output of the captured forward is computed from (see ``input_flow``)."""
        unread = self.graph_module.meta.get("fxsight_unread_inputs")
        if unread is None:
            unread = self.graph_module.meta["fxsight_unread_inputs"] = \
                unread_placeholders(self.graph_module.graph, BOUNDARY)
        return unread

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
        slot = self.slots[site]
        metas = [_to_meta(n.meta.get("val"), self.bindings) if n is not None else None
                 for n in slot.nodes]
        return slot.value(metas)

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


class _CacheState:
    """What ``_Root`` needs and learns about cache objects during one capture."""

    def __init__(self, found: list, layout: Any, dynamic: bool):
        self.found = found  # the input caches (see ``caches.expand``)
        self.layout = layout  # the original inputs' pytree layout
        self.dynamic = dynamic
        self.roots: list = []
        self.result: CacheLayout | None = None

    def convert(self, output: Any) -> Any:
        flat, spec = pytree.tree_flatten(output)
        positions = {}
        roots = self.roots
        for index, leaf in enumerate(flat):
            if caches.is_cache(leaf):
                k = next((j for j, r in enumerate(roots) if r is leaf), None)
                if k is None:
                    roots.append(leaf)
                    k = len(roots) - 1
                positions[index] = k
        if not roots:
            return output
        finals, skeletons = [], []
        for root in roots:
            tensors, skeleton = caches.flatten(root, symbolic_ok=not self.dynamic)
            finals.append(tensors)
            skeletons.append(skeleton)
        self.result = CacheLayout(skeletons, len(self.found), spec, positions)
        return ([leaf for i, leaf in enumerate(flat) if i not in positions], finals)


def _concrete(sizes: Any, bindings: dict | None) -> list[int]:
    out = []
    for size in sizes:
        if isinstance(size, torch.SymInt):
            expr = size.node.expr
            size = int(expr.xreplace(bindings)) if bindings is not None else size.node.hint
        out.append(int(size))
    return out


def _to_meta(value: Any, bindings: dict | None = None) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.empty_strided(_concrete(value.shape, bindings),
                                   _concrete(value.stride(), bindings),
                                   dtype=value.dtype, device="meta")
    return value


def capture(model: torch.nn.Module, args: tuple, kwargs: dict, *rest: Any,
            **options: Any) -> Captured:
    """:func:`_capture` (see there), leaving no generated source behind: ``torch.export``
    compiles several intermediate GraphModules, and fx keeps the source of each one for
    the life of the process (``linecache`` and its loader); those of modules that are
    not part of the capture are dropped, those of its modules go when they are
    collected.

    The capture runs in a copy of the caller's ``contextvars`` context: each
    ``torch.*.config.patch()`` that ``torch.export`` enters leaves a context variable of
    its own in the context it ran in (two per capture), which would grow the caller's
    context without bound; nothing a capture sets is meant to outlive it."""
    known = generated_source_keys()
    captured = None
    try:
        captured = contextvars.copy_context().run(_capture, model, args, kwargs, *rest,
                                                  **options)
        return captured
    finally:
        keep = set()
        if captured is not None:
            for module in captured.graph_module.modules():
                if isinstance(module, fx.GraphModule):
                    key = generated_source_key(module)
                    if key is not None and key not in known:
                        keep.add(key)
                        weakref.finalize(module, forget_generated_source, key)
        for key in generated_source_keys() - known - keep:
            forget_generated_source(key)


def _capture(model: torch.nn.Module, args: tuple, kwargs: dict,
            dynamic: bool = False, events_on: torch.nn.Module | None = None,
            operations: frozenset = frozenset(),
            opaque: dict[str, str] | None = None,
            outputs: dict[Site, Any] | None = None) -> Captured:
    """Capture ``model(*args, **kwargs)`` into a GraphModule with boundary markers.

    ``events_on``: the module whose boundaries are marked and named (its submodule paths
    are the sites), where ``model`` is a wrapper around it (a decoding step); by default
    ``model`` itself.

    With ``dynamic``, every dimension of every input tensor is ``Dim.AUTO`` (export keeps
    it symbolic unless the model fixes it): the graph serves other batch and sequence
    lengths too (see :meth:`Captured.bind`).

    ``operations``: an operations spec (:mod:`fxsight.capture.operations`): the calls
    inside those forwards are marked too, as sites ``<module>.source.<op>``.

    Raises :class:`CaptureError` naming the innermost module that could not be captured;
    also, before anything runs, where the model has forward hooks or pre-hooks (a graph
    runs no Python hook: one that changes values would keep what it did at capture time,
    one that only looks would run once, on fake tensors, and never on the values of a
    trace; the hooks backend runs them as a plain forward does), and where the forward
    changes the model's Python state (the graph would not repeat that; the change is
    undone).

    ``opaque`` (path -> reason) names modules that run as ``fxsight::opaque`` calls
    returning tensors shaped as in ``outputs`` (see :func:`capture_partly`).
    """
    opaque = opaque or {}
    start = time.perf_counter()
    global_hooks, hooked = state.user_hooks(model)
    if global_hooks is not None:
        error = CaptureError(f"could not capture the model: {global_hooks}, which a "
                             f"captured graph would not run")
        error.whole_model = True
        raise error
    foreign = _foreign_forward(model) or dispatch.offload_reason(model)
    if foreign is not None:
        error = CaptureError(f"could not capture the model: {foreign[1]}", foreign[0])
        error.whole_model = True
        raise error
    cached = _cached_parametrization(model)
    if cached is not None:
        error = CaptureError(f"could not capture the model: module {cached or 'model'!r} has "
                             f"parametrized tensors and a parametrize.cached() block is "
                             f"open; a captured graph would keep the cached tensor for later "
                             f"blocks too (the hooks backend uses the block's cache, as a "
                             f"plain forward does)", cached)
        error.whole_model = True
        raise error
    if hooked:
        path, _, description = hooked[0]
        error = CaptureError(f"could not capture the model: {description}; a captured "
                             f"graph runs no Python hook (the hooks backend runs it on the "
                             f"real values of each trace, as a plain forward does)", path)
        error.whole_model = True
        raise error
    layouts: dict[Site, tuple[pytree.TreeSpec, list[Any]]] = {}

    def mark(site: Site, value: Any) -> Any:
        flat, spec = pytree.tree_flatten(value)
        layouts[site] = (spec, [None if isinstance(v, torch.Tensor) else v for v in flat])
        label = _marker(site)
        marked = [boundary(v, label, i) if isinstance(v, torch.Tensor) else v
                  for i, v in enumerate(flat)]
        return pytree.tree_unflatten(marked, spec)

    events = ModuleEvents(model if events_on is None else events_on, mark,
                          operations=operations, copy_back=True)
    before = state.Watch(model, 0)
    changes: list[str] = []
    layout = pytree.tree_structure((tuple(args), dict(kwargs)))
    try:
        args, kwargs, found = caches.expand(tuple(args), dict(kwargs))
    except caches.Unsupported as error:
        raise CaptureError(f"could not capture the model: {error}") from None
    cache_state = _CacheState(found, layout, dynamic)
    root = _Root(model, before, changes, cache_state,
                 opaque_calls.ignored_changes(opaque))
    opaque_kept: list = []  # (the opaque calls' registry entries, until the graph holds them)
    try:
        # (one export at a time: export sets process-wide flags, see fxsight.locks)
        try:
            with exclusive_export(), events.installed(), _quiet_symbolic_shapes(), \
                    export_leaves_no_buffer_hook(), state.KeptAttributes(model), \
                    opaque_calls.routed(model if events_on is None else events_on,
                                        opaque, outputs or {}, opaque_kept):
                exported = torch.export.export(
                    root, tuple(args), dict(kwargs), strict=False,
                    dynamic_shapes=_auto_dynamic_shapes(model, args, kwargs)
                    if dynamic else None)
        finally:
            # (export puts back the modules' own attributes after tracing; not the
            # attributes of the objects they hold)
            # (transformers' output-capturing hooks, installed on first use, are kept
            # as a plain forward keeps them: the graph traced them)
            if not before.unchanged() and (changes or not before.only_traced_hooks_added()):
                changes = changes or before.changes() or ["its state"]
                before.restore()
    except Exception as error:  # noqa: BLE001 - any failure means: fall back to hooks
        if isinstance(error, _Uncapturable):
            error = error.error
        culprit = events.stack[-1] if events.stack else None
        where = f"module {culprit or 'model'!r}" if culprit is not None else "the model"
        reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        raise CaptureError(f"could not capture {where}: {reason}", culprit) from error
    if changes:
        error = CaptureError(f"could not capture the model: its forward changes "
                             f"{changes[0]}, which a captured graph would not repeat")
        error.changes_state = True
        error.changed_module = opaque_calls.changed_module(changes[0])
        raise error

    gm = exported.module()
    guards = strip_export_checks(gm)
    guards = guards if dynamic else None
    graph = gm.graph
    in_spec, out_spec = exported.call_spec
    plain_codegen(graph)
    opaque_calls.hold_calls(graph)
    owner = _unwrap(gm, graph)
    marks: dict[str, dict[int, fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_function" and node.target is BOUNDARY:
            marks.setdefault(node.args[1], {})[node.args[2]] = node
    slots = {}
    for site in events.order:
        spec, constants = layouts[site]
        constants = [_cache_ref(c, cache_state.roots, site) if caches.is_cache(c)
                     else kept_constant(c, site.label) for c in constants]
        found = marks.get(_marker(site), {})
        nodes = [found.get(i) if constants[i] is None else None for i in range(len(constants))]
        slots[site] = SiteSlot(spec, nodes, constants)
    module = fx.GraphModule(owner, graph, class_name="CapturedForward")
    _drop_forward_hooks(module)
    bump("captures")
    captured = Captured(module, in_spec, out_spec, list(events.order), slots,
                        time.perf_counter() - start, caches=cache_state.result,
                        callees=dict(events.callees), opaque=dict(opaque),
                        aliases={site: memory_roots(slot.nodes, BOUNDARY)
                                 for site, slot in slots.items()})
    if dynamic:
        _make_dynamic(captured, exported, guards)
    return captured


def _cache_ref(cache: Any, roots: list, site: Site) -> caches.CacheRef:
    """What a capture keeps of a cache object at a module boundary."""
    where = f"{site.label}"
    found = caches.find(cache, roots)
    return caches.CacheRef(None, (), where) if found is None else \
        caches.CacheRef(found[0], found[1], where)


class _Uncapturable(Exception):
    """A data-dependent failure inside the model, carried out of ``torch.export`` as an
    exception it does not annotate: export prints the partial graph of such failures to
    ``sys.stderr`` (unconditionally, ``torch/export/_trace.py``), fxsight's fallback
    warning says it once instead."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


def _data_dependent(error: BaseException) -> bool:
    # what ``torch.fx.Tracer.trace`` tests before attaching ``partial_fx_graph``
    return isinstance(error, RuntimeError) and bool(error.args) and \
        isinstance(error.args[0], str) and "data-dependent" in error.args[0]


class _Root(torch.nn.Module):
    """What ``capture`` exports: the model as its only child ``model`` (whose prefix
    :func:`_unwrap` takes off the graph's attribute names again), called through a forward
    with the model's own signature that carries data-dependent failures out as
    :class:`_Uncapturable`, and puts in ``changes`` the plain attributes the model's
    forward changed (compared with ``watch``; export puts them back afterwards)."""

    def __init__(self, model: torch.nn.Module, watch: state.Watch, changes: list[str],
                 cache_state: "_CacheState", ignored: set[str] = frozenset()):
        super().__init__()
        self.model = model

        def forward(*args, **kwargs):
            if cache_state.found:  # the input caches, built again from their tensors
                args, kwargs, cache_state.roots = caches.rebuild(
                    args, kwargs, cache_state.layout, cache_state.found)
            try:
                output = self.model(*args, **kwargs)
            except Exception as error:
                if _data_dependent(error):
                    raise _Uncapturable(error) from None
                raise
            changes[:] = [c for c in watch.changes(plain=True) if c not in ignored]
            return cache_state.convert(output)

        try:
            forward.__signature__ = inspect.signature(model.forward)
        except (TypeError, ValueError):
            pass
        self.forward = forward


def _unprefixed(path: str) -> str:
    return "" if path == "model" else path[len("model."):] if path.startswith("model.") \
        else path


def _unwrap(gm: torch.nn.Module, graph: fx.Graph) -> torch.nn.Module:
    """The module of the exported ``_Root``'s child, holding every attribute the graph
    reads, under the model's own names (``lm_head.weight``, not ``model.lm_head.weight``).
    (``gm``'s modules are new ones, made by ``ExportedProgram.module()``.)"""
    owner = gm.get_submodule("model") if isinstance(getattr(gm, "model", None),
                                                     torch.nn.Module) else None
    if owner is None:
        return gm
    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:  # paths as the model's own: "model.a.b" -> "a.b", "model" -> "" (the
            node.meta["nn_module_stack"] = {  # root's, where "" was _Root's)
                key: (_unprefixed(path), kind) for key, (path, kind) in stack.items()
                if path != ""}
        if node.op != "get_attr":
            continue
        if node.target.startswith("model."):
            node.target = node.target[len("model."):]
            continue
        # an attribute of the root (a lifted constant): moved onto the model's module
        value = gm
        for part in node.target.split("."):
            value = getattr(value, part)
        name = node.target.replace(".", "_")
        while hasattr(owner, name):
            name += "_"
        if isinstance(value, torch.nn.Parameter):
            owner.register_parameter(name, value)
        elif node.target in gm._buffers:
            owner.register_buffer(name, value)
        else:
            setattr(owner, name, value)
        node.target = name
    return owner


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


class _OtherThreadsOrErrors(logging.Filter):
    """Lets through the records of other threads, and errors."""

    def __init__(self):
        super().__init__()
        self.thread = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread != self.thread or record.levelno >= logging.ERROR


@contextlib.contextmanager
def _quiet_symbolic_shapes():
    """A failed capture is reported once, by the fallback warning: keep torch's shape
    solver from also logging warnings about it ("Unable to find user code ...") for this
    thread. Nothing process-wide is swapped (``sys.stderr`` is never touched; the partial
    graph export would print is avoided by :class:`_Root`), and other threads log as
    usual."""
    logger = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    quiet = _OtherThreadsOrErrors()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def _marker(site: Site) -> str:
    """A site's name in its boundary markers: its label, except the root's, which would be
    the label of a top-level submodule called ``model`` (Llama's) too."""
    return site.label if site.path else f".{site.label}"


def _cached_parametrization(model: torch.nn.Module) -> str | None:
    """The path of the first parametrized module where ``parametrize.cached()`` is on."""
    if not parametrization_cache_on():
        return None
    for path, module in model.named_modules():
        if torch.nn.utils.parametrize.is_parametrized(module):
            return path
    return None


def _drop_forward_hooks(module: torch.nn.Module) -> None:
    module._forward_hooks.clear()
    module._forward_pre_hooks.clear()


# packages that replace the ``forward`` of every module of a model they wrap, with
# objects torch.export cannot trace (what to tell the user)
_FOREIGN_FORWARDS = {"nnsight": "nnsight.NNsight wrapped this model and replaced the forward "
                                "of each of its modules; fxsight runs it with the hooks "
                                "backend (the same numbers), or wrap a fresh copy of the model"}


def _foreign_forward(model: torch.nn.Module) -> tuple[str, str] | None:
    """``(path, why)`` of the first module whose ``forward`` another interpretability
    package replaced on the instance (a package in ``_FOREIGN_FORWARDS``), else ``None``."""
    for path, module in model.named_modules():
        forward = module.__dict__.get("forward")
        if forward is None:
            continue
        package = (getattr(type(forward), "__module__", None) or "").split(".")[0]
        if package in _FOREIGN_FORWARDS:
            return path, (f"module {path or 'model'!r} has its forward replaced by "
                          f"{package} ({type(forward).__name__}): "
                          f"{_FOREIGN_FORWARDS[package]}")
    return None
