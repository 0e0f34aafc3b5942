"""Where fxsight's own time per trace goes (the core benchmark's ``own µs``), and what
bounds it from below.

The core benchmark's steer experiment on its tiny model (GPT-2, 2 layers, 64 wide, vocab
1000; token ids of batch 8 x 32; ``use_cache=False``; no autograd; the eager fx backend):

    with wrapped.trace(ids, use_cache=False):
        kept = wrapped.transformer.h[0].output.save()
        wrapped.transformer.h[1].output[:] += steer
        logits = wrapped.lm_head.output.save()

Each trace is timed in parts: timers between the block's statements (opening the trace,
each line, the end of the block) and around three of fxsight's calls inside the end of the
block: the model state check (``capture.state.state_token``), the rewritten graph
(``Executable.__call__``: excluded from the own cost, as in the core benchmark) and
binding the saved names (``bind.bind_frame``). Two conditions:

- ``after a forward``: a plain forward pass of the model runs between traces (untimed), as
  in a script that does other work between traces;
- ``back to back``: one trace after another (the graph run inside each trace replaces
  fxsight's code and data in the CPU's caches all the same).

Two more rows time the same trace where its caller holds a list of 20,000 earlier results
(a loop over experiments that keeps what it found), outside and inside a ``session()``:
binding the saved names (and, in a session, saving what a later trace may use) must not
walk them.

Floors, timed the same ways:

- ``the block's statements alone``: the same three statements against a stand-in model
  (a few plain classes) that records nothing: what Python spends on the block's syntax;
- ``the model state check alone``: the check above, called by itself;
- ``hand-written hooks``: the experiment as forward hooks registered and removed around
  a forward pass, minus the plain forward pass (the two take turns; their difference is
  at the noise level of a forward pass);
- ``a minimal replay design``: what a trace would cost if a repeated block did nothing
  but what a replay of its last recording needs: its statements append a tuple each to a
  list (stand-ins, no nodes, no source lines, no checks), and the end of the block compares
  the list with the last trace's, calls the model state check, compares the input's shape,
  calls the runner fxsight chose for this block (the graph excluded, as everywhere here)
  and binds the two saved names in the caller's frame. Not an implementation: it records
  nothing else, checks no misuse and has no fallback; it bounds what such a redesign
  could reach on this machine.
"""

from __future__ import annotations

import operator
import statistics
import sys
import time
from typing import Any, Callable

import torch

from perf.bench_core import GraphClock, _gpt2, _hooks, _ids, _steer

ORDER = "parts timed inside each trace; the conditions one after the other"
TRACES = 400  # per condition
SAVED, STEERED = 0, 1
CONDITIONS = ("after a forward", "back to back")
PARTS = ("opening the trace (`trace(...)`, `__enter__`)", "line 1: read, save",
         "line 2: read, in-place steer", "line 3: read, save",
         "end of block: the model state check",
         "end of block: binding the saved names",
         "end of block: the rest (lookups, checks, the runner's Python around the graph)")
TOTAL = "fxsight's own cost per trace (the sum)"
HISTORY = 20_000  # earlier results a loop keeps in a list of its own
WITH_HISTORY = (f"the same trace, the caller holding a list of {HISTORY:,} earlier results "
                f"(whole trace minus the graph)")
IN_SESSION = "the same, inside a `session()` (where a trace saves what a later one may use)"
FLOORS = ("the block's statements alone (a stand-in that records nothing)",
          "the model state check alone", "hand-written hooks (hooks − plain forward)",
          "a minimal replay design (the statements append tuples; the end compares them "
          "with the last trace's, checks the model state, calls the same runner, binds two "
          "names)")


class _Timer:
    """Seconds spent in one function of a module, summed while installed."""

    def __init__(self, module: Any, name: str):
        self.module, self.name = module, name
        self.original = getattr(module, name)
        self.seconds = 0.0

    def __enter__(self) -> "_Timer":
        original, timer = self.original, self

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                timer.seconds += time.perf_counter() - start

        setattr(self.module, self.name, timed)
        return self

    def __exit__(self, *exc) -> None:
        setattr(self.module, self.name, self.original)


def _parted_trace(wrapped: Any, ids: torch.Tensor, steer: torch.Tensor,
                  clocks: tuple) -> list[float]:
    """One steer trace; seconds per part (``PARTS``), the graph excluded."""
    graph, state, bind = clocks
    before = (graph.seconds, state.seconds, bind.seconds)
    t0 = time.perf_counter()
    with wrapped.trace(ids, use_cache=False):
        t1 = time.perf_counter()
        kept = wrapped.transformer.h[SAVED].output.save()
        t2 = time.perf_counter()
        wrapped.transformer.h[STEERED].output[:] += steer
        t3 = time.perf_counter()
        logits = wrapped.lm_head.output.save()
        t4 = time.perf_counter()
    t5 = time.perf_counter()
    assert isinstance(kept, torch.Tensor) and isinstance(logits, torch.Tensor)
    graph_s, state_s, bind_s = (c.seconds - b for c, b in zip(clocks, before))
    return [t1 - t0, t2 - t1, t3 - t2, t4 - t3, state_s, bind_s,
            t5 - t4 - graph_s - state_s - bind_s]


# --- the stand-in: the block's syntax against objects that record nothing ---------------
class _StandInValue:
    __slots__ = ()

    def save(self) -> "_StandInValue":
        return self

    def __getitem__(self, key: Any) -> "_StandInValue":
        return self

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def __iadd__(self, other: Any) -> "_StandInValue":
        return self


class _StandInModule:
    def __init__(self, module: torch.nn.Module):
        for name, child in module.named_children():
            setattr(self, name, _StandInModule(child))

    def __getitem__(self, index: int) -> "_StandInModule":
        return getattr(self, str(index))

    @property
    def output(self) -> _StandInValue:
        return _StandInValue()


class _StandInTrace:
    def __enter__(self) -> "_StandInTrace":
        return self

    def __exit__(self, *exc) -> bool:
        return False


def _stand_in(model: torch.nn.Module) -> Callable[[torch.Tensor, torch.Tensor], float]:
    stand_in = _StandInModule(model)
    stand_in.trace = lambda *args, **kwargs: _StandInTrace()

    def block(ids: torch.Tensor, steer: torch.Tensor) -> float:
        start = time.perf_counter()
        with stand_in.trace(ids, use_cache=False):
            stand_in.transformer.h[SAVED].output.save()
            stand_in.transformer.h[STEERED].output[:] += steer
            stand_in.lm_head.output.save()
        return time.perf_counter() - start
    return block


# --- a design's floor: a replay of the last recording, nothing else -----------------------
class _Replay:
    """The steps recorded by one replayed block (stand-ins), and the plan they must equal."""

    active: "_Replay | None" = None

    def __init__(self, ids: torch.Tensor, plan: "_Plan"):
        self.ids, self.plan = ids, plan
        self.steps: list[tuple] = []
        self.inputs: list[torch.Tensor] = []
        self.saved: list["_ReplayValue"] = []

    def step(self, *step: Any) -> "_ReplayValue":
        self.steps.append(step)
        return _ReplayValue(len(self.steps))

    def __enter__(self) -> "_Replay":
        _Replay.active = self
        return self

    def __exit__(self, *exc) -> bool:
        _Replay.active = None
        plan = self.plan
        if plan.steps is None:  # (the first block: its steps are the plan)
            plan.steps = self.steps
        if self.steps != plan.steps or plan.token(plan.model) != plan.state or \
                self.ids.shape != plan.shape:
            raise RuntimeError("the replay floor's plan no longer holds")
        _, saves = plan.runner([self.ids, False, *self.inputs], ())
        values = dict(zip(map(id, self.saved), saves))
        frame = sys._getframe(1)
        names = frame.f_locals
        for name, value in names.items():
            if type(value) is _ReplayValue:
                names[name] = values[id(value)]
        if plan.locals_to_fast is not None:  # (before Python 3.13)
            plan.locals_to_fast(frame, 0)
        return False


class _ReplayValue:
    __slots__ = ("index",)

    def __init__(self, index: int):
        self.index = index

    def save(self) -> "_ReplayValue":
        _Replay.active.saved.append(self)
        return self

    def __getitem__(self, key: Any) -> "_ReplayValue":
        return _Replay.active.step(operator.getitem, self.index, key)

    def __iadd__(self, other: Any) -> "_ReplayValue":
        replay = _Replay.active
        if type(other) is torch.Tensor:
            replay.inputs.append(other)
            other = torch.Tensor
        replay.step(operator.iadd, self.index, other)
        return self

    def __setitem__(self, key: Any, value: "_ReplayValue") -> None:
        _Replay.active.step(operator.setitem, self.index, key, value.index)


class _ReplayModule:
    def __init__(self, module: torch.nn.Module, path: str = ""):
        self._path = path
        for name, child in module.named_children():
            setattr(self, name, _ReplayModule(child, f"{path}.{name}"))

    def __getitem__(self, index: int) -> "_ReplayModule":
        return getattr(self, str(index))

    @property
    def output(self) -> _ReplayValue:
        return _Replay.active.step("output", self._path)


class _Plan:
    """What a replay compares with: the steps of one recording, the model's state token and
    the input's shape then, and the runner fxsight chose for the block."""

    def __init__(self, model: torch.nn.Module, ids: torch.Tensor, runner: Any,
                 token: Callable[[torch.nn.Module], int]):
        from fxsight import bind

        self.model, self.token, self.runner, self.shape = model, token, runner, ids.shape
        self.state = token(model)
        self.steps: list[tuple] | None = None  # (set by the first replay)
        self.locals_to_fast = bind._LOCALS_TO_FAST  # (how fxsight binds names)


def _replay_floor(model: torch.nn.Module, wrapped: Any, ids: torch.Tensor,
                  steer: torch.Tensor, graph: GraphClock) -> Callable[[], float]:
    """The steer block against the replay stand-ins (see the module's docstring): seconds
    per block, the graph excluded."""
    from fxsight.capture import state

    with wrapped.trace(ids, use_cache=False):  # (fxsight's runner for this block)
        wrapped.transformer.h[SAVED].output.save()
        wrapped.transformer.h[STEERED].output[:] += steer
        wrapped.lm_head.output.save()
    last = [*wrapped._last_run.values()][-1]  # (the latest run: this block's)
    plan = _Plan(model, ids, last.runner(), state.state_token)
    stand_in = _ReplayModule(model)

    def block() -> tuple[Any, Any]:
        with _Replay(ids, plan):
            kept = stand_in.transformer.h[SAVED].output.save()
            stand_in.transformer.h[STEERED].output[:] += steer
            logits = stand_in.lm_head.output.save()
        return kept, logits

    for _ in range(20):
        kept, logits = block()
    assert isinstance(kept, torch.Tensor) and isinstance(logits, torch.Tensor)

    def timed() -> float:
        before = graph.seconds
        start = time.perf_counter()
        block()
        return time.perf_counter() - start - (graph.seconds - before)
    return timed


# --- running -----------------------------------------------------------------------------
def _condition(model: torch.nn.Module, ids: torch.Tensor, between: bool,
               measure: Callable[[], Any], traces: int) -> list[Any]:
    samples = []
    for _ in range(traces):
        if between:
            model(ids, use_cache=False)
        samples.append(measure())
    return samples


def _with_history(wrapped: Any, ids: torch.Tensor, steer: torch.Tensor,
                  graph: GraphClock) -> Callable[[], float]:
    """A steer trace whose caller keeps a long list of earlier results (a loop over
    experiments): what binding the saved names costs there."""
    results = [torch.zeros(1) for _ in range(HISTORY)]

    def trace() -> float:
        before = graph.seconds
        start = time.perf_counter()
        with wrapped.trace(ids, use_cache=False):
            kept = wrapped.transformer.h[SAVED].output.save()
            wrapped.transformer.h[STEERED].output[:] += steer
            logits = wrapped.lm_head.output.save()
        elapsed = time.perf_counter() - start - (graph.seconds - before)
        assert isinstance(kept, torch.Tensor) and isinstance(logits, torch.Tensor)
        assert len(results) == HISTORY
        return elapsed
    return trace


def _estimators(samples: list[float]) -> dict[str, float]:
    return {"median": statistics.median(samples) * 1e6, "min": min(samples) * 1e6}


def run(quick: bool = False, threads: int = 2) -> list[dict[str, Any]]:
    """One dict per part and floor: ``{part, <condition>: {median, min}}`` in µs."""
    import fxsight
    from fxsight.api import tracer as tracer_module
    from fxsight.capture import state

    traces = 60 if quick else TRACES
    torch.set_num_threads(threads)
    model = _gpt2(2, 64, 4, 1000)
    ids, steer = _ids(model), _steer(model)
    wrapped = fxsight.NNsight(model)
    rows: dict[str, dict[str, Any]] = {
        part: {"part": part} for part in (*PARTS, TOTAL, WITH_HISTORY, IN_SESSION, *FLOORS)}
    with torch.no_grad():
        with GraphClock() as graph, _Timer(state, "state_token") as check, \
                _Timer(tracer_module, "bind_frame") as bind:
            clocks = (graph, check, bind)
            for _ in range(20):
                _parted_trace(wrapped, ids, steer, clocks)
            for condition in CONDITIONS:
                samples = _condition(model, ids, condition == CONDITIONS[0],
                                     lambda: _parted_trace(wrapped, ids, steer, clocks),
                                     traces)
                for i, part in enumerate(PARTS):
                    rows[part][condition] = _estimators([s[i] for s in samples])
                rows[TOTAL][condition] = _estimators([sum(s) for s in samples])
            history = _with_history(wrapped, ids, steer, graph)
            for condition in CONDITIONS:
                rows[WITH_HISTORY][condition] = _estimators(
                    _condition(model, ids, condition == CONDITIONS[0], history, traces))
                with wrapped.session():
                    rows[IN_SESSION][condition] = _estimators(
                        _condition(model, ids, condition == CONDITIONS[0], history, traces))
        block = _stand_in(model)
        hooks, token = _hooks(model, "steer", STEERED, steer), state.state_token
        for condition in CONDITIONS:
            between = condition == CONDITIONS[0]
            rows[FLOORS[0]][condition] = _estimators(
                _condition(model, ids, between, lambda: block(ids, steer), traces))
            rows[FLOORS[1]][condition] = _estimators(
                _condition(model, ids, between, lambda: _timed(token, model), traces))
        rows[FLOORS[2]].update(_hooks_own(model, ids, hooks, traces))
        with GraphClock() as graph:
            replay = _replay_floor(model, wrapped, ids, steer, graph)
            for condition in CONDITIONS:
                rows[FLOORS[3]][condition] = _estimators(
                    _condition(model, ids, condition == CONDITIONS[0], replay, traces))
    return list(rows.values())


def _timed(fn: Callable, *args: Any) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def _hooks_own(model: torch.nn.Module, ids: torch.Tensor, hooks: Callable, traces: int
               ) -> dict[str, dict[str, float]]:
    """The hand-written hooks' cost over the plain forward (the two taking turns); in the
    ``after a forward`` column (each call follows the other's forward pass)."""
    plain, hooked = [], []
    for _ in range(traces):
        plain.append(_timed(lambda: model(ids, use_cache=False)))
        hooked.append(_timed(hooks, ids))
    a, b = _estimators(hooked), _estimators(plain)
    return {CONDITIONS[0]: {k: a[k] - b[k] for k in a}}


def table(results: list[dict[str, Any]]) -> str:
    lines = [f"| part | {CONDITIONS[0]}: median / min µs | {CONDITIONS[1]}: median / min µs |",
             "|---|---:|---:|"]
    for row in results:
        cells = [f"{row[c]['median']:.1f} / {row[c]['min']:.1f}" if c in row else "—"
                 for c in CONDITIONS]
        name = f"**{row['part']}**" if row["part"] == TOTAL else row["part"]
        if row["part"] == FLOORS[0]:
            lines.append("| *floors* | | |")
        lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def targets(results: list[dict[str, Any]]) -> str:
    by_part = {row["part"]: row for row in results}
    own = by_part[TOTAL][CONDITIONS[0]]
    floor = sum(by_part[part][CONDITIONS[0]]["median"] for part in FLOORS[:2])
    replay = by_part[FLOORS[3]].get(CONDITIONS[0])
    replayed = f"; a minimal replay design: {replay['median']:.0f} µs (min " \
        f"{replay['min']:.0f})" if replay else ""
    return (f"- fxsight's own cost per trace after a forward: {own['median']:.0f} µs (min "
            f"{own['min']:.0f}; target < 100): {'met' if own['median'] < 100 else 'NOT met'}; "
            f"the block's statements against a stand-in and the model state check alone: "
            f"{floor:.0f} µs{replayed}")


if __name__ == "__main__":
    found = run()
    print(table(found))
    print(targets(found))
