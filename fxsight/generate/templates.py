"""Which decoding steps make the same Program: steps whose nodes are alike (the same
operations on the same values, in the same order) share one template, found once per
generation.
"""

from __future__ import annotations

import math
from typing import Any

from ..record.program import Node

def step_classes(by_step: dict[int, list[Node]], wanted: set[Node],
                  tried: int = 8) -> dict[int, int]:
    """step -> a class number, equal for steps whose nodes are :func:`_alike` (each step
    compared with the first step of up to ``tried`` classes)."""
    firsts: list[tuple[list[Node], dict[Node, int]]] = []
    classes = {}
    for step, nodes in by_step.items():
        where = {node: i for i, node in enumerate(nodes)}
        for number, (first, first_where) in enumerate(firsts):
            if _alike(first, nodes, wanted, (first_where, where)):
                classes[step] = number
                break
        else:
            if len(firsts) < tried:
                classes[step] = len(firsts)
                firsts.append((nodes, where))
    return classes


def _alike(a: list[Node], b: list[Node], wanted: set[Node],
           where: tuple[dict[Node, int], dict[Node, int]]) -> bool:
    """Whether the nodes ``a`` and ``b`` (each a step's, in order; ``where`` maps each
    step's nodes to their positions) make the same Program: node by node the same kind,
    operation, target, site, flags and line, saved alike, and arguments equal where nodes
    of the step stand at the same position and any other node (an input, a value of
    another step) is the same node."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x.kind is not y.kind or x.op != y.op or x.target is not y.target or \
                (x.site is not y.site and x.site != y.site) or \
                x.accessor != y.accessor or x.invoke != y.invoke or \
                x.skip != y.skip or x.mutation != y.mutation or x.lenient != y.lenient or \
                x.at_read != y.at_read or \
                x.input_index != y.input_index or (x in wanted) != (y in wanted) or \
                (x.line is not y.line and x.line != y.line) or \
                not _same(x.args, y.args, where) or \
                (x.kwargs or y.kwargs) and not _same(x.kwargs, y.kwargs, where):
            return False
    return True


def _same(u: Any, v: Any, where: tuple[dict, dict]) -> bool:
    """Whether arguments ``u`` (of a node of step a) and ``v`` (of step b) are alike:
    ``where`` maps each step's nodes to their positions. (A module-level function: a
    nested recursive one would be a reference cycle, freed only by the collector.)"""
    kind = type(u)
    if kind is not type(v):
        return False
    if kind is Node:
        i, j = where[0].get(u), where[1].get(v)
        return i == j if i is not None or j is not None else u is v
    if kind is tuple or kind is list:
        if len(u) != len(v):
            return False
        for p, q in zip(u, v):  # (the common items compared here, without a call each)
            item = type(p)
            if item is not type(q):
                return False
            if item is Node:
                i, j = where[0].get(p), where[1].get(q)
                if (i != j) if i is not None or j is not None else p is not q:
                    return False
            elif item in _BY_VALUE:
                if p != q:
                    return False
            elif item is slice and p.start is None and p.stop is None and p.step is None:
                if q.start is not None or q.stop is not None or q.step is not None:
                    return False
            elif (p is not q or item in _CONTAINERS) and not _same(p, q, where):
                return False
        return True
    if kind is dict:
        return list(u) == list(v) and all(_same(p, q, where)
                                          for p, q in zip(u.values(), v.values()))
    if kind is slice:
        return _same(u.start, v.start, where) and _same(u.stop, v.stop, where) and \
            _same(u.step, v.step, where)
    if kind is float:  # (0.0 and -0.0 are equal, and different constants)
        return u == v and math.copysign(1.0, u) == math.copysign(1.0, v)
    if kind in _BY_VALUE:
        return u == v
    return u is v


_CONTAINERS = frozenset({tuple, list, dict, slice})
_BY_VALUE = frozenset({int, str, bool, type(None), type(Ellipsis)})
