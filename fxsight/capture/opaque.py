"""Opaque calls: a module that cannot be captured runs as one call inside an otherwise
captured graph.

Where ``torch.export`` fails inside module X (data-dependent expert routing, a forward
that changes its own Python state, ...), :func:`capture_partly` captures the model again
with X's call routed through ``fxsight::opaque``: a custom operator whose real
implementation calls X's forward on the real inputs at run time, and whose fake
implementation returns tensors shaped like X's outputs as a forward of the same inputs
recorded them. X's input and output stay sites (their boundary markers are in place);
what runs inside X is not in the graph (reading or writing a site inside X runs the
trace on hooks, see ``run.forward``), the rest of the model is captured, pruned, spliced
and compiled as usual.

Nothing is left on the user's model: X's ``forward`` is an instance attribute only while
``torch.export`` traces (in this thread); the operator finds X through a registry entry
that holds X weakly. The entry lives as long as a graph calls it: the graph's
``fxsight::opaque`` nodes hold it (``node.meta``, which copies of the graph share), so
captures that leave the capture cache take their entries with them.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from .._torch import (FakeTensorMode, autocast_cache_off, fake_cache_unchanged, pytree,
                      unset_fake_temporarily, user_modes_suspended)
from ..record.sites import OUTPUT, Site
from .events import ModuleEvents
from .fast_path_outputs import as_plain_output
from .fast_paths import attention_adds_its_keys, attention_key_argument
from .effects import kept_forward_effects
from .state import Watch

MAX_OPAQUE = 8  # modules made opaque in one capture, at most

# the Python values an opaque call may take or return besides tensors: they are constants
# of the captured graph (anything else, a cache object, would be stale at run time)
_PLAIN = (type(None), bool, int, float, str, torch.dtype, torch.device)


@dataclass
class _Call:
    """One opaque call: the module (weakly), how its inputs and output are laid out."""

    path: str
    module: Any                       # weakref.ref to the module
    in_spec: Any
    in_constants: list[Any]           # TENSOR where a tensor goes
    n_tensors: int
    out_spec: Any
    out_constants: list[Any]
    out_metas: list[tuple]            # (shape, dtype, device, stride) of each output
    reason: str
    grad_enabled: bool = True         # the grad mode the forward was captured in
    attention_key: int | None = None  # an attention module's: its key tensor's index
    adds_keys: bool = False           # whether its output adds that tensor back


TENSOR = object()  # where a tensor goes among a call's constants

_CALLS: "weakref.WeakValueDictionary[str, _Call]" = weakref.WeakValueDictionary()
_KEYS = itertools.count()
_LOCK = threading.Lock()
_HELD = "fxsight_opaque_call"  # the node.meta key of the _Call an opaque node calls


def _register(call: _Call, kept: list[_Call]) -> str:
    """The key of ``call``, held by ``kept`` until :func:`hold_calls` hands it to the
    graph's node."""
    with _LOCK:
        key = f"opaque{next(_KEYS)}"
        _CALLS[key] = call
    kept.append(call)
    return key


def hold_calls(graph: torch.fx.Graph) -> None:
    """Make each ``fxsight::opaque`` node of ``graph`` hold the registry entry it calls:
    the entry then lives as long as a graph (or a copy of it) calls it."""
    for node in graph.nodes:
        if node.op == "call_function" and node.target is OPAQUE:
            node.meta[_HELD] = _CALLS[node.args[1]]


@torch.library.custom_op("fxsight::opaque", mutates_args=())
def opaque(inputs: list[torch.Tensor], key: str) -> list[torch.Tensor]:
    """Call the module registered under ``key`` on ``inputs`` (its tensors, then its
    parameters, which are there for autograd to see); its output tensors, as new tensors."""
    call = _CALLS.get(key)
    module = call.module() if call is not None else None
    if module is None:
        raise RuntimeError(f"fxsight: the module of opaque call {key!r} is gone")
    tensors = iter(inputs[:call.n_tensors])
    leaves = [next(tensors) if c is TENSOR else c for c in call.in_constants]
    args, kwargs = pytree.tree_unflatten(leaves, call.in_spec)
    # in the captured grad mode, not the one autograd runs an operator's forward in (off):
    # some kernels choose by it (an LSTM's on CPU: 7e-9 off in fp32 without this)
    with torch.set_grad_enabled(call.grad_enabled):
        output = module.forward(*args, **kwargs)
    flat = [v.detach() for v in pytree.tree_leaves(output) if isinstance(v, torch.Tensor)]
    if len(flat) != len(call.out_metas):
        raise RuntimeError(f"fxsight: module {call.path!r} returned {len(flat)} tensors, "
                           f"{len(call.out_metas)} when it was captured")
    seen = {t.untyped_storage().data_ptr() for t in inputs if t.numel()}
    out = []
    for tensor, (shape, dtype, _, stride) in zip(flat, call.out_metas):
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise RuntimeError(f"fxsight: module {call.path!r} returned a {tensor.dtype} "
                               f"tensor of shape {tuple(tensor.shape)} where the captured "
                               f"graph has {dtype} {shape} (its output shape depends on "
                               f"data); trace with backend='hooks'")
        if tensor.stride() != stride or (
                tensor.numel() and tensor.untyped_storage().data_ptr() in seen):
            # the layout the plain forward gives (a batch-first LSTM's output is a
            # transposed view: later kernels run on it as in the plain forward, bit for
            # bit); an operator's outputs never alias its inputs
            tensor = torch.empty_strided(shape, stride, dtype=dtype,
                                         device=tensor.device).copy_(tensor)
        seen.add(tensor.untyped_storage().data_ptr())
        out.append(tensor)
    return out


def deciding_inputs(graph: torch.fx.Graph, leaves: list[Any]
                    ) -> tuple[tuple[int, torch.Tensor], ...]:
    """Where an opaque call of ``graph`` takes a tensor whose size depends on data (a
    ``PackedSequence``'s data, as long as the sum of its lengths): the model's integer
    tensors on the CPU among its flat inputs ``leaves`` (index, a copy of the value), whose
    values decide such sizes (``pack_padded_sequence`` takes its lengths there); the
    output shapes the capture recorded for the call hold only for these values. ``()``
    where no opaque call takes such a tensor. (A size decided by other values, a float
    tensor's, is checked when the call runs, see :func:`opaque`.)"""
    if not any(node.op == "call_function" and node.target is OPAQUE and any(
            _data_sized(arg.meta.get("val")) for arg in node.args[0]
            if isinstance(arg, torch.fx.Node)) for node in graph.nodes):
        return ()
    return tuple((index, value.detach().clone()) for index, value in enumerate(leaves)
                 if isinstance(value, torch.Tensor) and value.device.type == "cpu"
                 and not value.is_floating_point() and not value.is_complex()
                 and value.numel() <= _MAX_DECIDING_NUMEL)


_MAX_DECIDING_NUMEL = 1 << 16  # (lengths, not token ids of a long batch: not kept)


def _data_sized(value: Any) -> bool:
    """Whether a fake tensor has a size known only from data (an unbacked symbolic size)."""
    return isinstance(value, torch.Tensor) and any(
        isinstance(size, torch.SymInt) and size.node.hint is None for size in value.shape)


@opaque.register_fake
def _opaque_fake(inputs, key):
    call = _CALLS[key]
    return [torch.empty_strided(shape, stride, dtype=dtype, device=device)
            for shape, dtype, device, stride in call.out_metas]


def _no_backward(ctx, grads):
    call = _CALLS.get(ctx.key)
    path = call.path if call is not None else "?"
    raise RuntimeError(f"fxsight: module {path!r} ran as an opaque call inside a captured "
                       f"graph; gradients through it are not computed (trace with "
                       f"backend='hooks')")


def _setup(ctx, inputs, output):
    ctx.key = inputs[1]


opaque.register_autograd(_no_backward, setup_context=_setup)

OPAQUE = torch.ops.fxsight.opaque.default


def opaque_modules(graph_module: torch.fx.GraphModule) -> list[str]:
    """The paths of the modules that run as opaque calls in ``graph_module``."""
    paths = []
    for node in graph_module.graph.nodes:
        if node.op == "call_function" and node.target is OPAQUE:
            call = _CALLS.get(node.args[1])
            if call is not None and call.path not in paths:
                paths.append(call.path)
    return paths


# --- recording the outputs a capture's fake implementation returns -----------------------

def record_outputs(model: torch.nn.Module, args: tuple, kwargs: dict,
                   events_on: torch.nn.Module) -> dict[Site, Any]:
    """Every module's output (meta tensors, device in ``_device``) in a forward of these
    inputs: on fake tensors, or for real (without gradients) where the model's code
    depends on data. The model's Python state, its buffers and the random generators are
    put back afterwards (a trace changes them only as the plain forward does), and
    autocast's cache of weight casts is neither filled nor read (``autocast_cache_off``)."""
    outputs: dict[Site, Any] = {}
    modules = dict(events_on.named_modules())

    def record(site: Site, value: Any) -> None:
        if site.kind == OUTPUT:
            # (the value the real forward returns: None where a fused kernel's fake gives
            # an empty tensor, which the opaque call's real output must match)
            value = as_plain_output(modules.get(site.path), value)
            with unset_fake_temporarily():
                outputs[site] = pytree.tree_map(_meta, value)

    before = Watch(model, 0)
    try:
        # (a user's dispatch mode sees the trace's forward only)
        with user_modes_suspended(), autocast_cache_off(), fake_cache_unchanged(), \
                kept_forward_effects(model, args, kwargs):
            _forward_recording(model, args, kwargs, events_on, record, outputs)
    finally:
        if not before.unchanged():
            before.restore()
    return outputs


def _forward_recording(model: torch.nn.Module, args: tuple, kwargs: dict,
                       events_on: torch.nn.Module, record: Callable[[Site, Any], None],
                       outputs: dict[Site, Any]) -> None:
    """A forward of ``model`` with ``record`` called at every event of ``events_on``'s
    modules: on fake tensors, or for real where the model's code depends on data."""
    try:
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        fake = pytree.tree_map_only(torch.Tensor, mode.from_tensor, (args, kwargs))
        with torch.no_grad(), ModuleEvents(events_on, record).installed(), mode:
            model(*fake[0], **fake[1])
    except Exception:  # noqa: BLE001 - data-dependent code: record with real values
        outputs.clear()
        with torch.no_grad(), ModuleEvents(events_on, record).installed():
            model(*args, **kwargs)


class _Meta:
    """A recorded output tensor: shape, dtype, device and its layout's strides (a
    pytree leaf)."""

    __slots__ = ("shape", "dtype", "device", "stride")

    def __init__(self, tensor: torch.Tensor):
        self.shape, self.dtype, self.device = tuple(tensor.shape), tensor.dtype, tensor.device
        self.stride = dense_stride(tensor)


def dense_stride(tensor: torch.Tensor) -> tuple[int, ...]:
    """``tensor``'s strides where they lay it out densely (a permutation of a contiguous
    layout: a transposed or ``channels_last`` tensor), else the contiguous strides (a view
    into a larger tensor is returned as a tensor of its own)."""
    shape, stride = tuple(tensor.shape), tuple(tensor.stride())
    order = sorted(range(len(shape)), key=lambda d: (stride[d], shape[d]))
    expected, dense = 1, True
    for dim in order:
        if shape[dim] != 1 and stride[dim] != expected:
            dense = False
            break
        expected *= shape[dim]
    if dense:
        return stride
    contiguous, size = [], 1
    for extent in reversed(shape):
        contiguous.append(size)
        size *= max(extent, 1)
    return tuple(reversed(contiguous))


class _Nested:
    """A recorded nested tensor (inside a ``TransformerEncoder``'s fast path): no shape
    of its own; a module that returns one cannot be an opaque call."""


def _meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_nested:
        return _Nested()
    return _Meta(value) if isinstance(value, torch.Tensor) else value


# --- routing calls while capturing ---------------------------------------------------------

class Unroutable(Exception):
    """A module whose call cannot be opaque (a non-plain Python value in or out)."""


@contextlib.contextmanager
def routed(events_on: torch.nn.Module, reasons: dict[str, str],
           outputs: dict[Site, Any], kept: list) -> Iterator[None]:
    """While ``torch.export`` traces (in this thread), the modules at ``reasons``' paths
    run as ``fxsight::opaque`` calls returning what ``outputs`` recorded; ``kept`` holds
    the registry entries of the calls made (until :func:`hold_calls`)."""
    thread = threading.get_ident()
    installed = []
    try:
        for path, reason in reasons.items():
            module = events_on.get_submodule(path)
            previous = vars(module).get("forward", _MISSING)
            vars(module)["forward"] = _router(module, path, reason, outputs, thread, kept)
            installed.append((module, previous))
        yield
    finally:
        for module, previous in installed:
            if previous is _MISSING:
                vars(module).pop("forward", None)
            else:
                vars(module)["forward"] = previous


_MISSING = object()


def _router(module: torch.nn.Module, path: str, reason: str, outputs: dict[Site, Any],
            thread: int, kept: list) -> Any:
    original = module.forward  # (the class's, or the instance's own)
    calls = itertools.count()
    ref = weakref.ref(module)

    def forward(*args, **kwargs):
        if threading.get_ident() != thread:
            return original(*args, **kwargs)
        call = next(calls)
        recorded = outputs.get(Site(path, OUTPUT, call))
        if recorded is None:
            raise Unroutable(f"module {path!r}: no output recorded for call #{call}")
        flat, spec = pytree.tree_flatten((args, kwargs))
        for value in flat:
            if not isinstance(value, (torch.Tensor, *_PLAIN)):
                raise Unroutable(f"module {path!r} takes a {type(value).__name__}")
        tensors = [v for v in flat if isinstance(v, torch.Tensor)]
        out_flat, out_spec = pytree.tree_flatten(recorded)
        for value in out_flat:
            if not isinstance(value, (_Meta, *_PLAIN)):
                raise Unroutable(f"module {path!r} returns a {type(value).__name__}")
        key = _register(_Call(path, ref, spec,
                              [TENSOR if isinstance(v, torch.Tensor) else v for v in flat],
                              len(tensors), out_spec,
                              [TENSOR if isinstance(v, _Meta) else v for v in out_flat],
                              [(m.shape, m.dtype, m.device, m.stride) for m in out_flat
                               if isinstance(m, _Meta)], reason, torch.is_grad_enabled(),
                              _attention_key(module, args, kwargs, tensors),
                              attention_adds_its_keys(module)),
                        kept)
        parameters = [p for p in module.parameters()]
        results = iter(opaque(tensors + parameters, key))
        leaves = [next(results) if c is TENSOR else c
                  for c in _CALLS[key].out_constants]
        return pytree.tree_unflatten(leaves, out_spec)

    return forward


def _attention_key(module: torch.nn.Module, args: tuple, kwargs: dict,
                   tensors: list[torch.Tensor]) -> int | None:
    """For a module whose fast path is an attention (a batch-first
    ``nn.MultiheadAttention``, an ``nn.TransformerEncoderLayer``): the index among
    ``tensors`` (its call's) of the argument whose tokens are the attention's keys."""
    key = attention_key_argument(module, args, kwargs)
    if key is None:
        return None
    return next((i for i, t in enumerate(tensors) if t is key), None)


def attention_key(target: Any, args: tuple) -> tuple[Any, bool] | None:
    """Where ``target`` of ``args`` is an opaque call of a module whose fast path is an
    attention (the padding checks see it as the attention kernel it runs): its key
    argument (a leaf of its inputs: a graph node, a tensor) and whether the module's
    output adds it back (an encoder layer's residual connections), else ``None``."""
    if target is not OPAQUE or len(args) < 2 or not isinstance(args[1], str):
        return None
    call = _CALLS.get(args[1])
    if call is None or call.attention_key is None or \
            not isinstance(args[0], (list, tuple)) or len(args[0]) <= call.attention_key:
        return None
    return args[0][call.attention_key], call.adds_keys


def ignored_changes(reasons: dict[str, str]) -> set[str]:
    """The state changes ``routed`` makes (``state.Watch.changes``' words)."""
    return {f"module {(path or 'model')!r}, attribute 'forward' (added)" for path in reasons}


_CHANGED = re.compile(r"^module '([^']+)'")


def changed_module(change: str) -> str | None:
    """The module path of a state change in ``state.Watch.changes``' words."""
    found = _CHANGED.match(change)
    return found.group(1) if found else None
