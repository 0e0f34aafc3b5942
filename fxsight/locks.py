"""Locks that make traces safe to run from several threads.

- :func:`exclusive_export`: one ``torch.export`` at a time in the process. Export flips
  process-wide flags (``torch.compiler.is_exporting()``, ``is_compiling()``, fx's
  ``is_fx_tracing()``) and a torch-dispatch mode stack: two overlapping exports restore
  them in the wrong order and leave them set for good.
- :func:`model_lock`: one trace at a time runs on a given model. A trace installs hooks on
  the model (hooks backend, scan, capture), swaps a submodule's parameters for meta ones
  (an envoy called on a traced value) and fills the model's caches: a second thread's
  trace of the same model waits for it. Traces of different models run concurrently.

Both are reentrant (a trace nested in another's thread just goes on) and are always taken
in that order (model, then export), so they cannot deadlock each other.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

_EXPORT = threading.RLock()
_MODELS: "weakref.WeakKeyDictionary[Any, threading.RLock]" = weakref.WeakKeyDictionary()
_MODELS_GUARD = threading.Lock()


def exclusive_export() -> threading.RLock:
    """The process-wide lock to hold around ``torch.export`` (``with exclusive_export():``)."""
    return _EXPORT


def model_lock(model: Any) -> threading.RLock:
    """The lock of ``model`` (a ``torch.nn.Module``), held while a trace of it runs; kept
    as long as the model lives."""
    lock = _MODELS.get(model)
    if lock is None:
        with _MODELS_GUARD:
            lock = _MODELS.get(model)
            if lock is None:
                lock = _MODELS[model] = threading.RLock()
    return lock
