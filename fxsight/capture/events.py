"""Observing module boundaries with forward hooks, with a guarantee that they are removed."""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator

import torch

from .._torch import forward_hook_dicts
from ..record.sites import INPUT, OUTPUT, Site

# on_event(site, value) -> replacement value or None; value is (args, kwargs) for inputs.
EventHandler = Callable[[Site, Any], Any]


def module_paths(model: torch.nn.Module) -> dict[torch.nn.Module, str]:
    """Each module of ``model`` with its dotted path (the first path of a shared module)."""
    paths: dict[torch.nn.Module, str] = {}
    for path, module in model.named_modules():
        paths.setdefault(module, path)
    return paths


class ModuleEvents:
    """Calls a handler at each module's inputs and output, counting calls per module.

    ``stack`` holds the paths of the modules running now: after an exception it names the
    innermost module that failed.

    Only calls made in the thread that created it are events: a forward of the same model
    in another thread (the user's own, plain) sees none of its handler's effects.
    """

    def __init__(self, model: torch.nn.Module, on_event: EventHandler,
                 only: set[str] | None = None):
        self.model = model
        self.on_event = on_event
        self.only = only
        self.calls: dict[str, int] = {}
        self.stack: list[str] = []
        self.order: list[Site] = []
        # while paused, module calls are not events (a module the handler itself calls,
        # e.g. an envoy applied to a traced value, is not a call of the model's forward)
        self.paused = False
        self.thread = threading.get_ident()

    @contextlib.contextmanager
    def installed(self) -> Iterator["ModuleEvents"]:
        handles = []
        try:
            for module, path in module_paths(self.model).items():
                if self.only is not None and path not in self.only:
                    continue
                handles.append(module.register_forward_pre_hook(
                    self._pre_hook(path), with_kwargs=True))
                handles.append(module.register_forward_hook(
                    self._post_hook(path)))
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _pre_hook(self, path: str):
        def hook(module, args, kwargs):
            if self.paused or threading.get_ident() != self.thread:
                return None
            call = self.calls.get(path, 0)
            self.calls[path] = call + 1
            self.stack.append(path)
            site = Site(path, INPUT, call)
            self.order.append(site)
            new = self.on_event(site, (args, kwargs))
            return new
        return hook

    def _post_hook(self, path: str):
        def hook(module, args, output):
            if self.paused or threading.get_ident() != self.thread:
                return None
            if self.stack and self.stack[-1] == path:
                self.stack.pop()
            elif path in self.stack:  # an exception unwound through inner modules
                return None
            site = Site(path, OUTPUT, self.calls[path] - 1)
            self.order.append(site)
            return self.on_event(site, output)
        return hook


@contextlib.contextmanager
def silenced_hooks(model: torch.nn.Module) -> Iterator[None]:
    """While active, the forward hooks and pre-hooks already on ``model``'s modules (and
    torch's global ones) do nothing for calls made in this thread: a scan runs the model
    on fake tensors, and a user's hook must only ever see the real values of a forward.

    Each hook is wrapped in place (same key, so the hook dicts keep their order and the
    capture state sees no change) and put back in ``finally``; other threads' calls still
    run it."""
    thread = threading.get_ident()
    wrapped: list[tuple[dict, Any, Any, Any]] = []

    def guard(hook):
        def guarded(*args, **kwargs):
            if threading.get_ident() == thread:
                return None
            return hook(*args, **kwargs)
        return guarded

    try:
        for hooks in (*forward_hook_dicts(None),
                      *(d for m in module_paths(model) for d in forward_hook_dicts(m))):
            for key, hook in list(hooks.items()):
                new = guard(hook)
                hooks[key] = new
                wrapped.append((hooks, key, new, hook))
        yield
    finally:
        for hooks, key, new, hook in reversed(wrapped):
            if hooks.get(key) is new:
                hooks[key] = hook
