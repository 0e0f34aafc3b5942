"""The step scopes of ``lm.generate``: ``tracer.iter[...]`` and ``tracer.all()``, entered
with ``with`` (nodes recorded once for the chosen decoding steps) or iterated with ``for``
(the body recorded once per step), for :class:`~fxsight.api.generation.Generator`."""

from __future__ import annotations

import sys
from typing import Any, Iterator

from ..record.active import active_sessions
from ..record.scope import Scope, Steps, resolve_choice
from .block_steps import step_target
from .calls import refuse_nested, scoped_loop
from .tracer import Tracer


class StepScope:
    """``with tracer.iter[1:4]:`` / ``with tracer.all():``: nodes recorded inside apply at
    the chosen decoding steps (recorded once; a saved value is a list, one per step).

    ``for step in tracer.iter[1:4]:`` / ``for step in tracer.all():``: the body is
    recorded once per step, ``step`` a real int (so ``if step == 2:``, ``h[step]`` and
    Python lists filled per step work); a value saved there is that step's value. An
    open-ended slice or ``all()`` runs to ``max_new_tokens``.
    """

    def __init__(self, tracer: Tracer, steps: Steps):
        self.tracer = tracer
        self.steps = steps
        self._previous: Scope | None = None

    def __enter__(self) -> Any:
        recorder = self.tracer.recorder
        refuse_nested(recorder.scope.steps is not None, "step")
        self._previous = recorder.scope
        recorder.scope = recorder.scope._replace(steps=self.steps)
        return step_target(self.steps)

    def __exit__(self, exc_type: Any, *exc: Any) -> bool:
        self.close(sys._getframe(1), exc_type is not None)
        return False

    def close(self, frame: Any, failed: bool) -> None:
        """End the scope, entered in ``frame``: what the block appended there to a list is
        one entry per step after the run (see :mod:`fxsight.api.step_appends`)."""
        self.tracer.recorder.scope = self._previous
        if not failed:
            steps = self.steps
            kept = [*self.tracer._kept, *(obj for s in active_sessions() for obj in s.kept)]
            self.tracer._step_appends.mark(
                frame, kept,
                lambda proxy: object.__getattribute__(proxy, "_node").steps is steps)

    def __iter__(self) -> Iterator[int]:
        refuse_nested(self.tracer.recorder.scope.steps is not None, "step")
        steps = self.steps.concrete(self.tracer._step_count)
        return scoped_loop(self.tracer.recorder, steps,
                         lambda step: {"steps": Steps(step, single=True)})


class StepIndexer:
    """``tracer.iter``: indexed with an int, a slice or a list of steps."""

    def __init__(self, tracer: Tracer):
        self.tracer = tracer

    def __getitem__(self, choice: Any) -> StepScope:
        if not isinstance(choice, (int, slice, list, tuple)):
            raise TypeError(f"tracer.iter takes an int, a slice or a list of steps, "
                            f"not {choice!r}")
        return StepScope(self.tracer, Steps(resolve_choice(
            choice, "step", self.tracer._counted_steps)))
