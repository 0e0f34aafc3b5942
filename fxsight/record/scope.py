"""Scopes: which rows of the batch and which decoding steps a recorded node applies to.

Every node takes the recorder's scope at the moment it is recorded: the invoke whose rows
it sees (``None`` for the whole batch) and, inside ``generate``, the decoding steps it runs
at (``None``: the first step only).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from ..errors import TraceError, at_line, user_line

ALL = "all"


class Steps:
    """A choice of decoding steps: an int, a slice, a list of ints, or every step.

    ``single``: one step of a ``for step in tracer.iter[...]`` loop, whose body is recorded
    once per step (a value saved there is that step's value, not a list)."""

    __slots__ = ("choice", "single")

    def __init__(self, choice: Any, single: bool = False):
        if isinstance(choice, slice) and (choice.step or 1) <= 0:
            raise ValueError("step slices must go forward")
        self.choice = choice
        self.single = single

    def __contains__(self, step: int) -> bool:
        choice = self.choice
        if choice == ALL:
            return True
        if isinstance(choice, int):
            return step == choice
        if isinstance(choice, slice):
            start, stop, stride = choice.start or 0, choice.stop, choice.step or 1
            return step >= start and (stop is None or step < stop) and \
                (step - start) % stride == 0
        return step in choice

    def missing(self, count: int) -> list[int]:
        """The chosen steps that did not happen when ``count`` steps ran: every step of
        an int or a list must run; a slice runs the steps of it that happened (open-ended
        or cut short by ``max_new_tokens``), so it misses only when none of them did."""
        choice = self.choice
        if choice == ALL:
            return []
        if isinstance(choice, int):
            return [choice] if choice >= count else []
        if isinstance(choice, slice):
            start = choice.start or 0
            return [start] if start >= count else []
        return [step for step in choice if step >= count]

    def concrete(self, bound: Any) -> list[int]:
        """The chosen steps as ints; ``bound()`` gives the number of steps, asked only
        for an open-ended slice or every step."""
        choice = self.choice
        if isinstance(choice, int):
            return [choice]
        if isinstance(choice, list):
            return list(choice)
        if choice == ALL:
            return list(range(bound()))
        stop = bound() if choice.stop is None else choice.stop
        return list(range(choice.start or 0, stop, choice.step or 1))

    def __repr__(self) -> str:
        return f"Steps({self.choice!r})"


def resolve_choice(choice: Any, what: str, count: Callable[[], int] | None) -> Any:
    """A ``tracer.iter[choice]`` checked and with negative indices resolved: ``what``
    names the unit ("step" or "call"); ``count()`` gives how many there are (``None``:
    unknown before the model runs, so a negative index is refused). An index or slice that
    chooses nothing is refused: it would silently do nothing."""
    choice = list(choice) if isinstance(choice, tuple) else choice
    shown = f"tracer.iter[{_shown(choice)}]"
    items = choice if isinstance(choice, list) else [choice] if isinstance(choice, int) \
        else [i for i in (choice.start, choice.stop) if i is not None]
    if any(not isinstance(i, int) or isinstance(i, bool) for i in items):
        raise TraceError(at_line(f"{shown}: {what}s are chosen with ints", user_line()))
    if isinstance(choice, slice) and (choice.step or 1) <= 0:
        raise TraceError(at_line(f"{shown}: {what} slices must go forward (a positive "
                                 "step)", user_line()))
    if any(i < 0 for i in items):
        if count is None:
            raise TraceError(at_line(
                f"{shown}: {what}s are counted from 0 here (how many {what}s there are is "
                f"known only once the model has run, so a negative {what} cannot be "
                f"resolved)", user_line()))
        total = count()
        chosen = range(total)
        if isinstance(choice, slice):
            resolved = list(chosen[choice])
        else:
            resolved = [i + total if i < 0 else i for i in items]
            if any(i < 0 for i in resolved):
                raise TraceError(at_line(f"{shown}: only {total} {what}s run", user_line()))
        choice = resolved[0] if isinstance(choice, int) else resolved
    empty = choice == [] or (isinstance(choice, slice) and choice.stop is not None
                             and choice.stop <= (choice.start or 0))
    if empty:
        raise TraceError(at_line(f"{shown} chooses no {what}s: nothing inside it would run",
                                 user_line()))
    return choice


def _shown(choice: Any) -> str:
    if isinstance(choice, slice):
        parts = ["" if i is None else str(i) for i in (choice.start, choice.stop)]
        return ":".join(parts + ([str(choice.step)] if choice.step is not None else []))
    return repr(choice)


class Scope(NamedTuple):
    """The invoke (``None``: the whole batch) and decoding steps (``None``: the first step,
    or a plain trace) that nodes recorded now belong to; ``call``: in a plain trace's
    ``for i in tracer.iter[...]`` loop, the call of each module that reads and writes
    see (``None``: the first, or the envoy's own)."""

    invoke: int | None = None
    steps: Steps | None = None
    call: int | None = None


WHOLE_BATCH = Scope()
