"""Edit: interventions recorded once and baked into every later trace of a model, and the
edited model exported as a plain ``torch.nn.Module``.

``with model.edit() as edited:`` records a Program like a trace does, but runs nothing:
the Program is kept on ``edited`` (a new wrapper around the *same* torch module, or the
model itself with ``inplace=True``) and copied in front of the Program of each later trace,
so a trace's own reads see the edited values. ``edited.export(inputs)`` splices the edits
into the captured graph and re-exports the result with ``torch.export``: every fxsight
helper is traced through into ATen ops, the edit's tensors become buffers, and the module
takes and returns what the model does -- it runs, pickles (``torch.save``) and exports
without fxsight.
"""

from __future__ import annotations

import copy
import inspect
import sys
from typing import Any

import torch
import torch.fx as fx

from .._torch import plain_pickling, pytree, pytree_codegen
from ..capture.captures import cached_capture
from ..capture.export import CaptureError, strip_export_checks
from ..capture.operations import spec_for
from ..capture.quiet_warnings import held_warnings
from ..errors import TraceError, at_line
from ..locks import exclusive_export, model_lock
from ..record.program import HookedCall, Kind, Node, Program
from ..record.proxy import Proxy
from ..record.scope import Scope
from ..run.options import RunOptions
from ..splice.rows import Rows
from ..splice.splice import splice
from ..splice.meta_walker import MetaWalker
from .call_site import unpacks_two
from .tracer import Tracer

# (``model`` below is an NNsight wrapper: fxsight.api.nnsight imports this module)


def edits_of(model: Any) -> list[Program]:
    """The edit Programs of a wrapper (oldest first)."""
    return model.__dict__.setdefault("_edits", [])


def seed(program: Program, edits: list[Program], scope: Scope | None = None) -> None:
    """Copy the nodes of ``edits`` (in order) into ``program`` (in ``scope``, or each
    node's own)."""
    for edit in edits:
        env: dict[Node, Node] = {}
        for node in edit.nodes:
            if node.kind is Kind.INPUT:
                env[node] = program.input(edit.input_values[node.input_index])
            else:
                env[node] = program.copy(node, env.__getitem__, scope)
                program.from_edits.add(env[node])


def seed_tracer(tracer: Any, edits: list[Program]) -> None:
    """:func:`seed` a trace's Program with ``edits``; a module an edit calls with
    ``hook=True`` (an SAE attached to the model) is read in the trace as in the edit: its
    submodules' ``.output`` / ``.input`` are that call's (``sae.encoder.output``)."""
    program = tracer.program
    first = len(program.nodes)
    seed(program, edits)
    for node in program.nodes[first:]:
        if isinstance(node.target, HookedCall):
            tracer.hooked_calls[node.target.path] = (Proxy(tracer.recorder, node), node.line)


def edited_copy(model: Any) -> Any:
    """A new wrapper around the same module, with a copy of ``model``'s edit list."""
    new = copy.copy(model)
    object.__setattr__(new, "_root", new)
    # (nnsight's edited model is a shallow copy sharing the envoys: the original's
    # envoys read and write a trace of the copy, and the copy's a trace of the original)
    object.__setattr__(new, "_edit_lineage", edit_lineage(model))
    object.__setattr__(new, "_children", {})
    object.__setattr__(new, "_last_run", {})
    object.__setattr__(new, "_edits", list(edits_of(model)))
    return new


def edit_lineage(model: Any) -> Any:
    """The wrapper a model's chain of non-inplace edits started from (the model itself
    where it is no edited copy)."""
    return model.__dict__.get("_edit_lineage", model)


class EditTracer(Tracer):
    """``with model.edit(*inputs, inplace=False) as edited:`` -- records, runs nothing
    (``as (tracer, edited)``, as nnsight >= 0.5 writes it, binds the tracer too).

    Inside the block, interventions are written on ``model`` (nnsight's idiom) or on
    ``edited``. With inputs, shapes are known inside the block and the edit is validated
    against them at its end."""

    def __init__(self, model: Any, args: tuple, kwargs: dict, options: RunOptions,
                 inplace: bool = False):
        super().__init__(model, args, kwargs, options)
        self.edited = model if inplace else edited_copy(model)
        self._also = self.edited  # current_tracer(edited) finds this tracer too

    def __enter__(self) -> Any:
        super().__enter__()
        if unpacks_two(sys._getframe(1)):  # nnsight >= 0.5: `as (tracer, edited)`
            # (unpacking the edited model itself would bind two of its submodules)
            return self, self.edited
        return self.edited

    def _calls_of(self, nodes: list, line: Any) -> int:
        if not self.invokes:  # (the bound of an open-ended loop needs the inputs)
            raise TraceError(at_line(
                "an open-ended `for _ in tracer.iter[...]` (or tracer.all()) in an edit: "
                "fxsight records an edit's lines once, and they apply where a trace's "
                "lines outside tracer.iter do (a module's first call, generate's first "
                "step), not at every call or decoding step; write the loop in each trace "
                "(`for step in tracer.all():` in lm.generate)", line))
        return super()._calls_of(nodes, line)

    def _save_reachable(self, kept: list, frame: Any) -> None:
        """Only what the block itself asked to save (``fxsight.save(obj)`` on an object of
        its own, an error at the end): inside a session, the proxies an edit leaves in the
        caller's variables or the session's objects are no values a later trace can use,
        and are not saved."""
        if self._kept:
            super()._save_reachable(self._kept, None)

    def _save_stored(self, frame: Any) -> None:
        """Nothing: an edit has no values of its own (the proxies its block stores in the
        caller's containers are no values, as in a trace of nnsight's edit)."""

    def _execute(self) -> None:
        program = self.program
        if program.saves:
            raise TraceError(at_line(
                "an edit cannot save values: it has no results of its own (a saved value "
                "would never be bound); save it in a trace of the edited model instead",
                program.saves[0].line))
        if self._cache_requests:
            raise TraceError(at_line("tracer.cache() has no meaning in an edit; call it in "
                                     "a trace of the edited model",
                                     self._cache_requests[0].line))
        if self._stop_line is not None:
            raise TraceError(at_line("tracer.stop() has no meaning in an edit",
                                     self._stop_line))
        edit = Program()  # an edit applies to every row of a later batch
        seed(edit, [program], Scope())
        if self.invokes:
            args, kwargs, rows = self._batched()
            whole = Program()
            seed(whole, [*edits_of(self.model), edit])
            operations = spec_for(self.model._module, whole.site_paths)
            MetaWalker(whole, rows, self._metadata_source(args, kwargs, operations)).run()
        if not edit.is_empty():
            edits_of(self.edited).append(edit)
        self.backend = "edit"


def export(model: Any, args: tuple, kwargs: dict) -> fx.GraphModule:
    """The edited model for these example inputs as a self-contained GraphModule."""
    prepared = model._prepare_invoke(args, kwargs, None)
    args, kwargs = model._batch_inputs([prepared])
    size = prepared[2]
    model._before_run()
    module = model._module
    with model_lock(module):
        return _export(model, module, args, kwargs, size)


def _export(model: Any, module: torch.nn.Module, args: tuple, kwargs: dict,
            size: int) -> fx.GraphModule:
    program = Program()
    seed(program, edits_of(model))
    # (edits of operations inside a forward, ``.source``: a capture with them marked)
    operations = spec_for(module, program.site_paths)
    captured = cached_capture(module, args, kwargs, operations=operations)
    if captured.caches is not None:
        # an exported GraphModule returns tensors: no cache objects (transformers' default
        # call returns one); the cache is left out where the model lets it
        if "use_cache" in kwargs or \
                "use_cache" not in inspect.signature(module.forward).parameters:
            raise TraceError("the exported model would take or return a cache object, "
                             "which a self-contained graph cannot; call it with "
                             "use_cache=False")
        kwargs = {**kwargs, "use_cache": False}
        captured = cached_capture(module, args, kwargs, operations=operations)
    if captured.opaque:  # (the graph would call back into fxsight and the module)
        path, reason = next(iter(captured.opaque.items()))
        raise CaptureError(f"model.export needs the whole model captured: module {path!r} "
                           f"runs as an opaque call ({reason})", path)
    rows = {None: Rows(0, size, size)}
    MetaWalker(program, rows, captured).run()
    spliced = splice(captured, program, rows, keep_output=True, flat_attributes=False)
    gm = spliced.graph_module
    flat_inputs = pytree.tree_leaves((args, kwargs))
    _bake_program_inputs(gm, len(flat_inputs), program.input_values)

    # (torch's warnings about its own export held back, the shown-warnings records kept)
    with exclusive_export(), held_warnings():
        exported = torch.export.export(gm, tuple(flat_inputs), strict=False).module()
    strip_export_checks(exported)
    graph = exported.graph
    output = next(n for n in graph.nodes if n.op == "output")
    flat_out = list(output.args[0])
    plan = spliced.model_output
    leaves = [flat_out[v] if kind == "out" else v for kind, v in plan.leaves]
    output.args = (tuple(leaves),)
    names = [n.name for n in graph.nodes if n.op == "placeholder"]
    pytree_codegen(graph, names, captured.in_spec, _plain_spec(plan.spec))
    graph.eliminate_dead_code()
    plain_pickling(graph)  # unpickling retraces with plain fx
    result = fx.GraphModule(exported, graph, class_name="EditedModel")
    result.train(module.training)
    return result


def _plain_spec(spec: pytree.TreeSpec) -> pytree.TreeSpec:
    """An output layout that survives ``torch.save``: a transformers ``ModelOutput`` becomes
    its ``to_tuple()`` (as with ``return_dict=False``). Unpickling a GraphModule retraces
    its code with plain fx, which would turn the ``ModelOutput`` into a dict."""
    if spec.is_leaf():
        return spec
    children = [_plain_spec(child) for child in spec.children()]
    kind = spec.type
    if isinstance(kind, type) and issubclass(kind, dict) and kind is not dict and \
            hasattr(kind, "to_tuple"):
        return pytree.TreeSpec(tuple, None, children)
    return pytree.TreeSpec(kind, spec.context, children)


def _bake_program_inputs(gm: fx.GraphModule, n_model_inputs: int, values: list[Any]) -> None:
    """The edit's own tensors (steering vectors) as buffers instead of graph inputs."""
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"][n_model_inputs:]
    for i, (node, value) in enumerate(zip(placeholders, values)):
        name = f"edit_input_{i}"
        if not isinstance(value, torch.Tensor):  # a Python number: a constant again
            for user in list(node.users):
                user.args = fx.node.map_arg(user.args, lambda n: value if n is node else n)
                user.kwargs = fx.node.map_arg(user.kwargs,
                                              lambda n: value if n is node else n)
            graph.erase_node(node)
            continue
        gm.register_buffer(name, value.detach().clone())
        with graph.inserting_before(node):
            attr = graph.get_attr(name)
        node.replace_all_uses_with(attr)
        graph.erase_node(node)
    gm.recompile()
