"""nnsight's module-level functions: ``fxsight.trace``, ``fxsight.save``, ``fxsight.apply``."""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch

from .._torch import pytree
from ..record.proxy import Proxy, find_recorder
from .nnsight import NNsight


def save(value: Any) -> Any:
    """``value.save()`` as a function; works on nested structures of proxies too.

    >>> import torch, fxsight
    >>> net = fxsight.NNsight(torch.nn.Linear(2, 2))
    >>> with net.trace(torch.ones(1, 2)):
    ...     pair = fxsight.save([net.input, net.output])
    >>> [tuple(v.shape) for v in pair]
    [(1, 2), (1, 2)]
    """
    if isinstance(value, Proxy):
        return value.save()
    for leaf in pytree.tree_leaves(value):
        if isinstance(leaf, Proxy):
            leaf.save()
    return value


def apply(fn: Callable, *args, **kwargs) -> Any:
    """Record a call of any Python callable on traced values (run with the real values).

    >>> import torch, fxsight
    >>> net = fxsight.NNsight(torch.nn.Linear(3, 3))
    >>> with net.trace(torch.ones(2, 3)):
    ...     top = fxsight.apply(lambda h: h.topk(1).indices, net.output).save()
    >>> top.shape
    torch.Size([2, 1])
    """
    return find_recorder(args, kwargs).create_op("call_function", fn, args, kwargs,
                                                 lenient=True)


class trace:  # noqa: N801 - nnsight's spelling
    """``with fxsight.trace(module, inputs) as model:`` wraps ``module`` and traces it.

    >>> import torch, fxsight
    >>> with fxsight.trace(torch.nn.Linear(2, 1), torch.ones(3, 2)) as model:
    ...     out = model.output.save()
    >>> out.shape
    torch.Size([3, 1])
    """

    def __init__(self, module: torch.nn.Module, *args, **kwargs):
        self.model = module if isinstance(module, NNsight) else NNsight(module)
        self.tracer = self.model.trace(*args, **kwargs)

    def __enter__(self) -> NNsight:
        self.tracer.__enter__()
        return self.model

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.tracer.exit_into(sys._getframe(1), exc_type is not None)
        return False
