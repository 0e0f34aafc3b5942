"""Scopes: which rows of the batch and which decoding steps a recorded node applies to.

Every node takes the recorder's scope at the moment it is recorded: the invoke whose rows
it sees (``None`` for the whole batch) and, inside ``generate``, the decoding steps it runs
at (``None``: the first step only).
"""

from __future__ import annotations

from typing import Any, NamedTuple

ALL = "all"


class Steps:
    """A choice of decoding steps: an int, a slice, a list of ints, or every step."""

    __slots__ = ("choice",)

    def __init__(self, choice: Any):
        if isinstance(choice, slice) and (choice.step or 1) <= 0:
            raise ValueError("step slices must go forward")
        self.choice = choice

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

    def __repr__(self) -> str:
        return f"Steps({self.choice!r})"


class Scope(NamedTuple):
    """The invoke (``None``: the whole batch) and decoding steps (``None``: the first step,
    or a plain trace) that nodes recorded now belong to."""

    invoke: int | None = None
    steps: Steps | None = None


WHOLE_BATCH = Scope()
