"""fxsight: look inside PyTorch models and intervene on them, through torch.fx graphs.

The user-facing API follows nnsight's; the engine captures the model into a GraphModule
with every module boundary a node and splices the interventions into it.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from .errors import (CaptureError, ControlFlowError, FxsightError, OrderError, ShapeError,
                     TraceError)
from .api.nnsight import NNsight
from .record.proxy import Proxy
from .stats import reset_stats, stats

__all__ = ["NNsight", "LanguageModel", "trace", "save", "apply", "stats", "reset_stats",
           "Proxy", "FxsightError", "TraceError", "OrderError", "ShapeError",
           "ControlFlowError", "CaptureError"]

__version__ = "0.1.0"


def save(value: Any) -> Any:
    """``value.save()`` as a function (works on nested structures of proxies too)."""
    if isinstance(value, Proxy):
        return value.save()
    for leaf in torch.utils._pytree.tree_leaves(value):
        if isinstance(leaf, Proxy):
            leaf.save()
    return value


def apply(fn, *args, **kwargs) -> Any:
    """Record a call of any Python callable on traced values (run with the real values)."""
    from .record.proxy import _find_tracer
    tracer = _find_tracer(args, kwargs)
    return tracer._record("call_function", fn, args, kwargs, lenient=True)


class trace:  # noqa: N801 - nnsight's spelling
    """``with fxsight.trace(module, inputs) as model:`` wraps ``module`` and traces it."""

    def __init__(self, module: torch.nn.Module, *args, **kwargs):
        self.model = module if isinstance(module, NNsight) else NNsight(module)
        self.tracer = self.model.trace(*args, **kwargs)

    def __enter__(self) -> NNsight:
        self.tracer.__enter__()
        return self.model

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.tracer._exit(sys._getframe(1), exc_type is not None)
        return False


def __getattr__(name: str) -> Any:
    if name == "LanguageModel":
        from .api.language_model import LanguageModel
        return LanguageModel
    raise AttributeError(name)
