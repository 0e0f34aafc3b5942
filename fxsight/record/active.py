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
    """The innermost open tracer of ``model`` (an ``NNsight`` wrapper), or ``None``."""
    for tracer in reversed(active_tracers()):
        if tracer.model is model or getattr(tracer, "_also", None) is model:
            return tracer
    return None


def active_sessions() -> list[Any]:
    """This thread's stack of open ``model.session()`` blocks."""
    try:
        return _ACTIVE.sessions
    except AttributeError:
        _ACTIVE.sessions = []
        return _ACTIVE.sessions
