"""Capture: a model's forward pass as a GraphModule whose module boundaries are nodes.

Every tensor that enters or leaves a module passes through ``fxsight::boundary`` while
``torch.export`` traces the model, so the captured graph alone says where each module's
inputs and outputs are. The markers are identities: the splicer attaches interventions to
them and then removes them all.
"""

from __future__ import annotations

import contextvars
import inspect
import os
import sysconfig
import time
import traceback
import weakref
from types import FrameType
from typing import Any, ContextManager

import torch
import torch.fx as fx

from .._torch import (compiled_functions_eager, export_leaves_no_buffer_hook,
                      fake_cache_unchanged, forget_generated_source, generated_source_key,
                      generated_source_keys, in_tracing_machinery,
                      parametrization_cache_on, plain_codegen, pytree, user_modes_suspended)

from ..locks import exclusive_export
from ..stats import bump
from ..errors import CaptureError
from . import caches, dispatch, model_hooks, state
from .captured_forward import CacheLayout, Captured, SiteSlot
from .dynamic_shapes import _auto_dynamic_shapes, _make_dynamic
from .events import ModuleEvents
from .hidden import NestedTensor, kept_constant
from .memory import memory_roots
from .quiet_logs import quiet_logger
from .quiet_warnings import held_warnings
from . import opaque as opaque_calls
from ..record.sites import INPUT, Site


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
        # (a user's dispatch mode sees no fake forward; a compiled function the model
        # calls is traced as plain Python, dynamo's code for it left as it was; the fake
        # operators' cache stays as it was)
        # (and the warnings as a plain forward leaves them: see quiet_warnings)
        with user_modes_suspended(), compiled_functions_eager(), fake_cache_unchanged(), \
                held_warnings(_issued_by_the_model):
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
    global_hooks, hooked = model_hooks.user_hooks(model)
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
    flat_given = pytree.tree_leaves((tuple(args), dict(kwargs)))  # (the caller's inputs)
    layouts: dict[Site, tuple[pytree.TreeSpec, list[Any]]] = {}
    tensor_leaves: dict[Site, frozenset[int]] = {}  # (a constant None is a leaf too)

    repeats: dict[Site, dict[int, int]] = {}  # (a leaf -> the first leaf of its tensor)

    def mark(site: Site, value: Any) -> Any:
        flat, spec = pytree.tree_flatten(value)
        layouts[site] = (spec, [None if isinstance(v, torch.Tensor) else v for v in flat])
        tensor_leaves[site] = frozenset(
            i for i, v in enumerate(flat) if isinstance(v, torch.Tensor))
        label = _marker(site)
        # one marker per tensor of an input: a forward that tests its arguments for
        # identity (nn.MultiheadAttention's ``query is key`` projects a self-attention's
        # inputs in one product) takes the branch the plain forward takes
        firsts = _first_leaves(flat) if site.kind == INPUT else {}
        repeats[site] = {i: first for i, first in firsts.items() if i != first}
        marked: list[Any] = []
        for i, v in enumerate(flat):
            first = firsts.get(i, i)
            marked.append(marked[first] if first != i else
                          boundary(v, label, i) if isinstance(v, torch.Tensor) else v)
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
        text = str(error).strip()
        reason = f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"
        raise CaptureError(f"could not capture {where}: {reason}{_model_line(error)}",
                           culprit) from error
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
    nested = _nested_marks(gm, graph)
    slots = {}
    for site in events.order:
        spec, constants = layouts[site]
        constants = [_cache_ref(c, cache_state.roots, site) if caches.is_cache(c)
                     else kept_constant(c, site.label) for c in constants]
        found = marks.get(_marker(site), {})
        repeated = repeats.get(site, {})
        nodes = [found.get(repeated.get(i, i)) if constants[i] is None else None
                 for i in range(len(constants))]
        # a tensor whose marker is not in the top-level graph: inside a nested graph
        inner = nested.get(_marker(site), {})
        tensors = tensor_leaves[site]
        constants = [NestedTensor(site.label, _nested_value(inner.get(i)))
                     if i in tensors and n is None else c
                     for i, (c, n) in enumerate(zip(constants, nodes))]
        slots[site] = SiteSlot(spec, nodes, constants)
    module = fx.GraphModule(owner, graph, class_name="CapturedForward")
    _drop_forward_hooks(module)
    bump("captures")
    captured = Captured(module, in_spec, out_spec, list(events.order), slots,
                        time.perf_counter() - start, caches=cache_state.result,
                        callees=dict(events.callees), opaque=dict(opaque),
                        aliases={site: memory_roots(slot.nodes, BOUNDARY)
                                 for site, slot in slots.items()},
                        events_inside=events_on is not None and events_on is not model,
                        decided_by=opaque_calls.deciding_inputs(graph, flat_given)
                        if opaque else ())
    if dynamic:
        _make_dynamic(captured, exported, guards)
    return captured


_TORCH_DIR = os.path.dirname(inspect.getfile(torch)) + os.sep
_OWN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_STDLIB_DIR = sysconfig.get_paths()["stdlib"] + os.sep
_MACHINERY = ("fx.", "export.", "overrides", "_")  # (torch's tracing, not the model's calls)


def _model_line(error: BaseException) -> str:
    """Where the model's own code was when ``error`` stopped the capture: `` (in forward at
    file:line, calling torch.nn.utils.rnn.pad_packed_sequence)``; ``""`` where no frame of
    the traceback is the model's (one outside torch, fxsight and the standard library)."""
    frames = traceback.extract_tb(error.__traceback__)
    own = [k for k, frame in enumerate(frames)
           if not frame.filename.startswith((_TORCH_DIR, _OWN_DIR, _STDLIB_DIR, "<frozen"))]
    if not own:
        return ""
    frame = frames[own[-1]]
    where = f" (in {frame.name} at {frame.filename}:{frame.lineno}"
    callee = frames[own[-1] + 1] if own[-1] + 1 < len(frames) else None
    if callee is not None and callee.filename.startswith(_TORCH_DIR):
        module = os.path.splitext(callee.filename[len(_TORCH_DIR):])[0].replace(os.sep, ".")
        # (a torch function the model called, not the tracing machinery around the call)
        if not callee.name.startswith("_") and not module.startswith(_MACHINERY) and \
                "._" not in module and not module.split(".")[-1].startswith("_"):
            where += f", calling torch.{module}.{callee.name}"
    return where + ")"


def _nested_marks(gm: fx.GraphModule, graph: fx.Graph) -> dict[str, dict[int, fx.Node]]:
    """The boundary markers inside nested graphs (the subgraphs of higher-order ops such
    as ``wrap_with_set_grad_enabled``, which torch.export makes of a ``torch.no_grad()``
    block in a forward): marker -> leaf index -> node, as the top-level ``marks``."""
    found: dict[str, dict[int, fx.Node]] = {}
    for sub in gm.modules():
        if isinstance(sub, fx.GraphModule) and sub.graph is not graph:
            for node in sub.graph.nodes:
                if node.op == "call_function" and node.target is BOUNDARY:
                    found.setdefault(node.args[1], {})[node.args[2]] = node
    return found


def _nested_value(node: fx.Node | None) -> Any:
    return node.meta.get("val") if node is not None else None


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
            output = self._call_model(args, kwargs)
            changes[:] = [c for c in watch.changes(plain=True) if c not in ignored]
            return cache_state.convert(output)

        try:
            forward.__signature__ = inspect.signature(model.forward)
        except (TypeError, ValueError):
            pass
        self.forward = forward

    def _call_model(self, args: tuple, kwargs: dict) -> Any:
        """The model's own forward (the frames of the model's code run inside this one's:
        see :func:`_issued_by_the_model`)."""
        try:
            return self.model(*args, **kwargs)
        except Exception as error:
            if _data_dependent(error):
                raise _Uncapturable(error) from None
            raise


def _issued_by_the_model(frame: FrameType) -> bool:
    """Whether a warning issued in ``frame`` during a capture is one a plain forward issues
    too: issued by code the model's forward runs (the model's, torch.nn's), not by torch's
    tracing machinery (about the capture itself, before, around or after the forward)."""
    if in_tracing_machinery(frame.f_globals.get("__name__")):
        return False
    model_call = _Root._call_model.__code__
    while frame is not None:
        if frame.f_code is model_call:
            return True
        frame = frame.f_back
    return False


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


def _quiet_symbolic_shapes() -> ContextManager[None]:
    """A failed capture is reported once, by the fallback warning: keep torch's shape
    solver from also logging warnings about it ("Unable to find user code ...") for this
    thread. Nothing process-wide is swapped (``sys.stderr`` is never touched; the partial
    graph export would print is avoided by :class:`_Root`), and other threads log as
    usual."""
    return quiet_logger("torch.fx.experimental.symbolic_shapes")


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


def _first_leaves(flat: list[Any]) -> dict[int, int]:
    """For each tensor leaf of ``flat``: the index of the first leaf holding the same
    tensor (itself, unless the tensor is passed more than once)."""
    first: dict[int, int] = {}
    return {i: first.setdefault(id(v), i) for i, v in enumerate(flat)
            if isinstance(v, torch.Tensor)}


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
