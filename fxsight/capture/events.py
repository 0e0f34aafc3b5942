"""Observing module boundaries with forward hooks, with a guarantee that they are removed
(or, where a hook would change the path the forward takes, with the module's ``forward``
wrapped: :class:`ObservedForward`)."""

from __future__ import annotations

import contextlib
import threading
import types
from typing import Any, Callable, Iterator

import torch

from .._torch import forward_hook_dicts, pytree
from ..record.sites import INPUT, OUTPUT, Site
from . import operations as ops
from .fast_paths import hook_sensitive_modules
from .model_hooks import is_traced_hook
from .module_tree import first_paths

# on_event(site, value) -> replacement value or None; value is (args, kwargs) for inputs.
EventHandler = Callable[[Site, Any], Any]


def module_paths(model: torch.nn.Module) -> dict[torch.nn.Module, str]:
    """Each module of ``model`` with its dotted path (the first path of a shared module),
    walked again only where the tree changed (:func:`module_tree.first_paths`)."""
    return first_paths(model)


def _replaced(before: Any, after: Any) -> list:
    """``(original, replacement, its version)`` for each tensor leaf of ``before`` that
    ``after`` replaces (a boundary marker's copy, a written value)."""
    old, new = pytree.tree_leaves(before), pytree.tree_leaves(after)
    if len(old) != len(new):
        return []
    return [(o, n, n._version) for o, n in zip(old, new)
            if isinstance(o, torch.Tensor) and isinstance(n, torch.Tensor) and o is not n]


def _run_before_traced_hooks(hooks: dict, key: int) -> list | None:
    """Move the hooks that a capture traces (transformers' output-capturing hooks,
    installed on the first forward asking ``output_hidden_states``/``output_attentions``)
    after the forward hook ``key`` (the last of ``hooks``), the others keeping their order:
    they only collect the module's output into the model's, so they must see the value an
    intervention gives, as every other user of the output does (was: a written block's
    output came back unwritten in ``output.hidden_states`` once those hooks were
    installed, on both backends). Returns the keys' order before (for
    :func:`_put_back_order`), or None where nothing moved."""
    keys = list(hooks)
    traced = [k for k in keys[:-1] if is_traced_hook(hooks[k])]
    if not traced or keys[-1] != key:
        return None
    for later in traced:
        hooks.move_to_end(later)
    return keys[:-1]


def _put_back_order(hooks: dict, order: list) -> None:
    """Put ``hooks`` back in ``order`` (keys added since go after them, in their order)."""
    known = set(order)
    added = [k for k in hooks if k not in known]
    for key in (*order, *added):
        if key in hooks:
            hooks.move_to_end(key)


_ABSENT = object()  # (an instance attribute that was not there)
_CALLED = "__fxsight_called__"  # (attribute of a dispatcher's wrapper: the function it calls)
# (attribute of an enclosing function's wrapper, set by a nested function's dispatcher for
# the one call it wraps: ``((path, tree), ...)``, the nested functions' names for the same
# call, whose operations the callee's calls are too)
_ALSO = "__fxsight_also__"


def _wrapper_also(wrapper: Any, names: tuple[tuple[str, dict], ...]) -> Any:
    """``wrapper`` (an enclosing function's operation wrapping a call) told that the call
    is the operations ``names`` too (``(path, tree)``: ``tree`` instruments the callee's
    operations under ``path``)."""
    def call(*args, **kwargs):
        setattr(wrapper, _ALSO, names)
        return wrapper(*args, **kwargs)
    return call


def _within(enclosing: Any, dispatch: Any, names: dict[str, str]) -> Any:
    """The dispatcher of a function defined inside an instrumented one: each call is an
    operation of both (``inner_0.source.torch_tanh_0`` and the enclosing function's
    ``torch_tanh_0``), ``dispatch``'s events around ``enclosing``'s."""
    def both(fn, name):
        outer = names.get(name)
        return dispatch(fn if outer is None else enclosing(fn, outer), name)
    both.instrumenting = dispatch.instrumenting
    return both


class ModuleEvents:
    """Calls a handler at each module's inputs and output, counting calls per module.

    ``stack`` holds the paths of the modules running now: after an exception it names the
    innermost module that failed.

    Only calls made in the thread that created it are events: a forward of the same model
    in another thread (the user's own, plain) sees none of its handler's effects.
    """

    def __init__(self, model: torch.nn.Module, on_event: EventHandler,
                 only: set[str] | None = None, operations: frozenset = frozenset(),
                 copy_back: bool = False, keep_fast_paths: bool = False):
        self.model = model
        # observe the modules whose forward hooks would turn an enclosing module's fast
        # path off (``fast_paths.hook_sensitive_modules``) by their ``forward`` instead,
        # so that the forward takes the path a plain one takes (a real run, a scan of it)
        self.keep_fast_paths = keep_fast_paths
        self.on_event = on_event
        self.only = only
        # ``on_event`` gives operations copies of their arguments (boundary markers): what
        # an operation changes in place in one is copied back to the argument. Otherwise
        # a value it gives is a written one, and the model's argument stays as it is.
        self.copy_back = copy_back
        # the operations spec (see ``capture.operations``): calls inside forwards that are
        # events too, sites ``<module>.source.<op>``; ``callees``: op path -> the function
        # it called, an ``ops.Opaque`` (a module, a builtin), or an ``ops.Differing`` where
        # its calls called different functions
        self.operations = operations
        self.callees: dict[str, Any] = {}
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
        forwards = []
        observed: list[tuple[torch.nn.Module, Any]] = []
        reordered: list[tuple[dict, list]] = []
        try:
            if self.operations:
                for module, path in module_paths(self.model).items():
                    tree = ops.tree_of(self.operations, ops.module_forward(module))
                    slot = ops.forward_slot(module)
                    if tree is None or slot is None:
                        continue  # (a forward of the instance's own is not instrumented)
                    prefix = f"{path}.{ops.SOURCE}" if path else ops.SOURCE
                    forward = ops.module_forward(module)
                    function = ops.instrumented(forward,
                                                self._dispatcher(prefix, tree, forward))
                    forwards.append((module, slot, vars(module).get(slot, _ABSENT)))
                    vars(module)[slot] = types.MethodType(function, module)
            paths = module_paths(self.model)
            sensitive = hook_sensitive_modules(paths) if self.keep_fast_paths else ()
            for module, path in paths.items():
                if self.only is not None and path not in self.only:
                    continue
                if module in sensitive:
                    observed.append((module, vars(module).get("forward", _ABSENT)))
                    vars(module)["forward"] = ObservedForward(self, module, path)
                    continue
                handles.append(module.register_forward_pre_hook(
                    self._pre_hook(path), with_kwargs=True))
                handle = module.register_forward_hook(self._post_hook(path))
                handles.append(handle)
                hooks = forward_hook_dicts(module)[1]
                order = _run_before_traced_hooks(hooks, handle.id)
                if order is not None:
                    reordered.append((hooks, order))
            yield self
        finally:
            for handle in handles:
                handle.remove()
            for hooks, order in reordered:
                _put_back_order(hooks, order)
            for module, before in reversed(observed):
                if before is _ABSENT:
                    vars(module).pop("forward", None)
                else:  # (its instrumented forward, or the instance's own)
                    vars(module)["forward"] = before
            for module, slot, before in forwards:
                if getattr(vars(module).get(slot), ops.MARK, False):
                    if before is _ABSENT:
                        del vars(module)[slot]
                    else:  # (accelerate's ``_old_forward``, put back)
                        vars(module)[slot] = before

    def _dispatcher(self, prefix: str, tree: dict, function: Any) -> Any:
        """The ``__fxsight_op__`` of ``function`` instrumented under ``prefix``
        (``h.0.attn.source``): each call ``fn(...)`` named ``name`` becomes the events
        ``<prefix>.<name>`` input and output, around ``fn`` (instrumented itself where
        ``tree`` asks for its operations)."""
        def dispatch(fn, name):
            if self.paused or threading.get_ident() != self.thread:
                return fn
            called = getattr(fn, _CALLED, fn)  # (an enclosing function's op wraps it)
            path = f"{prefix}.{name}"
            inner = tree.get(name)
            emit = self.only is None or path in self.only
            if not emit and inner is None:
                return fn

            def call(*args, **kwargs):
                target = fn
                self.callees[path] = ops.merged_callee(  # (for ``.source`` of it)
                    self.callees.get(path), ops.callee(called))
                names = ((path, inner),) if inner is not None else ()
                names += getattr(call, _ALSO, ())  # (nested functions' names of the call)
                if names and called is not fn:
                    # (the enclosing function's name for this call instruments the callee:
                    # its calls are these names' operations too)
                    target = _wrapper_also(fn, names)
                elif names:
                    target = self._instrumented_callee(fn, *names[0], names[1:])
                if not emit:
                    return target(*args, **kwargs)
                count = self.calls.get(path, 0)
                self.calls[path] = count + 1
                site = Site(path, INPUT, count)
                self.order.append(site)
                new = self.on_event(site, (args, kwargs))
                moved = []
                if new is not None:
                    moved = _replaced((args, kwargs), new) if self.copy_back else []
                    args, kwargs = new
                output = target(*args, **kwargs)
                for original, given, version in moved:
                    if given._version != version:  # changed in place by the operation:
                        original.copy_(given)       # so is the argument it stands for
                site = Site(path, OUTPUT, count)
                self.order.append(site)
                new = self.on_event(site, output)
                return output if new is None else new
            setattr(call, _CALLED, called)
            return call
        dispatch.instrumenting = ops.innermost(function)
        return dispatch

    def _instrumented_callee(self, fn: Any, path: str, tree: dict,
                             also: tuple[tuple[str, dict], ...] = ()) -> Any:
        """``fn`` instrumented under ``<path>.source`` (``tree``: its calls' own
        instrumentation); ``also``: ``(path, tree)`` of other names of the same call (a
        nested function's, ``inner_0.source.g_0``, of the enclosing ``g_0``, innermost
        last): each call inside is an operation under all, a nested name's events around
        its enclosing one's."""
        if isinstance(fn, torch.nn.Module):
            raise ops.SourceError(
                f"{path} calls a module ({type(fn).__name__}): reach its operations "
                f"through the module's own envoy (model.<its path>.source)")
        dispatch = self._dispatcher(f"{path}.{ops.SOURCE}", tree, fn)
        for other_path, other_tree in also:
            other = self._dispatcher(f"{other_path}.{ops.SOURCE}", other_tree, fn)
            dispatch = _within(dispatch, other, {name: name for name in
                                                 ops.parse(ops.innermost(fn)).operations})
        enclosing = ops.enclosing_dispatch(fn)
        if enclosing is not None:  # (its calls are sites of the enclosing function's too)
            dispatch = _within(enclosing, dispatch, ops.enclosing_names(
                enclosing.instrumenting, fn))
        owner = getattr(fn, "__self__", None)
        function = ops.instrumented(getattr(fn, "__func__", fn), dispatch)
        return types.MethodType(function, owner) if owner is not None and \
            not isinstance(owner, types.ModuleType) else function

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


class ObservedForward:
    """A module's ``forward`` with its boundary events around it, in place of the forward
    hook and pre-hook :class:`ModuleEvents` would add (an instance attribute while the
    events are installed): where a hook would turn a fast path off
    (``nn.TransformerEncoderLayer`` takes its slow path where a module inside it has
    one), the forward takes the path a plain one takes. ``inner``: what it calls (the
    module's forward, or a skip of it, see ``run.hooks``)."""

    def __init__(self, events: ModuleEvents, module: torch.nn.Module, path: str):
        self.inner = module.forward  # (the class's, the instance's own, an instrumented one)
        self._pre, self._post = events._pre_hook(path), events._post_hook(path)
        self._module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        new = self._pre(self._module, args, kwargs)
        if new is not None:
            args, kwargs = new
        output = self.inner(*args, **kwargs)
        new = self._post(self._module, args, output)
        return output if new is None else new


def observed_forward(module: torch.nn.Module) -> ObservedForward | None:
    """The :class:`ObservedForward` installed on ``module``, if any."""
    forward = vars(module).get("forward")
    return forward if isinstance(forward, ObservedForward) else None


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
                if is_traced_hook(hook):  # (part of the forward's own output)
                    continue
                new = guard(hook)
                hooks[key] = new
                wrapped.append((hooks, key, new, hook))
        yield
    finally:
        for hooks, key, new, hook in reversed(wrapped):
            if hooks.get(key) is new:
                hooks[key] = hook
