"""Proxies: stand-ins for future values inside a trace; every use records a Program node."""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any, Iterator

import torch

from .._torch import pytree
from ..errors import ControlFlowError, TraceError, at_line, user_line
from .program import is_backward, origin

_CONTROL_FLOW_HINT = (
    "Python control flow on a traced value cannot be recorded: the value does not exist "
    "until the model runs. Use tensor operations instead, e.g. torch.where(cond, a, b) "
    "in place of `if`, or fxsight.apply(fn, ...) to run arbitrary Python on the real value."
)


class Proxy:
    """A value of the running model seen from inside a ``trace`` block.

    Operations on a proxy (torch functions, tensor methods, operators, indexing) are
    recorded, not executed. After the block, a saved proxy's name is re-bound to the real
    value; ``proxy.value`` returns it too. ``proxy.grad`` is its gradient (read, or assign
    to replace it) once ``loss.backward()`` is called inside the block.

    >>> import torch, fxsight
    >>> net = fxsight.NNsight(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1)))
    >>> with net.trace(torch.ones(2, 3)):
    ...     hidden = net[0].output
    ...     grad = hidden.grad.save()
    ...     _ = net.output.sum().backward()
    >>> torch.equal(grad, net[1].weight.detach().expand(2, 3))
    True
    """

    __slots__ = ("_recorder", "_node", "__weakref__")

    def __init__(self, recorder: Any, node: Any):
        # recorder: the fxsight.record.recorder.Recorder that created it (which imports
        # this module); node: its Program node
        object.__setattr__(self, "_recorder", recorder)
        object.__setattr__(self, "_node", node)

    # --- results ---------------------------------------------------------------------
    def save(self) -> "Proxy":
        """Keep this value after the trace (the name is re-bound to the real value)."""
        return self._recorder.save(self)

    @property
    def value(self) -> Any:
        """The real value, once the trace has run and if the proxy was saved."""
        return self._recorder.value(self)

    # --- metadata (from shape propagation on fake values) ----------------------------
    @property
    def shape(self) -> torch.Size:
        return self._recorder.meta(self, "shape").shape

    def size(self, dim: int | None = None):
        shape = self.shape
        return shape if dim is None else shape[dim]

    @property
    def dtype(self) -> torch.dtype:
        return self._recorder.meta(self, "dtype").dtype

    @property
    def device(self) -> torch.device:
        return self._recorder.device(self)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dim(self) -> int:
        return self.ndim

    def retain_grad(self) -> None:
        """Accepted and ignored (returns None, as torch does; nothing is recorded): a trace
        reads gradients with ``value.grad`` inside the block, without retaining them."""

    # --- recording ---------------------------------------------------------------------
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        recorder = find_recorder(args, kwargs or {})
        return recorder.create_op("call_function", func, args, kwargs or {})

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        if name in _PROPERTIES:  # the property itself raised AttributeError: surface it
            return getattr(type(self), name).fget(self)
        if name in ("token", "t") and self._recorder.token_indexing:
            return self._recorder.token_indexer(self)
        if name == "grad":
            return self._recorder.create_grad(self)
        attr = getattr(torch.Tensor, name, None)
        if callable(attr):
            return _MethodRecorder(self, name)
        return self._recorder.create_op("call_function", getattr, (self, name), {})

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "grad":
            self._recorder.create_grad_write(self, value)
            return
        raise TraceError(
            at_line(f"cannot set attribute {name!r} on a traced value", user_line())
        )

    def __call__(self, *args, **kwargs):
        return self._recorder.create_op("call_function", _call_value, (self, *args), kwargs)

    def __getitem__(self, key):
        return self._recorder.create_op("call_function", operator.getitem, (self, key), {})

    def __setitem__(self, key, value):
        self._recorder.create_setitem(self, key, value)

    def __iter__(self) -> Iterator["Proxy"]:
        meta = self._recorder.meta(self, "iteration")
        if isinstance(meta, Mapping):  # a dict (kwargs, a ModelOutput): its keys
            return iter(list(meta.keys()))
        length = meta.shape[0] if isinstance(meta, torch.Tensor) else len(meta)
        return iter([self[i] for i in range(length)])

    def __len__(self) -> int:
        meta = self._recorder.meta(self, "len()")
        return meta.shape[0] if isinstance(meta, torch.Tensor) else len(meta)

    # --- a dict's value (kwargs of ``.inputs``, a ModelOutput): keys known from its meta
    def keys(self) -> list:
        """The keys of a dict value (``{**kw, "scale": 2.0}``, ``dict(kw)`` use it)."""
        return list(self._mapping("keys()").keys())

    def items(self) -> list[tuple[Any, "Proxy"]]:
        return [(key, self[key]) for key in self._mapping("items()").keys()]

    def values(self) -> Any:
        meta = self._recorder.meta(self, "values()")
        if isinstance(meta, Mapping):
            return [self[key] for key in meta.keys()]
        return self._recorder.create_op("call_method", "values", (self,), {})  # (sparse)

    def _mapping(self, what: str) -> Mapping:
        meta = self._recorder.meta(self, what)
        if not isinstance(meta, Mapping):
            raise AttributeError(at_line(f"{what[:-2]}: this value is a "
                                         f"{type(meta).__name__}, not a dict", user_line()))
        return meta

    # --- Python control flow is not recordable ----------------------------------------
    def _no_control_flow(self, what: str, convert: Any) -> Any:
        if self._recorder.done:  # after the trace: a saved value stands for itself
            return convert(self._recorder.value(self))
        raise ControlFlowError(at_line(f"{what} of a traced value{from_where(self)}. "
                                       f"{_CONTROL_FLOW_HINT}", user_line()))

    def __bool__(self):
        return self._no_control_flow("bool()", bool)

    def __int__(self):
        return self._no_control_flow("int()", int)

    def __float__(self):
        return self._no_control_flow("float()", float)

    def __index__(self):
        return self._no_control_flow("Using as an index / int", operator.index)

    def __enter__(self) -> "Proxy":
        """``with loss.backward():`` (nnsight 0.5's form): the block is part of the trace,
        and the gradients read or written inside it are those of this backward() call."""
        if is_backward(self._node):
            self._recorder.enter_backward(self._node)
        return self

    def __exit__(self, *exc) -> bool:
        if is_backward(self._node):
            self._recorder.exit_backward(self._node)
        return False

    def __repr__(self) -> str:
        if self._recorder.done:
            try:
                return repr(self._recorder.value(self))
            except TraceError:
                pass
        return f"<fxsight.Proxy {self._node.name}>"

    def __hash__(self) -> int:
        return id(self)

    def __format__(self, spec):
        return repr(self)


_PROPERTIES = ("shape", "dtype", "device", "ndim", "value")


def from_where(proxy: "Proxy") -> str:
    """`` (from model.layer1.output)``: where a traced value comes from, for messages."""
    where = origin(proxy._node)
    return f" (from {where})" if where else ""


def _call_value(fn, *args, **kwargs):
    return fn(*args, **kwargs)


class _MethodRecorder:
    __slots__ = ("proxy", "name")

    def __init__(self, proxy: Proxy, name: str):
        self.proxy = proxy
        self.name = name

    def __call__(self, *args, **kwargs):
        return self.proxy._recorder.create_op("call_method", self.name, (self.proxy, *args),
                                              kwargs)


def find_recorder(args: Any, kwargs: Any) -> Any:
    """The recorder of the first proxy among ``args`` and ``kwargs``."""
    for value in pytree.tree_leaves((args, kwargs)):
        if isinstance(value, Proxy):
            return value._recorder
    raise TraceError("no traced value among the arguments")


def _binary(op):
    def forward(self, other):
        return self._recorder.create_op("call_function", op, (self, other), {})

    def reverse(self, other):
        return self._recorder.create_op("call_function", op, (other, self), {})

    return forward, reverse


def _inplace(op):
    def method(self, other):
        return self._recorder.create_op("call_function", op, (self, other), {})

    return method


for _name, _op in {
    "add": operator.add, "sub": operator.sub, "mul": operator.mul,
    "truediv": operator.truediv, "floordiv": operator.floordiv, "mod": operator.mod,
    "pow": operator.pow, "matmul": operator.matmul, "and": operator.and_,
    "or": operator.or_, "xor": operator.xor, "lshift": operator.lshift,
    "rshift": operator.rshift,
}.items():
    _f, _r = _binary(_op)
    setattr(Proxy, f"__{_name}__", _f)
    setattr(Proxy, f"__r{_name}__", _r)
    setattr(Proxy, f"__i{_name}__", _inplace(getattr(operator, f"i{_name}")))

for _name, _op in {
    "lt": operator.lt, "le": operator.le, "gt": operator.gt, "ge": operator.ge,
    "eq": operator.eq, "ne": operator.ne,
}.items():
    setattr(Proxy, f"__{_name}__", _binary(_op)[0])

for _name, _op in {"neg": operator.neg, "pos": operator.pos, "abs": operator.abs,
                   "invert": operator.invert}.items():
    setattr(Proxy, f"__{_name}__", (lambda op: lambda self: self._recorder.create_op(
        "call_function", op, (self,), {}))(_op))
