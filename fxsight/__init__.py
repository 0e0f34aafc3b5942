"""fxsight: look inside PyTorch models and intervene on them, through torch.fx graphs.

The user-facing API follows nnsight's; the engine captures the model into a GraphModule
with every module boundary a node and splices the interventions into it. The package is
laid out as the flow: ``record`` → ``capture`` → ``splice`` → ``run`` → ``bind``, with the
user API in ``api``, generation in ``generate`` and experiments in ``experiments``.

nnsight's names for what fxsight does not do (NDIF's ``login``/``status``/..., ``CONFIG``,
``VisionLanguageModel``, ``DiffusionModel``) exist and raise :class:`UnsupportedError` where
a script uses them, saying what to write instead.
"""

from .api.envoy import Envoy
from .api.functions import SavableDict, SavableList, apply, log, save, trace
from .api.nnsight import NNsight
from .api.unsupported import (CONFIG, DiffusionModel, VisionLanguageModel, compare,
                              is_model_running, login, ndif_status, register, status,
                              whoami)
from .errors import (CaptureError, ControlFlowError, DataDependentError, FxsightError,
                     ItemAssignmentError, InputError, NNsightDeprecationWarning, OrderError,
                     ShapeError, ShapeIndexError, TokenIndexError, TraceError,
                     UnsupportedError, UsageError)
from .record.proxy import Proxy
from .stats import reset_stats, stats

# nnsight's type of a value read inside a trace (for hints): here the proxy that stands for
# it while the block is recorded
Object = Proxy

__all__ = ["NNsight", "LanguageModel", "TransformersModel", "Envoy", "trace", "save",
           "apply", "log", "stats", "reset_stats", "Proxy", "Object", "FxsightError",
           "TraceError", "OrderError", "ShapeError", "ControlFlowError", "CaptureError",
           "ShapeIndexError", "TokenIndexError", "DataDependentError",
           "ItemAssignmentError", "InputError", "UsageError", "UnsupportedError",
           "NNsightDeprecationWarning", "CONFIG", "VisionLanguageModel", "DiffusionModel",
           "login", "whoami", "register", "status", "ndif_status", "is_model_running",
           "compare"]

__version__ = "0.1.0"

# loaded on first use: they import transformers, which takes seconds
_LAZY = {"LanguageModel": ".api.language_model", "TransformersModel": ".api.transformers_model"}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is not None:
        import importlib
        return getattr(importlib.import_module(module, __name__), name)
    # nnsight 0.4's ``nnsight.list()`` / ``nnsight.dict()`` (not module globals: they would
    # shadow the builtins in this module)
    if name == "list":
        return SavableList
    if name == "dict":
        return SavableDict
    raise AttributeError(f"module 'fxsight' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
