"""Scan: run a model on fake tensors to learn the shapes at every module boundary."""

from __future__ import annotations

import sys
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from .._torch import (FakeTensorMode, autocast_cache_off, enclosing_checkpoint,
                      fake_cache_unchanged, fake_embedding_takes_meta_weights, pytree,
                      unflatten_keeping_sizes, unflatten_unchecked, unset_fake_temporarily, user_modes_suspended)

from ..errors import TraceError
from ..stats import bump
from . import caches
from .captures import MAX_CAPTURES, flat_inputs, signature
from .buffer_writes import BufferWrites
from .effects import kept_forward_effects
from .state import Watch
from .dispatch import offloaded
from .events import ModuleEvents, silenced_hooks
from .fast_path_outputs import as_plain_output
from .fast_paths import grad_decides_path
from .input_flow import InputFlow, InputReads
from .memory import MemoryNumbers
from .quiet_warnings import held_warnings
from ..record.sites import OUTPUT, Site


@dataclass
class ScanResult:
    """The boundary events of one forward pass, in order, with meta-tensor values."""

    events: list[Site]
    values: dict[Site, Any]
    devices: dict[Site, Any]
    output: Any = None
    index: dict[Site, int] = field(default_factory=dict)
    callees: dict = field(default_factory=dict, repr=False)  # (as ``Captured.callees``)
    # site -> keys of the memory its tensors are in (as ``Captured.alias_keys``): sites
    # whose keys meet hold the same tensor or views of one
    aliases: dict[Site, frozenset] = field(default_factory=dict, repr=False)
    # what the outputs carry of each tensor input (indices in ``captures.flat_inputs``; see
    # ``input_flow``; a cache object's tensors are not followed)
    input_reads: InputReads = InputReads((), 0)
    # the sites whose event the forward reaches inside ``torch.utils.checkpoint`` (in any
    # grad mode): "reentrant" or "non-reentrant" (see ``_torch.enclosing_checkpoint``)
    checkpointed: dict[Site, str] = field(default_factory=dict, repr=False)
    # the names of the model's buffers the forward writes in place (see ``buffer_writes``;
    # with those the scan's forward was seen to change, by value)
    written_buffers: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        self.index = {site: i for i, site in enumerate(self.events)}

    def meta_value(self, site: Site) -> Any:
        """``site``'s value, as meta tensors of its own: a walk may change them in place
        (``h.requires_grad_()``, ``h[:, 0] = 0``) and must not change this scan's."""
        value = self.values[site]
        if any(isinstance(leaf, NestedValue) for leaf in pytree.tree_leaves(value)):
            raise TraceError(
                f"{site.path}.{site.kind} holds a nested tensor (a module inside "
                f"nn.TransformerEncoder's fast path, which runs its layers on nested "
                f"tensors where a src_key_padding_mask is given in eval mode without "
                f"gradients): fxsight cannot read or write it; use the encoder's own "
                f"input or output, or trace with gradients on, in train mode or under "
                f"torch.backends.mha.set_fastpath_enabled(False), as a plain forward "
                f"then takes the path that has per-layer values")
        return _tree_map(_fresh_meta, value)

    def alias_keys(self, site: Site) -> frozenset:
        return self.aliases.get(site, frozenset())

    @property
    def unread_inputs(self) -> frozenset[int]:
        """The tensor inputs no output is computed from."""
        return self.input_reads.unread()


class NestedValue:
    """A nested tensor seen at a boundary (it has no shape to record)."""


def _to_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.is_nested:
        return NestedValue()
    if isinstance(value, torch.Tensor):
        return torch.empty(value.shape, dtype=value.dtype, device="meta")
    return value


def _fresh_meta(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype,
                                   device="meta")
    return value


def _tree_map(fn: Callable[[Any], Any], value: Any) -> Any:
    """``pytree.tree_map(fn, value)``, where a named tuple that checks its fields when
    made (``PackedSequence``: ``batch_sizes`` a tensor on the CPU) is made without its
    checks: it holds the scan's stand-ins (meta tensors, devices)."""
    leaves, spec = pytree.tree_flatten(value)
    mapped = [fn(leaf) for leaf in leaves]
    try:
        return unflatten_keeping_sizes(mapped, spec)
    except (ValueError, TypeError, RuntimeError, AttributeError):
        return unflatten_unchecked(mapped, spec)


def _is_meta_model(model: torch.nn.Module) -> bool:
    """Weights not loaded yet (a model that accelerate offloads holds meta parameters
    too, but its forward loads them: it is run with real values)."""
    return any(p.is_meta for p in model.parameters()) and not offloaded(model)


class _RealProbe(Exception):
    """The fake-tensor scan cannot run this model (skip to the probe)."""


def scan(model: torch.nn.Module, args: tuple, kwargs: dict,
         operations: frozenset = frozenset()) -> ScanResult:
    """Run ``model`` without computing anything real and record every boundary's shapes.

    Works on models whose weights are on the meta device (not loaded yet) too.

    Leaves no trace on the model or the process (a trace's effect is a plain forward's
    alone): the user's forward hooks do not run (they would see fake tensors), the global
    random generators are restored, buffers the forward changes in place are put back
    (fake mode runs an operation on real tensors for real where none of its inputs is
    fake: ``self.num_batches_tracked += 1``), and so is the model's Python state. Under
    ``torch.autocast`` it runs with autocast's cache of weight casts off, so it neither
    fills the user's cache with fake casts nor reads it.
    """
    values: dict[Site, Any] = {}
    devices: dict[Site, Any] = {}
    aliases: dict[Site, frozenset] = {}
    checkpointed: dict[Site, str] = {}
    number = MemoryNumbers()

    modules = dict(model.named_modules(remove_duplicate=False))

    def record(site: Site, value: Any) -> None:
        if site.kind == OUTPUT:
            value = as_plain_output(modules.get(site.path), value)
        with unset_fake_temporarily():  # plain meta tensors, not fakes of this scan's mode
            values[site] = _tree_map(_to_meta, value)
        devices[site] = _tree_map(
            lambda v: v.device if isinstance(v, torch.Tensor) and not v.is_nested else None,
            value)
        aliases[site] = frozenset(number(leaf) for leaf in pytree.tree_leaves(value)
                                  if isinstance(leaf, torch.Tensor))
        checkpoint = enclosing_checkpoint(sys._getframe(1))
        if checkpoint is not None:
            checkpointed[site] = checkpoint

    # (observed as the hooks backend observes it: the path a plain forward takes)
    events = ModuleEvents(model, record, operations=operations, keep_fast_paths=True)
    writes = BufferWrites(model)
    changed: list[torch.Tensor] = []
    before = Watch(model, 0)
    try:
        # (a user's dispatch mode or saved-tensor hooks around the trace see its forward
        # only; fxsight's own modes, entered after, stay)
        with user_modes_suspended(), silenced_hooks(model), \
                kept_forward_effects(model, args, kwargs, changed), autocast_cache_off(), \
                fake_cache_unchanged():
            output, events, reads = _run(model, args, kwargs, events, record,
                                          (values, devices, aliases, checkpointed), writes)
    finally:
        if not before.unchanged():  # the forward changed the model: undone (a trace
            before.restore()        # changes it only as the plain forward does)
    bump("scans")
    changed_ids = {id(t) for t in changed}
    written = writes.names | {name for name, b in model.named_buffers(remove_duplicate=False)
                              if id(b) in changed_ids}
    return ScanResult(list(events.order), values, devices, _tree_map(_to_meta, output),
                      callees=dict(events.callees), aliases=aliases, input_reads=reads,
                      checkpointed=checkpointed, written_buffers=frozenset(written))


def _run(model, args, kwargs, events, record, recorded, writes):
    def where() -> str:  # (the module running now: names an attention)
        return events.stack[-1] if events.stack else ""

    observe = writes.observe if writes.watched else None  # (the buffers written)

    # without gradients, but in the trace's grad mode where a module chooses its path by
    # it (nn.MultiheadAttention's fused fast path), so that the scan takes the path the
    # plain forward takes
    with torch.set_grad_enabled(torch.is_grad_enabled() and grad_decides_path(model)):
        try:
            if offloaded(model):  # weights loaded by accelerate in each forward: real
                raise _RealProbe  # tensors only (a probe with the real values)
            # inputs made fake too: models then take their tracing paths (transformers
            # skips data-dependent checks on fake tensors), for real and meta weights alike
            mode = FakeTensorMode(allow_non_fake_inputs=True)
            fake = mode.from_tensor
            if _is_meta_model(model) and not fake_embedding_takes_meta_weights():
                def fake(tensor):  # (torch before 2.13: meta weights take meta inputs only)
                    return mode.from_tensor(tensor.to("meta"))
            fake_args, fake_kwargs = pytree.tree_map_only(torch.Tensor, fake, (args, kwargs))
            flow = InputFlow(_followed(args, kwargs, (fake_args, fake_kwargs)), where,
                             observe)
            # (a cache object among the inputs: a copy, the user's is not updated)
            fake_args, fake_kwargs = caches.copied(fake_args, fake_kwargs, fake)
            with events.installed(), mode, flow:
                output = model(*fake_args, **fake_kwargs)
        except Exception:  # noqa: BLE001 - data-dependent code: probe with real values
            writes.forget_views()
            for table in recorded:
                table.clear()
            events = ModuleEvents(model, record, operations=events.operations,
                                  keep_fast_paths=True)
            if _is_meta_model(model):
                meta_args, meta_kwargs = pytree.tree_map(_to_meta, (args, kwargs))
                flow = InputFlow(_followed(args, kwargs, (meta_args, meta_kwargs)), where)
                meta_args, meta_kwargs = caches.copied(meta_args, meta_kwargs, _to_meta)
                with events.installed(), flow:
                    output = model(*meta_args, **meta_kwargs)
            else:
                flow = InputFlow(_followed(args, kwargs, (args, kwargs)), where, observe)
                args, kwargs = caches.copied(args, kwargs, torch.Tensor.clone)
                with events.installed(), flow:
                    output = model(*args, **kwargs)
                bump("real_scans")
    writes.forget_views()
    return output, events, flow.reads(output)


def _followed(args: tuple, kwargs: dict, given: tuple) -> list[Any]:
    """The tensors the forward is given (``given``: ``(args, kwargs)`` as it gets them,
    with the same layout) for each of ``flat_inputs(args, kwargs)``, ``None`` where none
    is followed (not a tensor; a cache object's tensors, which it gets as a copy)."""
    real = pytree.tree_leaves((args, kwargs))
    passed = pytree.tree_leaves(given)
    by_id = {id(r): p for r, p in zip(real, passed) if isinstance(r, torch.Tensor)}
    return [by_id.get(id(value)) if isinstance(value, torch.Tensor) else None
            for value in flat_inputs(args, kwargs)[0]]


_CACHE: "weakref.WeakKeyDictionary[torch.nn.Module, OrderedDict]" = \
    weakref.WeakKeyDictionary()


def cached_scan(model: torch.nn.Module, args: tuple, kwargs: dict,
                operations: frozenset = frozenset()) -> ScanResult:
    """``scan`` once per (model, input signature, operations spec), for the last
    ``MAX_CAPTURES`` signatures (an LRU, as the captures')."""
    key = (signature(model, args, kwargs), operations)
    per_model = _CACHE.get(model)
    if per_model is None:
        per_model = _CACHE[model] = OrderedDict()
    result = per_model.get(key)
    if result is None:
        # (the model's warnings in a scan are dropped: the run that follows issues them,
        # as the plain forward does, once; a capture's scan replays them, see export.py)
        with held_warnings():
            result = per_model[key] = scan(model, args, kwargs, operations)
        while len(per_model) > MAX_CAPTURES:
            per_model.popitem(last=False)
    else:
        per_model.move_to_end(key)
    return result
