"""Errors raised by fxsight, and the helper that finds the user's source line."""

from __future__ import annotations

import linecache
import os
import sys
from types import CodeType

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class FxsightError(Exception):
    """Base class of every error fxsight raises on purpose."""


class TraceError(FxsightError):
    """A trace's interventions cannot be honoured (raised before anything runs)."""


class OrderError(TraceError):
    """A write depends on a value that is only computed after the written module."""


class ShapeError(TraceError):
    """A value does not fit the activation it is written into."""


class ControlFlowError(TraceError):
    """Python control flow on a traced value, which cannot be recorded."""


class CaptureError(FxsightError):
    """The model could not be captured into a graph (the hooks backend takes over)."""

    def __init__(self, message: str, module_path: str | None = None):
        super().__init__(message)
        self.module_path = module_path


class SourceLine(str):
    """``"file:line: code"`` of a user's statement, formatted only when first shown.

    Recording a node costs a frame walk, not a file read: the code is looked up lazily."""

    __slots__ = ()

    def __new__(cls, filename: str, lineno: int) -> "SourceLine":
        return super().__new__(cls, f"{filename}:{lineno}")

    def __str__(self) -> str:
        location = str.__str__(self)
        filename, _, lineno = location.rpartition(":")
        code = linecache.getline(filename, int(lineno)).strip()
        return f"{location}: {code}"

    __format__ = lambda self, spec: format(str(self), spec)  # noqa: E731


# code object -> whether its frames are fxsight's (or torch's), one table per
# ``skip_torch``: asked for every recorded node, so the answer is remembered
_INSIDE: dict[bool, dict[CodeType, bool]] = {True: {}, False: {}}


def _inside(code: CodeType, skip_torch: bool) -> bool:
    filename = code.co_filename
    inside = filename.startswith(_PACKAGE_DIR) or (
        skip_torch and f"{os.sep}torch{os.sep}" in filename)
    _INSIDE[skip_torch][code] = inside
    return inside


def user_line(skip_torch: bool = True) -> SourceLine | str:
    """The ``"file:line: code"`` of the innermost frame outside fxsight (and torch)."""
    frame = sys._getframe(1)
    known = _INSIDE[skip_torch]
    while frame is not None:
        code = frame.f_code
        inside = known.get(code)
        if inside is None:
            inside = _inside(code, skip_torch)
        if not inside:
            return SourceLine(code.co_filename, frame.f_lineno)
        frame = frame.f_back
    return "<unknown line>"


def user_stacklevel() -> int:
    """The ``stacklevel`` for ``warnings.warn`` called by the caller of this function that
    attributes the warning to the innermost frame outside fxsight (the user's line)."""
    level = 1
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back
        level += 1
    return level


def at_line(message: str, line: str | None) -> str:
    """Append the user's source line to an error message."""
    return f"{message}\n  at {line}" if line else message
