"""The hooks backend: the same Program evaluated at module boundaries by forward hooks.

Used where the model cannot be captured. Each Program node runs at the boundary event of
its position (computed by the same walker that validates the Program), so the hooks and
fx backends give the same answers, in the same order.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Mapping

import torch
import torch.nn as nn

from .._torch import as_own_work, user_modes_resumed
from ..errors import TraceError, at_line
from ..capture.events import ModuleEvents
from ..capture.model_hooks import describe_hook
from ..record.program import Kind, Node, Program, execute, is_backward
from .skipping import skipping
from .checkpointing import (check_checkpoint_sites, check_checkpointed_writes,
                            check_gradient_outside_reentrant, check_write_outside_checkpoint,
                            gradient_reads, undone_on_refusal)
from ..splice.rows import Rows
from ..record.sites import INPUT, OUTPUT, Site, is_operation, module_label
from ..splice.walker import BEFORE_ALL, Walker


class RealWalker(Walker):
    def __init__(self, program: Program, rows: dict[Any, Rows], index: dict[Site, int]):
        super().__init__(program, rows, index)
        self.event_values: dict[Site, Any] = {}
        self.written: set[Site] = set()

    def site_value(self, site: Site) -> Any:
        return self.event_values[site]

    def input_value(self, node: Node) -> Any:
        return self.program.input_values[node.input_index]

    def call(self, node, op, target, args, kwargs, position):
        with user_modes_resumed():  # (the user's operation, in the user's modes)
            return execute(op, target, args, kwargs)

    def on_written(self, site: Site) -> None:
        self.written.add(site)

    def on_tapped(self, site: Site) -> None:
        self.written.add(site)


class _StopForward(BaseException):
    """Raised by a hook once everything a stopped trace needs is computed.

    A ``BaseException`` (as ``KeyboardInterrupt`` is), not an ``Exception``: a plain
    forward up to the stop raises nothing, so nothing in the model may react to the stop
    as to an error. torch calls a forward hook registered with ``always_call=True`` when
    its module's forward raises an ``Exception`` (with the output ``None`` for a module
    still running), and a forward's own ``except Exception:`` (a fallback path) would run
    code a plain forward never runs; both let a ``BaseException`` pass."""


def run_with_hooks(model: nn.Module, program: Program, rows: dict[Any, Rows],
                   index: dict[Site, int], positions: dict[Node, int],
                   args: tuple, kwargs: dict, *,
                   stop: bool = False,
                   grad_keys: dict[Node, str] | None = None,
                   operations: frozenset = frozenset(),
                   checkpointed: Mapping[Site, str] | None = None,
                   written_buffers: frozenset[str] | None = None
                   ) -> tuple[Any, dict[Node, Any]]:
    """Run ``model(*args, **kwargs)`` with ``program`` interleaved; return the model's
    output and the value of every Program node.

    ``stop``: end the forward pass (output ``None``) right after the last event the
    Program needs. ``operations``: the operations spec of the Program's operation sites
    (``capture.operations``). ``checkpointed``: the sites the forward reaches inside
    ``torch.utils.checkpoint`` (``ScanResult.checkpointed``). ``written_buffers``: the
    names of the buffers the forward writes in place (``ScanResult.written_buffers``;
    ``None``: not known, every buffer is kept to be put back should the forward be
    refused mid-way)."""
    _check_backward_hooks(model, program)
    check_checkpointed_writes(model, program)
    check_checkpoint_sites(program, checkpointed or {})
    grad = torch.is_grad_enabled()
    grad_reads = gradient_reads(program)
    schedule: dict[int, list[Node]] = defaultdict(list)
    walker = RealWalker(program, rows, index)
    for node in program.nodes:
        if node not in walker.backward_nodes:
            schedule[positions[node]].append(node)
    walker.run(schedule.get(BEFORE_ALL, []))
    paths = {site.path for site, i in index.items() if i in schedule}
    last = max(schedule, default=BEFORE_ALL)
    if stop and last == BEFORE_ALL:
        return None, walker.values

    def on_event(site: Site, value: Any) -> Any:
        return as_own_work(at_event, site, value)  # (fxsight's own: no user mode sees it)

    def at_event(site: Site, value: Any) -> Any:
        position = index.get(site)
        if position is None or position not in schedule:
            return None
        walker.event_values[site] = value
        walker.current.pop(site, None)
        events.paused = True  # modules the Program calls (the logit lens) are no events
        try:
            walker.run(schedule[position])
        finally:
            events.paused = False
        if stop and position == last:
            raise _StopForward
        if site in walker.written:
            check_write_outside_checkpoint(site, schedule[position], grad)
            check_gradient_outside_reentrant(site, grad_reads, grad)
            new = walker.current[site]
            return (tuple(new[0]), dict(new[1])) if site.kind == INPUT else new
        return None

    events = ModuleEvents(model, on_event, only=paths, operations=operations,
                          keep_fast_paths=True)
    skips = [n for n in program.nodes
             if n.skip and rows[n.invoke].whole]
    try:
        with undone_on_refusal(model, program, args, kwargs, written_buffers), \
                events.installed(), \
                skipping(model, skips, walker, events, index), user_modes_resumed():
            output = model(*args, **kwargs)
    except _StopForward:
        output = None
    finally:
        events = None  # (on_event's cell: the events and their callback form no cycle)
    if grad_keys is not None:
        grad_keys.update(walker.grad_keys)
    missing = [n for n in program.nodes
               if n not in walker.values and n not in walker.backward_nodes]
    if missing:
        node = missing[0]
        site = next((n.site for n in [node, *node.all_input_nodes]
                     if n.site is not None), None)
        where = module_label(site.path) if site else "a module"
        raise TraceError(at_line(f"{where} never ran during the forward pass, so this "
                                 f"intervention could not be applied", node.line))
    return output, walker.values


def _check_backward_hooks(model: nn.Module, program: Program) -> None:
    """Refuse a gradient path from the ``.output`` of a module with a full backward hook
    (or backward pre-hook): torch wraps a module's output for those hooks after its
    forward hooks have run, so the value a forward hook reads is the one before the wrap.
    A ``backward()`` from it, or from a write of a value computed from it, would skip the
    user's hook (and what it changes in the gradients upstream), unlike a plain backward."""
    if not any(is_backward(node) for node in program.nodes):
        return
    for node in program.nodes:
        if not is_backward(node) and node.kind is not Kind.WRITE:
            continue
        site = _hooked_output_read(model, node)
        if site is None:
            continue
        module = model.get_submodule(site.path)
        hook = next(iter({**module._backward_pre_hooks, **module._backward_hooks}.values()))
        use = f"this backward() starts from {site.label}" if is_backward(node) else \
            f"this write uses {site.label} and the trace calls backward()"
        raise TraceError(at_line(
            f"{use}, and {module_label(site.path)} has a full backward hook "
            f"({describe_hook(hook)}): torch passes a module's output through its backward "
            f"hooks only after forward hooks have read it, so the hook would not see this "
            f"gradient; use a later module's output, or remove the hook for the trace",
            node.line))


def _hooked_output_read(model: nn.Module, node: Node) -> Site | None:
    """The output site of a module with full backward hooks that ``node``'s value is
    computed from (in the Program), if any."""
    stack, seen = list(node.all_input_nodes), set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        stack.extend(current.all_input_nodes)
        site = current.site
        if current.kind is not Kind.READ or site.kind != OUTPUT or is_operation(site.path):
            continue
        module = model.get_submodule(site.path)
        if module._backward_pre_hooks or (module._is_full_backward_hook and
                                          module._backward_hooks):
            return site
    return None
