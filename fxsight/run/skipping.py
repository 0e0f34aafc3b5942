"""Skipped module calls on the hooks backend (``.skip(v)``): the call returns the skip value
and runs nothing of the module's own computation, as the forward with the module replaced.

torch cannot skip a module from a hook, so the module's ``forward`` is replaced for the run;
the forward pre-hooks by which torch computes a module's weight before each call
(:func:`~fxsight.capture.model_hooks.is_weight_reparametrization`: the hook-based
``weight_norm`` and ``spectral_norm``, ``torch.nn.utils.prune``'s masks) are part of that
computation, and do nothing on a skipped call: a skipped ``spectral_norm`` layer in train
mode leaves its vectors ``u``, ``v`` as they were, as on fx (where the hooks are refused and
parametrizations run inside the skipped forward)."""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator

import torch.nn as nn

from ..capture.events import ModuleEvents, observed_forward
from ..capture.model_hooks import is_weight_reparametrization
from ..record.program import Node, map_nodes
from ..record.sites import INPUT, OUTPUT, Site
from ..splice.walker import Walker

_NO_FORWARD = object()


@contextlib.contextmanager
def skipping(model: nn.Module, skips: list[Node], walker: Walker,
             events: ModuleEvents, index: dict[Site, int]) -> Iterator[None]:
    """While active, each skipped module call returns its skip value instead of running.

    A forward pre-hook cannot skip a module in torch, so the module's ``forward`` is
    replaced by an instance attribute for the run (restored in ``finally``; where the
    events wrap the module's forward, ``ObservedForward``, what the wrapper calls); its hooks
    still fire, so the skip's write and later reads happen at its output event, but for
    torch's weight reparametrizations, which do nothing on a skipped call (wrapped in
    place, same key, restored in ``finally``). Calls that are no events (another
    thread's, or a module call of the Program itself, made while ``events.paused``) run
    the module's own forward and hooks. The calls a skipped call would have made inside it
    are counted as made (``index``: the forward's events), so that a later call of a
    submodule has the number it has in the forward, as on fx."""
    saved: list[tuple[nn.Module, Any]] = []
    wrapped: list[tuple[dict, Any, Callable, Callable]] = []
    try:
        for node in skips:
            site: Site = node.site
            module = model.get_submodule(site.path)
            if any(m is module for m, _ in saved):
                continue
            calls = {n.site.call: n for n in skips if n.site.path == site.path}
            wrapped.extend(_reparametrizations_skipped(module, site.path, set(calls),
                                                       events))
            observed = observed_forward(module)
            if observed is not None:  # (its events wrap its forward: skipped inside them)
                saved.append((module, observed.inner))
                observed.inner = _skipped_forward(observed.inner, site.path, calls, walker,
                                                  events, index)
                continue
            saved.append((module, module.__dict__.get("forward", _NO_FORWARD)))
            module.forward = _skipped_forward(module.forward, site.path, calls, walker,
                                              events, index)
        yield
    finally:
        for hooks, key, new, hook in reversed(wrapped):
            if hooks.get(key) is new:
                hooks[key] = hook
        for module, previous in reversed(saved):
            observed = observed_forward(module)
            if observed is not None:
                observed.inner = previous
            elif previous is _NO_FORWARD:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = previous


def _skips_now(events: ModuleEvents, path: str, calls: set[int], upcoming: bool) -> bool:
    """Whether the call of the module at ``path`` running now (``upcoming``: about to be
    counted, from a pre-hook that runs before fxsight's own) is one of ``calls`` skipped:
    a call of the forward, in the trace's thread."""
    if threading.get_ident() != events.thread or events.paused:
        return False
    return events.calls.get(path, 0) - (0 if upcoming else 1) in calls


def _reparametrizations_skipped(module: nn.Module, path: str, calls: set[int],
                                events: ModuleEvents) -> list[tuple[dict, Any, Callable,
                                                                    Callable]]:
    """Wrap ``module``'s weight-reparametrization pre-hooks in place so that they do
    nothing on the skipped ``calls``; returns ``(hooks, key, wrapper, hook)`` of each.
    (They run before fxsight's own pre-hook, registered last: the call is the next one.)"""
    hooks = module._forward_pre_hooks
    wrapped = []
    for key, hook in list(hooks.items()):
        if not is_weight_reparametrization(hook):
            continue

        def unless_skipped(*args, _hook=hook, **kwargs):
            if _skips_now(events, path, calls, upcoming=True):
                return None
            return _hook(*args, **kwargs)

        hooks[key] = unless_skipped
        wrapped.append((hooks, key, unless_skipped, hook))
    return wrapped


def _skipped_forward(original: Callable, path: str, calls: dict[int, Node],
                     walker: Walker, events: ModuleEvents, index: dict[Site, int]):
    skipped = set(calls)

    def forward(*args, **kwargs):
        if not _skips_now(events, path, skipped, upcoming=False):
            # (another thread's call, the Program's own call of the module, a call not
            # skipped)
            return original(*args, **kwargs)
        call = events.calls.get(path, 0) - 1
        _count_calls_inside(events, index, path, call)
        return map_nodes(calls[call].args[0], walker.values.__getitem__)

    return forward


def _count_calls_inside(events: ModuleEvents, index: dict[Site, int], path: str,
                        call: int) -> None:
    """Count the calls of submodules and operations that call ``call`` of the module at
    ``path`` makes in the forward (between its input and output events), as made."""
    start = index.get(Site(path, INPUT, call))
    end = index.get(Site(path, OUTPUT, call))
    if start is None or end is None:
        return
    prefix = f"{path}." if path else ""
    for site, position in index.items():
        if start < position < end and site.kind == INPUT and site.path.startswith(prefix):
            events.calls[site.path] = events.calls.get(site.path, 0) + 1
