"""``lm.generate`` with every decoding step run as a rewritten graph (the fx backend,
:mod:`fxsight.generate.decoding`): transformers' ``generate`` loop calls fxsight's step
runner in place of the model's ``forward``, with a static cache where the steps replay
CUDA graphs; a generation that cannot go on on graphs after calling the caller's objects
is not run again on hooks."""

from __future__ import annotations

import copy
from typing import Any

import torch

from .._torch import user_modes_resumed
from ..errors import TraceError, at_line
from ..generate.decoding import (GraphSteps, HeldStreamer, Unsupported, callers_code_ran,
                                 callers_objects, unchanged_between_steps)
from ..generate.interleave import GENERATOR, StepWalker, needs_generated_ids
from ..run.options import RunOptions
from ..splice.rows import Rows
from .step_checks import check_steps


class GraphGeneration:
    """The fx backend's generation of a ``Generator`` (a mixin: it needs ``model``,
    ``program``, ``options``, ``_generate_kwargs``, ``_line`` and ``_operations()``)."""

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
        check_steps(self.program, steps.step)
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
