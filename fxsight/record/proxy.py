"""Proxies: stand-ins for future values inside a trace; every use records a Program node."""

from __future__ import annotations

import operator
from typing import TYPE_CHECKING, Any, Iterator

import torch

from ..errors import ControlFlowError, TraceError, at_line, user_line

if TYPE_CHECKING:
    from ..api.tracer import Tracer

_CONTROL_FLOW_HINT = (
    "Python control flow on a traced value cannot be recorded: the value does not exist "
    "until the model runs. Use tensor operations instead, e.g. torch.where(cond, a, b) "
    "in place of `if`, or fxsight.apply(fn, ...) to run arbitrary Python on the real value."
)


class Proxy:
    """A value of the running model seen from inside a ``trace`` block.

    Operations on a proxy (torch functions, tensor methods, operators, indexing) are
    recorded, not executed. After the block, a saved proxy's name is re-bound to the real
    value; ``proxy.value`` returns it too.
    """

    __slots__ = ("_tracer", "_node", "__weakref__")

    def __init__(self, tracer: "Tracer", node: Any):
        object.__setattr__(self, "_tracer", tracer)
        object.__setattr__(self, "_node", node)

    # --- results ---------------------------------------------------------------------
    def save(self) -> "Proxy":
        """Keep this value after the trace (the name is re-bound to the real value)."""
        return self._tracer._save(self)

    @property
    def value(self) -> Any:
        """The real value, once the trace has run and if the proxy was saved."""
        return self._tracer._value_of(self)

    # --- metadata (from shape propagation on fake values) ----------------------------
    @property
    def shape(self) -> torch.Size:
        return self._tracer._meta_of(self, "shape").shape

    def size(self, dim: int | None = None):
        shape = self.shape
        return shape if dim is None else shape[dim]

    @property
    def dtype(self) -> torch.dtype:
        return self._tracer._meta_of(self, "dtype").dtype

    @property
    def device(self) -> torch.device:
        return self._tracer._device_of(self)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dim(self) -> int:
        return self.ndim

    # --- recording ---------------------------------------------------------------------
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        tracer = _find_tracer(args, kwargs or {})
        return tracer._record("call_function", func, args, kwargs or {})

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        if name in _PROPERTIES:  # the property itself raised AttributeError: surface it
            return getattr(type(self), name).fget(self)
        if name in ("token", "t") and self._tracer._token_indexing:
            return self._tracer._token_indexer(self)
        if name == "grad":
            return self._tracer._grad_of(self)
        attr = getattr(torch.Tensor, name, None)
        if callable(attr):
            return _MethodRecorder(self, name)
        return self._tracer._record("call_function", getattr, (self, name), {})

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "grad":
            self._tracer._set_grad(self, value)
            return
        raise TraceError(
            at_line(f"cannot set attribute {name!r} on a traced value", user_line())
        )

    def __call__(self, *args, **kwargs):
        return self._tracer._record("call_function", _call_value, (self, *args), kwargs)

    def __getitem__(self, key):
        return self._tracer._record("call_function", operator.getitem, (self, key), {})

    def __setitem__(self, key, value):
        self._tracer._record_setitem(self, key, value)

    def __iter__(self) -> Iterator["Proxy"]:
        meta = self._tracer._meta_of(self, "iteration")
        length = meta.shape[0] if isinstance(meta, torch.Tensor) else len(meta)
        return iter([self[i] for i in range(length)])

    def __len__(self) -> int:
        meta = self._tracer._meta_of(self, "len()")
        return meta.shape[0] if isinstance(meta, torch.Tensor) else len(meta)

    # --- Python control flow is not recordable ----------------------------------------
    def _no_control_flow(self, what: str):
        raise ControlFlowError(at_line(f"{what} of a traced value{from_where(self)}. "
                                       f"{_CONTROL_FLOW_HINT}", user_line()))

    def __bool__(self):
        self._no_control_flow("bool()")

    def __int__(self):
        self._no_control_flow("int()")

    def __float__(self):
        self._no_control_flow("float()")

    def __index__(self):
        self._no_control_flow("Using as an index / int")

    def __enter__(self) -> "Proxy":
        """``with loss.backward():`` (nnsight 0.5's form): the block is part of the trace."""
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def __repr__(self) -> str:
        return f"<fxsight.Proxy {self._node.name}>"

    def __hash__(self) -> int:
        return id(self)

    def __format__(self, spec):
        return repr(self)


_PROPERTIES = ("shape", "dtype", "device", "ndim", "value")


def from_where(proxy: "Proxy") -> str:
    """`` (from model.layer1.output)``: where a traced value comes from, for messages."""
    from ..record.program import origin
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
        return self.proxy._tracer._record("call_method", self.name, (self.proxy, *args), kwargs)


def _find_tracer(args, kwargs) -> "Tracer":
    for value in torch.utils._pytree.tree_leaves((args, kwargs)):
        if isinstance(value, Proxy):
            return value._tracer
    raise TraceError("no traced value among the arguments")


def _binary(op):
    def forward(self, other):
        return self._tracer._record("call_function", op, (self, other), {})

    def reverse(self, other):
        return self._tracer._record("call_function", op, (other, self), {})

    return forward, reverse


def _inplace(op):
    def method(self, other):
        return self._tracer._record("call_function", op, (self, other), {})

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
    setattr(Proxy, f"__{_name}__", (lambda op: lambda self: self._tracer._record(
        "call_function", op, (self,), {}))(_op))
