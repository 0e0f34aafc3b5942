"""Run: a rewritten GraphModule executed eagerly or under torch.compile, cached by structure.

Two caches, two levels:

- a :class:`Runner` per (exact input signature, Program structure, rows, options): the
  Program was validated (shapes, order) for exactly these inputs; a hit costs a dict lookup;
- an :class:`Executable` per (captured graph, Program structure blind to tensor shapes,
  rows, options): the spliced GraphModule and its compiled function. Runners of a
  dynamic-shape capture (one graph for many batch/sequence lengths) share it, so new
  shapes are validated again but neither spliced nor compiled again.

Compilation goes through :class:`CountingBackend`, a thin wrapper around the chosen
``torch.compile`` backend (inductor by default) that counts every graph dynamo hands
over: ``fxsight.stats()["compilations"]`` counts compiles *and* recompiles. A graph of
torch operations run without gradients is first compiled by inductor directly and called
without dynamo's per-call wrapper wherever fxsight's checks pass (:mod:`.direct`).
"""

from __future__ import annotations

import contextvars
import dataclasses
import operator
import time
import warnings
import weakref
from collections import OrderedDict
from typing import Any, Callable

import torch

from ..stats import bump
from ..errors import NotOnGraph, user_stacklevel
from .._torch import compile_backend, pytree, user_modes_resumed, without_duck_shaping
from ..record.program import INPUT_PART, Program
from ..splice.indices import Validated, blind, candidates, tensor_indices
from ..splice.attention_masks import ASSUME_UNPADDED, CHECK, KEEP, all_ones, \
    elide_model_masks, pack_single_queries
from ..splice.splice import Spliced, splice
from ..splice.meta_walker import MetaWalker
from .eager import bound_forward, fast_forward, plainly_bindable
from .sources import release_source_when_collected
from .direct import compile_direct, eligible
from .options import CompileOptions
from ..capture import caches
from ..capture.captures import on_release
from ..capture.quiet_warnings import shown_warnings_kept

class CountingBackend:
    """A ``torch.compile`` backend that counts the graphs it compiles and delegates."""

    def __init__(self, backend: Any = "inductor", mode: str | None = None,
                 options: dict | None = None, dynamic: bool | None = None):
        self.inner = compile_backend(backend, mode, options, dynamic)
        self.compiler_name = getattr(self.inner, "compiler_name", str(backend))

    def __call__(self, gm: torch.fx.GraphModule, example_inputs, **kwargs):
        bump("compilations")
        start = time.perf_counter()
        try:
            return self.inner(gm, example_inputs, **kwargs)
        finally:
            bump("compile_ms", int(1000 * (time.perf_counter() - start)))

    def __getattr__(self, name: str) -> Any:  # get_compiler_config, reset, ...
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


def _first_line(error: BaseException) -> str:
    """The reason in one line (dynamo wraps a backend's exception: name that one)."""
    inner = getattr(error, "inner_exception", None)
    if isinstance(inner, BaseException):
        error = inner
    text = str(error).strip()
    for line in text.splitlines():
        if line.strip():
            return f"{type(error).__name__}: {line.strip()[:300]}"
    return type(error).__name__


def _plain_builder(plan: Any) -> Callable | None:
    """A function building ``plan``'s value from the graph's outputs where it is made of
    tuples and lists of graph outputs only (a decoding step's ``(logits, keys, values)``):
    one generated expression instead of a pytree rebuild per run; ``None`` otherwise."""
    if plan is None or any(kind != "out" for kind, _ in plan.leaves):
        return None
    indices = iter([int(index) for _, index in plan.leaves])

    def expression(spec: Any) -> str:
        if spec.is_leaf():
            return f"outputs[{next(indices)}]"
        items = [expression(child) for child in spec.children()]
        if spec.type is tuple:
            return f"({', '.join(items)}{',' if len(items) == 1 else ''})"
        if spec.type is list:
            return f"[{', '.join(items)}]"
        raise TypeError(spec.type)

    try:
        code = expression(plan.spec)
    except (TypeError, AttributeError):
        return None
    return eval(f"lambda outputs: {code}")  # noqa: S307 - integers and brackets only


def _single_output(plan: Any) -> Any:
    leaves = getattr(plan, "leaves", None)
    spec = getattr(plan, "spec", None)
    if leaves is not None and len(leaves) == 1 and leaves[0][0] == "out" and \
            spec is not None and spec.is_leaf():
        return leaves[0][1]
    return plan


def _outputs_getter(builders: list) -> Callable | None:
    """Where every save is one graph output (an index): ``outputs -> (the saves)`` in
    one C call; else ``None``."""
    if not builders or any(type(b) is not int for b in builders):
        return None
    if len(builders) == 1:
        index = builders[0]
        return lambda outputs: (outputs[index],)
    return operator.itemgetter(*builders)


# direct compilations tried per graph: one, and more only for index integers its guards
# exclude (0, positive and negative positions may each need one)
MAX_DIRECT = 3


class Executable:
    """A spliced GraphModule and the function that runs it (eager, or compiled lazily)."""

    def __init__(self, spliced: Spliced, compile_options: CompileOptions | None,
                 dynamic_capture: bool = False):
        self.spliced = spliced
        self.compile_options = compile_options
        self.failure: str | None = None
        # a save that is one graph output is read by index (no pytree rebuild per trace)
        self.save_builders = [_single_output(plan) for plan in spliced.saves]
        self.save_getter = _outputs_getter(self.save_builders)
        # the model's output, where it needs no cache objects (see _plain_builder)
        self.output_builder = None if spliced.cache_outputs else \
            _plain_builder(spliced.model_output)
        gm = spliced.graph_module
        # attention as the eager forward runs it, without the mask export builds: eager
        # graphs check whether the padding masks are all ones; a compiled graph keeps
        # the mask, and a twin compiled without it runs where they are (_unpadded)
        deciding = elide_model_masks(gm, CHECK if compile_options is None else KEEP)
        if compile_options is None:  # (compiled, transformers repeats the heads too)
            pack_single_queries(gm)
        self._unpadded: Executable | None = None
        self._padding_at: list[int] = []
        if compile_options is not None and deciding:
            self._unpadded, self._padding_at = _unpadded_twin(
                spliced, deciding, compile_options, dynamic_capture)
        release_source_when_collected(gm)  # (evicted, its source must not stay behind)
        self._eager = fast_forward(gm)
        self._fn: Callable = self._eager
        # eagerly, where the graph allows: the ATen calls through torch's own bindings
        # (run.eager), taken at each run with plain inputs and no torch function mode
        self._bound = bound_forward(gm) if compile_options is None else None
        # the graph compiled by inductor without dynamo where fxsight can check what
        # dynamo's guards would (run.direct): made at the first call that allows it
        self._direct: Any = None
        self._direct_pending = False
        self._directs: list[Any] = []  # every direct compilation made (see MAX_DIRECT)
        self._direct_attempts = 0
        # CUDA graphs replay into the same output memory: what a run returns is copied
        # before it is handed on (saves, the model's output, the KV cache of a step)
        self.copies_outputs = compile_options is not None and compile_options.reuses_outputs
        # (inductor records CUDA graphs of CUDA tensors only; another backend may reuse
        # any output)
        self._reused_on = "cuda" if compile_options is not None and \
            compile_options.backend == "inductor" else None
        if compile_options is not None:
            dynamic = compile_options.dynamic
            if dynamic is None and dynamic_capture:
                dynamic = True  # the graph is shape-generic: keep it so under dynamo
            inductor_options = _with_eager_random(compile_options, gm)
            self._direct_pending = not _draws_random(gm) and \
                eligible(gm, compile_options.backend, compile_options.mode)
            self._direct_dynamic = bool(dynamic)
            self._direct_options = inductor_options
            backend = CountingBackend(compile_options.backend, compile_options.mode,
                                      inductor_options, dynamic)
            # Compile the GraphModule's own forward (its code object is unique to it), so
            # dynamo's per-code cache and recompile limit are per rewritten graph.
            self._fn = torch.compile(gm.forward, backend=backend, dynamic=dynamic,
                                     fullgraph=compile_options.fullgraph)
            if dynamic:
                # no duck shaping: dynamo would give sizes of equal value one symbol, so
                # a sequence length that happens to equal a head size (a constant of the
                # graph) would be specialized, and the next length recompile
                self._fn = without_duck_shaping(self._fn)

    @property
    def compiled(self) -> bool:
        return self._fn is not self._eager

    def __call__(self, flat_inputs: list[Any]) -> tuple[Any, ...]:
        fn = self._fn
        if fn is self._eager:
            bound = self._bound
            if bound is not None and plainly_bindable(flat_inputs):
                return bound(*flat_inputs)
            return fn(*flat_inputs)
        if self._unpadded is not None and self._unpadded.failure is None and \
                all_ones(*[flat_inputs[i] for i in self._padding_at]):
            return self._unpadded(flat_inputs)
        direct = self._direct
        if direct is None and self._direct_pending:
            direct = self._direct = self._compile_direct(flat_inputs)
        if direct is not None:
            if not direct.accepts(flat_inputs):
                direct = self._direct_for_indices(flat_inputs) \
                    if direct.refused_indices else None
            if direct is not None:
                bump("direct_runs")
                return direct(flat_inputs)
        try:
            # (in a copy of the caller's context: each config patch dynamo and inductor
            # enter while compiling leaves a context variable where it ran)
            # (and the warnings shown so far stay shown: see shown_warnings_kept)
            with shown_warnings_kept():
                outputs = contextvars.copy_context().run(fn, *flat_inputs)
        except Exception as error:  # noqa: BLE001 - decide below whether compile was at fault
            # The same inputs eagerly: if that fails too, the error is the user's (raise
            # the eager error); if it works, compilation failed: run eagerly from now on.
            outputs = self._eager(*flat_inputs)
            self.failure = _first_line(error)
            self._fn = self._eager
            bump("compile_failures")
            warnings.warn(f"fxsight: torch.compile failed ({self.failure}); this "
                          f"intervention structure runs eagerly (results are unchanged)",
                          RuntimeWarning, stacklevel=user_stacklevel())
            return outputs
        return _owned(outputs, flat_inputs, self._reused_on) if self.copies_outputs \
            else outputs

    def _compile_direct(self, flat_inputs: list[Any]) -> Any:
        """Compile without dynamo (:mod:`run.direct`) at the first call without gradients
        or modes (and again for index integers: :meth:`_direct_for_indices`)."""
        if torch.is_grad_enabled():
            return None  # (tried again at a call without gradients)
        start = time.perf_counter()
        # (in a copy of the caller's context: see __call__)
        with shown_warnings_kept():
            direct = contextvars.copy_context().run(
                compile_direct, self.spliced.graph_module, flat_inputs,
                self._direct_dynamic, self._direct_options, self.spliced.index_inputs)
        self._direct_pending = False
        self._direct_attempts += 1
        if direct is not None:
            self._directs.append(direct)
            bump("compilations")
            bump("compile_ms", int(1000 * (time.perf_counter() - start)))
        return direct

    def _direct_for_indices(self, flat_inputs: list[Any]) -> Any:
        """A direct compilation for index integers (``splice.indices``) that the current
        one's guards exclude, though the tensors fit it: inductor specializes some values
        (an index first compiled at 0 stays 0). An earlier compilation that accepts them,
        else a new one while there have been fewer than :data:`MAX_DIRECT` attempts; the
        one found serves the next calls first."""
        for other in self._directs:
            if other is not self._direct and other.accepts(flat_inputs):
                self._direct = other
                return other
        if self._direct_attempts >= MAX_DIRECT:
            return None
        made = self._compile_direct(flat_inputs)
        if made is None or not made.accepts(flat_inputs):
            return None
        self._direct = made
        return made


def _unpadded_twin(spliced: Spliced, padding: list[str], compile_options: CompileOptions,
                   dynamic_capture: bool) -> tuple["Executable | None", list[int]]:
    """The Executable of a copy of ``spliced``'s graph whose attention calls take no mask
    where the padding masks named ``padding`` are all ones, and their positions among
    the graph's inputs; ``(None, [])`` where they are not all plain inputs."""
    gm = spliced.graph_module
    names = [node.name for node in gm.graph.nodes if node.op == "placeholder"]
    if not all(name in names for name in padding):
        return None, []
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))  # (node metadata shared, not copied)
    twin = torch.fx.GraphModule(gm, graph, class_name="RewrittenForward")
    elide_model_masks(twin, ASSUME_UNPADDED)
    return (Executable(dataclasses.replace(spliced, graph_module=twin), compile_options,
                       dynamic_capture),
            [names.index(name) for name in padding])


def _owned(outputs: Any, flat_inputs: list[Any], device_type: str | None = None) -> Any:
    """``outputs`` with each tensor that is not in an input's memory copied out of the
    memory a CUDA-graph replay hands out, which the next replay of that graph overwrites
    (PyTorch reports reading it then as "accessing tensor output of CUDAGraphs that has
    been overwritten by a subsequent run"). A saved value, the model's output and the KV
    cache a decoding step returns are the caller's to keep. Outputs in an input's memory
    (an input changed in place, a view of a parameter) are the input's, as eagerly.
    ``device_type``: only outputs on devices of that type are copied (``None``: all)."""
    inputs = {t.untyped_storage().data_ptr() for t in flat_inputs
              if isinstance(t, torch.Tensor)}

    def own(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and \
                (device_type is None or value.device.type == device_type) and \
                value.untyped_storage().data_ptr() not in inputs:
            return value.clone()
        return value

    return pytree.tree_map(own, outputs)


def _draws_random(gm: torch.fx.GraphModule) -> bool:
    """Whether the graph may draw random numbers (dropout in train mode; see the twins of
    splice.splice)."""
    return any(node.meta.get("fxsight_draw") or
               node.meta.get("fxsight_random") in ("twinned", "kept")
               for node in gm.graph.nodes)


def _with_eager_random(options: CompileOptions, gm: torch.fx.GraphModule) -> dict | None:
    """The inductor options of a graph: where it draws random numbers (dropout in train
    mode), inductor's ``fallback_random`` unless the user chose: its random ops then draw
    what eager ones draw with the same seed, and leave the generator where a plain forward
    does (inductor's own generator would draw other numbers; a per-compile option, no
    global setting)."""
    inductor = options.inductor_options()
    if options.backend != "inductor" or (inductor and "fallback_random" in inductor):
        return inductor
    if not _draws_random(gm):
        return inductor
    return {**(inductor or {}), "fallback_random": True}


class Runner:
    """Executes one validated rewritten forward pass."""

    def __init__(self, executable: Executable, index_values: list[int] = ()):
        self.executable = executable
        self.captured: Any = None  # the capture this runner was validated against
        # the integers of tensor keys its Program has, inputs of the shared graph
        # (splice.indices); they were validated with the Program
        self.index_values = list(index_values)

    @property
    def spliced(self) -> Spliced:
        return self.executable.spliced

    @property
    def graph_module(self) -> torch.fx.GraphModule:
        return self.executable.spliced.graph_module

    @property
    def compiled(self) -> bool:
        return self.executable.compiled

    def __call__(self, flat_inputs: list[Any], user_caches: list[Any] = (),
                 made_into: list[Any] = ()) -> tuple[Any, list[Any]]:
        """Run; ``user_caches``: the cache objects among the model's inputs, updated in
        place as the model's forward pass updates them; ``made_into``: objects that take,
        in place and in order, the state of the caches the forward pass made (instead of
        new objects: a decoding step's cache, built inside the graph from its tensors, is
        the one ``generate`` holds)."""
        executable = self.executable
        refused = executable.spliced.refused(flat_inputs) if executable.spliced.pinned \
            else None
        if refused is not None:  # (nothing has run)
            raise NotOnGraph(refused)
        if self.index_values:
            flat_inputs = [*flat_inputs, *self.index_values]
        with user_modes_resumed():  # (the graph: the model's and the user's operations)
            outputs = executable(flat_inputs)
        spliced = executable.spliced
        if executable.output_builder is not None:  # (no cache objects to rebuild)
            objects = None
            model_output = executable.output_builder(outputs)
        else:
            objects = _cache_objects(spliced, outputs, user_caches, made_into) \
                if spliced.cache_outputs else None
            plan = spliced.model_output
            model_output = plan.build(outputs, objects) if plan is not None else None
        if executable.save_getter is not None:
            return model_output, list(executable.save_getter(outputs))
        return model_output, [outputs[b] if type(b) is int else b.build(outputs, objects)
                              for b in executable.save_builders]


def _cache_objects(spliced: Spliced, outputs: Any, user_caches: list[Any],
                   made_into: list[Any] = ()) -> dict:
    """The run's cache objects (k -> object): the user's input caches updated in place,
    for the caches the forward pass made the objects of ``made_into`` updated in place
    (by order), else new ones."""
    if len(user_caches) != spliced.input_caches:
        raise RuntimeError("fxsight: the cache objects given do not match the capture")
    objects = {}
    for k, indices in spliced.cache_outputs.items():
        tensors = [outputs[i] for i in indices]
        skeleton = spliced.cache_skeletons[k]
        if k < spliced.input_caches:
            caches.update(user_caches[k], skeleton, tensors)
            objects[k] = user_caches[k]
        elif k - spliced.input_caches < len(made_into):
            target = made_into[k - spliced.input_caches]
            caches.update(target, skeleton, tensors, own_values=True)
            objects[k] = target
        else:
            objects[k] = caches.build(skeleton, tensors)
    return objects


_RUNNERS: "weakref.WeakKeyDictionary[torch.nn.Module, OrderedDict]" = \
    weakref.WeakKeyDictionary()
_EXECUTABLES: "weakref.WeakKeyDictionary[torch.nn.Module, OrderedDict]" = \
    weakref.WeakKeyDictionary()
# what the walk of a Program found about its integers (splice.indices.Validated), for the
# Programs alike but for them: (capture, Validated, its executable's key)
_VALIDATED: "weakref.WeakKeyDictionary[torch.nn.Module, OrderedDict]" = \
    weakref.WeakKeyDictionary()
# The caches are LRU, bounded per model: a long session that tries many structures keeps
# the most recently used ones (a runner keeps its executable alive while it is cached).
MAX_RUNNERS = 256
MAX_EXECUTABLES = 128
MAX_VALIDATED = 128


class Key:
    """A cache key (a tuple of nested tuples) hashed once: a lookup and the LRU update
    after it would each hash the whole Program structure again."""

    __slots__ = ("value", "hash")

    def __init__(self, value: tuple):
        self.value = value
        self.hash = hash(value)

    def __hash__(self) -> int:
        return self.hash

    def __eq__(self, other: object) -> bool:
        return self is other or (type(other) is Key and self.hash == other.hash
                                 and self.value == other.value)


def _lru_get(cache: "weakref.WeakKeyDictionary", model: torch.nn.Module, key: tuple,
             limit: int) -> tuple[OrderedDict, Key, Any]:
    """``(the model's cache, the key to store under, the cached value or None)``."""
    per_model = cache.get(model)
    if per_model is None:
        per_model = cache[model] = OrderedDict()
    key = Key(key)
    entry = per_model.get(key)
    if entry is not None:
        stored, value = entry
        per_model.move_to_end(stored)  # (the stored key: found by identity)
        return per_model, stored, value
    if len(per_model) >= limit:
        per_model.popitem(last=False)
    return per_model, key, None


def cached_runner(model: torch.nn.Module, key: tuple, captured: Any,
                  build: Callable[[], Runner]) -> Runner:
    """The runner for ``key`` (the capture's id + Program structure + ...), built once.

    ``captured`` is the capture the key's id names (checked: an id can be reused)."""
    per_model, key, runner = _lru_get(_RUNNERS, model, key, MAX_RUNNERS)
    if runner is None or runner.captured is not captured:
        runner = build()
        runner.captured = captured
        per_model[key] = (key, runner)
    else:
        bump("runner_hits")
    return runner


def cached_executable(model: torch.nn.Module, key: tuple,
                      build: Callable[[], Executable]) -> Executable:
    """The executable for ``key`` (captured graph + shape-blind structure), built once."""
    per_model, key, executable = _lru_get(_EXECUTABLES, model, key, MAX_EXECUTABLES)
    if executable is None:
        executable = build()
        per_model[key] = (key, executable)
    else:
        bump("executable_hits")
    return executable


def shape_blind(structure: tuple) -> tuple:
    """A Program structure key with the shapes of its input tensors reduced to their rank
    (the spliced graph never depends on them; validation runs per exact shape anyway)."""
    parts = []
    for part in structure:
        if part and part[0] == INPUT_PART and isinstance(part[1], tuple) and \
                part[1] and part[1][0] == "tensor":
            _, shape, *rest = part[1]
            part = (INPUT_PART, ("tensor", len(shape), *rest))
        parts.append(part)
    return tuple(parts)


def forget(model: torch.nn.Module) -> None:
    _RUNNERS.pop(model, None)
    _EXECUTABLES.pop(model, None)
    _VALIDATED.pop(model, None)


def _release(model: torch.nn.Module, graph_module: torch.fx.GraphModule) -> None:
    """Forget the runners and executables built on a captured graph that the capture
    cache let go (they would keep it, and themselves, alive up to their own bounds)."""
    runners = _RUNNERS.get(model)
    if runners:
        for key in [k for k, (_, r) in runners.items()
                    if getattr(r.captured, "graph_module", None) is graph_module]:
            del runners[key]
    executables = _EXECUTABLES.get(model)
    if executables:
        for key in [k for k in executables if k.value[0] is graph_module]:
            del executables[key]
    validated = _VALIDATED.get(model)
    if validated:
        for key in [k for k, (_, v) in validated.items()
                    if getattr(v[0], "graph_module", None) is graph_module]:
            del validated[key]


on_release(_release)


def rows_key(rows: dict, exact: bool = True) -> tuple:
    """The invokes' row ranges as a cache key (whole-batch ranges as ``"whole"`` unless
    ``exact``: the spliced graph holds no constant for them)."""
    # (insertion order is invoke order: the whole batch first, then invokes 0, 1, ...)
    return tuple([(k, (v.start, v.stop, v.total) if exact or not v.whole else "whole")
                  for k, v in rows.items() if k is not None])


def runner_for(model: torch.nn.Module, captured: Any, program: Program, rows: dict,
               keep_output: bool, compile_options: CompileOptions | None,
               update_caches: bool = True) -> Runner:
    """The runner of ``program`` over ``captured`` for these rows and options: a cache hit,
    or validated (and spliced and compiled where its executable is new) now
    (``update_caches``: see :func:`~fxsight.splice.splice.splice`)."""
    structure = program.structure_key()
    # the capture found for these exact inputs stands for their signature (cached_runner
    # checks it is the same object: ids can be reused)
    key = (id(captured), structure, rows_key(rows), keep_output, compile_options,
           update_caches)
    return cached_runner(model, key, captured, lambda: build_runner(
        model, captured, program, rows, keep_output, compile_options, structure,
        update_caches))


def build_runner(model: torch.nn.Module, captured: Any, program: Program, rows: dict,
                 keep_output: bool, compile_options: CompileOptions | None,
                 structure: tuple, update_caches: bool = True) -> Runner:
    """Validate ``program`` for these exact inputs and find (or splice, and compile) its
    executable."""
    # integers indexing tensors are inputs of the graph: a loop over positions splices
    # (and compiles) once, each position validated here for its own runner. (Not where
    # the user asked for static compilation: dynamo would recompile for each value up to
    # its recompile limit, then run eagerly; a graph per value stays compiled.)
    static = compile_options is not None and compile_options.dynamic is False
    dynamic = bool(getattr(captured, "dynamic", False))

    def executable_for(key: tuple, lifted: dict) -> Executable:
        return cached_executable(model, key, lambda: Executable(
            splice(captured, program, rows, keep_output, update_caches=update_caches,
                   indices=lifted, stopped=not update_caches),  # (only a stop keeps them)
            compile_options, dynamic))

    alike, integers = candidates(structure)
    if not static:  # a Program alike but for its indices: their checks stand for the walk
        per_model, stored, found = _lru_get(
            _VALIDATED, model, (id(captured), alike, rows_key(rows), keep_output,
                                compile_options, update_caches), MAX_VALIDATED)
        if found is not None and found[0] is captured:
            values = found[1].index_values(integers)
            if values is not None:
                bump("walks_skipped")
                return Runner(executable_for(found[2], found[1].lifted), values)
    walker = MetaWalker(program, rows, captured)
    walker.run()
    lifted = {} if static else tensor_indices(program, walker.values)
    key = (captured.graph_module, shape_blind(blind(structure, lifted)),
           rows_key(rows, exact=False), keep_output, compile_options, update_caches,
           tuple(lifted.items()))
    executable = executable_for(key, lifted)
    validated = Validated(program, lifted, walker.values, integers)
    if not static:
        per_model[stored] = (stored, (captured, validated, key))
    # (the walk checked them: in range, so never None here)
    return Runner(executable, validated.index_values(integers))
