"""fxsight: look inside PyTorch models and intervene on them, through torch.fx graphs.

The user-facing API follows nnsight's; the engine captures the model into a GraphModule
with every module boundary a node and splices the interventions into it. The package is
laid out as the flow: ``record`` → ``capture`` → ``splice`` → ``run`` → ``bind``, with the
user API in ``api``, generation in ``generate`` and experiments in ``experiments``.
"""

from __future__ import annotations

from typing import Any

from .api.envoy import Envoy
from .api.functions import SavableDict, SavableList, apply, log, save, trace
from .api.nnsight import NNsight
from .errors import (CaptureError, ControlFlowError, DataDependentError, FxsightError,
                     ItemAssignmentError, InputError, OrderError, ShapeError, ShapeIndexError,
                     TokenIndexError, TraceError, UsageError)
from .record.proxy import Proxy
from .stats import reset_stats, stats

__all__ = ["NNsight", "LanguageModel", "Envoy", "trace", "save", "apply", "log", "stats",
           "reset_stats", "Proxy", "FxsightError", "TraceError", "OrderError", "ShapeError",
           "ControlFlowError", "CaptureError", "ShapeIndexError", "TokenIndexError",
           "DataDependentError", "ItemAssignmentError", "InputError", "UsageError"]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # LanguageModel is loaded on first use: it imports transformers, which takes seconds
    if name == "LanguageModel":
        from .api.language_model import LanguageModel
        return LanguageModel
    # nnsight 0.4's ``nnsight.list()`` / ``nnsight.dict()`` (not module globals: they would
    # shadow the builtins in this module)
    if name == "list":
        return SavableList
    if name == "dict":
        return SavableDict
    raise AttributeError(name)
