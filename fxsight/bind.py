"""Bind: after a trace, the caller's names for saved proxies become the real values."""

from __future__ import annotations

import ctypes
import sys
import types
from typing import Any, Callable

from .record.proxy import Proxy

_LOCALS_TO_FAST = getattr(ctypes.pythonapi, "PyFrame_LocalsToFast", None)


def bind_frame(frame: types.FrameType, resolve: Callable[[Proxy], tuple[bool, Any]]) -> None:
    """Replace saved proxies in ``frame``'s variables (and in lists and dicts they hold).

    ``resolve(proxy)`` returns ``(True, value)`` for a proxy to replace.
    """
    if frame is None:
        return
    namespace = frame.f_locals
    changed = False
    for name, value in list(namespace.items()):
        if isinstance(value, Proxy):
            ok, real = resolve(value)
            if ok:
                namespace[name] = real
                changed = True
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, Proxy):
                    ok, real = resolve(item)
                    if ok:
                        value[i] = real
        elif isinstance(value, dict):
            for key, item in list(value.items()):
                if isinstance(item, Proxy):
                    ok, real = resolve(item)
                    if ok:
                        value[key] = real
    if changed and namespace is not frame.f_globals and _LOCALS_TO_FAST is not None \
            and sys.version_info < (3, 13):
        _LOCALS_TO_FAST(ctypes.py_object(frame), ctypes.c_int(0))
