"""``tracer.iter`` and ``tracer.all()`` in a plain trace: the body recorded once per call of
the modules it reads and writes (a module called several times in one forward pass)."""

from __future__ import annotations

from typing import Any

from ..errors import TraceError, at_line, user_line
from ..record.recorder import Recorder
from ..record.scope import ALL, Scope, Steps, resolve_choice


class CallScope:
    """``for i in tracer.iter[...]`` in a plain trace: the body recorded once per call
    ``i`` of the modules it reads and writes. An open-ended slice (or ``tracer.all()``)
    runs to the number of calls of the modules the first pass of the body uses."""

    def __init__(self, tracer: Any, steps: Steps):  # (an api.tracer.Tracer)
        self.tracer = tracer
        self.steps = steps
        self._previous: Scope | None = None

    def __enter__(self) -> int:
        refuse_nested(self.tracer.recorder.scope.call is not None, "call")
        if not isinstance(self.steps.choice, int):
            raise TraceError(at_line("in a trace, `with tracer.iter[...]` takes one call "
                                     "(an int); loop over several: `for i in "
                                     "tracer.iter[0:3]:`", user_line()))
        recorder = self.tracer.recorder
        self._previous = recorder.scope
        recorder.scope = recorder.scope._replace(call=self.steps.choice)
        return self.steps.choice

    def __exit__(self, *exc) -> bool:
        self.tracer.recorder.scope = self._previous
        return False

    def __iter__(self):
        choice = self.steps.choice
        recorder = self.tracer.recorder
        refuse_nested(recorder.scope.call is not None, "call")
        if not (choice == ALL or (isinstance(choice, slice) and choice.stop is None)):
            calls = self.steps.concrete(None)
            if any(not isinstance(c, int) or c < 0 for c in calls):
                raise TraceError(at_line(f"tracer.iter[{choice!r}]: calls are counted "
                                         "from 0", user_line()))
            yield from scoped_loop(recorder, calls, lambda call: {"call": call})
            return
        start, stride = (0, 1) if choice == ALL else (choice.start or 0, choice.step or 1)
        previous, first = recorder.scope, len(self.tracer.program.nodes)
        call, count, line = start, None, user_line()
        try:
            while count is None or call < count:
                recorder.scope = previous._replace(call=call)
                yield call
                recorder.scope = previous
                if count is None:
                    count = self.tracer._calls_of(self.tracer.program.nodes[first:], line)
                call += stride
        finally:
            recorder.scope = previous


def refuse_nested(nested: bool, unit: str) -> None:
    """Refuse ``tracer.iter[...]`` / ``tracer.all()`` inside another (``nested``): each
    chooses the ``unit`` (``"call"``, ``"step"``) of every read and write in its body, so
    an inner choice would replace the outer one and every pass of the outer loop would
    see the inner choice's values, not its own."""
    if not nested:
        return
    if unit == "step":
        detail = ("in generate both choose decoding steps, and the inner choice would "
                  "replace the outer one (each pass of the outer loop would read and write "
                  "the inner one's steps). Choose the steps once (`for step in "
                  "tracer.all():` with `if step == 2:` inside). A module or operation "
                  "called several times in one step is its first call there; "
                  "tracer.cache(modules=[...]) keeps every call of every step")
    else:
        detail = ("both choose the call of every module and operation their body reads "
                  "and writes, and the inner choice would replace the outer one (each pass "
                  "of the outer loop would see the inner one's calls). Choose the calls "
                  "once: one `for i in tracer.iter[...]:` loop, and `if i == 2:` inside")
    raise TraceError(at_line(f"tracer.iter[...] / tracer.all() inside another: {detail}",
                             user_line()))


def scoped_loop(recorder: Recorder, items: list[int], scope_for: Any):
    """Yield each of ``items`` with the recorder's scope changed by ``scope_for(item)``
    (a dict of Scope fields), restored after each and when the loop ends or breaks."""
    previous = recorder.scope
    try:
        for item in items:
            recorder.scope = previous._replace(**scope_for(item))
            yield item
            recorder.scope = previous
    finally:
        recorder.scope = previous


class CallIndexer:
    """``tracer.iter`` of a plain trace: indexed with an int, a slice or a list of calls."""

    def __init__(self, tracer: Any):  # (an api.tracer.Tracer)
        self.tracer = tracer

    def __getitem__(self, choice: Any) -> CallScope:
        if not isinstance(choice, (int, slice, list, tuple)):
            raise TypeError(f"tracer.iter takes an int, a slice or a list of calls, "
                            f"not {choice!r}")
        return CallScope(self.tracer, Steps(resolve_choice(choice, "call", None)))
