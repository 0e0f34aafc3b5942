"""Proxies: stand-ins for future values inside a trace; every use records a Program node."""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any, Iterator

import torch

from .._torch import pytree, user_modes_suspended
from ..errors import ControlFlowError, TraceError, at_line, user_line
from . import numpy_values
from .program import Kind, is_backward, origin, set_attribute

_CONTROL_FLOW_HINT = (
    "Python control flow on a traced value cannot be recorded: the value does not exist "
    "until the model runs. Use tensor operations instead, e.g. torch.where(cond, a, b) "
    "in place of `if`, or fxsight.apply(fn, ...) to run arbitrary Python on the real value."
)
_NO_VALUE_HINT = (
    "The value does not exist until the model runs: save it and convert the saved value "
    "after the block, or use fxsight.apply(fn, ...) to run Python on the real value inside "
    "the block."
)

# torch's named tuples (``torch.return_types``: what topk, sort, max(dim) ... return), the
# names of the functions returning them, and their fields that are Tensor attributes too
_RETURN_TYPES = [t for t in vars(torch.return_types).values()
                 if isinstance(t, type) and issubclass(t, tuple)]
_NAMED_TUPLE_OPS = frozenset(t.__name__ for t in _RETURN_TYPES)
_SHADOWED_FIELDS = frozenset(name for t in _RETURN_TYPES
                             for name in getattr(t, "__match_args__", ())
                             if hasattr(torch.Tensor, name))
# (fields rarely read as a Tensor method: a value's meta is asked for whatever made it)
_COMMON_FIELDS = frozenset({"values", "indices"})


def _one_loss(call: str, losses: Any, grads: Any, line: Any) -> tuple[Any, Any]:
    """The one loss (and its gradient) of ``torch.autograd.backward`` or ``.grad`` called
    on traced values, given alone or as a sequence of one."""
    if not isinstance(losses, (tuple, list)):
        return losses, grads
    if len(losses) != 1:
        raise TraceError(at_line(
            f"{call} of several traced values cannot be recorded; take it of their sum "
            f"(`(a * ga).sum() + (b * gb).sum()`)", line))
    if isinstance(grads, (tuple, list)):
        grads = grads[0] if grads else None
    return losses[0], grads


def _autograd_backward(tensors: Any, grad_tensors: Any = None, retain_graph: Any = None,
                       create_graph: bool = False, inputs: Any = None) -> Any:
    """``torch.autograd.backward(loss, ...)`` on a traced value: ``loss.backward(...)``."""
    tensors, grad_tensors = _one_loss("torch.autograd.backward", tensors, grad_tensors,
                                      user_line())
    if not isinstance(tensors, Proxy):
        raise TraceError(at_line("torch.autograd.backward in a trace takes the traced loss "
                                 "as its first argument", user_line()))
    kwargs = {"retain_graph": retain_graph, "create_graph": create_graph}
    if inputs is not None:
        kwargs["inputs"] = inputs
    return tensors.backward(grad_tensors, **kwargs)


def _autograd_grad(outputs: Any, inputs: Any, grad_outputs: Any = None,
                   retain_graph: Any = None, create_graph: bool = False,
                   only_inputs: bool = True, allow_unused: Any = None,
                   is_grads_batched: bool = False, materialize_grads: bool = False) -> Any:
    """``torch.autograd.grad(loss, inputs, ...)`` on traced values: the gradients of the
    loss with respect to module values (or items of them), as a tuple; nothing is
    accumulated into the parameters' ``.grad``."""
    line = user_line()
    outputs, grad_outputs = _one_loss("torch.autograd.grad", outputs, grad_outputs, line)
    inputs = [inputs] if isinstance(inputs, Proxy) else \
        list(inputs) if isinstance(inputs, (tuple, list)) else None
    if not isinstance(outputs, Proxy) or not inputs or \
            not all(isinstance(i, Proxy) for i in inputs):
        raise TraceError(at_line("torch.autograd.grad in a trace takes a traced loss and "
                                 "traced inputs (module values, or items of them)", line))
    if is_grads_batched or materialize_grads:
        raise TraceError(at_line("torch.autograd.grad in a trace takes neither "
                                 "is_grads_batched nor materialize_grads", line))
    return outputs._recorder.create_autograd_grad(outputs, inputs, grad_outputs,
                                                  retain_graph, bool(create_graph),
                                                  bool(allow_unused))


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
    # NumPy gives way to the proxy in ``np.float32(2) * value`` (as to a tensor)
    __array_ufunc__ = None

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
        return self._meta("shape", lambda meta: meta.shape)

    def size(self, dim: int | None = None):
        if dim is None:
            return self.shape
        return self._meta(f"size({operator.index(dim)})", lambda meta: meta.shape[dim])

    @property
    def dtype(self) -> torch.dtype:
        return self._meta("dtype", lambda meta: meta.dtype)

    @property
    def device(self) -> torch.device:
        return self._recorder.device(self)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dim(self) -> int:
        return self.ndim

    def retain_grad(self) -> None:
        """As torch's: after the trace, the saved value's ``.grad`` is its gradient from the
        ``backward()`` calls recorded after this line (summed); returns None."""
        self._recorder.retain_grad(self)

    # --- recording ---------------------------------------------------------------------
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.autograd.backward:
            return _autograd_backward(*args, **(kwargs or {}))
        if func is torch.autograd.grad:
            return _autograd_grad(*args, **(kwargs or {}))
        recorder = find_recorder(args, kwargs or {})
        return recorder.create_op("call_function", func, args, kwargs or {}, handed=True)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        if name in _PROPERTIES:  # the property itself raised AttributeError: surface it
            return getattr(type(self), name).fget(self)
        if name in ("token", "t") and self._recorder.token_indexing:
            return self._recorder.token_indexer(self)
        if name == "grad":
            return self._recorder.create_grad(self)
        if name in _SHADOWED_FIELDS and (name in _COMMON_FIELDS or _makes_named_tuple(self)):
            return self._field_or_method(name)
        attr = getattr(torch.Tensor, name, None)
        if callable(attr):
            return _MethodRecorder(self, name)
        return self._recorder.create_op("call_function", getattr, (self, name), {})

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "grad":
            self._recorder.create_grad_write(self, value)
            return
        if self._node.kind is Kind.READ and not isinstance(self._recorder.meta(
                self, f"setting .{name}"), torch.Tensor):
            self._recorder.create_op("call_function", set_attribute, (self, name, value), {})
            return
        raise TraceError(at_line(
            f"cannot set attribute {name!r} on a traced value; an attribute of a module's "
            f"output object is set on it directly (`model.layer.output.{name} = value`)",
            user_line()))

    def __call__(self, *args, **kwargs):
        return self._recorder.create_op("call_function", _call_value, (self, *args), kwargs)

    def __getitem__(self, key):
        return self._recorder.create_op("call_function", operator.getitem,
                                        (self, index_key(key, getting=True)), {})

    def __setitem__(self, key, value):
        self._recorder.create_setitem(self, index_key(key, getting=False), value)

    def __iter__(self) -> Iterator["Proxy"]:
        meta = self._recorder.meta(self, "iteration")
        if isinstance(meta, Mapping):  # a dict (kwargs, a ModelOutput): its keys
            return iter(list(meta.keys()))
        return iter([self[i] for i in range(self._meta("iteration", _length))])

    def __len__(self) -> int:
        return self._meta("len()", _length)

    def _meta(self, what: str, read: Any) -> Any:
        """``read`` of the value's meta value (see :meth:`Recorder.meta`), with the user's
        modes put aside: a read of fxsight's fake value is no call a user's
        ``TorchFunctionMode`` around the trace should see."""
        with user_modes_suspended():
            return read(self._recorder.meta(self, what))

    # --- a dict's value (kwargs of ``.inputs``, a ModelOutput): keys known from its meta
    def keys(self) -> list:
        """The keys of a dict value (``{**kw, "scale": 2.0}``, ``dict(kw)`` use it)."""
        return list(self._mapping("keys()").keys())

    def items(self) -> list[tuple[Any, "Proxy"]]:
        return [(key, self[key]) for key in self._mapping("items()").keys()]

    @property
    def values(self) -> Any:
        """The ``values`` field of a named tuple (``value.topk(k).values``); on a dict
        value, its ``values()`` method; on a tensor, ``Tensor.values`` (sparse)."""
        return self._field_or_method("values")

    def _field_or_method(self, name: str) -> Any:
        """``self.<name>`` where ``name`` is both a field of torch's named tuples and an
        attribute of Tensor (``values``, ``indices``, ``max``): the field where the value
        is a named tuple with it (as on torch's return types), else the method."""
        try:
            meta = self._recorder.meta(self, f".{name}")
        except TraceError:  # (known only when it runs, e.g. fxsight.apply's result)
            return self._recorder.create_op("call_function", getattr, (self, name), {})
        fields = _fields(meta)
        if name in fields:
            return self[fields.index(name)]
        if name == "values" and isinstance(meta, Mapping):
            return lambda: [self[key] for key in meta.keys()]
        return _MethodRecorder(self, name)

    def _mapping(self, what: str) -> Mapping:
        meta = self._recorder.meta(self, what)
        if not isinstance(meta, Mapping):
            raise AttributeError(at_line(f"{what[:-2]}: this value is a "
                                         f"{type(meta).__name__}, not a dict", user_line()))
        return meta

    # --- Python control flow is not recordable ----------------------------------------
    def _no_control_flow(self, what: str, convert: Any, hint: str = _CONTROL_FLOW_HINT) -> Any:
        if self._recorder.done:  # after the trace: a saved value stands for itself
            return convert(self._recorder.value(self))
        raise ControlFlowError(at_line(f"{what} of a traced value{from_where(self)}. {hint}",
                                       user_line()))

    def __bool__(self):
        return self._no_control_flow("bool()", bool)

    def __int__(self):
        return self._no_control_flow("int()", int)

    def __float__(self):
        return self._no_control_flow("float()", float)

    def __index__(self):
        return self._no_control_flow("Using as an index / int", operator.index)

    # --- Python (and NumPy) values of a tensor do not exist while recording -------------
    def item(self) -> Any:
        """A ``ControlFlowError`` inside the block (the number does not exist yet); after
        it, the saved value's ``item()``."""
        return self._no_control_flow("`.item()`", lambda value: value.item(), _NO_VALUE_HINT)

    def tolist(self) -> Any:
        """A ``ControlFlowError`` inside the block; after it, the saved value's list."""
        return self._no_control_flow("`.tolist()`", lambda value: value.tolist(),
                                     _NO_VALUE_HINT)

    def numpy(self, *args, **kwargs) -> Any:
        """A ``ControlFlowError`` inside the block; after it, the saved value's array."""
        return self._no_control_flow("`.numpy()`", lambda value: value.numpy(*args, **kwargs),
                                     _NO_VALUE_HINT)

    def __array__(self, *args, **kwargs) -> Any:
        return self._no_control_flow("A NumPy array (`np.asarray(...)`)",
                                     lambda value: value.__array__(*args, **kwargs),
                                     _NO_VALUE_HINT)

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


def _fields(value: Any) -> tuple:
    """The field names of a named tuple (torch's return types, ``collections.namedtuple``);
    ``()`` for anything else."""
    if not isinstance(value, tuple):
        return ()
    kind = type(value)
    return tuple(getattr(kind, "_fields", None) or getattr(kind, "__match_args__", ()))


def _makes_named_tuple(proxy: Proxy) -> bool:
    """Whether ``proxy`` is the result of an operation named as one of torch's return types
    (``torch.aminmax(h).max`` is its field, ``h.max`` a method)."""
    node = proxy._node
    if node.kind is not Kind.OP:
        return False
    target = node.target
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    return name in _NAMED_TUPLE_OPS or f"linalg_{name}" in _NAMED_TUPLE_OPS


# the types of index items taken as they are (the common case)
_PLAIN_INDEX = frozenset({int, slice, type(None), type(Ellipsis), Proxy, bool})


def index_key(key: Any, getting: bool) -> Any:
    """An index key as eager torch reads it, where the line is recorded: a 0-d integer
    tensor of the caller's is the integer it holds (torch selects at ``.item()``, a view),
    a boolean mask of the caller's in a read is the index tensors of its true elements
    (what torch turns it into), NumPy values are torch's (:mod:`.numpy_values`)."""
    if type(key) is tuple:
        if all(type(item) in _PLAIN_INDEX for item in key):
            return key
        items: list[Any] = []
        for item in key:
            items.extend(_index_items(item, getting))
        return tuple(items)
    if type(key) in _PLAIN_INDEX:
        return key
    items = _index_items(key, getting)
    return items[0] if len(items) == 1 else tuple(items)


def _index_items(item: Any, getting: bool) -> list[Any]:
    """The items one index item stands for (a boolean mask of k dimensions: k)."""
    if numpy_values.is_numpy(item):
        item = numpy_values.as_torch(item)
    if type(item) is Proxy or not isinstance(item, torch.Tensor) or item.is_meta:
        return [item]
    if item.dim() == 0 and not item.dtype.is_floating_point and \
            not item.dtype.is_complex and item.dtype not in (torch.bool, torch.uint8):
        return [int(item)]
    if getting and item.dim() > 0 and item.dtype in (torch.bool, torch.uint8):
        return list(item.nonzero(as_tuple=True))
    return [item]


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
        if numpy_values.is_array(other):
            other = _array_operand(op, self, other, reverse=False)
        return self._recorder.create_op("call_function", op, (self, other), {})

    def reverse(self, other):
        if numpy_values.is_array(other):
            other = _array_operand(op, self, other, reverse=True)
        return self._recorder.create_op("call_function", op, (other, self), {})

    return forward, reverse


def _length(meta: Any) -> int:
    """The length of a meta value: a tensor's first dimension, a sequence's ``len``."""
    return meta.shape[0] if isinstance(meta, torch.Tensor) else len(meta)


def _array_operand(op, proxy: Proxy, array: Any, reverse: bool) -> torch.Tensor:
    """A NumPy array operand of a Python operator as the tensor it is computed with."""
    try:
        meta = proxy._recorder.meta(proxy, "value")
    except TraceError:  # (unknown until it runs: Python's rules then, as in eager)
        meta = None
    return numpy_values.operand(op, meta, array, reverse)


def _inplace(op):
    def method(self, other):
        if numpy_values.is_array(other):
            # (eager: ``Tensor.__iadd__`` refuses an array and Python falls back to
            # ``value = value + array``, a new tensor: the traced value is not changed)
            return NotImplemented
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
