"""The hooks backend: the same Program evaluated at module boundaries by forward hooks.

Used where the model cannot be captured. Each Program node runs at the boundary event of
its position (computed by the same walker that validates the Program), so the hooks and
fx backends give the same answers, in the same order.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch.fx as fx
import torch.nn as nn

from .errors import TraceError, at_line
from .module_events import ModuleEvents
from .program import Program, execute
from .rows import Rows
from .sites import INPUT, Site, module_label
from .walk import BEFORE_ALL, Walker


class _RealWalker(Walker):
    def __init__(self, program: Program, rows: dict[Any, Rows], index: dict[Site, int]):
        super().__init__(program, rows, index)
        self.event_values: dict[Site, Any] = {}
        self.written: set[Site] = set()

    def site_value(self, site: Site) -> Any:
        return self.event_values[site]

    def input_value(self, node: fx.Node) -> Any:
        return self.program.input_values[node.meta["index"]]

    def call(self, node, op, target, args, kwargs, position):
        return execute(op, target, args, kwargs)

    def _write(self, node: fx.Node) -> None:
        super()._write(node)
        self.written.add(node.meta["site"])


def run_with_hooks(model: nn.Module, program: Program, rows: dict[Any, Rows],
                   index: dict[Site, int], positions: dict[fx.Node, int],
                   args: tuple, kwargs: dict) -> tuple[Any, dict[fx.Node, Any]]:
    """Run ``model(*args, **kwargs)`` with ``program`` interleaved; return the model's
    output and the value of every Program node."""
    schedule: dict[int, list[fx.Node]] = defaultdict(list)
    for node in program.nodes:
        schedule[positions[node]].append(node)
    walker = _RealWalker(program, rows, index)
    walker.run(schedule.get(BEFORE_ALL, []))
    paths = {site.path for site, i in index.items() if i in schedule}

    def on_event(site: Site, value: Any) -> Any:
        position = index.get(site)
        if position is None or position not in schedule:
            return None
        walker.event_values[site] = value
        walker.current.pop(site, None)
        walker.run(schedule[position])
        if site in walker.written:
            new = walker.current[site]
            return (tuple(new[0]), dict(new[1])) if site.kind == INPUT else new
        return None

    events = ModuleEvents(model, on_event, only=paths)
    with events.installed():
        output = model(*args, **kwargs)
    missing = [n for n in program.nodes if n not in walker.values]
    if missing:
        node = missing[0]
        site = next((n.meta["site"] for n in [node, *node.all_input_nodes]
                     if "site" in n.meta), None)
        where = module_label(site.path) if site else "a module"
        raise TraceError(at_line(f"{where} never ran during the forward pass, so this "
                                 f"intervention could not be applied", node.meta["line"]))
    return output, walker.values
