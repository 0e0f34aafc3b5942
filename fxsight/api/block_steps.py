"""What ``with tracer.iter[...] as step:`` / ``with tracer.all() as step:`` binds ``step`` to.

The body of such a ``with`` block is recorded once and applied at every chosen step, so
``step`` cannot be one step's number (in nnsight the body runs again at each step, and
``step`` is that step's index). For one step (``tracer.iter[2]``) it is that int; for
several it is a :class:`RecordedOnceSteps`, which refuses to be used as a number
(``if step == 1:``, ``h[step]``, ``step + 1``) rather than answer once for all steps, and
points at ``for step in tracer.iter[...]:``, whose body is recorded once per step.
"""

from __future__ import annotations

from typing import Any, NoReturn

from ..errors import ControlFlowError, at_line, user_line
from ..record.scope import ALL, Steps


def step_target(steps: Steps) -> Any:
    """The value a ``with`` block over ``steps`` binds its ``as`` target to."""
    choice = steps.choice
    if isinstance(choice, int) and not isinstance(choice, bool):
        return choice
    return RecordedOnceSteps(steps)


def _spelling(steps: Steps) -> str:
    choice = steps.choice
    if choice == ALL:
        return "tracer.all()"
    if isinstance(choice, slice):
        parts = ["" if part is None else str(part)
                 for part in (choice.start, choice.stop, choice.step)]
        return f"tracer.iter[{':'.join(parts if parts[2] else parts[:2])}]"
    return f"tracer.iter[{list(choice)!r}]"


class RecordedOnceSteps:
    """The ``as`` target of a ``with`` block over several decoding steps: not a number
    (the block is recorded once for all of them); any use as one raises
    :class:`~fxsight.ControlFlowError` naming the line and the ``for`` loop to write."""

    __slots__ = ("_steps",)

    def __init__(self, steps: Steps):
        self._steps = steps

    def _refuse(self, *_: Any) -> NoReturn:
        spelling = _spelling(self._steps)
        raise ControlFlowError(at_line(
            f"`with {spelling} as step:` records its body once for all those steps, so "
            f"`step` is not one step's number and cannot be compared, computed with or "
            f"used as an index; write `for step in {spelling}:` (its body is recorded once "
            f"per step, `step` a real int)", user_line()))

    __bool__ = __index__ = __int__ = __float__ = __hash__ = _refuse
    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = _refuse
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _refuse
    __mod__ = __rmod__ = __floordiv__ = __rfloordiv__ = __truediv__ = __rtruediv__ = _refuse
    __neg__ = __format__ = _refuse

    def __repr__(self) -> str:
        return f"<the steps of `{_spelling(self._steps)}` (one recording for them all)>"
