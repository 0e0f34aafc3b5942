"""What the caller does with the value a call returns, read from its bytecode: nnsight's
forms that differ only there (``with model.edit() as (tracer, edited):``, and
``ids = lm.generate(...)`` without a ``with``), and calls that are no context managers
refused in a ``with`` before they run."""

from __future__ import annotations

import dis
import os
import weakref
from types import CodeType, FrameType

from ..errors import TraceError, at_line, user_line

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the instruction a ``with`` statement runs on its context manager's value (3.11 - 3.13;
# from 3.14 ``LOAD_SPECIAL``, after a ``COPY`` of the value)
_WITH = frozenset({"BEFORE_WITH", "BEFORE_ASYNC_WITH", "LOAD_SPECIAL", "COPY"})
# instructions that hand the value out of the frame (a helper returning the context manager
# its caller enters): what is done with it is not known here
_HANDED_OUT = frozenset({"RETURN_VALUE", "YIELD_VALUE"})


# per code object (by id, held weakly): offset of the running instruction -> the (up to
# two) instructions after it. Decoding a code object with ``dis`` took 0.1-0.3 ms a trace
# (every ``model.trace(...)`` asks); a call site asks the same question every time.
_FOLLOWING: dict[int, tuple[weakref.ref, dict[int, tuple[dis.Instruction, ...]]]] = {}
_MAX_CODES = 512  # code objects remembered (all forgotten past it; each is a few entries)


def _following(frame: FrameType) -> tuple[dis.Instruction, ...]:
    """The (at most two) instructions ``frame`` runs after the one running now (a
    call's; ``f_lasti`` may be at the call's inline cache entries, which ``dis`` does not
    list), as ``dis`` lists them."""
    code, offset = frame.f_code, frame.f_lasti
    entry = _FOLLOWING.get(id(code))
    if entry is None or entry[0]() is not code:
        if len(_FOLLOWING) >= _MAX_CODES:
            _FOLLOWING.clear()
        entry = (weakref.ref(code, _forget_code(id(code))), {})
        _FOLLOWING[id(code)] = entry
    found = entry[1].get(offset)
    if found is None:
        found = entry[1][offset] = _decoded_after(code, offset)
    return found


def _forget_code(key: int):
    """The weak reference's callback: the code object's entry goes with it (where it is
    still its own: a later code object may have taken the id's entry)."""
    def forget(reference: weakref.ref) -> None:
        entry = _FOLLOWING.get(key)
        if entry is not None and entry[0] is reference:
            del _FOLLOWING[key]
    return forget


def _decoded_after(code: CodeType, offset: int) -> tuple[dis.Instruction, ...]:
    instructions = dis.get_instructions(code)
    for instruction in instructions:
        if instruction.offset > offset:
            following = next(instructions, None)
            return (instruction,) if following is None else (instruction, following)
    return ()


def next_instruction(frame: FrameType) -> dis.Instruction | None:
    """The instruction ``frame`` runs after the one running now (a call's; ``f_lasti`` may
    be at the call's inline cache entries, which ``dis`` does not list)."""
    following = _following(frame)
    return following[0] if following else None


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
    following = _following(frame)
    if not following:
        return False
    if following[0].opname == "COPY":  # 3.14: COPY, then LOAD_SPECIAL (__enter__)
        return len(following) > 1 and following[1].opname == "LOAD_SPECIAL"
    return following[0].opname in _WITH


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
