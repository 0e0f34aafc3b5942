"""Capture: a model's forward pass as a GraphModule whose module boundaries are nodes.

Every tensor that enters or leaves a module passes through ``fxsight::boundary`` while
``torch.export`` traces the model, so the captured graph alone says where each module's
inputs and outputs are. The markers are identities: the splicer attaches interventions to
them and then removes them all.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import sys
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from .._torch import global_forward_hooks, plain_codegen, pytree

from ..locks import exclusive_export
from ..stats import bump
from ..errors import CaptureError
from .events import ModuleEvents
from ..record.sites import Site


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
    # dynamic-shape captures (see ``capture(..., dynamic=True)``): the graph holds symbolic
    # sizes; ``bind`` gives a view for concrete inputs whose ``bindings`` (symbol -> size)
    # make ``meta_value`` concrete
    dynamic: bool = False
    guards: Any = None
    dims: list = field(default_factory=list, repr=False)
    ranges: dict = field(default_factory=dict, repr=False)
    bindings: dict | None = None

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


def capture(model: torch.nn.Module, args: tuple, kwargs: dict,
            dynamic: bool = False, events_on: torch.nn.Module | None = None) -> Captured:
    """Capture ``model(*args, **kwargs)`` into a GraphModule with boundary markers.

    ``events_on``: the module whose boundaries are marked and named (its submodule paths
    are the sites), where ``model`` is a wrapper around it (a decoding step); by default
    ``model`` itself.

    With ``dynamic``, every dimension of every input tensor is ``Dim.AUTO`` (export keeps
    it symbolic unless the model fixes it): the graph serves other batch and sequence
    lengths too (see :meth:`Captured.bind`).

    Raises :class:`CaptureError` naming the innermost module that could not be captured.
    """
    start = time.perf_counter()
    layouts: dict[Site, tuple[pytree.TreeSpec, list[Any]]] = {}

    def mark(site: Site, value: Any) -> Any:
        flat, spec = pytree.tree_flatten(value)
        layouts[site] = (spec, [None if isinstance(v, torch.Tensor) else v for v in flat])
        label = _marker(site)
        marked = [boundary(v, label, i) if isinstance(v, torch.Tensor) else v
                  for i, v in enumerate(flat)]
        return pytree.tree_unflatten(marked, spec)

    events = ModuleEvents(model if events_on is None else events_on, mark)
    try:
        # (one export at a time: export sets process-wide flags, see fxsight.locks)
        with exclusive_export(), events.installed(), _quiet_symbolic_shapes():
            exported = torch.export.export(
                model, tuple(args), dict(kwargs), strict=False,
                dynamic_shapes=_auto_dynamic_shapes(model, args, kwargs) if dynamic else None)
    except Exception as error:  # noqa: BLE001 - any failure means: fall back to hooks
        culprit = events.stack[-1] if events.stack else None
        where = f"module {culprit or 'model'!r}" if culprit is not None else "the model"
        reason = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        raise CaptureError(f"could not capture {where}: {reason}", culprit) from error

    gm = exported.module()
    guards = strip_export_checks(gm)
    guards = guards if dynamic else None
    graph = gm.graph
    in_spec, out_spec = exported.call_spec
    plain_codegen(graph)
    marks: dict[str, dict[int, fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_function" and node.target is BOUNDARY:
            marks.setdefault(node.args[1], {})[node.args[2]] = node
    slots = {}
    for site in events.order:
        spec, constants = layouts[site]
        found = marks.get(_marker(site), {})
        nodes = [found.get(i) if constants[i] is None else None for i in range(len(constants))]
        slots[site] = SiteSlot(spec, nodes, constants)
    module = fx.GraphModule(gm, graph, class_name="CapturedForward")
    _drop_forward_hooks(module)
    bump("captures")
    captured = Captured(module, in_spec, out_spec, list(events.order), slots,
                        time.perf_counter() - start)
    if dynamic:
        _make_dynamic(captured, exported, guards)
    return captured


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
    for slot in captured.slots.values():
        for constant in slot.constants:
            if isinstance(constant, (torch.SymInt, torch.SymFloat, torch.SymBool)):
                raise ValueError("a module boundary carries a symbolic Python number")
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
    captured.guards = guards
    captured.dims = dims
    captured.ranges = ranges


@contextlib.contextmanager
def _quiet_symbolic_shapes():
    """A failed capture is reported once, by the fallback warning: keep torch from also
    printing the partial graph on stderr (export does, unconditionally) and logging it.
    What else reached stderr is passed on when the capture succeeds."""
    logger = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    buffer = io.StringIO()
    failed = False
    try:
        with contextlib.redirect_stderr(buffer):
            yield
    except BaseException:
        failed = True
        raise
    finally:
        logger.setLevel(level)
        if not failed and buffer.getvalue():
            sys.stderr.write(buffer.getvalue())


def _marker(site: Site) -> str:
    """A site's name in its boundary markers: its label, except the root's, which would be
    the label of a top-level submodule called ``model`` (Llama's) too."""
    return site.label if site.path else f".{site.label}"


def _drop_forward_hooks(module: torch.nn.Module) -> None:
    module._forward_hooks.clear()
    module._forward_pre_hooks.clear()


# --- the capture cache ---------------------------------------------------------------
_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


_LEAF_TYPES = (bool, int, float, str, torch.dtype, torch.device)


def flat_inputs(args: tuple, kwargs: dict) -> tuple[list[Any], Any]:
    """``pytree.tree_flatten((args, kwargs))``'s leaves and a hashable key of its layout;
    a fast path for the common inputs (tensors and plain values, no containers)."""
    flat = []
    for value in args:
        if value is None or isinstance(value, torch.Tensor) or type(value) in _LEAF_TYPES:
            flat.append(value)
        else:
            break
    else:
        for value in kwargs.values():
            if value is None or isinstance(value, torch.Tensor) or type(value) in _LEAF_TYPES:
                flat.append(value)
            else:
                break
        else:
            return flat, ("flat", len(args), tuple(kwargs))
    flat, spec = pytree.tree_flatten((args, kwargs))
    return flat, str(spec)


def signature(model: torch.nn.Module, args: tuple, kwargs: dict,
              flat: tuple[list[Any], Any] | None = None) -> tuple:
    """What a capture depends on: input shapes and types, non-tensor inputs, model state.

    ``flat`` is ``flat_inputs(args, kwargs)`` where the caller has it already."""
    flat, layout = flat if flat is not None else flat_inputs(args, kwargs)
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
    # the captured graph holds the parameter and buffer objects themselves: one replaced
    # (``layer.weight = nn.Parameter(...)``) needs a new capture, or it would be ignored
    tensors, first = _tensor_ids(model)
    state = (model.training, None if first is None else (first.dtype, first.device))
    return (layout, tuple(parts), state, torch.is_grad_enabled(), tensors, _user_hooks(model))


# Parameters, buffers and submodules assigned as attributes go through torch's global
# registration hooks: a generation count, bumped by them, tells when the (costly, ~5 µs per
# module) walk over a model's tensors must be redone; between changes it is memoized.
# ``Module._apply`` (``.to()``, ``.half()``...) may put new tensors in place without those
# hooks: it replaces every buffer and (when it replaces any) every parameter, so the first
# of each, checked by identity, tells that too.
_GENERATION = [0]
_TENSOR_IDS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _bump_generation(*_: Any) -> None:
    _GENERATION[0] += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_bump_generation)
torch.nn.modules.module.register_module_buffer_registration_hook(_bump_generation)
torch.nn.modules.module.register_module_module_registration_hook(_bump_generation)


def _first(model: torch.nn.Module, attribute: str) -> tuple | None:
    for module in model.modules():
        for name, tensor in getattr(module, attribute).items():
            if tensor is not None:
                return (getattr(module, attribute), name, tensor)
    return None


def _tensor_ids(model: torch.nn.Module) -> tuple[tuple, torch.Tensor | None]:
    """The ids of ``model``'s parameters and buffers, and its first parameter (memoized)."""
    memo = _TENSOR_IDS.get(model)
    if memo is not None and memo[0] == _GENERATION[0]:
        parameter, buffer = memo[1]  # (mapping, name, tensor) of the first of each, or None
        if (parameter is None or parameter[0].get(parameter[1]) is parameter[2]) and \
                (buffer is None or buffer[0].get(buffer[1]) is buffer[2]):
            return memo[2], memo[3]
    ids = tuple(map(id, model.parameters())) + tuple(map(id, model.buffers()))
    firsts = (_first(model, "_parameters"), _first(model, "_buffers"))
    first = next(model.parameters(), None)
    _TENSOR_IDS[model] = (_GENERATION[0], firsts, ids, first)
    return ids, first


_MODULES: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _user_hooks(model: torch.nn.Module) -> tuple:
    """The forward (pre-)hooks on ``model``'s modules and the global ones: export runs them
    and bakes their effect into the captured graph, so a hook added or removed afterwards
    needs a new capture (else the fx backend would silently keep or ignore it)."""
    memo = _MODULES.get(model)
    if memo is None or memo[0] != _GENERATION[0]:  # (no module is kept, only their hook
        modules = tuple(model.modules())  # dicts: a wrapper's memo must not keep the model
        hook_dicts = [d for m in modules for d in (m._forward_hooks, m._forward_pre_hooks)]
        owners = tuple((id(m), m._forward_pre_hooks, m._forward_hooks) for m in modules)
        memo = _MODULES[model] = (_GENERATION[0], owners, hook_dicts)  # alive)
    hooks: tuple = ()
    if any(memo[2]):  # (the usual answer, no hook anywhere, costs one pass in C)
        hooks = tuple((key, tuple(pre), tuple(post)) for key, pre, post in memo[1]
                      if pre or post)
    pre, post = global_forward_hooks()
    if pre or post:
        hooks += (("global", pre, post),)
    return hooks


def general_signature(key: tuple) -> tuple:
    """A signature with each input tensor's shape reduced to its rank."""
    spec, parts, *rest = key
    parts = tuple(("T", len(p[1]), *p[2:]) if p[0] == "T" else p for p in parts)
    return (spec, parts, *rest)


_DYNAMIC_ATTEMPTS = 2  # dynamic captures tried per general signature


def cached_capture(model: torch.nn.Module, args: tuple, kwargs: dict,
                   dynamic: str = "never",
                   flat: tuple[list[Any], Any] | None = None,
                   events_on: torch.nn.Module | None = None) -> Captured:
    """Capture once per (model, signature); failures are remembered too.

    ``dynamic`` (``"never"``, ``"auto"``, ``"always"``) lets a compiled trace use one
    dynamic-shape capture for many input shapes: ``"always"`` captures dynamically at
    once, ``"auto"`` once inputs of a second shape (same structure) are seen. Where a
    dynamic capture fails or does not fit the inputs, the exact-shape capture is used.
    """
    per_model = _CACHE.get(model)
    if per_model is None:
        per_model = _CACHE[model] = {}
    key = signature(model, args, kwargs, flat)
    if dynamic != "never":
        view = per_model.get(("dynamic", key))
        if view is None:  # False: known not to have one
            view = per_model[("dynamic", key)] = \
                _dynamic_view(model, per_model, key, args, kwargs, dynamic, events_on) or False
        if view is not False:
            return view
    hit = per_model.get(key)
    if hit is None:
        general = general_signature(key)
        shapes = per_model.setdefault(("shapes", general), set())
        if len(shapes) < 2:
            shapes.add(key)
        try:
            hit = capture(model, args, kwargs, events_on=events_on)
        except CaptureError as error:
            hit = error
            bump("capture_failures")
        per_model[key] = hit
    if isinstance(hit, CaptureError):
        raise hit
    return hit


def _dynamic_view(model: torch.nn.Module, per_model: dict, key: tuple, args: tuple,
                  kwargs: dict, dynamic: str,
                  events_on: torch.nn.Module | None = None) -> Captured | None:
    general = general_signature(key)
    flat = flat_inputs(args, kwargs)[0]
    bases = per_model.setdefault(("dynamic-bases", general), [])
    for base in bases:
        if isinstance(base, Captured):
            view = base.bind(flat)
            if view is not None:
                return view
    if len(bases) >= _DYNAMIC_ATTEMPTS:
        return None
    shapes = per_model.get(("shapes", general), set())
    if dynamic == "auto" and not (shapes - {key}):
        return None  # only one shape seen so far: the exact capture serves it
    try:
        base = capture(model, args, kwargs, dynamic=True, events_on=events_on)
        bump("dynamic_captures")
    except Exception:  # noqa: BLE001 - the exact-shape capture is always a correct fallback
        bump("dynamic_capture_failures")
        bases.append(None)
        return None
    bases.append(base)
    return base.bind(flat)


def forget(model: torch.nn.Module) -> None:
    """Drop every cached capture of ``model`` (after changing its structure)."""
    _CACHE.pop(model, None)
