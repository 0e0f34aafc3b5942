"""NumPy values in a ``trace`` block, taken as eager PyTorch takes them.

Where torch takes a number, it reads a NumPy scalar as the Python number it stands for:
``np.int64`` as an int, ``np.float32`` as a float (its exact value, as a double), and
``np.bool_`` and ``np.complex64`` as floats too (torch's argument parser reads them as
doubles: ``int_tensor * np.bool_(True)`` is a float tensor in eager). A NumPy array is read
as the tensor of its values (in an index, say). fxsight converts them the same way when a
line is recorded, so the graph holds plain numbers and tensors (a NumPy object in the
generated code of a graph would need ``numpy`` among its globals).

Python operators between a tensor and a NumPy array are not torch's in eager PyTorch:
``Tensor.__add__`` gives way to ``ndarray.__radd__``, so NumPy computes them, with NumPy's
promotion (``int64 + float32`` is ``float64``). fxsight computes them with torch on the
array's tensor, and refuses where the two would give different dtypes (:func:`operand`).
"""

from __future__ import annotations

import operator
import sys
from typing import Any, Callable

import torch

from ..errors import TraceError, at_line, user_line


def is_numpy(value: Any) -> bool:
    """Whether ``value`` is a NumPy scalar or array (without importing NumPy)."""
    np = sys.modules.get("numpy")
    return np is not None and isinstance(value, (np.generic, np.ndarray))


def is_array(value: Any) -> bool:
    np = sys.modules.get("numpy")
    return np is not None and isinstance(value, np.ndarray)


def as_torch(value: Any) -> Any:
    """A NumPy scalar as the Python number torch reads it as, an array as a tensor of its
    values (a copy: the values the line saw); anything else as it is."""
    np = sys.modules.get("numpy")
    if np is None:
        return value
    if isinstance(value, np.ndarray):
        return torch.tensor(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, complex):  # (np.complex128 is a Python complex)
        return complex(value)
    if isinstance(value, (np.floating, np.bool_, np.complexfloating)):
        # (np.complex64: its real part, with NumPy's ComplexWarning, as torch reads it)
        return float(value)
    if isinstance(value, (str, bytes)):  # (np.str_, np.bytes_)
        return str(value) if isinstance(value, str) else bytes(value)
    return value


def operand(op: Callable, tensor: Any, array: Any, reverse: bool) -> torch.Tensor:
    """``array`` as the tensor fxsight computes ``op(tensor, array)`` with (``reverse``:
    ``op(array, tensor)``), where ``tensor`` is the traced value's meta tensor: refused
    where eager PyTorch, which hands the operation to NumPy, would give another dtype."""
    converted = torch.tensor(array)
    if not isinstance(tensor, torch.Tensor):
        return converted  # (not a tensor: Python's own rules, as in eager)
    ours = _torch_dtype(op, tensor, converted, reverse)
    theirs = _numpy_dtype(op, tensor.dtype, array.dtype, reverse)
    if ours is not None and ours == theirs:
        return converted
    symbol = _SYMBOLS.get(op, getattr(op, "__name__", "op"))
    got = f"NumPy gives {_name(theirs)}" if theirs is not None else "NumPy cannot compute it"
    mine = f"torch would give {_name(ours)}" if ours is not None else "torch cannot compute it"
    raise TraceError(at_line(
        f"`{symbol}` between a traced {_name(tensor.dtype)} tensor and a NumPy array of "
        f"{array.dtype}: eager PyTorch hands this operation to NumPy ({got}), {mine}; "
        f"convert the array to the tensor you mean first, e.g. "
        f"`torch.as_tensor(array, dtype=value.dtype)`", user_line()))


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _torch_dtype(op: Callable, tensor: torch.Tensor, converted: torch.Tensor,
                 reverse: bool) -> torch.dtype | None:
    other = torch.empty(converted.shape, dtype=converted.dtype, device="meta")
    mine = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
    try:
        result = op(other, mine) if reverse else op(mine, other)
    except Exception:  # noqa: BLE001 - (the shape check of the walk reports it)
        return None
    return result.dtype if isinstance(result, torch.Tensor) else None


def _numpy_dtype(op: Callable, dtype: torch.dtype, array_dtype: Any,
                 reverse: bool) -> torch.dtype | None:
    """The torch dtype of NumPy's result of ``op`` on arrays of these dtypes (``None``
    where NumPy cannot compute it: bfloat16, say)."""
    np = sys.modules["numpy"]
    try:
        mine = torch.zeros(1, dtype=dtype).numpy()
        other = np.ones(1, dtype=array_dtype)
        with np.errstate(all="ignore"):
            result = op(other, mine) if reverse else op(mine, other)
        return torch.from_numpy(np.asarray(result).reshape(-1)).dtype
    except Exception:  # noqa: BLE001 - (no NumPy dtype, or NumPy refuses)
        return None


_SYMBOLS: dict[Callable, str] = {
    operator.add: "+", operator.sub: "-", operator.mul: "*", operator.truediv: "/",
    operator.floordiv: "//", operator.mod: "%", operator.pow: "**", operator.matmul: "@",
    operator.and_: "&", operator.or_: "|", operator.xor: "^", operator.lshift: "<<",
    operator.rshift: ">>", operator.lt: "<", operator.le: "<=", operator.gt: ">",
    operator.ge: ">=", operator.eq: "==", operator.ne: "!=",
}
