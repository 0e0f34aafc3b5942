"""Generation: interventions across the decoding steps of transformers' ``generate``.

``with lm.generate(prompt, max_new_tokens=n) as tracer:`` records interventions like a
trace. A node recorded outside ``tracer.iter[...]`` / ``tracer.all()`` applies to the first
step; inside them, to the chosen steps, once per step (a saved value becomes a list with one
entry per step). Every model call ``generate`` makes is one step; its boundary events drive
the Program as in the hooks backend: each node runs as soon as its values exist in the
current step, and a write runs at its module's boundary.

On the fx backend (the default) every step runs as a rewritten graph (see
:mod:`fxsight.decoding`; ``compile=True`` compiles the decoding step once for all steps);
on the hooks backend, or where a step cannot be captured, the steps run through forward
hooks (:class:`_StepInterleaver`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections import defaultdict
from typing import Any, Iterator

import torch

from ..record.active import current_tracer
from ..generate.decoding import GraphSteps, Unsupported
from ..errors import TraceError, at_line, user_line, user_stacklevel
from ..run.hooks import _RealWalker
from ..capture.events import ModuleEvents
from ..record.program import Node
from ..splice.rows import Rows
from ..record.sites import INPUT, OUTPUT, Site, module_label
from ..api.tracer import Tracer, _dynamic_policy, _freeze

GENERATOR = Site("generator", OUTPUT, 0)
ALL = "all"


class Steps:
    """A choice of decoding steps: an int, a slice, a list of ints, or every step."""

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

    def __repr__(self) -> str:
        return f"Steps({self.choice!r})"


class _StepScope:
    """``with tracer.iter[1:4]:`` / ``for step in tracer.iter[1:4]:`` / ``tracer.all()``."""

    def __init__(self, tracer: "Generator", steps: Steps):
        self.tracer = tracer
        self.steps = steps
        self._previous: Steps | None = None

    def __enter__(self) -> Steps:
        self._previous = self.tracer._steps
        self.tracer._steps = self.steps
        return self.steps

    def __exit__(self, *exc) -> bool:
        self.tracer._steps = self._previous
        return False

    def __iter__(self) -> Iterator[Steps]:
        # the loop body is recorded once and applied at every chosen step
        with self:
            yield self.steps


class _StepIndexer:
    def __init__(self, tracer: "Generator"):
        self.tracer = tracer

    def __getitem__(self, choice: Any) -> _StepScope:
        if not isinstance(choice, (int, slice, list, tuple)):
            raise TypeError(f"tracer.iter takes an int, a slice or a list of steps, "
                            f"not {choice!r}")
        return _StepScope(self.tracer, Steps(list(choice) if isinstance(choice, tuple)
                                             else choice))


class Generator(Tracer):
    """The context of ``lm.generate(...)``: a trace whose model call is ``generate``."""

    def __init__(self, model, args: tuple, generate_kwargs: dict, *, backend: str = "auto",
                 compile: Any = None):
        super().__init__(model, args, {}, backend=backend, compile=compile, prune=False)
        self._generate_kwargs = generate_kwargs
        self._steps: Steps | None = None

    # --- user API -----------------------------------------------------------------------
    @property
    def iter(self) -> _StepIndexer:
        """``tracer.iter[1:4]``: the steps the interventions inside apply to."""
        return _StepIndexer(self)

    def all(self) -> _StepScope:
        """Interventions inside apply to every decoding step."""
        return _StepScope(self, Steps(ALL))

    @property
    def result(self) -> Any:
        """The generated token ids (a proxy inside the block)."""
        if self._state == "recording":
            return self._read(GENERATOR, "output")
        return self._output

    output = result

    # --- recording: every new node remembers the steps it belongs to ------------------------
    def _stamp(self) -> None:
        for node in reversed(self.program.nodes):
            if "steps" in node.meta:
                break
            node.meta["steps"] = self._steps

    def _record(self, *args, **kwargs):
        proxy = super()._record(*args, **kwargs)
        self._stamp()
        return proxy

    def _read(self, site: Site, accessor: str):
        proxy = super()._read(site, accessor)
        self._stamp()
        return proxy

    def _write(self, site: Site, accessor: str, value: Any) -> None:
        super()._write(site, accessor, value)
        self._stamp()

    def _grad_of(self, proxy):
        raise TraceError(at_line("gradients are not available inside generate()",
                                 user_line()))

    def cache(self, *args, **kwargs):
        """Not available inside ``generate()``: it would have to hold every module at every
        step; save what you need inside ``tracer.all()`` (one value per step) instead."""
        raise TraceError(at_line("tracer.cache() is not available inside generate(); save "
                                 "the values you need inside `with tracer.all():` (a list "
                                 "with one value per step)", user_line()))

    def stop(self) -> None:
        """Not available inside ``generate()``: ``max_new_tokens`` ends generation."""
        raise TraceError(at_line("tracer.stop() is not available inside generate(); "
                                 "max_new_tokens (or an eos token) ends generation",
                                 user_line()))

    _set_grad = _grad_of

    # --- running ------------------------------------------------------------------------
    def _execute(self) -> None:
        for barrier in self._barriers:
            barrier.check()
        args, kwargs, rows = self._batched()
        self.model._before_run()
        module = self.model._module
        inputs = {k: v for k, v in kwargs.items() if k not in ("position_ids", "use_cache")}
        options = dict(self._generate_kwargs)
        if self._backend_choice != "hooks":
            rng = torch.random.get_rng_state()
            try:
                self._generate_with_graphs(module, inputs, options, rows)
                return
            except Unsupported as reason:
                if self._backend_choice == "fx":
                    raise TraceError(f"generate() cannot run on the fx backend: {reason}") \
                        from None
                torch.random.set_rng_state(rng)  # (a seeded sampling starts over alike)
                self._warn_generation_fallback(str(reason))
        interleaver = _StepInterleaver(self.program, rows)
        with interleaver.installed(module):
            output = module.generate(**inputs, **options)
        interleaver.finish(output)
        self.backend = "hooks"
        self._output, self._output_kept = output, True
        self._results = {node: interleaver.result(node) for node in self.program.saves}

    def _generate_with_graphs(self, module, inputs: dict, options: dict,
                              rows: dict[Any, Rows]) -> None:
        """Every decoding step as a rewritten graph (:mod:`fxsight.decoding`)."""
        after = _needs_generated_ids(self.program)
        steps = GraphSteps(module, self.program, rows, self._compile, _freeze(self._compile),
                           _dynamic_policy(self._compile), after)
        original = module.__dict__.get("forward")
        module.forward = steps.forward_for(module.forward)
        try:
            output = module.generate(**inputs, **options)
        finally:
            if original is None:
                del module.forward
            else:
                module.forward = original
        values = dict(steps.persistent)
        if after:
            walker = _RealWalker(self.program, rows, _AnySite())
            walker.values.update(values)
            walker.positions.update((node, 0) for node in values)  # (all "now")
            walker.event_values[GENERATOR] = output
            for node in self.program.nodes:
                if node in after:
                    walker.visit(node)
            values.update((node, walker.values[node]) for node in after)
        self.backend = "fx"
        self.graph_module = steps.graph_module
        self._output, self._output_kept = output, True
        self._results = {node: values[node] if node in after else steps.result(node)
                         for node in self.program.saves}

    def _warn_generation_fallback(self, reason: str) -> None:
        warned = self.model.__dict__.setdefault("_generation_warned", set())
        if reason not in warned:
            warned.add(reason)
            warnings.warn(f"fxsight: generate() runs with the hooks backend: {reason}",
                          RuntimeWarning, stacklevel=user_stacklevel())


def _needs_generated_ids(program) -> set[Node]:
    """The nodes that read ``lm.generator.output`` or depend on it."""
    after: set[Node] = set()
    for node in program.nodes:
        if (node.meta["kind"] == "read" and node.meta["site"] == GENERATOR) or \
                any(arg in after for arg in node.all_input_nodes):
            after.add(node)
    return after


class _AnySite(dict):
    """Positions do not order a generation step: every site is 'now'."""

    def __contains__(self, site: object) -> bool:
        return True

    def __missing__(self, site: Site) -> int:
        return 0


class _StepInterleaver:
    """Runs a Program over the model calls of one ``generate``."""

    def __init__(self, program, rows: dict[Any, Rows]):
        skip = next((n for n in program.nodes if n.meta.get("skip")), None)
        if skip is not None:
            raise TraceError(at_line(
                f"{module_label(skip.meta['site'].path)}.skip(...) inside generate() needs "
                f"the fx backend (this generation runs on hooks)", skip.meta["line"]))
        self.program = program
        self.rows = rows
        self.after = _needs_generated_ids(program)  # they run once generate is done
        self.once = [n for n in program.nodes if n.meta.get("steps") is None]
        self.per_step = [n for n in program.nodes if n.meta.get("steps") is not None]
        self.persistent: dict[Node, Any] = {}
        self.collected: dict[Node, list[Any]] = defaultdict(list)
        self.step = -1
        self.walker: _RealWalker | None = None
        self.pending: list[Node] = []
        self.base: dict[str, int] = {}
        self.events: ModuleEvents | None = None

    @contextlib.contextmanager
    def installed(self, module):
        paths = {n.meta["site"].path for n in self.program.nodes
                 if n.meta["kind"] in ("read", "write") and n.meta["site"] != GENERATOR}
        self.events = ModuleEvents(module, self._on_event, only=paths | {""})
        with self.events.installed():
            yield

    def _start_step(self) -> None:
        self._end_step()
        self.step += 1
        self.walker = _RealWalker(self.program, self.rows, _AnySite())
        self.walker.values.update(self.persistent)
        self.walker.positions.update((node, 0) for node in self.persistent)
        active = [n for n in self.per_step if self.step in n.meta["steps"]]
        self.pending = [n for n in self.program.nodes
                        if (n in active or n in self.once) and n not in self.persistent]

    def _end_step(self) -> None:
        walker = self.walker
        if walker is None:
            return
        for node in self.per_step:
            if node in walker.values and self.step in node.meta["steps"]:
                self.collected[node].append(walker.values[node])
        for node in self.once:
            if node in walker.values:
                self.persistent[node] = walker.values[node]
        late = [n for n in self.pending if n not in self.after and (
            n.meta["kind"] == "write" or n.meta.get("steps") is not None or
            (n.meta["kind"] == "read" and n in self.once))]
        if late:
            node = late[0]
            if "site" in node.meta:
                message = (f"{node.meta['site'].label} was not reached in decoding step "
                           f"{self.step} (or this write depends on a later value)")
            else:
                message = (f"this was not computed in decoding step {self.step}: a value it "
                           f"needs is only computed in other steps, or its module did not run")
            raise TraceError(at_line(message, node.meta["line"]))

    def _on_event(self, site: Site, value: Any) -> Any:
        events = self.events
        if site.path == "" and site.kind == INPUT:
            self._start_step()
            self.base = dict(events.calls)
            self.base[""] = events.calls[""] - 1
        local = Site(site.path, site.kind, site.call - self.base.get(site.path, 0))
        walker = self.walker
        walker.event_values[local] = value
        walker.current.pop(local, None)
        self._pump(local)
        if local in walker.written:
            walker.written.discard(local)
            new = walker.current[local]
            return (tuple(new[0]), dict(new[1])) if local.kind == INPUT else new
        return None

    def _ready(self, node: Node, firing: Site | None) -> bool:
        walker = self.walker
        if any(arg not in walker.values for arg in node.all_input_nodes):
            return False
        kind = node.meta["kind"]
        if kind == "read":
            site = node.meta["site"]
            if site == GENERATOR:
                return site == firing
            return site in walker.event_values and (self.step == 0 or node not in self.once)
        if kind == "write":
            return node.meta["site"] == firing
        return True

    def _pump(self, firing: Site | None) -> None:
        progress = True
        while progress:
            progress = False
            for node in list(self.pending):
                if self._ready(node, firing):
                    try:
                        self.walker.visit(node)
                    except Exception as error:
                        if not isinstance(error, TraceError):
                            error.add_note(f"  at {node.meta.get('line')}")
                        raise
                    self.pending.remove(node)
                    progress = True

    def finish(self, output: Any) -> None:
        self._end_step()
        if self.walker is None:
            self._start_step()
        self.walker.event_values[GENERATOR] = output
        self.pending = [n for n in self.once if n not in self.persistent
                        and n not in self.walker.values]
        self._pump(GENERATOR)
        for node in self.once:
            if node in self.walker.values:
                self.persistent[node] = self.walker.values[node]
        if self.pending:
            node = self.pending[0]
            site = node.meta.get("site")
            where = f"{module_label(site.path)}" if site else "a value it needs"
            raise TraceError(at_line(f"{where} never ran during generation, so this "
                                     f"intervention could not be applied", node.meta["line"]))

    def result(self, node: Node) -> Any:
        if node.meta.get("steps") is not None:
            return list(self.collected.get(node, []))
        return self.persistent[node]


class GeneratorEnvoy:
    """``lm.generator``: ``.output`` is the generated token ids (inside ``generate``)."""

    def __init__(self, model):
        self._model = model

    @property
    def output(self):
        tracer = current_tracer(self._model)
        if not isinstance(tracer, Generator):
            raise TraceError(at_line("lm.generator.output is only available inside "
                                     "`with lm.generate(...)`", user_line()))
        return tracer._read(GENERATOR, "output")
