"""The recorder: where a line of a ``trace`` block becomes a Program node.

Proxies and envoys call its ``create_*`` methods (in the spirit of torch.fx's
``TracerBase.create_node``); each node takes the recorder's current :class:`Scope` (the
invoke, the decoding steps) and the user's source line as it is created. Questions that
need the model or the inputs (a value's shape, its real value after the run, token
positions) go to the recorder's :class:`Host`, the trace that owns it.
"""

from __future__ import annotations

import sys
import weakref
from operator import getitem
from threading import get_ident
from typing import Any, Protocol

import torch

from .._torch import pytree, user_modes_suspended
from ..errors import TraceError, at_line, user_line
from . import numpy_values
from .modes import ambient_modes, modes_passed, refuse_forward_mode_change, refuse_mode_change
from .active import active_tracers
from .program import AUTOGRAD_GRAD, Kind, Node, Program, execute, is_backward, setitem
from .proxy import Proxy, from_where
from .retained_grads import RetainedGrads
from .scope import Scope
from .sites import Site

_PLAIN_ARGS = frozenset({int, bool, str, type(None), type(Ellipsis)})


class Host(Protocol):
    """What a recorder asks the trace that owns it."""

    def meta_of(self, node: Node, what: str) -> Any:
        """``node``'s meta value (a meta tensor, or a structure of them)."""

    def device_of(self, node: Node) -> torch.device:
        """The device ``node``'s value will be on."""

    def value_of(self, proxy: Proxy) -> Any:
        """A saved proxy's real value, once the trace has run."""

    def token_indexer(self, proxy: Proxy) -> Any:
        """``proxy.token``: padding-aware token indexing (language models)."""


class Recorder:
    """Records the interventions of one trace into :attr:`program`."""

    def __init__(self, host: Host, token_indexing: bool = False):
        self.host = host
        self.program = Program()
        self.scope = Scope()
        self.token_indexing = token_indexing
        self.open = False  # whether recording is allowed (set by the trace's context)
        # the modes the trace's context was entered in (``modes.ambient_modes``)
        self.modes: tuple | None = None
        # the ``id`` of the frame the trace's block is in (``modes.entry_frame``)
        self.entry: int | None = None
        self.thread: int | None = None  # the thread whose trace context opened it
        # every proxy made, held weakly (what may wait to be saved at the end; ``None``
        # until the trace's context opens)
        self.made: list[weakref.ref] | None = None
        self.done = False  # whether the trace has run: saved proxies stand for their values
        # ``what -> why``: kinds of node this trace cannot run (gradients in generate)
        self.refused: dict[str, str] = {}
        # the ``with loss.backward():`` blocks open now, innermost last
        self.backward_blocks: list[Node] = []
        # ``value.retain_grad()`` calls: read at each later ``backward()``, filled after
        self.retained = RetainedGrads()
        # saved proxies (held weakly: a proxy refers to its recorder; an entry counts only
        # for the very proxy it was made for, so a reused id never matches) and their
        # nodes at save time
        self.saved: dict[int, tuple[weakref.ref, Node]] = {}
        # once the trace has run (:meth:`finish`): the saved nodes' values, and the host
        # held weakly (nothing of a finished trace refers back to it: its objects are freed
        # as soon as the caller lets go of them, with no cycle left for the collector)
        self._values: dict[Node, Any] | None = None
        self._host_ref: Any = None
        # the paths of the operation sites read or written (``envoy.source``): what the
        # capture must mark inside forwards
        self.operations: set[str] = set()

    # --- creating nodes -----------------------------------------------------------------
    def create_read(self, site: Site, accessor: str, current: bool = False) -> Proxy:
        """A module's ``accessor`` (``"output"``, ``"input"``, ``"inputs"``) at ``site``
        (``current``: the caller found this recorder's trace open in this thread)."""
        if not current and (not self.open or self.thread != get_ident()):
            self.check_open()
        if self.modes is not None:
            refuse_forward_mode_change(self.modes)
        proxy = Proxy(self, self.program.read(site, accessor, self.scope, user_line()))
        if self.made is not None:
            self.made.append(weakref.ref(proxy))
        return proxy

    def create_write(self, site: Site, accessor: str, value: Any) -> None:
        """Replace a module's ``accessor`` at ``site`` with ``value``."""
        self.check_open()
        if self.modes is not None:
            refuse_forward_mode_change(self.modes)
        self.program.write(site, accessor, self.to_arg(value), self.scope, user_line())

    def create_skip(self, site: Site, value: Any) -> None:
        """The module of ``site`` does not run; ``value`` is its output."""
        self.check_open()
        self.program.skip(site, self.to_arg(value), self.scope, user_line())

    def create_op(self, op: str, target: Any, args: tuple, kwargs: dict,
                  lenient: bool = False, handed: bool = False) -> Proxy:
        """Any operation on recorded values. An in-place one (``h += v``, ``h[k] = v``)
        moves its first argument's proxy to the new node and returns that proxy.
        ``handed``: a torch function, handed on by the torch function modes in force (the
        caller is ``Proxy.__torch_function__``)."""
        if self.done:  # a saved proxy used after its trace: the operation on its value
            live = next((p._recorder for p in _proxies_in((args, kwargs))
                         if not p._recorder.done), None)
            if live is not None:  # (used in a later trace: recorded there)
                return live.create_op(op, target, args, kwargs, lenient)
            return execute(op, target, *self.settle((tuple(args), kwargs)))
        if not self.open or self.thread != get_ident():
            self.check_open((args, kwargs))
        passed = modes_passed(sys._getframe(2), self.entry) if handed else []
        if self.modes is not None and ambient_modes(len(passed)) != self.modes:
            refuse_mode_change(self.modes, passed)
        if (kwargs and "device" in kwargs) or (op == "call_method" and target == "to"):
            _refuse_meta_device(args[1:] if op == "call_method" else (), kwargs)
        if lenient and sys.modules.get("numpy") is not None:
            # (the callable gets NumPy values as they are, as inputs of the graph)
            args, kwargs = pytree.tree_map_only(
                lambda value: numpy_values.is_numpy(value), self.program.input,
                (tuple(args), kwargs))
        node = self.program.op(op, target, self.to_arg(tuple(args)),
                               self.to_arg(kwargs) if kwargs else {}, self.scope,
                               user_line(), lenient)
        if self.retained and is_backward(node) and node.target is not AUTOGRAD_GRAD:
            self.retained.read_for(self.program, node)
        if node.mutation and args and isinstance(args[0], Proxy):
            object.__setattr__(args[0], "_node", node)
            return args[0]
        proxy = Proxy(self, node)
        if self.made is not None:
            self.made.append(weakref.ref(proxy))
        return proxy

    def create_setitem(self, proxy: Proxy, key: Any, value: Any) -> None:
        """``proxy[key] = value``."""
        self.create_op("call_function", setitem, (proxy, key, value), {})

    def create_grad(self, proxy: Proxy) -> Proxy:
        """``proxy.grad``."""
        if self.done:  # after the trace: the saved value's own gradient
            return self._value_of(proxy).grad
        self._check_allowed("grad")
        self.check_open()
        target = self._after_changes(self.to_arg(proxy))
        node = self.program.grad(target, self._scope_of(target), user_line())
        self._note_backward_block(node)
        proxy = Proxy(self, node)
        if self.made is not None:
            self.made.append(weakref.ref(proxy))
        return proxy

    def create_autograd_grad(self, loss: Proxy, inputs: list[Proxy], grad_outputs: Any,
                             retain_graph: Any, create_graph: bool,
                             allow_unused: bool) -> tuple[Proxy, ...]:
        """``torch.autograd.grad(loss, inputs, ...)``: a grad read of each input, owned by
        a backward call that accumulates into no parameter (see ``run.backward``)."""
        grads = [self.create_grad(proxy) for proxy in inputs]
        call = self.create_op("call_function", AUTOGRAD_GRAD, (loss, grad_outputs),
                              {"retain_graph": retain_graph, "create_graph": create_graph,
                               "allow_unused": allow_unused})
        for grad in grads:
            self.program.backward_blocks[grad._node] = call._node
        return tuple(grads)

    def retain_grad(self, proxy: Proxy) -> None:
        """``proxy.retain_grad()``: once the trace has run, the saved value's ``.grad`` holds
        its gradient from the ``backward()`` calls recorded after this line."""
        if self.done:  # after the trace: the value itself
            self._value_of(proxy).retain_grad()
            return
        self._check_allowed("grad")
        self.check_open()
        target = self._after_changes(self.to_arg(proxy))
        if isinstance(target, Node):
            self.retained.add(proxy, target, self._scope_of(target), user_line())

    def create_grad_write(self, proxy: Proxy, value: Any) -> None:
        """``proxy.grad = value``."""
        self._check_allowed("grad")
        self.check_open()
        target = self._after_changes(self.to_arg(proxy))
        self._note_backward_block(self.program.grad_write(
            target, self.to_arg(value), self._scope_of(target), user_line()))

    def enter_backward(self, node: Node) -> None:
        """``with loss.backward():`` opens: the gradients used inside are this call's."""
        self.backward_blocks.append(node)

    def exit_backward(self, node: Node) -> None:
        if self.backward_blocks and self.backward_blocks[-1] is node:
            self.backward_blocks.pop()

    def _note_backward_block(self, node: Node) -> None:
        if self.backward_blocks:
            self.program.backward_blocks[node] = self.backward_blocks[-1]

    def save(self, proxy: Proxy) -> Proxy:
        """Keep ``proxy``'s value after the trace."""
        if proxy._recorder is not self or not self.open:
            raise TraceError(at_line(".save() can only be called inside the trace that "
                                     f"created the value{from_where(proxy)}", user_line()))
        self.program.save(proxy._node)
        self.saved[id(proxy)] = (weakref.ref(proxy), proxy._node)
        return proxy

    def waiting(self) -> dict[int, Proxy] | None:
        """The proxies made and still alive but not saved, by id (``None`` where the
        recorder does not keep track: before the trace's context opens)."""
        if self.made is None:
            return None
        alive = [ref() for ref in self.made]
        return {id(p): p for p in alive if p is not None and not self.is_saved(p)}

    def live_saved(self) -> list[Proxy]:
        """The saved proxies still alive (a saved value nobody kept is not among them)."""
        alive = [ref() for ref, _ in self.saved.values()]
        return [proxy for proxy in alive if proxy is not None]

    def is_saved(self, proxy: Proxy) -> bool:
        """Whether ``proxy`` (this very object) was saved."""
        entry = self.saved.get(id(proxy))
        return entry is not None and entry[0]() is proxy

    def finish(self, values: dict[Node, Any]) -> None:
        """The trace has run: ``values`` holds the saved nodes' values. From now on saved
        proxies stand for them, and the host is held weakly."""
        self._values = values
        self.done = True
        if self.retained:
            self.retained.fill(self.resolve, values)
        self._host_ref = weakref.ref(self.host)
        self.host = None

    def resolve(self, proxy: Proxy) -> tuple[bool, Any]:
        """``(True, value)`` for a saved proxy of this finished trace, else ``(False,
        None)``."""
        entry = self.saved.get(id(proxy))
        values = self._values
        if entry is None or values is None or entry[0]() is not proxy or \
                entry[1] not in values:
            return False, None
        return True, values[entry[1]]

    def _value_of(self, proxy: Proxy) -> Any:
        if self._values is None:  # (not run yet: the host says why)
            return self.host.value_of(proxy)
        ok, value = self.resolve(proxy)
        if not ok:
            raise TraceError(at_line("this value was not saved: call .save() on it inside "
                                     "the trace", user_line()))
        return value

    # --- questions about recorded values -------------------------------------------------
    def meta(self, proxy: Proxy, what: str) -> Any:
        """``proxy``'s meta value, for ``.shape``, ``.dtype``, ``len()``, iteration (after
        the trace, its real value)."""
        if self.done:
            return self._value_of(proxy)
        self.check_open()
        with user_modes_suspended():  # (fxsight's reads of its fake values)
            return self.host.meta_of(proxy._node, what)

    def device(self, proxy: Proxy) -> torch.device:
        if self.done:
            return self._value_of(proxy).device
        self.check_open()
        with user_modes_suspended():
            return self.host.device_of(proxy._node)

    def settle(self, value: Any) -> Any:
        """``value`` with every proxy of this finished trace replaced by its real value
        (an error names the line of a proxy that was not saved)."""
        if isinstance(value, Proxy):
            if value._recorder is not self:
                return value._recorder.settle(value)
            if not self.is_saved(value):
                raise TraceError(at_line(
                    f"this trace has ended and this value{from_where(value)} was not saved: "
                    f"call .save() on it inside the `with ... trace(...)` block",
                    user_line()))
            return self._value_of(value)
        if type(value) in (tuple, list):
            return type(value)(self.settle(v) for v in value)
        if isinstance(value, dict):
            return {k: self.settle(v) for k, v in value.items()}
        if isinstance(value, slice):
            return slice(self.settle(value.start), self.settle(value.stop),
                         self.settle(value.step))
        return value

    def value(self, proxy: Proxy) -> Any:
        return self._value_of(proxy)

    def token_indexer(self, proxy: Proxy) -> Any:
        host = self.host if self._host_ref is None else self._host_ref()
        if host is None:
            raise TraceError(at_line("`.token` needs its trace, which is gone: index the "
                                     "saved value itself", user_line()))
        return host.token_indexer(proxy)

    # --- helpers ---------------------------------------------------------------------------
    def check_open(self, used: Any = None) -> None:
        """Raise unless recording is allowed now, in this thread."""
        if not self.open or self.host not in active_tracers():
            where = ""
            for value in _proxies_in(used):
                where = from_where(value)
                break
            raise TraceError(at_line(f"this trace has ended: values{where} can only be used "
                                     "inside the `with ... trace(...)` block", user_line()))

    def _check_allowed(self, what: str) -> None:
        why = self.refused.get(what)
        if why is not None:
            raise TraceError(at_line(why, user_line()))

    def _after_changes(self, target: Any) -> Any:
        """A gradient's ``target``; where in-place changes moved the proxy off a module's
        value (``h[:, 0] = 0``, ``h.requires_grad_()`` on ``h = env.output``, or an item
        of it), that value read again after them: the same tensor, whose gradient is
        then the changed value's, as a tensor hook registered at this line sees it."""
        if not isinstance(target, Node) or not target.mutation:
            return target
        base = target
        while isinstance(base, Node) and base.kind is Kind.OP and base.mutation:
            base = base.args[0]
        chain = []  # (the items and attributes from the read to the changed tensor)
        while isinstance(base, Node) and base.kind is Kind.OP and \
                base.target in (getitem, getattr) and not base.all_input_nodes[1:]:
            chain.insert(0, base)
            base = base.args[0]
        if not isinstance(base, Node) or base.kind is not Kind.READ:
            return target
        line, scope = user_line(), Scope(base.invoke, self.scope.steps)
        value = self.program.read(base.site, base.accessor, scope, line)
        for step in chain:
            value = self.program.op("call_function", step.target, (value, step.args[1]), {},
                                    scope, line)
        return value

    def _scope_of(self, target: Node) -> Scope:
        """A gradient's scope: the rows of the value it is the gradient of."""
        return Scope(target.invoke, self.scope.steps)

    def to_arg(self, value: Any) -> Any:
        """``value`` as a node argument: proxies become their nodes, real tensors and
        Python floats become Program inputs (new values reuse the graph)."""
        kind = type(value)
        if kind is float:  # a coefficient: an input, so new values reuse the graph
            return self.program.input(value)
        if kind in _PLAIN_ARGS:  # the common case, first
            return value
        if kind is Proxy:
            if value._recorder is not self and value._recorder.done and \
                    value._recorder.is_saved(value):
                return self.to_arg(value._recorder.settle(value))  # an earlier trace's value
            if value._recorder is not self:
                if value._recorder.open:
                    what = ("the enclosing trace, which has not run yet, was used in this "
                            "nested trace; save it there and use it in a trace after that "
                            "block ends")
                else:
                    what = ("an earlier trace was used here; save it in its own trace "
                            "and pass the real tensor instead")
                raise TraceError(at_line(f"a value{from_where(value)} from {what}",
                                         user_line()))
            return value._node
        if isinstance(value, torch.Tensor):
            with user_modes_suspended():  # (its reads of the tensor: fxsight's own)
                return self.program.input(value, user_line())
        if kind is tuple:  # (``x[:, 3]``'s key: the common items without a call each)
            items = []
            for item in value:
                item_kind = type(item)
                if item_kind in _PLAIN_ARGS or (item_kind is slice and item.start is None
                                                and item.stop is None and item.step is None):
                    items.append(item)
                elif item_kind is Proxy and item._recorder is self:
                    items.append(item._node)
                else:
                    items.append(self.to_arg(item))
            return tuple(items)
        if kind is slice:
            if value.start is None and value.stop is None and value.step is None:
                return value  # `:`
            return slice(self.to_arg(value.start), self.to_arg(value.stop),
                         self.to_arg(value.step))
        if isinstance(value, (tuple, list)):
            return _rebuilt(value, [self.to_arg(v) for v in value])
        if isinstance(value, dict):
            return {k: self.to_arg(v) for k, v in value.items()}
        if getattr(kind, "_is_envoy", False):
            raise TraceError(at_line("a module was passed where a value was expected; "
                                     "use its .output or .input", user_line()))
        if kind is Node:  # (an input made already: fxsight.apply's NumPy values)
            return value
        if getattr(kind, "__module__", None) == "numpy":  # (np.float64 is a float, too)
            converted = numpy_values.as_torch(value)
            if converted is not value:
                return self.to_arg(converted)
        if _holds_proxy(value):
            name = kind.__name__
            raise TraceError(at_line(
                f"a traced value inside a {name} object: fxsight sees traced values in "
                f"tuples, lists and dicts only, so the model would get the {name} holding "
                f"the traced value itself; build it when the model runs: "
                f"fxsight.apply({name}, ...)", user_line()))
        return value


def _refuse_meta_device(args: tuple, kwargs: dict) -> None:
    """A traced value moved to (or made on) the meta device would have no data: the run
    could not use it (``Cannot copy out of meta tensor``), so the line is refused."""
    devices = [kwargs.get("device"), *(a for a in args if isinstance(a, (str, torch.device)))]
    for device in devices:
        try:
            meta = device is not None and torch.device(device).type == "meta"
        except (RuntimeError, TypeError):  # (a dtype's name, say: not a device)
            continue
        if meta:
            raise TraceError(at_line(
                "a traced value on the meta device (shapes only, no data) cannot be "
                "written into the model or computed with; keep it on the model's device "
                "(a traced value's .shape and .dtype are known inside the block)",
                user_line()))


def _proxies_in(value: Any):
    if isinstance(value, Proxy):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _proxies_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _proxies_in(item)


def _rebuilt(value: tuple | list, items: list) -> tuple | list:
    """A tuple or list of ``value``'s type holding ``items``: a named tuple (the model's own
    output type, ``collections.namedtuple``) takes its fields as arguments."""
    if isinstance(value, tuple) and hasattr(type(value), "_fields"):
        return type(value)(*items)
    return type(value)(items)


def _holds_proxy(value: Any, depth: int = 3) -> bool:
    """Whether an object that ``to_arg`` passes on as it is (a dataclass, an object of
    the user's class) holds a traced value in its fields or attributes."""
    if isinstance(value, Proxy):
        return True
    if depth == 0 or isinstance(value, (type, torch.nn.Module)):
        return False
    if isinstance(value, (tuple, list, set, frozenset)):
        items = list(value)
    elif isinstance(value, dict):
        items = list(value.values())
    elif hasattr(value, "__dict__") and not callable(value):
        items = list(vars(value).values())
    else:
        return False
    return any(_holds_proxy(item, depth - 1) for item in items)
