"""The one execution path: a recorded Program run over a model's forward pass.

:func:`run_program` picks the backend (the fx backend where the model is captured, the
hooks backend where it is not or where asked), runs the forward pass with the Program
spliced in, then the backward phase where the trace uses gradients. The decision to fall
back to hooks is made in one place, :func:`fall_back`, for traces and generation alike.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from ..capture.caches import input_caches
from ..capture.captures import cached_capture, flat_inputs, signature
from ..capture.export import CaptureError, Captured
from ..capture.fast_paths import FUSED_REASONS, fast_path_refusal
from ..capture.operations import spec_for
from ..capture.scan import ScanResult, cached_scan
from ..errors import NotOnGraph, TraceError, at_line, user_line, user_stacklevel
from ..record.program import Kind, Node, Program
from ..record.sites import is_operation, module_label
from ..splice.gradients import TapHooks, backward_phase
from ..splice.rows import Rows
from ..stats import bump
from .attention_branches import attention_nodes, branch_refusal, plain_scan, with_plain_values
from .backward import BackwardPhase, forward_exports
from .executable import runner_for
from .hook_walks import walked_positions
from .hooks import run_with_hooks
from .options import RunOptions


class Outcome:
    """What a run produced: the model's output and every saved node's value."""

    __slots__ = ("backend", "output", "output_kept", "values", "graph_module", "grad_keys",
                 "runner", "used_caches")

    def __init__(self, backend: str, output: Any, output_kept: bool, values: dict[Node, Any],
                 graph_module: fx.GraphModule | None = None,
                 grad_keys: dict[Node, str] | None = None, runner: Any = None,
                 used_caches: bool = False):
        self.backend = backend  # "fx" or "hooks"
        self.output = output
        self.output_kept = output_kept
        self.values = values
        self.graph_module = graph_module
        self.grad_keys = {} if grad_keys is None else grad_keys
        self.runner = runner  # the fx backend's Runner
        self.used_caches = used_caches  # whether cache objects among the inputs were passed


def fall_back(reason: Exception | str, options: RunOptions, warned: set, key: Any,
              what: str = "this model") -> None:
    """The fx path cannot run ``what``: raise under ``backend="fx"``, else warn (once per
    ``key``) that the hooks backend takes over."""
    if options.backend == "fx":
        error = reason if isinstance(reason, Exception) else \
            TraceError(f"{what} cannot run on the fx backend: {reason}")
        message = error.args[0] if error.args else None
        if isinstance(message, str) and "\n  at " not in message:
            error.args = (at_line(message, user_line()), *error.args[1:])  # (the trace's)
        raise error
    bump("fallbacks")
    if key not in warned:
        warned.add(key)
        warnings.warn(f"fxsight: {what} runs with the hooks backend: {reason}",
                      RuntimeWarning, stacklevel=user_stacklevel())


def capture_for(module: nn.Module, args: tuple, kwargs: dict, options: RunOptions,
                warned: set, flat: tuple | None = None,
                operations: frozenset = frozenset(), token: int | None = None
                ) -> Captured | None:
    """The capture the fx backend runs, or ``None`` where the hooks backend runs instead
    (``backend="hooks"``, or a failed capture under ``"auto"``). ``token``: the model's
    state token, where the caller has just found it (see ``captures.signature``)."""
    if options.backend == "hooks":
        return None
    try:
        captured = cached_capture(module, args, kwargs, dynamic=options.dynamic_policy,
                                  flat=flat, operations=operations, token=token)
    except CaptureError as error:
        fall_back(error, options, warned, signature(module, args, kwargs, flat))
        return None
    if captured.opaque:
        key = ("opaque", signature(module, args, kwargs, flat))
        if key not in warned:
            warned.add(key)
            by_reason: dict[str, list[str]] = {}
            for path, reason in captured.opaque.items():
                by_reason.setdefault(reason, []).append(path)
            for reason, paths in by_reason.items():  # (one warning per reason: a ViT's
                warnings.warn(                       # 12 attentions are one)
                    f"fxsight: {_modules_named(paths)} "
                    f"{'runs as one opaque call' if len(paths) == 1 else 'run as opaque calls'}"
                    f" inside the captured graph (the rest of the model is captured; a "
                    f"trace that reads or writes inside {'it' if len(paths) == 1 else 'them'}"
                    f" runs on hooks): {reason}",
                    RuntimeWarning, stacklevel=user_stacklevel())
    return captured


def _modules_named(paths: list[str], shown: int = 4) -> str:
    """``module 'a'``, or ``modules 'a', 'b', ... (12 in all)``."""
    if len(paths) == 1:
        return f"module {paths[0]!r}"
    names = ", ".join(map(repr, paths[:shown]))
    return f"modules {names}{f', ... ({len(paths)} in all)' if len(paths) > shown else ''}"


def _inside_opaque(captured: Captured, program: Program,
                   backward_nodes: Any) -> str | None:
    """Why ``program`` cannot run on this partly captured graph, or ``None``: it reads or
    writes a site inside a module that runs as an opaque call, or uses gradients (which
    do not flow through opaque calls)."""
    if not captured.opaque:
        return None
    for node in program.nodes:
        site = getattr(node, "site", None)
        if site is None:
            continue
        for path in captured.opaque:
            if site.path.startswith(path + ".") or (path == "" and site.path):
                return at_line(f"{site.label} is inside module {path!r}, which runs as an "
                               f"opaque call in the captured graph ({captured.opaque[path]})",
                               node.line)
    if backward_nodes or any(n.kind in (Kind.GRAD, Kind.GRAD_WRITE) for n in program.nodes):
        path = next(iter(captured.opaque))
        return (f"the trace uses gradients, which do not flow through module {path!r} "
                f"(an opaque call in the captured graph)")
    return None


def _refuse_operations_not_called(module: nn.Module, captured: Captured, program: Program,
                                  args: tuple, kwargs: dict, operations: frozenset) -> None:
    """Raise, as the hooks backend does, where ``program`` reads or writes an operation
    (``.source``) of a module that runs as an opaque call because it may take torch's
    fused fast path, and that fast path runs for these inputs (a fake-tensor scan, which
    takes it as the plain forward does): the operation is not called."""
    fast = [path for path, reason in captured.opaque.items() if reason in FUSED_REASONS]
    if not fast or not operations:
        return
    nodes = [node for node in program.nodes if getattr(node, "site", None) is not None
             and is_operation(node.site.path)
             and any(node.site.path.startswith(f"{path}.") for path in fast)]
    if not nodes:
        return
    index = cached_scan(module, args, kwargs, operations).index
    called = {site.path for site in index}
    for node in nodes:
        site = node.site
        why = None if site.path in called else fast_path_refusal(site.path, called.__contains__)
        if why is not None:
            raise TraceError(at_line(f"{module_label(site.path)} has no {site.kind} call "
                                     f"#{site.call} in this forward pass ({why})", node.line))


def _plain_branch_refusal(module: nn.Module, program: Program, args: tuple, kwargs: dict,
                          operations: frozenset, captured: Captured | None,
                          callees: dict | None = None) -> str | None:
    """Raise, on both backends, where ``program`` reads or writes an operation inside one
    of transformers' attention functions that the plain forward does not call with these
    inputs; on the fx backend (``captured``), why its graph does not hold one as the
    plain forward computes it (see ``attention_branches``), else ``None``."""
    if not operations:
        return None
    nodes = attention_nodes(program.nodes, captured.callees if captured is not None
                            else callees)
    if not nodes:
        return None
    return branch_refusal(nodes, plain_scan(module, args, kwargs, operations), captured)


def metadata_source(module: nn.Module, args: tuple, kwargs: dict,
                    options: RunOptions,
                    operations: frozenset = frozenset()) -> Captured | ScanResult:
    """Boundary shapes for these inputs: from the capture where the fx backend will run
    (it is needed anyway), else from a fake-tensor scan. ``operations``: the operations
    spec whose sites are needed too (``capture.operations.spec_for``); the values of
    operations inside transformers' attention functions are the plain forward's
    (``attention_branches.with_plain_values``: a run that differs there runs on hooks)."""
    source = None
    if options.backend != "hooks":
        try:
            captured = cached_capture(module, args, kwargs, operations=operations)
            if not captured.opaque:  # (a partial capture lacks the sites inside)
                source = captured
        except CaptureError:
            pass
    if source is None:
        source = cached_scan(module, args, kwargs, operations)
    return with_plain_values(module, args, kwargs, operations, source) if operations \
        else source


def run_source(module: nn.Module, program: Program, args: tuple, kwargs: dict,
               options: RunOptions) -> Captured | ScanResult:
    """What :func:`run_program` will run ``program`` from, without running it: the capture
    of the fx backend (the same one: operations and dynamic shapes as the run asks), or
    the scan of the hooks backend where it will not capture."""
    operations = spec_for(module, program.site_paths)
    if options.backend != "hooks":
        try:
            return cached_capture(module, args, kwargs, dynamic=options.dynamic_policy,
                                  operations=operations)
        except CaptureError:
            pass
    return cached_scan(module, args, kwargs, operations)


class LastRun:
    """What chose the runner of one of a wrapper's latest fx traces, and that runner: a
    trace with the same options (the same object), structure key, rows and signature
    (inputs, grad mode and the model's state token, unique to the model) runs it again
    without the capture and runner lookups, which would find it. Only plain runs are
    remembered: no gradients, no ``stop()``, no operation sites, no cache objects among
    the inputs. A wrapper keeps :data:`MAX_LAST_RUNS`, by options, number of nodes and
    number of saves (a patching loop alternates a clean and a patched Program). The runner
    is held weakly: it lives in the runner cache, whose bounds and releases (a capture
    let go, parameters replaced) apply as they are."""

    __slots__ = ("options", "structure", "rows", "signature", "runner", "keep_output")

    def __init__(self, options: RunOptions, program: Program, rows: dict, signature: tuple,
                 runner: Any, keep_output: bool):
        self.options = options
        self.structure = program.structure_key()
        self.rows = dict(rows)
        self.signature = signature
        self.runner = weakref.ref(runner)
        self.keep_output = keep_output

    def rerun(self, module: nn.Module, program: Program, args: tuple, kwargs: dict,
              rows: dict, options: RunOptions) -> Outcome | None:
        """The Outcome of running the remembered runner, or ``None`` where the trace
        differs from the remembered one (nothing has run)."""
        if options is not self.options or rows != self.rows or \
                program.structure_key() != self.structure:
            return None
        flat = flat_inputs(args, kwargs)
        if signature(module, args, kwargs, flat) != self.signature:
            return None
        runner = self.runner()
        if runner is None:  # (no longer cached)
            return None
        if runner.spliced.pinned and \
                runner.spliced.refused(flat[0] + program.input_values) is not None:
            return None  # (refused by the run below, with the fall back it decides)
        if program.input_values:
            _check_inputs(program)
        output, saves = runner(flat[0] + program.input_values, ())
        bump("runner_hits")
        return Outcome("fx", output, self.keep_output, dict(zip(program.saves, saves)),
                       runner.graph_module)


MAX_LAST_RUNS = 8  # runs remembered per wrapper (by options, number of nodes and saves)


def run_program(module: nn.Module, program: Program, args: tuple, kwargs: dict,
                rows: dict[Any, Rows], options: RunOptions, warned: set,
                stop: bool = False, last: dict | None = None) -> Outcome:
    """Run ``module(*args, **kwargs)`` with ``program`` spliced in (``stop``: end the
    forward pass once everything the Program needs is computed). ``last``: the caller's
    latest runs (a dict of :class:`LastRun`), updated here."""
    slot = None
    if last is not None and not stop:
        slot = (id(options), len(program.nodes), len(program.saves))
        remembered = last.get(slot)
        if remembered is not None:
            outcome = remembered.rerun(module, program, args, kwargs, rows, options)
            if outcome is not None:
                return outcome
    _check_inputs(program)
    backward_nodes = backward_phase(program)
    if backward_nodes:
        with TapHooks():  # (the grad taps' tensor hooks live until the backward phase ends)
            return _run_program(module, program, args, kwargs, rows, options, warned, stop,
                                last, backward_nodes)
    return _run_program(module, program, args, kwargs, rows, options, warned, stop, last,
                        backward_nodes)


def _run_program(module: nn.Module, program: Program, args: tuple, kwargs: dict,
                 rows: dict[Any, Rows], options: RunOptions, warned: set, stop: bool,
                 last: dict | None, backward_nodes: set[Node]) -> Outcome:
    """:func:`run_program` once no remembered run applies: the forward pass, then the
    backward phase where the trace uses gradients."""
    slot = (id(options), len(program.nodes), len(program.saves)) \
        if last is not None and not stop else None
    for node in forward_exports(program, backward_nodes):
        program.save(node)  # forward values the backward phase needs
    if backward_nodes:
        # grad taps call back into the trace during backward(): the graph breaks there
        options = options.with_compile(fullgraph=False)
    keep_output = (not options.prune or not program.saves) and not stop
    forward_saves = [n for n in program.saves if n not in backward_nodes]
    flat = flat_inputs(args, kwargs)
    operations = spec_for(module, program.site_paths)
    # (a remembered run is keyed by the signature that chose its capture)
    remember = slot is not None and not backward_nodes and not operations \
        and options.backend != "hooks"
    key = signature(module, args, kwargs, flat) if remember else None
    captured = capture_for(module, args, kwargs, options, warned, flat, operations,
                           key[-1] if remember else None)
    outcome = None
    if captured is not None:
        _refuse_operations_not_called(module, captured, program, args, kwargs, operations)
        reason = _inside_opaque(captured, program, backward_nodes) or \
            _plain_branch_refusal(module, program, args, kwargs, operations, captured)
        if reason is not None:
            fall_back(NotOnGraph(reason), options, warned, ("opaque", reason))
            captured = None
    if captured is not None:
        try:
            outcome = _run_fx(module, captured, program, flat[0], rows, options, keep_output,
                              forward_saves, args, kwargs, update_caches=not stop)
            # (not a run whose capture holds for some input values only: the lengths of
            # a packed sequence, see ``Captured.decided_by``; the signature has shapes)
            if remember and not outcome.used_caches and not captured.decided_by:
                last.pop(slot, None)
                if len(last) >= MAX_LAST_RUNS:
                    del last[next(iter(last))]  # (the oldest)
                last[slot] = LastRun(options, program, rows, key, outcome.runner, keep_output)
        except NotOnGraph as error:  # (raised while splicing: nothing has run)
            fall_back(error, options, warned, ("not on graph", str(error)))
    if outcome is None:
        outcome = _run_hooks(module, program, args, kwargs, rows, stop, forward_saves,
                             operations)
    if backward_nodes:
        forward = {n: outcome.values[n] for n in forward_saves}
        values = BackwardPhase(program, rows, backward_nodes, forward,
                               outcome.grad_keys).run()
        outcome.values.update((n, values[n]) for n in program.saves if n in backward_nodes)
    return outcome


def _run_fx(module: nn.Module, captured: Captured, program: Program, flat: list[Any],
            rows: dict[Any, Rows], options: RunOptions, keep_output: bool,
            forward_saves: list[Node], args: tuple = (), kwargs: dict | None = None,
            update_caches: bool = True) -> Outcome:
    # a stopped trace leaves a passed-in cache as it was (the forward pass did not finish):
    # its updates are not outputs, so nothing only they need is computed
    runner = runner_for(module, captured, program, rows, keep_output, options.compile,
                        update_caches)
    user_caches = input_caches(args, kwargs or {}) if captured.caches is not None and \
        captured.caches.n_inputs else ()
    output, saves = runner(flat + program.input_values, user_caches)
    grad_keys = {}
    if runner.spliced.grad_keys:
        nodes = program.nodes
        grad_keys = {nodes[i]: key for i, key in runner.spliced.grad_keys.items()}
    return Outcome("fx", output, keep_output, dict(zip(forward_saves, saves)),
                   runner.graph_module, grad_keys, runner, bool(user_caches))


def _run_hooks(module: nn.Module, program: Program, args: tuple, kwargs: dict,
               rows: dict[Any, Rows], stop: bool, forward_saves: list[Node],
               operations: frozenset = frozenset()) -> Outcome:
    source = cached_scan(module, args, kwargs, operations)
    _plain_branch_refusal(module, program, args, kwargs, operations, None, source.callees)
    positions = walked_positions(module, program, rows, with_plain_values(
        module, args, kwargs, operations, source))
    grad_keys: dict[Node, str] = {}
    output, values = run_with_hooks(module, program, rows, source.index, positions,
                                    args, kwargs, stop=stop, grad_keys=grad_keys,
                                    operations=operations, checkpointed=source.checkpointed,
                                    written_buffers=source.written_buffers)
    return Outcome("hooks", output, not stop, {n: values[n] for n in forward_saves},
                   None, grad_keys)


def _check_inputs(program: Program) -> None:
    """Tensors the user brought into the trace must hold data (not be on the meta device)."""
    for index, value in enumerate(program.input_values):
        if isinstance(value, torch.Tensor) and value.is_meta:
            user = next((n for n in program.nodes if any(
                a.kind is Kind.INPUT and a.input_index == index for a in n.all_input_nodes)),
                None)
            raise TraceError(at_line("a tensor on the meta device (shapes only, no data) was "
                                     "used in this trace; pass a real tensor",
                                     user.line if user is not None else None))
