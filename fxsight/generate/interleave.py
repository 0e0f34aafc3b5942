"""Generation on the hooks backend: a Program driven by the module events of each model
call ``generate`` makes.

Every model call is one decoding step. Nodes recorded outside ``tracer.iter``/``tracer.all()``
run at the first step, the others at their steps (a saved value becomes a list with one
entry per step); each node runs as soon as its values exist in the current step, and a write
runs at its module's boundary. Nodes that read the generated ids run once, after
``generate`` (one value in any scope: see :func:`check_ids_with_step_values`).
"""

from __future__ import annotations

import contextlib
import copy
from collections import defaultdict
from typing import Any

import torch

from .._torch import user_modes_suspended
from ..capture.caches import Unsupported as CacheUnsupported
from ..capture.caches import build, flatten, is_cache
from ..capture.events import ModuleEvents
from ..errors import EDIT_CALL_HINT, TraceError, at_line
from ..record.program import Kind, Node
from ..record.sites import INPUT, OUTPUT, Site, module_label
from ..run.hooks import RealWalker
from ..splice.rows import Rows, narrow_row_groups, narrow_rows
from .decoding import expanded_step_rows, step_result

GENERATOR = Site("generator", OUTPUT, 0)  # ``lm.generator.output``: the generated ids


def needs_generated_ids(program) -> set[Node]:
    """The nodes that read ``lm.generator.output`` or depend on it."""
    after: set[Node] = set()
    for node in program.nodes:
        if (node.kind is Kind.READ and node.site == GENERATOR) or \
                any(arg in after for arg in node.all_input_nodes):
            after.add(node)
    return after


def check_ids_with_step_values(program) -> None:
    """The generated ids are one value of the whole generation, known once it has ended: a
    value computed from them (in any scope: nnsight's generator is called once, after
    ``generate``) is computed once, from them and from values of the first step or of one
    step of a ``for step in tracer.iter[...]`` loop. One that also needs a value of every
    chosen step (of ``with tracer.all():`` / ``with tracer.iter[...]:``, a list, one per
    step) has no one step to be computed at: a TraceError at its line, before running."""
    after = needs_generated_ids(program)
    for node in program.nodes:
        if node not in after:
            continue
        for arg in node.all_input_nodes:
            if arg not in after and arg.steps is not None and not arg.steps.single:
                raise TraceError(at_line(
                    "this uses the generated ids (lm.generator.output), one value known "
                    "once generation has ended, with a value of each decoding step of "
                    "`with tracer.all():` / `with tracer.iter[...]:` (one per step): save "
                    "both and combine them after the block, or use them in a step loop "
                    "(`for step in tracer.all():`), where each step's value is one",
                    node.line))


class AnySite(dict):
    """Positions do not order a generation step: every site is 'now'."""

    def __contains__(self, site: object) -> bool:
        return True

    def __missing__(self, site: Site) -> int:
        return 0


class StepWalker(RealWalker):
    """The walker of one decoding step. Its ``rows`` are the step's: ``generate`` runs
    each prompt row as consecutive rows (its beams, or its sequences), so an invoke's
    rows are its prompts' groups of rows. The generated ids (``lm.generator.output``)
    have a group per prompt of a size of their own (``num_return_sequences`` rows of a
    beam search of more beams): an invoke reads its prompts' groups of each of their
    tensors (``prompt_rows``: the invokes' rows of the prompts)."""

    def __init__(self, program, rows: dict[Any, Rows], prompt_rows: dict[Any, Rows]):
        super().__init__(program, rows, AnySite())
        self.prompt_rows = prompt_rows

    def _rows(self, node: Node) -> Rows:
        if node.site == GENERATOR:
            return self.prompt_rows[node.invoke]
        return self.rows[node.invoke]

    def narrowing(self, site: Site):
        return narrow_row_groups if site == GENERATOR else narrow_rows

    def _read(self, node: Node) -> None:
        super()._read(node)
        if node.site == GENERATOR:
            rows = self._rows(node)
            if not rows.whole:
                self.values[node] = _invokes_own_output(
                    self.values[node], rows,
                    rows.start * self.rows[None].total // rows.total, node.line)


def _invokes_own_output(value: Any, rows: Rows, offset: int, line: Any = None) -> Any:
    """An invoke's rows of ``generate``'s output object (its tensors' rows are taken
    leaf by leaf), as a ``generate`` of its prompts alone returns it: ``beam_indices``
    counted from the invoke's first beam (a beam search numbers the beams of the whole
    batch: ``offset`` = the beams before the invoke's; ``-1``, no beam, stays), and the
    cache object holding the invoke's rows (a new one: generate's is the batch's)."""
    if not hasattr(value, "keys") or not hasattr(value, "beam_indices") and \
            not any(is_cache(item) for item in value.values()):
        return value
    value = copy.copy(value)  # (generate's own object is the whole batch's)
    indices = getattr(value, "beam_indices", None)
    if isinstance(indices, torch.Tensor) and offset:
        value.beam_indices = torch.where(indices >= 0, indices - offset, indices)
    for name, item in list(value.items()):
        if is_cache(item):
            try:
                tensors, skeleton = flatten(item)
            except CacheUnsupported as error:
                raise TraceError(at_line(
                    f"an invoke's rows of generate's {name} ({type(item).__name__}) cannot "
                    f"be taken ({error}): read generate's output outside the invokes "
                    f"(tracer.result after the block)", line)) from None
            setattr(value, name, build(skeleton, [
                narrow_row_groups(t, rows.start, rows.stop, rows.total) for t in tensors]))
    return value


def _batch_size(inputs: tuple[tuple, dict]) -> int | None:
    """The batch of a model call's ``(args, kwargs)``: the rows of its token ids (or of
    its input embeddings, or of its first batched tensor)."""
    args, kwargs = inputs
    for name in ("input_ids", "inputs_embeds"):
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return None


class StepInterleaver:
    """Runs a Program over the model calls of one ``generate``."""

    def __init__(self, program, rows: dict[Any, Rows], operations: frozenset = frozenset()):
        skip = next((n for n in program.nodes if n.skip), None)
        if skip is not None:
            raise TraceError(at_line(
                f"{module_label(skip.site.path)}.skip(...) inside generate() needs "
                f"the fx backend (this generation runs on hooks)", skip.line))
        self.program = program
        self.rows = rows
        self.operations = operations  # (``.source`` sites: capture.operations' spec)
        self.after = needs_generated_ids(program)  # they run once generate is done
        self.once = [n for n in program.nodes if n.steps is None]
        self._once = set(self.once)
        self.per_step = [n for n in program.nodes if n.steps is not None]
        # the per-step nodes of one step each (a ``tracer.iter`` loop's body, recorded
        # once per step) found by their step; the others asked at every step
        self._at_step: dict[int, list[Node]] = defaultdict(list)
        self._any_steps: list[Node] = []
        for node in self.per_step:
            if type(node.steps.choice) is int:
                self._at_step[node.steps.choice].append(node)
            else:
                self._any_steps.append(node)
        self._order = {node: index for index, node in enumerate(program.nodes)}
        self.active: list[Node] = []  # the per-step nodes of the step under way
        self.persistent: dict[Node, Any] = {}
        self.collected: dict[Node, list[Any]] = defaultdict(list)
        self.step = -1
        self.walker: RealWalker | None = None
        self.pending: list[Node] = []
        self.base: dict[str, int] = {}
        self.events: ModuleEvents | None = None

    @contextlib.contextmanager
    def installed(self, module):
        paths = {n.site.path for n in self.program.nodes
                 if n.kind in (Kind.READ, Kind.WRITE) and n.site != GENERATOR}
        self.events = ModuleEvents(module, self._on_event, only=paths | {""},
                                   operations=self.operations, keep_fast_paths=True)
        with self.events.installed():
            yield

    def _start_step(self, batch: int | None = None) -> None:
        """A new decoding step, of a model call of ``batch`` rows (``None``: unknown,
        the invokes' own)."""
        self._end_step()
        self.step += 1
        rows = self.rows if batch is None else expanded_step_rows(self.rows, batch)
        self.walker = StepWalker(self.program, rows, self.rows)
        self.walker.values.update(self.persistent)
        self.walker.positions.update((node, 0) for node in self.persistent)
        step = self.step
        active = self._at_step.get(step, []) + \
            [n for n in self._any_steps if step in n.steps]
        active.sort(key=self._order.__getitem__)
        self.active = active
        persistent = self.persistent
        pending = [n for n in active if n not in persistent] + \
            [n for n in self.once if n not in persistent]
        pending.sort(key=self._order.__getitem__)  # (in the Program's order)
        self.pending = pending

    def _end_step(self) -> None:
        walker = self.walker
        if walker is None:
            return
        for node in self.active:
            if node in walker.values:
                self.collected[node].append(walker.values[node])
                if node.steps.single:  # (other steps may use it)
                    self.persistent[node] = walker.values[node]
        for node in self.once:
            if node in walker.values:
                self.persistent[node] = walker.values[node]
        late = [n for n in self.pending if n not in self.after and (
            n.kind is Kind.WRITE or n.steps is not None or
            (n.kind is Kind.READ and n in self.once))]
        if late:
            node = late[0]
            if node.site is not None:
                message = (f"{node.site.label} was not reached in decoding step "
                           f"{self.step} (or this write depends on a later value)")
                if node in self.program.from_edits and node.site.call:
                    message += EDIT_CALL_HINT
            else:
                message = (f"this was not computed in decoding step {self.step}: a value it "
                           f"needs is only computed in other steps, or its module did not run")
            raise TraceError(at_line(message, node.line))

    def _on_event(self, site: Site, value: Any) -> Any:
        with user_modes_suspended():  # (fxsight's own work: no user mode sees it)
            return self._at_event(site, value)

    def _at_event(self, site: Site, value: Any) -> Any:
        events = self.events
        if site.path == "" and site.kind == INPUT:
            self._start_step(_batch_size(value))
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
        kind = node.kind
        if kind is Kind.READ:
            site = node.site
            if site == GENERATOR:
                return site == firing
            return site in walker.event_values and (self.step == 0 or node not in self._once)
        if kind is Kind.WRITE:
            return node.site == firing
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
                            error.add_note(f"  at {node.line}")
                        raise
                    self.pending.remove(node)
                    progress = True

    def finish(self, output: Any) -> None:
        self._end_step()
        if self.walker is None:
            self._start_step()
        self.walker.event_values[GENERATOR] = output
        self.pending = [n for n in self.program.nodes
                        if (n in self._once or n in self.after) and n not in self.persistent
                        and n not in self.walker.values]
        self._pump(GENERATOR)
        for node in self.once:
            if node in self.walker.values:
                self.persistent[node] = self.walker.values[node]
        for node in self.after:  # (computed once, from the ids: one value, as on fx)
            if node in self.walker.values:
                self.persistent[node] = self.walker.values[node]
        if self.pending:
            node = self.pending[0]
            site = node.site
            where = f"{module_label(site.path)}" if site else "a value it needs"
            raise TraceError(at_line(f"{where} never ran during generation, so this "
                                     f"intervention could not be applied", node.line))

    def result(self, node: Node) -> Any:
        if node.steps is not None and node not in self.after:
            return step_result(node, self.collected.get(node, []))
        return self.persistent[node]
