"""The blocks inside a trace that choose rows: ``tracer.invoke(...)`` (one input of the
batch: :class:`Invoke`; no input: the whole batch, :class:`WholeBatch`) and nnsight's
``tracer.barrier(n)`` (:class:`Barrier`)."""

from __future__ import annotations

from typing import Any

from ..errors import TraceError, UsageError, at_line, user_line
from ..record.scope import Scope


class Invoke:
    """One input of a batched trace: inside its block, reads and writes see its rows."""

    def __init__(self, tracer: "Tracer", index: int, args: tuple, kwargs: dict):
        self.tracer = tracer
        self.index = index
        self.args = args
        self.kwargs = kwargs
        self.prepared: tuple[tuple, dict, int] | None = None
        # whether its attention mask has a zero, where the wrapper knows it without reading
        # the device (LanguageModel: from the tokens' facts); None where not known
        self.padded: bool | None = None
        # a check its preparation left to be made with the other invokes' before the run
        # (LanguageModel: ``(extremes of its token ids, or the facts of its tokens and of
        # the mask given, where, line, that mask or None)``, read at once)
        self.unchecked: tuple | None = None
        # its position ids are the wrapper's own (LanguageModel: real-token positions of its
        # mask), not the caller's: the batch does not compare them again
        self.positions_made = False
        # (LanguageModel: ``(where, line)`` where its input continues a cache whose rows are
        # padded and gives no position ids: the model places its tokens, as the plain call)
        self.model_positions: tuple[str, str] | None = None
        self._previous: Scope | None = None

    @property
    def inputs(self) -> "InvokeInputs":
        """nnsight >= 0.5's ``invoker.inputs``: this invoke's prepared inputs as ``(args,
        kwargs)``, real values known when the invoke is opened (a ``LanguageModel``'s
        token ids are ``invoker.inputs[1]["input_ids"]``; the logit lens tutorial's
        ``input_tokens = invoker.inputs.save()``). New containers: changing them changes
        nothing of the trace."""
        if self.prepared is None:
            raise TraceError(at_line("this invoke's inputs are not prepared yet",
                                     user_line()))
        args, kwargs, _ = self.prepared
        return InvokeInputs((PositionalInputs(args), dict(kwargs)))

    def __enter__(self) -> "Invoke":
        recorder = self.tracer.recorder
        if recorder.scope.invoke is not None:
            raise UsageError(at_line("invokes cannot be nested", user_line()))
        scope = self._previous = recorder.scope
        # (made directly: ``_replace`` is two Python calls)
        recorder.scope = Scope(self.index, scope.steps, scope.call)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.tracer.recorder.scope = self._previous
        return False


class InvokeInputs(tuple):
    """``(args, kwargs)`` of an invoke (:attr:`Invoke.inputs`): real values, so ``.save()``
    (nnsight saves every object) returns them as they are."""

    def save(self) -> "InvokeInputs":
        """The inputs themselves: they are real values already."""
        return self


class PositionalInputs(tuple):
    """The positional half of :class:`InvokeInputs`: a tuple whose index out of range
    says where the inputs are where they are all keywords (a ``LanguageModel``'s tokens:
    nnsight 0.4's ``invoker.inputs[0][0]["input_ids"]`` is ``invoker.inputs[1]
    ["input_ids"]``)."""

    def __getitem__(self, index: Any) -> Any:
        try:
            return super().__getitem__(index)
        except IndexError:
            if len(self) == 0:
                raise IndexError(
                    "invoker.inputs is (args, kwargs), as nnsight >= 0.5 gives it, and this "
                    "invoke's inputs are all keywords (args is ()): read them from "
                    "invoker.inputs[1] (a LanguageModel's token ids: invoker.inputs[1]"
                    "[\"input_ids\"]; nnsight 0.4 wrote invoker.inputs[0][0][\"input_ids\"])"
                ) from None
            raise


class Alone:
    """The one input of a run without a trace (``trace=False``): no tracer, no other
    invokes. Its preparation notes here what an :class:`Invoke`'s notes on it
    (``padded``), for the check before the run."""

    tracer = None
    index = None

    def __init__(self):
        self.padded: bool | None = None
        self.model_positions: tuple[str, str] | None = None
        self.positions_made = False
        self.prepared: tuple[tuple, dict, int] | None = None  # (once prepared)


class WholeBatch:
    """``tracer.invoke()`` with no input: the block sees the whole batch."""

    def __init__(self, tracer: "Tracer"):
        self.tracer = tracer
        self._previous: Scope | None = None

    def __enter__(self) -> "WholeBatch":
        recorder = self.tracer.recorder
        self._previous = recorder.scope
        recorder.scope = recorder.scope._replace(invoke=None)
        return self

    def __exit__(self, *exc) -> bool:
        self.tracer.recorder.scope = self._previous
        return False


class Barrier:
    """nnsight's barrier: all ``n`` invokes reach it before any goes on.

    fxsight runs every invoke in one dependency-ordered pass, so values flow between
    invokes without it; calling it is accepted and checked (``n`` distinct invokes)."""

    def __init__(self, tracer: "Tracer", participants: int):
        self.tracer = tracer
        self.participants = participants
        self.arrived: set[int | None] = set()
        self.line = user_line()

    def __call__(self) -> None:
        self.arrived.add(self.tracer.recorder.scope.invoke)

    def check(self) -> None:
        if self.arrived and len(self.arrived) != self.participants:
            reached = ", ".join("the whole batch" if i is None else f"#{i}"
                                for i in sorted(self.arrived, key=lambda i: (i is None, i)))
            raise UsageError(at_line(
                f"barrier({self.participants}) was reached by {len(self.arrived)} invoke(s) "
                f"({reached}); each of the {self.participants} participating invokes must "
                f"call it", self.line))
