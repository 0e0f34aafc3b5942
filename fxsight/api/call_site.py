"""What the caller does with the value a call returns, read from its bytecode: nnsight's
forms that differ only there (``with model.edit() as (tracer, edited):``, and
``ids = lm.generate(...)`` without a ``with``), and calls that are no context managers
refused in a ``with`` before they run."""

from __future__ import annotations

import dis
import os
from types import FrameType

from ..errors import TraceError, at_line, user_line

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the instruction a ``with`` statement runs on its context manager's value (3.11 - 3.13;
# from 3.14 ``LOAD_SPECIAL``, after a ``COPY`` of the value)
_WITH = frozenset({"BEFORE_WITH", "BEFORE_ASYNC_WITH", "LOAD_SPECIAL", "COPY"})
# instructions that hand the value out of the frame (a helper returning the context manager
# its caller enters): what is done with it is not known here
_HANDED_OUT = frozenset({"RETURN_VALUE", "YIELD_VALUE"})


def next_instruction(frame: FrameType) -> dis.Instruction | None:
    """The instruction ``frame`` runs after the one running now (a call's; ``f_lasti`` may
    be at the call's inline cache entries, which ``dis`` does not list)."""
    for instruction in dis.get_instructions(frame.f_code):
        if instruction.offset > frame.f_lasti:
            return instruction
    return None


def unpacks_two(frame: FrameType) -> bool:
    """Whether the value of the running call is unpacked into two names (``with x as
    (a, b):``, ``a, b = x``)."""
    instruction = next_instruction(frame)
    return instruction is not None and instruction.opname == "UNPACK_SEQUENCE" and \
        instruction.arg == 2


def entered_by_with(frame: FrameType) -> bool:
    """Whether the value of the running call is a ``with`` statement's context manager
    (``with lm.generate(...) as tracer:``); where the bytecode cannot tell (the value is
    returned or yielded to a caller), True."""
    instruction = next_instruction(frame)
    return instruction is None or instruction.opname in _WITH | _HANDED_OUT


def is_with_statement(frame: FrameType) -> bool:
    """Whether the value of the running call is, for certain, a ``with`` statement's context
    manager (a value handed out of the frame is not)."""
    instructions = dis.get_instructions(frame.f_code)
    for instruction in instructions:
        if instruction.offset > frame.f_lasti:
            if instruction.opname == "COPY":  # 3.14: COPY, then LOAD_SPECIAL (__enter__)
                following = next(instructions, None)
                return following is not None and following.opname == "LOAD_SPECIAL"
            return instruction.opname in _WITH
    return False


def refuse_in_with(frame: FrameType, call: str, what: str, instead: str) -> None:
    """Raise a ``TraceError`` before ``call`` runs where its value is, for certain, the
    context manager of a ``with`` statement in ``frame`` (the caller's; fxsight's own calls
    are not checked): ``what`` it returns is no context manager, so the statement would
    fail only after the call ran (the model, a move). ``instead``: what to write."""
    refuse_with(frame, f"`with {call}`: {call} is no context manager to use in a with "
                       f"statement (it returns {what}, after running); {instead}")


def refuse_with(frame: FrameType, message: str) -> None:
    """Raise a ``TraceError`` saying ``message`` at the user's line where the value of the
    running call is, for certain, the context manager of a ``with`` statement in ``frame``
    (the caller's; fxsight's own calls are not checked)."""
    if not frame.f_code.co_filename.startswith(_PACKAGE_DIR) and is_with_statement(frame):
        raise TraceError(at_line(message, user_line()))


def refuse_discarded(frame: FrameType, call: str) -> None:
    """Raise a ``TraceError`` where the value of the running call, a context to enter in a
    ``with`` statement (a trace, a scan, an edit, a session), is dropped (the call alone on
    a line: nothing would be traced or run, silently). ``frame``: the caller's; fxsight's
    own calls are not checked."""
    if frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        return
    instruction = next_instruction(frame)
    if instruction is not None and instruction.opname == "POP_TOP":
        raise TraceError(at_line(
            f"`{call}` alone on a line does nothing: it gives a context to enter, "
            f"`with {call}:` (the lines inside it are traced when the with statement "
            f"ends)", user_line()))
