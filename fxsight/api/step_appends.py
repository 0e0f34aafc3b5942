"""Appends inside ``with tracer.all():`` / ``with tracer.iter[...]:`` in ``lm.generate``:
one entry per decoding step, as nnsight's body, run once per step, appends once per step.

fxsight records such a block once, so ``logits.append(lm.lm_head.output)`` there puts one
proxy into the list, whose value is the list of the steps' values. When the step scope
ends, the lists the caller's frame reaches (its variables and the lists, dicts and objects
of the user's those hold, a few levels deep) and the objects kept with ``fxsight.save`` are
looked at from their end: the proxies recorded in the scope found there were appended in
it, and are marked. After the run, the binding puts each marked proxy's values in its
place, one entry per step (:func:`fxsight.bind.bind_frame`'s ``spreads``). A value
recorded in the scope and appended after it (``h = ...save()`` inside, ``l.append(h)``
after) stays one entry, the list of the steps' values, as ``h`` itself is.
"""

from __future__ import annotations

import types
from typing import Any, Callable, Iterable

from ..bind import reachable_lists
from ..record.proxy import Proxy


class StepAppends:
    """The proxies appended to lists inside a trace's step scopes (see the module's
    docstring); held until the trace has bound its values, then let go."""

    def __init__(self) -> None:
        # id(list) -> (the list, ids of the proxies appended to it in a step scope)
        self._marks: dict[int, tuple[list, set[int]]] = {}

    def mark(self, frame: types.FrameType | None, kept: Iterable[Any],
             recorded_in: Callable[[Proxy], bool]) -> None:
        """Mark the proxies ``recorded_in`` the scope that end a list ``frame`` or ``kept``
        reach (appended while the scope was open)."""
        roots = list(kept)
        if frame is not None:
            roots.extend(frame.f_locals.values())
        for found in reachable_lists(roots):
            appended = []
            for item in reversed(found):
                if type(item) is not Proxy or not recorded_in(item):
                    break
                appended.append(id(item))
            if appended:
                entry = self._marks.setdefault(id(found), (found, set()))
                entry[1].update(appended)

    def spreads(self, container: list, item: Any) -> bool:
        """Whether ``item`` was appended to ``container`` in a step scope."""
        entry = self._marks.get(id(container))
        return entry is not None and entry[0] is container and id(item) in entry[1]

    def __bool__(self) -> bool:
        return bool(self._marks)

    def clear(self) -> None:
        """Let go of the lists (after the binding)."""
        self._marks.clear()
