"""Errors raised by fxsight, and the helper that finds the user's source line."""

from __future__ import annotations

import linecache
import os
import sys
from types import CodeType, FrameType

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class FxsightError(Exception):
    """Base class of every error fxsight raises on purpose."""


class TraceError(FxsightError):
    """A trace's interventions cannot be honoured (raised before anything runs)."""


class OrderError(TraceError):
    """A write depends on a value that is only computed after the written module."""


class ShapeError(TraceError):
    """A value does not fit the activation it is written into."""


# Errors that stand for a built-in one are instances of it too, so that a script's
# ``except IndexError`` keeps catching what eager torch would have raised on that line.
class ShapeIndexError(ShapeError, IndexError):
    """An index out of range on a traced value (``value[999]``): torch raises IndexError."""


class TokenIndexError(TraceError, IndexError):
    """A token index (``value.token[i]``) past either end of a prompt."""


class ControlFlowError(TraceError):
    """Python control flow on a traced value, which cannot be recorded."""


class DataDependentError(TraceError):
    """An operation whose result's shape (or a number it needs) depends on the values of a
    traced tensor (``h[h > 0]``, ``nonzero``, ``masked_select``): unknown while the block
    is recorded, so nothing after it could be checked or placed in the graph."""


class InputError(TraceError, ValueError):
    """A run with nothing to run on (``model.trace(trace=False)`` without inputs, a trace
    with no invoke), or an input that cannot be read as the model's (a list of word lists
    without ``is_split_into_words=True``): nnsight raises ValueError."""


class UsageError(TraceError, ValueError):
    """A trace's blocks used in a way that cannot run: invokes nested, a barrier that not
    every participating invoke reaches, a read or write inside a module that is skipped:
    nnsight raises ValueError."""


class NNsightDeprecationWarning(FutureWarning):
    """The warning of an nnsight spelling that nnsight 0.8 deprecates and fxsight accepts
    (``model.iter[...]``): the category nnsight warns under, so that a ported filter
    (``warnings.filterwarnings("ignore", category=NNsightDeprecationWarning)``) applies."""


class UnsupportedError(FxsightError, NotImplementedError):
    """An nnsight name for something fxsight does not do (NDIF's remote service and its
    settings, models of images or diffusion): raised at the line that uses it, saying what
    to write instead."""


class ItemAssignmentError(TraceError, TypeError):
    """An item assigned into a traced value that cannot take one (a tuple output): Python
    raises TypeError."""


class NotOnGraph(TraceError):
    """An intervention the fx backend cannot honour on a captured graph (the hooks backend
    can): under ``backend="auto"`` the trace runs on hooks, with a warning."""


class CaptureError(FxsightError):
    """The model could not be captured into a graph (the hooks backend takes over)."""

    def __init__(self, message: str, module_path: str | None = None):
        super().__init__(message)
        self.module_path = module_path


class SourceLine:
    """``"file:line: code"`` of a user's statement, worked out only when shown.

    Recording a node keeps the code object and the instruction offset of the user's frame:
    the line number (a scan of the code's line table) and the source text (a file read)
    are looked up when an error message needs them."""

    __slots__ = ("code", "offset")

    def __init__(self, code: CodeType, offset: int):
        self.code = code
        self.offset = offset

    @property
    def lineno(self) -> int | None:
        for start, end, line in self.code.co_lines():
            if start <= self.offset < end:
                return line
        return self.code.co_firstlineno

    def __str__(self) -> str:
        filename, lineno = self.code.co_filename, self.lineno
        code = linecache.getline(filename, lineno).strip() if lineno else ""
        return f"{filename}:{lineno}: {code}"

    def __eq__(self, other: object) -> bool:  # (a loop's body records one per iteration)
        return self is other or (type(other) is SourceLine and self.code is other.code
                                 and self.offset == other.offset)

    def __hash__(self) -> int:
        return hash((id(self.code), self.offset))

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)

    def __repr__(self) -> str:
        return f"<SourceLine {self}>"


# code object -> whether its frames are fxsight's (or torch's), one table per
# ``skip_torch``: asked for every recorded node, so the answer is remembered (for up to
# ``_MAX_INSIDE`` code objects: a notebook makes new ones at every run of a cell, and the
# table would keep each alive)
_INSIDE: dict[bool, dict[CodeType, bool]] = {True: {}, False: {}}
_MAX_INSIDE = 4096


def _inside(code: CodeType, skip_torch: bool) -> bool:
    filename = code.co_filename
    # (a torch function mode's handler, a user's too, hands the user's line on to fxsight)
    inside = filename.startswith(_PACKAGE_DIR) or (
        skip_torch and (f"{os.sep}torch{os.sep}" in filename
                        or code.co_name == "__torch_function__"))
    table = _INSIDE[skip_torch]
    if len(table) >= _MAX_INSIDE:
        table.clear()
    table[code] = inside
    return inside


def user_line(skip_torch: bool = True) -> SourceLine | str:
    """The ``"file:line: code"`` of the innermost frame outside fxsight (and torch, and
    ``__torch_function__`` handlers)."""
    frame = sys._getframe(1)
    known = _INSIDE[skip_torch]
    while frame is not None:
        code = frame.f_code
        inside = known.get(code)
        if inside is None:
            inside = _inside(code, skip_torch)
        if not inside:
            return SourceLine(code, frame.f_lasti)
        frame = frame.f_back
    return "<unknown line>"


def user_frame() -> FrameType | None:
    """The innermost frame outside fxsight (torch's frames count as the user's)."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back
    return frame


def user_stacklevel() -> int:
    """The ``stacklevel`` for ``warnings.warn`` called by the caller of this function that
    attributes the warning to the innermost frame outside fxsight (the user's line)."""
    level = 1
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back
        level += 1
    return level


# said where a line of a ``model.edit()`` chose a module's later call (``for i in
# tracer.iter[...]`` in the edit) that a forward pass does not make
EDIT_CALL_HINT = (
    "; this line is a model.edit()'s: `tracer.iter` in an edit counts a module's calls "
    "within one forward pass, and lm.generate runs one forward pass per decoding step, so "
    "an edit's calls do not choose decoding steps (nnsight counts them over the steps); "
    "write the step loop in the `with lm.generate(...)` block (`for step in "
    "tracer.iter[...]:`)")


def outside_a_trace(label: str, what: str) -> str:
    """The message of ``label.what`` (``model.transformer.h.0.output``) used outside a
    trace: where it is read, how to keep it for after the block (nothing of a trace is
    left on the model or its envoys)."""
    keep = (f"; to use it after the block, save it inside: `value = {label}.{what}.save()` "
            f"(a tensor once the block ends)") if what in ("output", "input", "inputs") \
        else ""
    return f"{label}.{what} is only available inside a trace (`with model.trace(...):`){keep}"


def at_line(message: str, line: str | None) -> str:
    """Append the user's source line to an error message."""
    return f"{message}\n  at {line}" if line else message
