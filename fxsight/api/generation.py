"""Generation: interventions across the decoding steps of transformers' ``generate``.

``with lm.generate(prompt, max_new_tokens=n) as tracer:`` records interventions like a
trace. A node recorded outside ``tracer.iter[...]`` / ``tracer.all()`` applies to the first
step; inside them, to the chosen steps, once per step (a saved value becomes a list with one
entry per step; the generated ids, ``lm.generator.output``, stay one value in any
scope). ``for step in tracer.iter[...]`` / ``for step in tracer.all()`` record the
loop's body once per step instead, ``step`` a real int (a saved value is that step's).
Every model call ``generate`` makes is one step; its boundary events drive
the Program as in the hooks backend: each node runs as soon as its values exist in the
current step, and a write runs at its module's boundary.

On the fx backend (the default) every step runs as a rewritten graph (see
:mod:`fxsight.generate.decoding`; ``compile=True`` compiles the decoding step once for all steps);
on the hooks backend, or where a step cannot be captured, the steps run through forward
hooks (:class:`StepInterleaver`).
"""

from __future__ import annotations

from typing import Any

from .._torch import user_modes_resumed
from ..capture.caches import Unsupported as CacheUnsupported
from ..capture.caches import flatten, rows_of
from ..capture.effects import saved_generators
from ..errors import NotOnGraph, TraceError, at_line, user_line
from ..generate.decoding import Unsupported, unsupported_options
from ..generate.first_step import repeated_rows
from ..generate.interleave import GENERATOR, StepInterleaver, check_ids_with_step_values
from ..record.scope import ALL, Steps
from ..run.forward import fall_back, metadata_source
from ..run.options import RunOptions
from ..splice.rows import Rows
from .first_step_inputs import FirstStepInputs
from .graph_generation import GraphGeneration
from .step_checks import StepChecks, check_nothing_changed_after, check_steps, check_steps_possible
from .step_branches import step_branch_refusal
from .step_scopes import StepIndexer, StepScope
from .token_inputs import CACHE_KEYWORDS, past_length
from .tracer import Tracer


class Generator(FirstStepInputs, StepChecks, GraphGeneration, Tracer):
    """The context of ``lm.generate(...)``: a trace whose model call is ``generate``."""

    def __init__(self, model: Any, args: tuple, generate_kwargs: dict, options: RunOptions):
        super().__init__(model, args, {}, options)
        self._generate_kwargs = generate_kwargs
        self.recorder.refused["grad"] = "gradients are not available inside generate()"

    # --- user API -----------------------------------------------------------------------
    @property
    def iter(self) -> StepIndexer:
        """``tracer.iter[1:4]``: the steps the interventions inside apply to."""
        return StepIndexer(self)

    def all(self) -> StepScope:
        """Interventions inside apply to every decoding step."""
        return StepScope(self, Steps(ALL))

    @property
    def result(self) -> Any:
        """The generated token ids (a proxy inside the block)."""
        if self._state == "recording":
            return self.recorder.create_read(GENERATOR, "output")
        return self._output

    output = result

    def cache(self, *args, **kwargs):
        """``tracer.cache(...)`` across decoding steps: each module's entry is a list with
        one entry per step it ran at (every step; inside ``tracer.iter[...]`` /
        ``tracer.all()``, the chosen ones), as nnsight appends them. A module called once
        in the chosen steps has a plain entry."""
        recorder = self.recorder
        previous = recorder.scope
        if previous.steps is None:
            recorder.scope = previous._replace(steps=Steps(ALL))
        try:
            return super().cache(*args, **kwargs)
        finally:
            recorder.scope = previous

    def _metadata_source(self, args: tuple, kwargs: dict,
                         operations: frozenset | None = None) -> Any:
        # which sites a step has, from a scan of the first step's forward (not a capture
        # of the plain forward, which generate never runs)
        operations = self._operations() if operations is None else operations
        kwargs = self._first_step_inputs(kwargs)
        return metadata_source(self.model._module, args, kwargs, RunOptions("hooks"),
                               operations)

    def _inputs_for_metadata(self, invoke: int | None) -> tuple[tuple, dict]:
        # (step 0's rows: an invoke's prompts each repeated as generate runs them, for
        # beams or sequences; a shape read there is of those rows)
        args, kwargs = self._prompt_inputs_for_metadata(invoke)
        repeats = self._row_repeats(kwargs)
        if repeats is not None and repeats != 1:
            invokes = self.invokes if invoke is None else [self.invokes[invoke]]
            total = sum(inv.prepared[2] for inv in invokes)
            kwargs = repeated_rows(kwargs, repeats, total)
        return args, kwargs

    def _prompt_inputs_for_metadata(self, invoke: int | None) -> tuple[tuple, dict]:
        # (an invoke alone, where a cache is given to generate: the cache's rows of its
        # prompts, as its first step sees them; a cache whose rows cannot be taken:
        # none, the invoke's whole sequence)
        args, kwargs = super()._inputs_for_metadata(invoke)
        given = {**self._generate_kwargs, **kwargs}
        name = next((name for name in CACHE_KEYWORDS if name in given), None)
        if invoke is None or name is None or not past_length(given, None):
            return args, kwargs
        kwargs = self._after_cache_layout(kwargs, [self.invokes[invoke]])
        start = sum(inv.prepared[2] for inv in self.invokes[:invoke])
        stop = start + self.invokes[invoke].prepared[2]
        cache = given[name]
        try:
            total = next(t.shape[0] for t in flatten(cache)[0] if t.dim() > 0)
            rows = rows_of(cache, start, stop, total) if total >= stop else cache
        except (CacheUnsupported, NotOnGraph, StopIteration):
            rows = None
        return args, {**kwargs, name: rows}

    def _batched(self) -> tuple[tuple, dict, dict[Any, Rows]]:
        # (prompts of different lengths continuing a cache: padded after its tokens)
        args, kwargs, rows = super()._batched()
        return args, self._after_cache_layout(kwargs, self.invokes), rows


    def _run_source(self, args: tuple, kwargs: dict) -> Any:
        # (the decoding steps are captured apart: the prompt's forward from a scan)
        return self._metadata_source(args, kwargs)

    def stop(self) -> None:
        """Not available inside ``generate()``: ``max_new_tokens`` ends generation."""
        raise TraceError(at_line("tracer.stop() is not available inside generate(); "
                                 "max_new_tokens (or an eos token) ends generation",
                                 user_line()))

    def _max_new_tokens(self) -> Any:
        """``max_new_tokens`` as ``generate`` takes it: its keyword, else the
        ``generation_config`` given to it, else the model's (``None`` where
        ``max_length`` is given instead)."""
        kwargs = self._generate_kwargs
        if kwargs.get("max_new_tokens") is not None or "max_length" in kwargs:
            return kwargs.get("max_new_tokens")
        for config in (kwargs.get("generation_config"),
                       getattr(self.model._module, "generation_config", None)):
            count = getattr(config, "max_new_tokens", None)
            if count is not None:
                return count
        return None

    def _step_count(self) -> int:
        """How many decoding steps run at most (``max_new_tokens``), for a step loop."""
        count = self._max_new_tokens()
        if not isinstance(count, int):
            raise TraceError(at_line(
                "`for step in tracer.all()` (or an open-ended tracer.iter[...] slice) needs "
                "to know how many steps run: pass max_new_tokens=... to generate(), or "
                "choose the steps (tracer.iter[0:5])", user_line()))
        return count

    def _counted_steps(self) -> int:
        """``max_new_tokens``, for a negative step (counted from the end)."""
        count = self._max_new_tokens()
        if not isinstance(count, int):
            raise TraceError(at_line(
                "a negative step in tracer.iter[...] counts from the end, which needs "
                "max_new_tokens=... passed to generate(); or choose the steps from 0",
                user_line()))
        return count

    # --- running ------------------------------------------------------------------------
    def _execute(self) -> None:
        check_nothing_changed_after(self.program)
        check_steps_possible(self.program, self._max_new_tokens(),
                              self._generate_kwargs.get("max_new_tokens") is not None)
        check_ids_with_step_values(self.program)
        args, kwargs, rows = self._prepare_run()
        self._check_cache_padding(kwargs)
        # (shapes as the first decoding step has them: logits of the last position only)
        step_kwargs, step_rows, exact = self._as_step_zero(kwargs, rows)
        self._check_shapes_read(args, self._first_step_inputs(step_kwargs), step_rows)
        self._check_step_shapes_read(kwargs)
        module = self.model._module
        branches = step_branch_refusal(module, self.program, args,
                                       self._first_step_inputs(step_kwargs),
                                       self._generate_kwargs, self._operations(),
                                       fx=self.options.backend != "hooks")
        inputs = {k: v for k, v in kwargs.items() if k not in ("position_ids", "use_cache")}
        options = dict(self._generate_kwargs)
        if self.options.backend != "hooks":
            reason = unsupported_options(module, options) or branches
            if reason is None:
                restore_generators = saved_generators(module, (), inputs)
                try:
                    self._generate_with_graphs(module, inputs, options, rows)
                    self.model._after_generate(self, inputs, [self._output,
                                                              *self._results.values()])
                    self._fill_caches()
                    return
                except Unsupported as error:
                    restore_generators()  # (a seeded sampling starts over alike, CUDA too)
                    reason = str(error)
            fall_back(reason, self.options, self.model._fallback_warned,
                      ("generate", reason), what="generate()")
        self._check_first_step(args, step_kwargs, step_rows, exact)
        interleaver = StepInterleaver(self.program, rows, self._operations())
        with interleaver.installed(module), user_modes_resumed():
            output = module.generate(**inputs, **options)
        check_steps(self.program, interleaver.step + 1)
        interleaver.finish(output)
        self.backend = "hooks"
        self._output, self._output_kept = output, True
        self._results = {node: interleaver.result(node) for node in self.program.saves}
        self.model._after_generate(self, inputs, [output, *self._results.values()])
        self._fill_caches()
