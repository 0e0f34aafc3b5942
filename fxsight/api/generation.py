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

import copy
import inspect
import sys
from typing import Any, Iterator

import torch

from .._torch import user_modes_resumed
from ..capture.caches import Unsupported as CacheUnsupported
from ..capture.caches import flatten, rows_of
from ..capture.effects import saved_generators
from ..errors import NotOnGraph, TraceError, at_line, user_line
from ..locks import model_lock
from ..generate.decoding import (GraphSteps, HeldStreamer, Unsupported, callers_code_ran,
                                 callers_objects, unchanged_between_steps,
                                 unsupported_options)
from ..generate.first_step import first_step_nodes, repeated_rows, row_repeats
from ..generate.interleave import (GENERATOR, StepInterleaver, StepWalker,
                                   check_ids_with_step_values, needs_generated_ids)
from ..record.active import active_sessions, current_tracer
from ..record.program import Kind, Node, is_view
from ..record.proxy import Proxy
from ..record.scope import ALL, Scope, Steps, resolve_choice
from ..record.sites import is_operation
from ..run.forward import fall_back, metadata_source
from ..run.options import RunOptions
from ..splice.rows import Rows, expand_rows
from ..splice.meta_walker import MetaWalker
from ..splice.walker import Walker
from .block_steps import step_target
from .cache_layout import padded_rows, pads_after_cache, refusal
from .calls import refuse_nested, scoped_loop
from .token_inputs import CACHE_KEYWORDS, past_length
from .tracer import Tracer


class StepScope:
    """``with tracer.iter[1:4]:`` / ``with tracer.all():``: nodes recorded inside apply at
    the chosen decoding steps (recorded once; a saved value is a list, one per step).

    ``for step in tracer.iter[1:4]:`` / ``for step in tracer.all():``: the body is
    recorded once per step, ``step`` a real int (so ``if step == 2:``, ``h[step]`` and
    Python lists filled per step work); a value saved there is that step's value. An
    open-ended slice or ``all()`` runs to ``max_new_tokens``.
    """

    def __init__(self, tracer: "Generator", steps: Steps):
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

    def __init__(self, tracer: "Generator"):
        self.tracer = tracer

    def __getitem__(self, choice: Any) -> StepScope:
        if not isinstance(choice, (int, slice, list, tuple)):
            raise TypeError(f"tracer.iter takes an int, a slice or a list of steps, "
                            f"not {choice!r}")
        return StepScope(self.tracer, Steps(resolve_choice(
            choice, "step", self.tracer._counted_steps)))


class Generator(Tracer):
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

    def _first_step_inputs(self, kwargs: dict) -> dict:
        """``kwargs`` as ``generate`` gives them to the model at the first decoding step:
        an encoder-decoder's decoder ids (:meth:`_first_decoder_ids`), and
        ``logits_to_keep`` where the model's forward takes it (``generate`` passes 1,
        unless given one: the logits hold the prompts' last position only)."""
        decoder_ids = self._first_decoder_ids(kwargs)
        if decoder_ids is not None:
            kwargs = {**kwargs, "decoder_input_ids": decoder_ids}
        keep = self._generate_kwargs.get("logits_to_keep", 1)
        if "logits_to_keep" not in kwargs and _takes_logits_to_keep(self.model._module):
            kwargs = {**kwargs, "logits_to_keep": keep}
        config = getattr(self.model._module, "config", None)
        if getattr(config, "is_encoder_decoder", False):  # (a cache of the decoder's)
            return kwargs
        return _after_the_cache(kwargs, self._generate_kwargs)

    def _row_repeats(self, kwargs: dict) -> int | None:
        """How many consecutive rows decoding step 0 runs each prompt row as (beams,
        sequences: :func:`row_repeats`); ``None`` where that is more than one beside a
        cache given (``generate`` expands the cache's rows itself)."""
        repeats = row_repeats(self.model._module, self._generate_kwargs)
        if repeats != 1:
            given = {**self._generate_kwargs, **kwargs}
            if any(given.get(name) is not None for name in CACHE_KEYWORDS):
                return None
        return repeats

    def _as_step_zero(self, kwargs: dict, rows: dict[Any, Rows]
                      ) -> tuple[dict, dict[Any, Rows], bool]:
        """The batch's ``kwargs`` and the invokes' ``rows`` as decoding step 0 has them:
        each prompt row repeated as ``generate`` expands its inputs for beams or
        sequences; and whether that is known (else both as given)."""
        repeats = self._row_repeats(kwargs)
        if repeats == 1:
            return kwargs, rows, True
        total = rows[None].total
        expanded = None if repeats is None else expand_rows(rows, total * repeats)
        if expanded is None:
            return kwargs, rows, False
        return repeated_rows(kwargs, repeats, total), expanded, True

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

    def _after_cache_layout(self, kwargs: dict, invokes: list) -> dict:
        """``kwargs`` (the rows of ``invokes``, left-padded) laid out after a cache given
        to ``generate`` where a row is padded (:mod:`fxsight.api.cache_layout`)."""
        past = self._cached_tokens(kwargs)
        if not past or not padded_rows(invokes):
            return kwargs
        return pads_after_cache(kwargs, past)

    def _cached_tokens(self, kwargs: dict | None = None) -> int:
        """How many of the prompts' first tokens a cache given to ``generate`` holds (a
        decoder-only model's: step 0 computes the tokens after them); else 0."""
        config = getattr(self.model._module, "config", None)
        if getattr(config, "is_encoder_decoder", False):
            return 0
        return past_length({**self._generate_kwargs, **(kwargs or {})}, None)

    def _first_decoder_ids(self, kwargs: dict) -> torch.Tensor | None:
        """For an encoder-decoder model, the decoder's ids at the first decoding step
        where the inputs give none: those given to ``generate``, else its start token
        per row, as ``generate`` chooses it (``None``: not an encoder-decoder model, or
        no start token known)."""
        module = self.model._module
        if not getattr(getattr(module, "config", None), "is_encoder_decoder", False) or \
                "decoder_input_ids" in kwargs or "decoder_inputs_embeds" in kwargs:
            return None
        ids = kwargs.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            return None
        given = self._generate_kwargs.get("decoder_input_ids")
        if isinstance(given, torch.Tensor):
            # (given for the whole batch; an invoke's scan has its own rows: the shapes
            # it learns are alike, as generate's decoder ids are one length)
            return given if given.dim() != 2 or given.shape[0] == ids.shape[0] else \
                given[:1].expand(ids.shape[0], -1)
        # (as generate chooses it: its keyword, else a config's, else the bos token)
        start = self._generate_kwargs.get("decoder_start_token_id")
        configs = (self._generate_kwargs.get("generation_config"),
                   getattr(module, "generation_config", None), module.config)
        for name in ("decoder_start_token_id", "bos_token_id"):
            for config in configs:
                if start is None:
                    start = getattr(config, name, None)
        if not isinstance(start, int):
            return None
        return torch.full((ids.shape[0], 1), start, dtype=torch.long, device=ids.device)

    def _run_source(self, args: tuple, kwargs: dict) -> Any:
        # (the decoding steps are captured apart: the prompt's forward from a scan)
        return self._metadata_source(args, kwargs)

    def _check_token_index(self, line: str) -> None:
        """Token indexing counts the prompts' tokens, which only the first decoding step
        holds: a later step holds the new token (with a cache) or the prompt and the
        tokens generated so far, so ``.token[i]`` there is an error, not a wrong token."""
        steps = self.recorder.scope.steps
        if steps is not None and steps.concrete(lambda: 2) != [0]:
            raise TraceError(at_line(
                "token indexing (.token[...] / .t[...]) counts the prompt's tokens, which "
                "only decoding step 0 holds: at later steps index the step's positions "
                "directly (e.g. [:, -1], the newest token)", line))

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
        _check_nothing_changed_after(self.program)
        _check_steps_possible(self.program, self._max_new_tokens(),
                              self._generate_kwargs.get("max_new_tokens") is not None)
        check_ids_with_step_values(self.program)
        args, kwargs, rows = self._prepare_run()
        self._check_cache_padding(kwargs)
        # (shapes as the first decoding step has them: logits of the last position only)
        step_kwargs, step_rows, exact = self._as_step_zero(kwargs, rows)
        self._check_shapes_read(args, self._first_step_inputs(step_kwargs), step_rows)
        self._check_step_shapes_read(kwargs)
        module = self.model._module
        inputs = {k: v for k, v in kwargs.items() if k not in ("position_ids", "use_cache")}
        options = dict(self._generate_kwargs)
        if self.options.backend != "hooks":
            reason = unsupported_options(module, options)
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
        _check_steps(self.program, interleaver.step + 1)
        interleaver.finish(output)
        self.backend = "hooks"
        self._output, self._output_kept = output, True
        self._results = {node: interleaver.result(node) for node in self.program.saves}
        self.model._after_generate(self, inputs, [output, *self._results.values()])
        self._fill_caches()

    def _check_first_step(self, args: tuple, kwargs: dict, rows: dict[Any, Rows],
                          exact: bool) -> None:
        """On the hooks backend a step's lines run at its module events as they come: a
        line of the first step at a module call that a decoding step does not make (an
        edit's ``tracer.iter[:2]`` loop at call #1: a step is one forward pass), or whose
        values do not fit its operation (an index out of range: ``h[:, 9]`` of 3 tokens)
        was found only once step 0 had run, the model called and a token sampled (torch's
        error, no line named). Checked before ``generate`` against a scan of the first
        step's forward pass, as the fx backend's splice of step 0 checks it, with its
        errors (a missing call's, ``ShapeIndexError``, ``ShapeError``). (Modules only: an
        operation's call may depend on the cache ``generate`` gives, which the scan does
        not have.)"""
        nodes = [node for node in self.program.nodes
                 if node.kind in (Kind.READ, Kind.WRITE) and node.site != GENERATOR and
                 not is_operation(node.site.path) and not _after_the_prompt(node.steps)]
        # (``kwargs`` and ``rows`` as step 0 has them: not known where a cache is given
        # beside beams or sequences, whose rows generate expands itself)
        walked = first_step_nodes(self.program) if exact else []
        if not nodes and not walked:
            return
        try:  # (a model the scan fails on: its lines are checked as they run, as before)
            with model_lock(self.model._module):
                source = self._metadata_source(args, kwargs)
        except Exception:  # noqa: BLE001
            return
        walker = Walker(self.program, rows, source.index)
        for node in nodes:
            walker.position_of_site(node)
        if walked:
            with model_lock(self.model._module):
                MetaWalker(self.program, rows, source).run(walked)

    def _check_step_shapes_read(self, kwargs: dict) -> None:
        """A shape read while recording is of the prompt's forward pass (step 0); at a
        later decoding step the token dimension is another length (one new token with a
        cache, one more each step without). A shape read for such a step would silently
        be the prompt's (``h.shape[1] > 1`` always true): refused where it reads a
        dimension as long as the prompt, naming the line."""
        ids = kwargs.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.dim() == 0:
            return
        # (an encoder-decoder model's decoder starts from its own ids: its token
        # dimension grows from their length, or keys of a cache from it)
        lengths = {ids.shape[-1]}
        past = past_length({**self._generate_kwargs, **kwargs}, None)
        if 0 < past < ids.shape[-1]:  # (step 0 computes the tokens after a cache's)
            lengths.add(ids.shape[-1] - past)
        decoder_ids = self._first_decoder_ids(kwargs)
        if decoder_ids is not None:
            lengths.add(decoder_ids.shape[-1])
        for node, dims, seen, line in self._shapes_read:
            if not _after_the_prompt(node.steps):
                continue
            dims = range(len(seen)) if dims is None else dims
            length = next((seen[d] for d in dims
                           if -len(seen) <= d < len(seen) and seen[d] in lengths), None)
            if length is not None:
                raise TraceError(at_line(
                    f"this shape, {seen}, is the prompt's forward pass (step 0), read for a "
                    f"later decoding step, where the token dimension ({length} at step 0) "
                    f"has another length: it would silently be the prompt's. Branch "
                    f"on the step instead (`for step in tracer.iter[:]: if step == 0: "
                    f"...`), or read a dimension decoding does not change (`h.size(-1)`)",
                    line))

    def _generate_with_graphs(self, module: torch.nn.Module, inputs: dict, options: dict,
                              rows: dict[Any, Rows]) -> None:
        """Every decoding step as a rewritten graph (:mod:`fxsight.generate.decoding`)."""
        after = needs_generated_ids(self.program)
        options = _with_static_cache(module, inputs, options, self.options)
        # transformers compiles the model's forward itself for a static cache on a GPU:
        # here that forward is fxsight's step runner, which compiles its graphs itself
        # (``compile=``), and dynamo would trace fxsight's own Python
        options = _without_compile(options)
        # (the prompts' padding as the invokes' preparation found it: the steps' checks of
        # the mask read it from the device only where it is not known)
        known = self.model._known_masks(self, inputs)
        steps = GraphSteps(module, self.program, rows, self.options, after,
                           self._operations(), unchanged_between_steps(module, options),
                           prompt_padded=not known[0][1] if known else None)
        if options.get("streamer") is not None:
            options["streamer"] = HeldStreamer(options["streamer"], steps)
        original = module.__dict__.get("forward")
        module.forward = steps.forward_for(module.forward)
        try:
            with user_modes_resumed():  # (transformers' loop, as in a plain generate)
                output = module.generate(**inputs, **options)
        except Unsupported as reason:
            if self.options.backend != "fx" and callers_code_ran(self._generate_kwargs, steps):
                raise self._not_run_again(reason, steps) from reason
            raise
        finally:
            if original is None:
                del module.forward
            else:
                module.forward = original
        _check_steps(self.program, steps.step)
        values = dict(steps.persistent)
        if after:
            walker = StepWalker(self.program, steps.rows, rows)
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

    def _check_cache_padding(self, kwargs: dict) -> None:
        """``generate`` takes the whole sequence, a cache given to it holding its first
        tokens: rows of different lengths (invokes, ragged prompts) are padded between
        the cache's tokens and their own (:mod:`fxsight.api.cache_layout`). Where that
        cannot be exact (no ``position_ids`` to give, a prompt no longer than the cache,
        an encoder-decoder's cache), refused before running."""
        past = past_length({**self._generate_kwargs, **kwargs}, None)
        if not past or not padded_rows(self.invokes):
            return
        reason = refusal(self.model._module, kwargs, self._generate_kwargs, past)
        if reason is None:
            return
        raise TraceError(at_line(
            f"lm.generate(...) with a cache of {past} tokens (past_key_values=/cache=) and "
            f"prompts of different lengths (or padded) is not supported here: {reason}. "
            f"Generate each prompt in its own lm.generate, or give prompts of one length",
            self._line))

    def _not_run_again(self, reason: Unsupported, steps: GraphSteps) -> TraceError:
        """The error of a generation that stopped on graphs after calling the caller's
        objects: running it again on hooks would call them again."""
        objects = ", ".join(callers_objects(self._generate_kwargs))
        return TraceError(at_line(
            f"generate() cannot go on with the fx backend at decoding step "
            f"{steps.completed} ({reason}), and is not run again with the hooks backend: "
            f"it has already called what was given to it ({objects}), which would see "
            f"the generation twice. Pass backend=\"hooks\" to lm.generate(...)",
            self._line))


def _after_the_cache(kwargs: dict, generate_kwargs: dict) -> dict:
    """A decoder-only model's first-step ``kwargs`` where a cache is given to ``generate``
    (``past_key_values=`` / ``cache=``, holding the first ``past`` tokens of the ids it
    takes): the cache, and the ids (and their positions, token types) after its tokens, as
    ``generate`` gives them; the mask covers both. Without it, step 0 would be taken for a
    forward pass of the whole sequence (a shape read ``past`` tokens longer, silently)."""
    ids = kwargs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        return kwargs
    given = {**generate_kwargs, **kwargs}
    past = past_length(given, None)
    mask = kwargs.get("attention_mask")
    if not 0 < past < ids.shape[1] or (isinstance(mask, torch.Tensor) and
                                       mask.shape[-1] != ids.shape[1]):
        return kwargs  # (no cache, or these are the ids after it already)
    name = next(name for name in CACHE_KEYWORDS if name in given)
    kwargs = {**kwargs, name: given[name]}
    for key, value in kwargs.items():
        if key != "attention_mask" and isinstance(value, torch.Tensor) and \
                value.dim() == 2 and value.shape == ids.shape:
            kwargs[key] = value[:, past:]
    return kwargs


def _takes_logits_to_keep(module: torch.nn.Module) -> bool:
    """Whether ``module``'s forward takes ``logits_to_keep`` (as transformers' ``generate``
    asks, to pass it)."""
    try:
        return "logits_to_keep" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def _with_static_cache(module: torch.nn.Module, inputs: dict, options: dict,
                       run_options: RunOptions) -> dict:
    """``generate``'s options, with transformers' static cache where the decoding steps
    run under CUDA graphs (a compile mode such as ``"reduce-overhead"``) and the call
    chooses no cache: its tensors are as large as the whole generation from the first
    step, so every decoding step has the same shapes and replays one recorded graph
    (with a cache that grows, each step would record a graph of its own)."""
    compile = run_options.compile
    if compile is None or not compile.reuses_outputs:
        return options
    chosen = {"cache_implementation", "cache", "past_key_values"}
    if chosen & (options.keys() | inputs.keys()) or options.get("use_cache") is False:
        return options
    config = getattr(module, "generation_config", None)
    if getattr(config, "cache_implementation", None) is not None or \
            getattr(config, "use_cache", True) is False or \
            not getattr(module, "_can_compile_fullgraph", False):
        return options
    return {**options, "cache_implementation": "static"}


def _check_nothing_changed_after(program: Any) -> None:
    """Before generation: a write, a skip or an in-place change of a model's value that
    uses the generated ids (``lm.generator.output``, ``lm.generator.streamer.output``)
    would run once generation has ended, changing nothing: an error at its line."""
    after = needs_generated_ids(program)
    for node in program.nodes:
        if node in after and (node.kind is Kind.WRITE or node.skip or
                              (node.mutation and _changes_a_model_value(node))):
            raise TraceError(at_line(
                "this changes the model's run with the generated ids (lm.generator.output "
                "or lm.generator.streamer.output), which are known only once generation "
                "has ended: they can be saved, not used to steer", node.line))


def _changes_a_model_value(mutation: Node) -> bool:
    """Whether an in-place ``mutation`` changes a module's value (its first argument is
    one, or a view of one), not a value of the user's own (a copy)."""
    changed = mutation.args[0]
    while isinstance(changed, Node) and changed.kind is Kind.OP and \
            (is_view(changed) or changed.mutation) and changed.args:
        changed = changed.args[0]
    return isinstance(changed, Node) and changed.kind is Kind.READ and \
        changed.site != GENERATOR


def _without_compile(options: dict) -> dict:
    """``generate``'s options with ``disable_compile``: on the ``generation_config`` given
    (a copy), where one is (transformers warns of a config passed with keywords),
    otherwise as a keyword."""
    config = options.get("generation_config")
    if config is None:
        return {**options, "disable_compile": True}
    config = copy.deepcopy(config)
    config.disable_compile = True
    return {**options, "generation_config": config}


def _check_steps(program: Any, count: int) -> None:
    """After generation: a node chosen for a step that never happened is an error (it
    would save nothing and write nothing)."""
    for node in program.nodes:
        if node.steps is not None:
            missing = node.steps.missing(count)
            if missing and node.steps.single:
                raise TraceError(at_line(
                    f"this line of a step loop is for decoding step {missing[0]}, but "
                    f"generation ended after {count} step(s) (an eos token?): every step "
                    "of a loop must run; pass min_new_tokens equal to max_new_tokens, or "
                    "record once with `with tracer.all():` (it takes the steps that run)",
                    node.line))
            if missing:
                raise TraceError(at_line(
                    f"this line applies to decoding step {missing[0]}, but generation ran "
                    f"{count} step(s) (0 to {count - 1}): set max_new_tokens high enough, "
                    "or choose steps that exist (an open-ended slice or tracer.all() takes "
                    "whatever steps run)", node.line))


def _check_steps_possible(program: Any, limit: Any, given: bool) -> None:
    """Before generation: a node chosen for a step past ``max_new_tokens`` (``limit``;
    ``given``: as a keyword, else from a generation config) is an error before anything
    runs, as it would be after the run (:func:`_check_steps`), the model run for nothing."""
    if not isinstance(limit, int):
        return
    where = f"max_new_tokens={limit}" if given else \
        f"the generation config's max_new_tokens ({limit})"
    for node in program.nodes:
        missing = node.steps.missing(limit) if node.steps is not None else []
        if missing:
            what = "this line of a step loop is for" if node.steps.single else \
                "this line applies to"
            raise TraceError(at_line(
                f"{what} decoding step {missing[0]}, but {where} makes at most {limit} "
                f"step(s) (0 to {limit - 1}): pass a larger max_new_tokens, or choose steps "
                "below it", node.line))


def _after_the_prompt(steps: Steps | None) -> bool:
    """Whether ``steps`` (a node's decoding steps; ``None``: the first only) include a
    step after the prompt's forward pass."""
    if steps is None:
        return False
    choice = steps.choice
    if choice == ALL:
        return True
    if isinstance(choice, int):
        return choice != 0
    if isinstance(choice, slice):
        start, stride = choice.start or 0, choice.step or 1
        return choice.stop is None or any(s != 0 for s in range(start, choice.stop, stride))
    return any(step != 0 for step in choice)


class GeneratorEnvoy:
    """``lm.generator``: ``.output`` is the generated token ids (inside ``generate``);
    ``.streamer.output`` the token ids chosen at a step."""

    def __init__(self, model):
        self._model = model

    @property
    def streamer(self) -> "StreamerEnvoy":
        return StreamerEnvoy(self._model)

    @property
    def output(self) -> Proxy:
        tracer = current_tracer(self._model)
        if not isinstance(tracer, Generator):
            raise TraceError(at_line("lm.generator.output is only available inside "
                                     "`with lm.generate(...)`", user_line()))
        return tracer.recorder.create_read(GENERATOR, "output")


class StreamerEnvoy:
    """``lm.generator.streamer.output``: what transformers' ``generate`` puts into its
    streamer at the decoding step, as nnsight's streamer module sees its calls (a CPU
    tensor, as ``streamer.put`` receives it): at step 0 the prompt's ids (shape ``(batch,
    prompt length)``; an encoder-decoder's decoder start ids), at step ``s`` the token ids
    chosen at step ``s - 1`` (shape ``(batch,)``); at step 0 outside a step loop, at
    ``step`` in ``for step in tracer.iter[...]``. It is read from the generated ids, so it
    is known once generation has ended (save it; it cannot steer a later step)."""

    def __init__(self, model):
        self._model = model

    @property
    def output(self) -> Proxy:
        tracer = current_tracer(self._model)
        line = user_line()
        if not isinstance(tracer, Generator):
            raise TraceError(at_line("lm.generator.streamer.output is only available inside "
                                     "`with lm.generate(...)`", line))
        steps = tracer.recorder.scope.steps
        if steps is not None and not steps.single:
            raise TraceError(at_line(
                "lm.generator.streamer.output is one step's tokens: read it in a step loop "
                "(`for step in tracer.all():`), not in `with tracer.all():`", line))
        step = 0 if steps is None else steps.choice
        prompt = _prompt_length(tracer, line)
        generated = tracer.recorder.create_read(GENERATOR, "output")
        return tracer.recorder.create_op("call_function", _streamed_at, (generated, prompt, step),
                                         {}, lenient=True)


def _prompt_length(tracer: Generator, line: Any) -> int:
    """How many tokens precede the first generated one in what ``generate`` returns: the
    prompt's, or for an encoder-decoder model the decoder's start token (the prompt goes
    to the encoder)."""
    _, kwargs, _ = tracer._batched()
    config = getattr(tracer.model._module, "config", None)
    if not getattr(config, "is_encoder_decoder", False):
        return kwargs["input_ids"].shape[1]
    if "decoder_input_ids" in kwargs or "decoder_input_ids" in tracer._generate_kwargs:
        raise TraceError(at_line(
            "lm.generator.streamer.output with decoder_input_ids is not supported: read "
            "the step's token from lm.generator.output", line))
    return 1


def _streamed_at(generated: Any, prompt: int, step: int) -> torch.Tensor:
    """What ``generate`` put into its streamer at decoding step ``step`` (``streamer.put``
    call #step), from what it returned (its ids, or the ``sequences`` of its output
    object with ``return_dict_in_generate=True``): the ``prompt`` ids before the first
    step, then the token chosen at each step; on the CPU, as transformers puts them."""
    ids = getattr(generated, "sequences", generated)
    if step == 0:
        return ids[:, :prompt].cpu()
    return ids[:, prompt + step - 1].cpu()
