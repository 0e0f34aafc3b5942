"""Objects whose batched tensors an invoke cannot be given its own rows of.

A module's output (or input) that is a dataclass or an object of the user's class holding
tensors is one leaf to pytree: narrowing it to an invoke's rows would hand the invoke the
whole batch, silently. Such a read or write inside an invoke of a batch of several invokes
is refused instead (:func:`batched_object` names the object)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._torch import pytree
from ..capture.caches import is_cache


def batched_object(value: Any, total: int, depth: int = 3) -> str | None:
    """The type name of an object in ``value`` (a pytree leaf that is no tensor and no
    cache object) that holds a tensor of ``total`` rows in its attributes, or ``None``."""
    if isinstance(value, torch.Tensor):  # (the common read: nothing to look at)
        return None
    for leaf in pytree.tree_leaves(value, is_leaf=is_cache):
        if isinstance(leaf, torch.Tensor) or is_cache(leaf):
            continue
        if _holds_batched(leaf, total, depth):
            return type(leaf).__name__
    return None


def _holds_batched(value: Any, total: int, depth: int) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dim() > 0 and value.shape[0] == total
    if depth == 0 or isinstance(value, (type, nn.Module, str, bytes)) or callable(value):
        return False
    if isinstance(value, (tuple, list, set, frozenset)):
        items = list(value)
    elif isinstance(value, dict):
        items = list(value.values())
    else:
        items = _attributes(value)
    return any(_holds_batched(item, total, depth - 1) for item in items)


def _attributes(value: Any) -> list[Any]:
    """The values of an object's instance attributes (``__dict__`` and ``__slots__``)."""
    items = list(vars(value).values()) if hasattr(value, "__dict__") else []
    for cls in type(value).__mro__:
        slots = cls.__dict__.get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if name not in ("__dict__", "__weakref__") and hasattr(value, name):
                items.append(getattr(value, name))
    return items
