"""The checks of ``lm.generate``'s interventions against its decoding steps, before
anything runs where they can be made then (a step past ``max_new_tokens``, a change that
uses the generated ids, a shape read of the prompt's pass for a later step, a first step's
line that does not fit the first step, a cache with padded prompts) and after generation
(a chosen step that never ran), for :class:`~fxsight.api.generation.Generator`."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import TraceError, at_line
from ..locks import model_lock
from ..generate.first_step import first_step_nodes
from ..generate.interleave import GENERATOR, needs_generated_ids
from ..record.program import Kind, Node, is_view
from ..record.scope import ALL, Steps
from ..record.sites import is_operation
from ..splice.rows import Rows
from ..splice.meta_walker import MetaWalker
from ..splice.walker import Walker
from .cache_layout import padded_rows, refusal
from .token_inputs import past_length


class StepChecks:
    """The checks a ``Generator`` makes of its steps (a mixin: it needs ``model``,
    ``program``, ``recorder``, ``_generate_kwargs``, ``_shapes_read``, ``_line``,
    ``_metadata_source()`` and ``_first_decoder_ids()``)."""

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


def check_nothing_changed_after(program: Any) -> None:
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



def check_steps(program: Any, count: int) -> None:
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


def check_steps_possible(program: Any, limit: Any, given: bool) -> None:
    """Before generation: a node chosen for a step past ``max_new_tokens`` (``limit``;
    ``given``: as a keyword, else from a generation config) is an error before anything
    runs, as it would be after the run (:func:`check_steps`), the model run for nothing."""
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
