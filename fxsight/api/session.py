"""``with model.session():`` several traces as one unit (nnsight's session).

Each trace inside runs when its own block ends, as outside a session, so Python between
traces (conditions, loops with ``break``) sees real values. What a session adds: a value
of an earlier trace can be used in a later one without ``.save()`` (a trace inside a
session saves the traced values its caller's variables hold when it ends), and
``fxsight.save(obj)`` on a list, dict or object of your own called in the session (outside
a trace) collects the traced values of every trace inside it.
"""

from __future__ import annotations

from typing import Any

from ..record.active import active_sessions


class Session:
    """The context of ``model.session()``.

    >>> import torch, fxsight
    >>> net = fxsight.NNsight(torch.nn.Linear(2, 2))
    >>> with net.session():
    ...     outs = fxsight.save(list())
    ...     with net.trace(torch.ones(1, 2)):
    ...         first = net.output          # (no .save(): a later trace uses it)
    ...     with net.trace(torch.zeros(1, 2)):
    ...         net.output = first
    ...         outs.append(net.output)
    >>> torch.equal(outs[0], first)
    True
    """

    def __init__(self, model: Any):
        self.model = model
        self.kept: list[Any] = []

    def keep(self, value: Any) -> None:
        if not any(value is other for other in self.kept):
            self.kept.append(value)

    def __enter__(self) -> "Session":
        active_sessions().append(self)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        stack = active_sessions()
        if self in stack:
            stack.remove(self)
        return False
