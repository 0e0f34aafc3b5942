"""The capture cache: one capture per (model, input signature, model state), failures
included, in a bounded LRU per model; dynamic-shape captures serving many input shapes.

A signature is what a capture depends on (:func:`signature`): input shapes and types,
non-tensor inputs, grad mode and the model's state (:mod:`fxsight.capture.state`). A
capture that leaves the cache is announced to the listeners of :func:`on_release`, so that
what was built on it goes too.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Any

import torch

from .._torch import (default_device_set, mha_fastpath_enabled, parametrization_cache_on,
                      pytree, user_modes_suspended)
from ..errors import CaptureError
from ..stats import bump
from . import caches, state
from .export import Captured, capture
from .partial import capture_partly

# --- the capture cache ---------------------------------------------------------------
# Per model, LRU: the captures (failures included) of the last MAX_CAPTURES signatures,
# dynamic-shape bases counted with them.
MAX_CAPTURES = 32
_MAX_VIEWS = 4 * MAX_CAPTURES  # dynamic views (cheap: they share their base's graph)


class _Captures:
    """One model's cache: ``entries`` (signature -> Captured or CaptureError, and
    ``("dynamic-bases", general signature)`` -> list of bases), ``views`` (signature ->
    view of a dynamic base, or False) and ``shapes`` (general signature -> the first two
    signatures seen), each a bounded LRU."""

    __slots__ = ("entries", "views", "shapes", "refused")

    def __init__(self):
        self.entries: OrderedDict = OrderedDict()
        self.views: OrderedDict = OrderedDict()
        self.shapes: OrderedDict = OrderedDict()
        # the error of a model whose forward changes its own state: not captured again
        self.refused: CaptureError | None = None

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: Any) -> Any:
        return _used(self.entries, key)

    def put(self, key: Any, value: Any) -> list:
        """Store ``value``; returns the values evicted."""
        self.entries[key] = value
        self.entries.move_to_end(key)
        evicted = []
        while len(self.entries) > MAX_CAPTURES:
            old, value = self.entries.popitem(last=False)
            evicted.append(value)
            if old[0] == "dynamic-bases":
                self.views.clear()  # (views share the bases' graphs)
        return evicted

    def view(self, key: Any) -> Any:
        return _used(self.views, key)

    def put_view(self, key: Any, value: Any) -> None:
        self.views[key] = value
        while len(self.views) > _MAX_VIEWS:
            self.views.popitem(last=False)

    def shapes_of(self, general: tuple) -> set:
        seen = self.shapes.get(general)
        if seen is None:
            seen = self.shapes[general] = set()
            while len(self.shapes) > _MAX_VIEWS:
                self.shapes.popitem(last=False)
        return seen

    def drop_states(self, tokens: set) -> list:
        """Forget the captures of these model states (see ``state.state_token``); returns
        the values dropped."""
        dropped = []
        for table in (self.entries, self.views, self.shapes):
            for key in [k for k in table if _token_of(k) in tokens]:
                dropped.append(table.pop(key))
        return dropped


def _used(table: OrderedDict, key: Any) -> Any:
    """``table[key]`` (or ``None``), marked most recently used."""
    value = table.get(key)
    if value is not None:
        table.move_to_end(key)
    return value


# Called as ``listener(model, graph_module)`` when a capture leaves the cache, so that
# what was built on it (runners, spliced graphs) goes too: see ``run.executable``.
_RELEASE_LISTENERS: list = []


def on_release(listener: Any) -> None:
    """Register ``listener(model, graph_module)``, called for each captured graph the
    capture cache lets go."""
    _RELEASE_LISTENERS.append(listener)


def _release(model: torch.nn.Module, values: list) -> None:
    graphs = {}
    for value in values:
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, Captured):
                graphs[id(item.graph_module)] = item.graph_module
    for graph_module in graphs.values():
        for listener in _RELEASE_LISTENERS:
            listener(model, graph_module)


def _token_of(key: tuple) -> Any:
    if key[0] in ("dynamic-bases",):
        key = key[1]
    return key[-1]


_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, _Captures]" = weakref.WeakKeyDictionary()


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
    if not any(caches.is_cache(leaf) for leaf in flat):
        return flat, str(spec)
    # a cache object passes as its tensors (see ``caches``): its layout is in the key
    expanded, skeletons = [], []
    for leaf in flat:
        if caches.is_cache(leaf):
            try:
                tensors, skeleton = caches.flatten(leaf)
            except caches.Unsupported:
                expanded.append(leaf)  # (its capture fails and says why)
                continue
            expanded.extend(tensors)
            skeletons.append(skeleton)
        else:
            expanded.append(leaf)
    return expanded, f"{spec} with caches {skeletons!r}"



def signature(model: torch.nn.Module, args: tuple, kwargs: dict,
              flat: tuple[list[Any], Any] | None = None, token: int | None = None) -> tuple:
    """What a capture depends on: input shapes and types, non-tensor inputs, grad mode,
    autocast (:func:`autocast_key`), the torch settings a forward may read
    (:func:`_torch_settings`), and the model's state (a number from
    :func:`state.state_token`: its parameters and buffers, modules, training flags, plain
    attributes and hooks as they are now).

    ``flat`` is ``flat_inputs(args, kwargs)`` where the caller has it already; ``token``
    the model's state token where the caller knows that no code could have changed the
    model since it was found (the state is not compared again)."""
    flat, layout = flat if flat is not None else flat_inputs(args, kwargs)
    parts = []
    device_types = set(_AUTOCAST_DEVICE_TYPES)
    for value in flat:
        if isinstance(value, torch.Tensor):
            parts.append(("T", tuple(value.shape), value.dtype, value.device))
            device_types.add(value.device.type)
        else:
            try:
                hash(value)
                parts.append(("V", value))
            except TypeError:
                parts.append(("V", repr(value)))
    if token is None:
        token = state.state_token(model, _drop_states)
    return (layout, tuple(parts), torch.is_grad_enabled(), autocast_key(device_types),
            _torch_settings(), token)  # (the state token stays last: ``_token_of``)


def _torch_settings() -> tuple:
    """The process-wide torch settings a forward can read and a capture bakes in: the
    default dtype and device (read in Python they are constants of the graph: transformers'
    ``emb.to(torch.get_default_dtype())``), inference mode, deterministic algorithms and
    the float32 matmul precision (a forward may branch on them), and whether parametrized
    tensors are cached (``parametrize.cached()``: a capture would bake the cached tensor
    in, see ``export``), and whether ``nn.MultiheadAttention`` may take its fast path (which
    makes it an opaque call, see ``fast_paths``). A capture made under other settings is another capture, as a
    plain forward would see the change."""
    return (torch.get_default_dtype(), default_device_set(),
            torch.is_inference_mode_enabled(), torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.get_float32_matmul_precision(), parametrization_cache_on(),
            mha_fastpath_enabled())


_AUTOCAST_DEVICE_TYPES = ("cpu", "cuda")  # looked at always (a model may move its inputs)


def autocast_key(device_types: set[str]) -> tuple:
    """``(device type, autocast dtype)`` for each of ``device_types`` where autocast is on:
    the dtypes a forward computes in, so the meta values a capture or scan recorded
    (``.dtype`` in a trace, the checks of writes) hold only in the same autocast state."""
    return tuple((kind, torch.get_autocast_dtype(kind)) for kind in sorted(device_types)
                 if kind != "meta" and torch.is_autocast_enabled(kind))


def _drop_states(model: torch.nn.Module, tokens: set) -> None:
    captures = _CACHE.get(model)
    if captures is not None:
        _release(model, captures.drop_states(tokens))


def general_signature(key: tuple) -> tuple:
    """A signature with each input tensor's shape reduced to its rank."""
    spec, parts, *rest = key
    parts = tuple(("T", len(p[1]), *p[2:]) if p[0] == "T" else p for p in parts)
    return (spec, parts, *rest)


_DYNAMIC_ATTEMPTS = 2  # dynamic captures tried per general signature


def _kept(error: CaptureError) -> CaptureError:
    """A copy of ``error`` without traceback (the cache keeps one, and raises a new copy
    each time: the frames of a traceback would keep the model and the inputs alive)."""
    kept = CaptureError(str(error), error.module_path)
    kept.changes_state = getattr(error, "changes_state", False)
    return kept


def cached_capture(model: torch.nn.Module, args: tuple, kwargs: dict,
                   dynamic: str = "never",
                   flat: tuple[list[Any], Any] | None = None,
                   events_on: torch.nn.Module | None = None,
                   operations: frozenset = frozenset(),
                   dynamic_operations: bool = False, token: int | None = None) -> Captured:
    """Capture once per (model, signature); failures are remembered too (both in a
    bounded LRU, see :data:`MAX_CAPTURES`).

    ``dynamic`` (``"never"``, ``"auto"``, ``"always"``) lets a compiled trace use one
    dynamic-shape capture for many input shapes: ``"always"`` captures dynamically at
    once, ``"auto"`` once inputs of a second shape (same structure) are seen. Where a
    dynamic capture fails or does not fit the inputs, the exact-shape capture is used.

    ``operations`` (a spec of :mod:`fxsight.capture.operations`) is part of the key: a
    capture with operation sites is another capture, of exact shapes unless
    ``dynamic_operations`` (the caller then checks the view's ``symbolic`` sites against
    what it reads: their values are sizes of the capture's shapes).

    ``token``: see :func:`signature`.
    """
    key = signature(model, args, kwargs, flat, token)
    if operations:
        key = (*key[:-1], operations, key[-1])  # (the state token stays last)
        dynamic = dynamic if dynamic_operations else "never"
    cache = _CACHE.get(model)
    if cache is None:
        cache = _CACHE[model] = _Captures()
    if cache.refused is not None:
        raise _kept(cache.refused)
    if dynamic != "never":
        view = cache.view(key)
        if view is None:  # False: known not to have one
            view = _dynamic_view(model, cache, key, args, kwargs, dynamic, events_on,
                                 operations) or False
            cache.put_view(key, view)
        if view is not False:
            return view
    hit = cache.get(key)
    if isinstance(hit, Captured) and hit.decided_by and not _fits_values(hit, args, kwargs):
        hit = None  # (its opaque calls' shapes were recorded for other lengths: again)
        bump("value_recaptures")
    if hit is None:
        shapes = cache.shapes_of(general_signature(key))
        if len(shapes) < 2:
            shapes.add(key)
        try:
            hit = capture_partly(model, args, kwargs, events_on=events_on,
                                 operations=operations)
        except CaptureError as error:
            bump("capture_failures")
            kept = _kept(error)
            if kept.changes_state:
                cache.refused = kept
            _release(model, cache.put(key, kept))
            raise
        _release(model, cache.put(key, hit))
    if isinstance(hit, CaptureError):
        raise _kept(hit)
    return hit


def _fits_values(captured: Captured, args: tuple, kwargs: dict) -> bool:
    """:meth:`Captured.fits_values` of these inputs (read with the user's modes
    suspended)."""
    with user_modes_suspended():
        return captured.fits_values(pytree.tree_leaves((tuple(args), dict(kwargs))))


def _dynamic_view(model: torch.nn.Module, cache: _Captures, key: tuple, args: tuple,
                  kwargs: dict, dynamic: str,
                  events_on: torch.nn.Module | None = None,
                  operations: frozenset = frozenset()) -> Captured | None:
    general = general_signature(key)
    flat = flat_inputs(args, kwargs)[0]
    bases_key = ("dynamic-bases", general)
    bases = cache.get(bases_key)
    if bases is None:
        bases = []
        _release(model, cache.put(bases_key, bases))
    for base in bases:
        if isinstance(base, Captured):
            view = base.bind(flat)
            if view is not None:
                return view
    if len(bases) >= _DYNAMIC_ATTEMPTS:
        return None
    shapes = cache.shapes.get(general, set())
    if dynamic == "auto" and not (shapes - {key}):
        return None  # only one shape seen so far: the exact capture serves it
    try:
        base = capture(model, args, kwargs, dynamic=True, events_on=events_on,
                       operations=operations)
        bump("dynamic_captures")
    except Exception:  # noqa: BLE001 - the exact-shape capture is always a correct fallback
        bump("dynamic_capture_failures")
        bases.append(None)
        return None
    bases.append(base)
    return base.bind(flat)


def forget(model: torch.nn.Module) -> None:
    """Drop every cached capture of ``model`` (after changing its structure)."""
    captures = _CACHE.pop(model, None)
    if captures is not None:
        _release(model, list(captures.entries.values()))
    state.forget(model)
