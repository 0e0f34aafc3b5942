"""Decoding steps as rewritten graphs: the fx backend of ``lm.generate``.

transformers' ``generate`` calls the model once per step. While it runs, the model's
``forward`` is replaced (an instance attribute, with the original's signature, so
``generate`` passes the same arguments) by :class:`GraphSteps`, which runs each call as a
captured graph with that step's interventions spliced in:

- the KV cache enters and leaves the graph as plain tensors: :class:`DecodingStep` wraps
  the model, rebuilds a ``DynamicCache`` from them inside the graph and returns the grown
  cache's tensors, which are written back into the cache object ``generate`` holds;
- the decoding steps (after the first) are captured once with dynamic shapes (the cache
  and the attention mask grow by one token per step), so one graph, and under
  ``compile=True`` one compilation, serves every step and every sequence length;
- the model's state is compared with its snapshot (``capture.state``) at the first step,
  and at every step where code other than transformers' own could have run since the
  last: a callable or object given to ``generate`` (a streamer, a logits processor, a
  stopping criterion...), or a generation method the model's class overrides
  (:func:`unchanged_between_steps`);
- each step runs the part of the trace's Program that applies to it: nodes recorded
  outside ``tracer.iter``/``tracer.all()`` at the first step, the others at their steps.
  Values a later step needs from the first are graph outputs of the first step and graph
  inputs of the later ones.

A static cache (``generate(..., cache_implementation="static")``, transformers'
``StaticCache``) passes through the graph as a cache object instead (:class:`CacheStep`):
its tensors are as large as the whole generation from the start, so every decoding step
has the same shapes, is one exact-shape graph, and under CUDA graphs
(``compile={"mode": "reduce-overhead"}``) replays one recorded graph.

``generate`` may run each prompt row as several consecutive rows (``num_beams``,
``num_return_sequences``): an invoke's rows are then its prompts' groups of rows
(:func:`expanded_step_rows`), on this backend and on hooks alike.

Where a step cannot run this way (a cache of another kind, a batch that changes size,
arguments the wrapper does not know), :class:`Unsupported` is raised and the generation
is run again with the hooks backend (``api.graph_generation`` decides whether it may be).
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections import OrderedDict, defaultdict
from contextlib import nullcontext
from typing import Any, Callable

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from .._torch import user_modes_suspended
from ..capture.captures import cached_capture, flat_inputs, signature
from ..capture.state import current_watch
from ..capture.export import CaptureError
from ..errors import NotOnGraph, TraceError, at_line
from ..record.program import Kind, Node, Program
from ..record.sites import INPUT
from ..run.executable import Key, rows_key, runner_for
from ..run.options import RunOptions
from ..splice.attention_masks import known_masks
from ..splice.rows import Rows, expand_rows
from ..stats import bump
from .step_io import CacheObjectLayout, StepOutput
from .steps import CacheStep, DecodingStep, cache_step, decoding_step, is_static_cache
from .templates import step_classes

# what generate may pass to the model's forward beyond what DecodingStep takes, and the
# values that change nothing here
_HARMLESS = {"return_dict": (True, None), "output_attentions": (False, None),
             "output_hidden_states": (False, None)}


# DecodingStep's inputs, in the order GraphSteps passes them
_STEP_INPUTS = ["input_ids", "attention_mask", "position_ids", "keys", "values", "use_cache",
                "logits_to_keep"]
# a step slice up to this long is expanded into the steps it names, once per generation
# (longer ones, open-ended ones and ``tracer.all()`` are tested at each step)
_EXPANDED = 4096


def unchanged_between_steps(model: torch.nn.Module, generate_kwargs: dict) -> bool:
    """Whether only transformers' own code runs between the decoding steps of
    ``model.generate(**generate_kwargs)``: every argument is a plain value, a tensor or a
    ``GenerationConfig`` (no callable or other object of the caller's: a streamer, a
    logits processor, a stopping criterion, an assistant model), and the model's class
    overrides none of ``GenerationMixin``'s methods. Then nothing can change the model
    between steps (but another thread of the caller's, as in a plain generate)."""
    from transformers.generation.utils import GenerationMixin

    if not all(map(_plain_argument, generate_kwargs.values())):
        return False
    methods = {name: method for name, method in vars(GenerationMixin).items()
               if callable(method) or isinstance(method, (staticmethod, classmethod))}
    # (a class before GenerationMixin in the model's MRO that defines one of its methods
    # overrides it, unless it holds the very same object)
    for cls in type(model).__mro__:
        if cls is GenerationMixin:
            return True
        attributes = vars(cls)
        if any(attributes[name] is not methods[name]
               for name in methods.keys() & attributes.keys()):
            return False
    return False


def _plain_argument(value: Any) -> bool:
    """A value of ``generate``'s arguments that runs no code of the caller's: a plain
    value, a tensor, a ``GenerationConfig``, or a list, tuple or dict of those."""
    from transformers import GenerationConfig

    if value is None or type(value) in (bool, int, float, str, torch.dtype, torch.device,
                                        GenerationConfig) or isinstance(value, torch.Tensor):
        return True
    if type(value) in (list, tuple):
        return all(map(_plain_argument, value))
    if type(value) is dict:
        return all(map(_plain_argument, value.values()))
    return False


def expanded_step_rows(rows: dict[Any, Rows], batch: int) -> dict[Any, Rows]:
    """The invokes' ``rows`` in a decoding step of ``batch`` rows: ``generate`` repeats
    each prompt row as consecutive rows (``num_beams`` or ``num_return_sequences`` of
    them, ``repeat_interleave``), so an invoke's rows are its prompts' groups of rows. A
    batch of other rows cannot be divided among the invokes: an error."""
    expanded = expand_rows(rows, batch)
    if expanded is None:
        raise TraceError(
            f"generate() called the model with a batch of {batch} rows, which does not "
            f"repeat each of the {rows[None].total} prompt rows of the invokes alike, so "
            "which rows are each invoke's is unknown: generate each invoke's prompts in "
            "a generate() of their own")
    return expanded


class Unsupported(Exception):
    """A decoding step that the graph path cannot run (the hooks backend takes over)."""


# generation options that make generate pass arguments to the model's forward which the
# decoding steps do not take (see GraphSteps.__call__)
_STEP_OUTPUTS = ("output_attentions", "output_hidden_states")


def unsupported_options(model: torch.nn.Module, generate_kwargs: dict) -> str | None:
    """Why the decoding steps of ``model.generate(**generate_kwargs)`` cannot run as
    graphs, where its options say so before it runs (``None``: they do not), so that
    the hooks backend takes over before ``generate`` calls anything of the caller's."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        # (generate calls such a model with the encoder's outputs and decoder ids, which
        # the decoding steps do not take)
        return "the decoding steps of an encoder-decoder model are not captured"
    config = generate_kwargs.get("generation_config")
    if config is None:
        config = getattr(model, "generation_config", None)
    asked = [name for name in _STEP_OUTPUTS
             if generate_kwargs.get(name, getattr(config, name, None))]
    if asked:
        return f"generate passes {asked} to the model"
    return None


# the arguments of generate's whose objects it calls only once the model's first call
# has returned (a streamer: its first value is held back until then, see HeldStreamer),
# or only reads (a tokenizer of stop strings)
_CALLED_AFTER_FIRST_STEP = frozenset({"streamer", "logits_processor", "stopping_criteria",
                                      "prefix_allowed_tokens_fn", "tokenizer"})


def callers_objects(generate_kwargs: dict) -> list[str]:
    """The arguments of ``generate`` that hold objects of the caller's (a streamer, a
    logits processor, an assistant model...): anything but plain values and tensors."""
    return [name for name, value in generate_kwargs.items() if not _plain_argument(value)]


def callers_code_ran(generate_kwargs: dict, steps: "GraphSteps") -> bool:
    """Whether a generation of ``steps`` that stopped (an :class:`Unsupported` step) has
    called an object of the caller's: it has, where one is given and a step has run, or
    where one is given that ``generate`` may call before the model's first call. Then
    running the generation again (on hooks) would call it again."""
    objects = callers_objects(generate_kwargs)
    return bool(objects) and (steps.completed > 0 or
                              any(name not in _CALLED_AFTER_FIRST_STEP for name in objects))


class HeldStreamer:
    """The caller's streamer, as ``generate`` on graphs gets it: what ``generate`` puts
    before its first decoding step has run (the prompt) is handed on once the step has
    run, so a generation whose first step cannot run as a graph (and runs again on
    hooks) has put nothing into it. Afterwards every value goes through as it comes."""

    def __init__(self, streamer: Any, steps: "GraphSteps"):
        self.streamer = streamer
        self._steps = steps
        self._held: list[Any] | None = []

    def put(self, value: Any) -> None:
        if self._held is not None:
            if not self._steps.completed:
                self._held.append(value)
                return
            self._release()
        self.streamer.put(value)

    def end(self) -> None:
        self._release()
        self.streamer.end()

    def _release(self) -> None:
        held, self._held = self._held, None
        for value in held or ():
            self.streamer.put(value)


# DecodingStep -> the runners its decoding steps ran, by what chose them (see
# GraphSteps._remembered); kept apart from the step (a Module: its state is watched)
_CHOSEN: "weakref.WeakKeyDictionary[DecodingStep, OrderedDict]" = weakref.WeakKeyDictionary()
MAX_CHOSEN = 512  # runners remembered per model (a step per entry: 16 generations of 32)


class GraphSteps:
    """Runs each model call of one ``generate`` as a rewritten graph of its step."""

    def __init__(self, model: torch.nn.Module, program: Program, rows: dict[Any, Rows],
                 options: RunOptions, after: set[Node], operations: frozenset = frozenset(),
                 unchanged: bool = False, prompt_padded: bool | None = None):
        self.model = model
        # whether a row of the prompts' mask is padded, as the invokes' preparation found
        # it (``None``: not known), for the steps' masks (see :meth:`_mask_known`)
        self.prompt_padded = prompt_padded
        # the model's state token found at the first step, where nothing can change the
        # model between steps (``unchanged``: see :func:`unchanged_between_steps`)
        self.unchanged = unchanged
        self.token: int | None = None
        self.operations = operations  # (``.source`` sites: capture.operations' spec)
        self.wrapper = decoding_step(model)
        self.cache_wrapper: CacheStep | None = None  # (made at a step with a static cache)
        self._cache_chosen: OrderedDict = OrderedDict()
        self._cache_layout = CacheObjectLayout()
        self.program = program
        _refuse_model_inputs(program)
        # the invokes' rows of the prompts, and of the steps (each prompt row repeated
        # for beams or sequences: known at the first step)
        self.prompt_rows = rows
        self.rows = rows
        self.batch: int | None = None
        self.completed = 0  # decoding steps run to their end
        self.options = options
        self.after = after  # nodes that need the generated ids: they run after generate
        self.step = 0
        self.persistent: dict[Node, Any] = {}  # first-step values later steps use
        self.collected: dict[Node, list[Any]] = defaultdict(list)
        self.graph_module: Any = None
        self._needed_later = self._first_step_values_needed_later()
        self._saved_or_needed = set(program.saves) | self._needed_later
        self._by_step, self._checked = self._step_buckets()
        # steps whose nodes are copies of one another's (a loop's body recorded per step)
        # share one Program: step -> its class, class -> (Program, saved positions)
        self._classes = step_classes(self._by_step, self._saved_or_needed)
        self._templates: dict[Any, tuple[Program, list[tuple[Node, int]]]] = {}
        # template Program -> what identifies its runners across generations (its
        # structure, rows, options and operations), hashed once
        self._template_keys: dict[int, Key] = {}
        chosen = _CHOSEN.get(self.wrapper)
        if chosen is None:
            chosen = _CHOSEN[self.wrapper] = OrderedDict()
        self._chosen = chosen
        # the pytree layout of DecodingStep's inputs, per shape of their structure (see
        # _flat): found by flattening once, then the leaves are listed directly
        self._layouts: dict[tuple, Any] = {}
        self._output = StepOutput()

    # --- installing --------------------------------------------------------------------
    def forward_for(self, original: Callable) -> Callable:
        """A replacement of ``model.forward`` with ``original``'s signature."""

        thread = threading.get_ident()

        @functools.wraps(original)
        def forward(*args, **kwargs):
            if threading.get_ident() != thread:  # another thread's plain call of the model
                return original(*args, **kwargs)
            if args:
                raise Unsupported("generate passed positional arguments to the model")
            # the step's own capture calls the model: with its own forward
            attributes = self.model.__dict__
            replacement = attributes.pop("forward")
            try:
                with user_modes_suspended():  # (its graph runs in them: see Executable)
                    return self(**kwargs)
            finally:
                attributes["forward"] = replacement  # (a function: no Module bookkeeping)

        return forward

    # --- one step ----------------------------------------------------------------------
    def __call__(self, input_ids: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None, cache: Any = None,
                 past_key_values: Any = None, use_cache: bool | None = None,
                 logits_to_keep: int = 0, **rest: Any) -> CausalLMOutputWithPast:
        if input_ids is None:
            raise Unsupported("generate called the model without input_ids")
        if rest:
            unknown = {k for k, v in rest.items()
                       if k not in _HARMLESS or v not in _HARMLESS[k]}
            if unknown:
                raise Unsupported(f"generate passed {sorted(unknown)} to the model")
        cache = cache if cache is not None else past_key_values
        use_cache = bool(use_cache) and cache is not None
        self._step_batch(input_ids.shape[0])
        if use_cache and is_static_cache(cache):
            output = self._cache_object_step(input_ids, attention_mask, position_ids, cache,
                                             logits_to_keep)
            self.completed += 1
            return output
        keys, values = self._cache_tensors(cache) if use_cache else ([], [])
        ones = self._mask_known(attention_mask)
        if attention_mask is None:
            past = keys[0].shape[-2] if keys else 0
            attention_mask = torch.ones(input_ids.shape[0], past + input_ids.shape[1],
                                        dtype=torch.long, device=input_ids.device)
            ones = True  # (ours: the graph's check need not read it)
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=position_ids, keys=keys, values=values,
                      use_cache=use_cache, logits_to_keep=logits_to_keep)
        step = self.step
        self.step += 1
        program, origin = self._program_for(step)
        # (the step's cache, made inside the graph, is written into generate's object)
        with known_masks(((attention_mask, ones),)) if ones is not None else nullcontext():
            logits, _ = self._run(program, origin, inputs, self._flat(inputs), self.wrapper,
                                  self._chosen, decoding=step > 0,
                                  made_into=[cache] if use_cache else [])
        self.completed += 1
        return self._output(logits, cache if use_cache else None)

    def _mask_known(self, mask: Any) -> bool | None:
        """Whether the 2-D ``mask`` ``generate`` passes to a step is all ones, where that is
        known without reading it (on a GPU, a wait for its queue at every step): ``False``
        where the prompts' mask is known padded and only transformers' own code runs
        between the steps (``unchanged``): ``generate`` passes the prompts' mask (its rows
        repeated for beams) with a column of ones appended per step, so the prompts'
        zeros stay in it. Otherwise ``None`` (read by the graph's check). A mask is never
        said to be all ones here: only one this class makes itself (:meth:`__call__`)."""
        if self.prompt_padded and self.unchanged and isinstance(mask, torch.Tensor) and \
                mask.dim() == 2:
            return False
        return None

    def _step_batch(self, batch: int) -> None:
        """The rows of a step of ``batch`` rows: at the first step, the invokes' rows in
        it (:func:`expanded_step_rows`); a later step of another batch is not run."""
        if self.batch is None:
            self.rows = expanded_step_rows(self.prompt_rows, batch)
            self.batch = batch
        elif batch != self.batch:
            raise Unsupported(f"the batch has {batch} rows at decoding step {self.step}, "
                              f"{self.batch} at the first")

    def _cache_object_step(self, input_ids: torch.Tensor, attention_mask: Any,
                           position_ids: Any, cache: Any, logits_to_keep: int
                           ) -> CausalLMOutputWithPast:
        """One step with a cache of fixed size (:class:`CacheStep`): every step but the
        first has the same shapes, so one exact-shape graph serves them all."""
        if self.cache_wrapper is None:
            self.cache_wrapper = cache_step(self.model)
            chosen = _CHOSEN.get(self.cache_wrapper)
            if chosen is None:
                chosen = _CHOSEN[self.cache_wrapper] = OrderedDict()
            self._cache_chosen = chosen
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask,
                      position_ids=position_ids, cache=cache, use_cache=True,
                      logits_to_keep=logits_to_keep)
        step = self.step
        self.step += 1
        program, origin = self._program_for(step)
        logits = self._run(program, origin, inputs, self._cache_layout.flat(inputs),
                           self.cache_wrapper, self._cache_chosen, decoding=step > 0,
                           caches=[cache], dynamic="never")
        return self._output(logits, cache)

    def _cache_tensors(self, cache: Any) -> tuple[list, list]:
        layers = getattr(cache, "layers", ())
        if not isinstance(cache, DynamicCache) or \
                any(type(layer) is not DynamicLayer for layer in layers):
            kinds = ", ".join(sorted({type(layer).__name__ for layer in layers}))
            raise Unsupported(f"the KV cache is a {type(cache).__name__}" +
                              (f" of {kinds}" if kinds else ""))
        filled = [layer for layer in layers if layer.is_initialized]
        if not filled:  # (the first step, nothing cached yet)
            return [], []
        if len(filled) != len(layers):
            raise Unsupported("the KV cache has layers that hold nothing yet beside "
                              "layers that do")
        # contiguous: the first step leaves views (its keys are transposed projections),
        # later steps concatenations; one layout keeps one compiled decoding step
        return ([layer.keys.contiguous() for layer in filled],
                [layer.values.contiguous() for layer in filled])

    def _run(self, program: Program, origin: dict[Node, Node], inputs: dict,
             flat: tuple[list[Any], Any], wrapper: torch.nn.Module, chosen: OrderedDict,
             decoding: bool, caches: list[Any] = (), dynamic: str | None = None,
             made_into: list[Any] = ()) -> Any:
        """Run ``program`` for one step of ``wrapper`` (``caches``: the cache objects
        among ``inputs``, updated as the forward updates them; ``made_into``: the objects
        that take the state of the caches the forward makes); the wrapper's output."""
        token = self.token
        runner, remember = self._remembered(program, inputs, flat, token, decoding,
                                            wrapper, chosen)
        if runner is None:
            runner = self._choose(program, inputs, flat, token, decoding, wrapper, dynamic)
            if remember is not None:
                if len(chosen) >= MAX_CHOSEN:
                    chosen.popitem(last=False)  # (the oldest)
                chosen[remember] = weakref.ref(runner)
        output, saves = runner(flat[0] + program.input_values, caches, made_into)
        self.graph_module = runner.graph_module
        for node, value in zip(program.saves, saves):
            parent = origin[node]
            if parent.steps is None or parent in self._needed_later:
                self.persistent[parent] = value
            if parent.steps is not None:
                self.collected[parent].append(value)
        return output

    def _remembered(self, program: Program, inputs: dict, flat: tuple, token: int | None,
                    decoding: bool, wrapper: torch.nn.Module,
                    chosen: OrderedDict) -> tuple[Any, Any]:
        """``(the runner a step with this template Program and these inputs ran in an
        earlier generation, or None; the key to remember the runner chosen now under, or
        None)``. Only where the model's state token is known for the whole generation
        (:func:`unchanged_between_steps`): it is part of the key, with the inputs'
        signature, the template's structure, rows and options, and whether the step is a
        decoding one. A runner chosen by those is the one :meth:`_choose` would find
        again (the capture and runner caches are keyed by them); it is held weakly, so
        their bounds and releases apply as they are."""
        template = self._template_keys.get(id(program))
        if token is None or template is None:
            return None, None
        key = (template, signature(wrapper, (), inputs, flat, token), decoding)
        ref = chosen.get(key)
        runner = ref() if ref is not None else None
        if runner is not None:
            bump("runner_hits")
        return runner, key

    def _choose(self, program: Program, inputs: dict, flat: tuple, token: int | None,
                decoding: bool, wrapper: torch.nn.Module, dynamic: str | None = None) -> Any:
        """The capture of this step's inputs and the runner of ``program`` over it
        (``dynamic``: the capture's shape policy; by default, dynamic shapes for the
        decoding steps, the options' policy for the first)."""
        if dynamic is None:
            dynamic = "always" if decoding else self.options.dynamic_policy
        with wrapper.attached():
            try:
                captured = cached_capture(wrapper, (), inputs, flat=flat, events_on=self.model,
                                          dynamic=dynamic,
                                          operations=self.operations,
                                          dynamic_operations=True, token=token)
                if token is None and self.unchanged:
                    self.token = current_watch(wrapper).token
                    token = self.token
                if captured.symbolic and captured.symbolic & set(program.sites()):
                    # (sizes read as values: an exact-shape capture)
                    captured = cached_capture(wrapper, (), inputs, flat=flat,
                                              events_on=self.model,
                                              operations=self.operations, token=token)
                runner = runner_for(wrapper, captured, program, self.rows, True,
                                    self.options.compile)
            except (CaptureError, NotOnGraph) as error:
                raise Unsupported(str(error)) from error
        return runner

    def _flat(self, inputs: dict) -> tuple[list[Any], Any]:
        """``flat_inputs((), inputs)`` for DecodingStep's inputs: its pytree flattening is
        done once per layout (the type of every input and of every cache tensor); later
        steps of that layout list the same leaves in the same order directly."""
        keys, values = inputs["keys"], inputs["values"]
        layout = (tuple([type(v) for k, v in inputs.items() if k not in ("keys", "values")]),
                  tuple(map(type, keys)), tuple(map(type, values)))
        direct = [inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"],
                  *keys, *values, inputs["use_cache"], inputs["logits_to_keep"]]
        known = self._layouts.get(layout)
        if known is not None:
            return direct, known
        flat, spec = flat_inputs((), inputs)
        if list(inputs) == _STEP_INPUTS and len(direct) == len(flat) and \
                all(a is b for a, b in zip(direct, flat)) and \
                all(isinstance(t, torch.Tensor) for t in (*keys, *values)):
            self._layouts[layout] = spec
        return flat, spec

    # --- the Program of a step ------------------------------------------------------------
    def _step_buckets(self) -> tuple[dict[int, list[Node]], list[Node]]:
        """The nodes that run at each step, found once per generation: ``(step -> nodes
        of fixed steps, nodes whose steps are tested per step)`` (open-ended choices,
        long ranges), each in recording order. A node runs at ``step`` unless it is an
        input or runs after generation (``after``): with ``steps`` None at the first step
        only, otherwise where ``step in steps``."""
        by_step: dict[int, list[Node]] = defaultdict(list)
        checked: list[Node] = []
        for node in self.program.nodes:
            if node in self.after or node.kind is Kind.INPUT:
                continue
            steps = node.steps
            if steps is None:
                by_step[0].append(node)
                continue
            choice = steps.choice
            if type(choice) is int:  # (one step of a step loop: the common case)
                by_step[choice].append(node)  # (a negative one never runs)
                continue
            if type(choice) is list and all(type(c) is int for c in choice):
                chosen: Any = choice
            elif type(choice) is slice and choice.stop is not None and \
                    (choice.stop - (choice.start or 0)) // (choice.step or 1) <= _EXPANDED:
                chosen = range(choice.start or 0, choice.stop, choice.step or 1)
            else:
                checked.append(node)
                continue
            for step in dict.fromkeys(chosen):  # (each is in ``steps``; a negative never runs)
                by_step[step].append(node)
        return dict(by_step), checked

    def _nodes_of(self, step: int) -> tuple[list[Node], Any]:
        """The nodes of ``step``, in recording order, and the key of the Program they make
        where another step may make the same one (``None``: not known)."""
        nodes = self._by_step.get(step, [])
        extra = [node for node in self._checked if step in node.steps] \
            if self._checked else ()
        if not extra:
            number = self._classes.get(step)
            if number is not None:
                return nodes, ("fixed", number)
            return nodes, ("empty",) if not nodes else None
        if not nodes:
            return extra, ("checked", tuple(extra))  # (the same nodes: the same Program)
        return sorted([*nodes, *extra], key=lambda node: node.index), None

    def _first_step_values_needed_later(self) -> set[Node]:
        """Values other steps use: of the first step, and of one step of a ``for step in
        tracer.iter[...]`` loop used at another."""
        needed = set()
        after = self.after
        for node in self.program.nodes:
            inputs = node.all_input_nodes
            if not inputs:
                continue
            stepped = node.steps is not None or node in after
            for n in inputs:
                steps = n.steps
                if node in after and n not in after and n.kind is not Kind.INPUT:
                    needed.add(n)  # (the nodes of the ids run after the steps)
                elif steps is None:
                    if stepped and n.kind is not Kind.INPUT:
                        needed.add(n)
                elif steps.single and not _same_step(n, node):
                    needed.add(n)
        return needed

    def _program_for(self, step: int) -> tuple[Program, dict[Node, Node]]:
        """The nodes of ``step``, as a Program of their own (with the map back).

        Steps whose nodes are alike (:func:`_alike`: the same operations on the same
        values, in the same order) share the Program of the first of them."""
        nodes, key = self._nodes_of(step)
        template = self._templates.get(key) if key is not None else None
        if template is not None:
            program, saved = template
            return program, {copy: nodes[i] for copy, i in saved}
        parent = self.program
        program = Program()
        env: dict[Node, Node] = {}

        def resolve(node: Node, user: Node) -> Node:
            if node in env:
                return env[node]
            if node.kind is Kind.INPUT:
                return program.input(parent.input_values[node.input_index])
            if node in self.persistent:
                return program.input(self.persistent[node])
            raise TraceError(at_line(
                f"this value is used in decoding step {step}, but what it depends on "
                f"({node.name}) is only computed in other steps", user.line))

        for node in nodes:
            env[node] = program.copy(node, lambda n, user=node: resolve(n, user))
            if node in parent.from_edits:
                program.from_edits.add(env[node])
        wanted = self._saved_or_needed
        origin = {}
        saved = []
        for i, (node, copy) in enumerate(env.items()):
            if node in wanted:
                program.save(copy)
                origin[copy] = node
                saved.append((copy, i))
        if key is not None:
            self._templates[key] = (program, saved)
            self._template_keys[id(program)] = Key((
                program.structure_key(), rows_key(self.rows), self.options,
                self.operations))
        return program, origin

    # --- results ---------------------------------------------------------------------------
    def result(self, node: Node) -> Any:
        if node.steps is not None:
            return step_result(node, self.collected.get(node, []))
        if node not in self.persistent:
            raise TraceError(at_line("this value was never computed during generation (no "
                                     "decoding step ran)", node.line))
        return self.persistent[node]


def _refuse_model_inputs(program: Program) -> None:
    """The model's own inputs (``lm.inputs``, a whole-model ``tracer.cache()`` with
    inputs) at a decoding step are the keywords ``generate`` passes to the model (in its
    order, with ``return_dict``, without an attention mask where it passes none): the
    decoding step's graph calls the model with its own, so they run on hooks
    (:class:`Unsupported`, before ``generate`` is called)."""
    if any(node.kind in (Kind.READ, Kind.WRITE) and node.site.path == "" and
           node.site.kind == INPUT for node in program.nodes):
        raise Unsupported("the model's inputs (lm.inputs) at a decoding step are "
                          "generate's keywords to the model, which the fx decoding step "
                          "does not pass alike")


def _same_step(node: Node, user: Node) -> bool:
    """Whether ``user`` runs only at the one step ``node`` (of a step loop) runs at."""
    steps = user.steps
    return steps is not None and steps.single and steps.choice == node.steps.choice


def step_result(node: Node, values: list) -> Any:
    """A saved value of chosen steps: the list of its values, one per step; of one step
    of a ``for step in tracer.iter[...]`` loop, that step's value."""
    if node.steps.single:
        if not values:
            raise TraceError(at_line(f"decoding step {node.steps.choice} did not run, so "
                                     "this value was never computed", node.line))
        return values[0]
    return list(values)


