"""Scopes: which rows of the batch and which decoding steps a recorded node applies to.

Every node takes the recorder's scope at the moment it is recorded: the invoke whose rows
it sees (``None`` for the whole batch) and, inside ``generate``, the decoding steps it runs
at (``None``: the first step only).
"""

from __future__ import annotations

from typing import Any, NamedTuple

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


class Scope(NamedTuple):
    """The invoke (``None``: the whole batch) and decoding steps (``None``: the first step,
    or a plain trace) that nodes recorded now belong to; ``call``: in a plain trace's
    ``for i in tracer.iter[...]`` loop, the call of each module that reads and writes
    see (``None``: the first, or the envoy's own)."""

    invoke: int | None = None
    steps: Steps | None = None
    call: int | None = None


WHOLE_BATCH = Scope()
