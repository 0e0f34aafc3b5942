"""The hooks backend's walk of a Program on meta values, remembered per scan.

Before a hooks run, :class:`~fxsight.splice.meta_walker.MetaWalker` evaluates the Program
on the scan's meta values: every check that must raise before the model runs, and the
position of each node in the forward pass (where its hook acts). The fx backend keeps
that walk's result in its runner (validated once per capture, Program structure and rows);
the hooks backend walked again at every trace (~0.3-0.6 ms of a tiny model's 3 ms trace).

Here the positions are remembered under the same key as the fx backend's runners: the
scan (the model's state and the inputs' signature, by identity: a scan the scan cache let
go is not found), the Program's structure key (every node's kind, target, arguments with
their plain values, the input tensors' shapes, dtypes and devices, the saves) and the
invokes' rows. A walk's checks and positions depend on nothing else: a Program's inputs
are tensors (keyed by shape) and floats (no shape of their own). Programs that use
gradients are walked every time.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Any

import torch

from ..record.program import Node, Program
from ..splice.meta_walker import MetaWalker
from ..splice.rows import Rows
from ..stats import bump
from .executable import rows_key

MAX_WALKS = 64  # remembered walks per model (an LRU)

# model -> (structure key, rows key) -> (the scan, weakly; (node index, position), ...)
_WALKS: "weakref.WeakKeyDictionary[torch.nn.Module, OrderedDict]" = \
    weakref.WeakKeyDictionary()


def walked_positions(model: torch.nn.Module, program: Program, rows: dict[Any, Rows],
                     source: Any) -> dict[Node, int]:
    """The position in the forward pass of each of ``program``'s nodes, from a walk on
    ``source``'s meta values (which raises what must raise before the run), or from the
    walk of an earlier trace of the same structure, rows and scan."""
    if program.uses_gradients:
        return _walk(program, rows, source)
    key = (program.structure_key(), rows_key(rows))
    per_model = _WALKS.get(model)
    if per_model is None:
        per_model = _WALKS[model] = OrderedDict()
    found = per_model.get(key)
    if found is not None and found[0]() is source:
        per_model.move_to_end(key)
        bump("hook_walks_skipped")
        nodes = program.nodes
        return {nodes[index]: position for index, position in found[1]}
    positions = _walk(program, rows, source)
    per_model[key] = (weakref.ref(source),
                      tuple((node.index, position) for node, position in positions.items()))
    per_model.move_to_end(key)
    while len(per_model) > MAX_WALKS:
        per_model.popitem(last=False)
    return positions


def _walk(program: Program, rows: dict[Any, Rows], source: Any) -> dict[Node, int]:
    walker = MetaWalker(program, rows, source)
    walker.run()
    return walker.positions
