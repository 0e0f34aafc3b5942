"""The traces open in this thread (innermost last): how ``model.layer.output`` finds its
trace."""

from __future__ import annotations

import threading
from typing import Any

_ACTIVE = threading.local()


def active_tracers() -> list[Any]:
    """This thread's stack of open tracers."""
    try:
        return _ACTIVE.stack
    except AttributeError:
        _ACTIVE.stack = []
        return _ACTIVE.stack


def current_tracer(model: Any) -> Any:
    """The innermost open tracer of ``model`` (an ``NNsight`` wrapper), or ``None``.

    A model and its edited copies (``model.edit()``) share their envoys, as nnsight's
    shallow copies do: the tutorial's ``with edited.trace(x): model.lm_head.output`` reads
    the edited model's trace."""
    stack = active_tracers()
    if not stack:
        return None
    lineage = _lineage(model)
    for tracer in reversed(stack):
        if tracer.model is model or getattr(tracer, "_also", None) is model or \
                _lineage(tracer.model) is lineage:
            return tracer
    return None


def _lineage(model: Any) -> Any:
    """The wrapper ``model``'s non-inplace edits started from (see ``api.edit``)."""
    try:
        return vars(model).get("_edit_lineage", model)
    except TypeError:  # (no __dict__)
        return model


def active_sessions() -> list[Any]:
    """This thread's stack of open ``model.session()`` blocks."""
    try:
        return _ACTIVE.sessions
    except AttributeError:
        _ACTIVE.sessions = []
        return _ACTIVE.sessions
