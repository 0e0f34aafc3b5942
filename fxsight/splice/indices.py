"""Integer indices of tensors as graph inputs: one spliced graph for every position.

A patching loop writes ``h.output[:, pos] = clean`` for one position after another. The
shape of ``x[:, pos]`` does not depend on ``pos``, so the spliced graph need not either:
the integers of a tensor's ``[...]`` read or assignment (``operator.getitem``, fxsight's
``setitem``) whose key is made of whole slices (``:``) and integers become inputs of the
graph (placeholders after the Program's own inputs), and Programs that differ only in
them share one Executable. Each of them still gets its own Runner, validated for its own
integers (an index out of range raises before anything runs), which hands them to the
graph at every call.

In the graph such a read is ``torch.select`` along each integer's dimension (the view
``x[:, pos]`` is), and an assignment writes into that view (:func:`setitem_at`): dynamo
and inductor keep an integer given to ``select`` symbolic, where one inside an indexing
tuple is specialized to its value (a recompilation per position). The graph gets the
integers counted from the start (``-1`` of a size 7 is ``6``): inductor computes
``x[:, i] += v`` wrongly for a negative symbolic ``i`` (torch 2.13), and a negative index
would need a compilation of its own.

Other keys (``x[:, :k]``: the shape depends on ``k``; ``None``, ``...``, tensors), integers
indexing a tuple, list or dict (``h.output[0]``: which value, resolved when splicing),
``bool`` and everything that is not a plain ``int`` stay constants of the graph.

A new position's Program is not walked again either: :func:`candidates` leaves every
integer that could be lifted out of its structure, and where an alike Program was walked
(:class:`Validated`), checking the integers stands for the walk: the lifted ones in range
of the sizes they index, the others equal.
"""

from __future__ import annotations

import operator
from typing import Any

import torch

from ..record.program import Kind, Node, Program, setitem

# where the structure key of a node had an integer that is now a graph input
INDEX = ("fxsight-index",)  # (a structure never holds this tuple: tuples are tagged)

# node index -> the positions of the integers in its key (None: the key is one integer)
Lifted = dict[int, "tuple[int, ...] | None"]


def tensor_indices(program: Program, values: dict) -> Lifted:
    """The integers of ``program`` that index tensors, by node (``values``: the meta
    values of a walk over the Program, which tell tensors from containers)."""
    lifted: Lifted = {}
    for node in program.nodes:
        if node.kind is not Kind.OP or node.op != "call_function" or \
                (node.target is not operator.getitem and node.target is not setitem) or \
                len(node.args) < 2:
            continue
        indexed = _indexed(node, values)
        if not isinstance(indexed, torch.Tensor):
            continue
        key = node.args[1]
        if type(key) is int:
            positions = None
        elif type(key) is tuple and all(type(item) is int or _whole(item) for item in key):
            positions = tuple(i for i, item in enumerate(key) if type(item) is int)
            if not positions:
                continue
        else:
            continue
        # (the sizes indexed must be known: negative integers are counted from them)
        if all(type(size) is int for size in _sizes(indexed, positions)):
            lifted[node.index] = positions
    return lifted


def _indexed(node: Node, values: dict) -> Any:
    """The (meta) value a getitem or setitem node indexes."""
    first = node.args[0]
    return values.get(first) if type(first) is Node else first


def _sizes(indexed: torch.Tensor, positions: "tuple[int, ...] | None") -> list[Any]:
    """The sizes the lifted integers index (each item of such a key is one dimension)."""
    shape = indexed.shape
    if positions is None:
        return [shape[0]] if len(shape) else [None]
    return [shape[p] if p < len(shape) else None for p in positions]


def _whole(item: Any) -> bool:
    return type(item) is slice and item.start is None and item.stop is None and \
        item.step is None


def dimensions(positions: "tuple[int, ...] | None") -> tuple[int, ...]:
    """The dimension each lifted integer selects along, after the selections before it
    (``[:, p, :, q]`` -> ``(1, 2)``)."""
    if positions is None:
        return (0,)
    dims, removed = [], 0
    for position in positions:
        dims.append(position - removed)
        removed += 1
    return tuple(dims)


def select_at(value: torch.Tensor, dims: tuple[int, ...], *indices: Any) -> torch.Tensor:
    """``value`` selected at ``indices`` along ``dims`` in turn: the view ``value[key]``."""
    for dim, index in zip(dims, indices):
        value = torch.select(value, dim, index)
    return value


def setitem_at(target: torch.Tensor, dims: tuple[int, ...], value: Any,
               *indices: Any) -> torch.Tensor:
    """``target[key] = value`` in place for a key of whole slices and integers (written
    as selections: see the module's docstring), returning ``target``."""
    select_at(target, dims, *indices)[...] = value
    return target


def blind(structure: tuple, lifted: Lifted) -> tuple:
    """A Program structure key with the lifted integers replaced by :data:`INDEX` (parts
    and nodes are in step: part ``i`` describes node ``i``, as ``Program._add`` builds
    it: ``(kind, op, target, args, ...)``, ``args`` as ``("tuple", (first, key, ...))``)."""
    if not lifted:
        return structure
    parts = list(structure)
    for index, positions in lifted.items():
        part = parts[index]
        kind, op, target, args, *rest = part
        tag, items = args  # ("tuple", (first argument, key, ...))
        key = items[1]
        if positions is None:
            key = INDEX
        else:
            key_tag, key_items = key
            key = (key_tag, tuple(INDEX if i in positions else item
                                  for i, item in enumerate(key_items)))
        parts[index] = (kind, op, target, (tag, (items[0], key, *items[2:])), *rest)
    return tuple(parts)


def as_selection(target: Any, args: tuple, positions: "tuple[int, ...] | None",
                 inputs: list[Any]) -> tuple[Any, tuple]:
    """A lifted getitem's or setitem's target and arguments (mapped to graph values) as
    :func:`select_at` or :func:`setitem_at` of the integers' placeholders ``inputs``."""
    dims = dimensions(positions)
    if target is operator.getitem:
        return select_at, (args[0], dims, *inputs)
    return setitem_at, (args[0], dims, args[2], *inputs)


def count(positions: "tuple[int, ...] | None") -> int:
    """How many integers a node's key lifts."""
    return 1 if positions is None else len(positions)


# --- Programs that differ from a validated one in their indices only ---------------------
def candidates(structure: tuple) -> tuple[tuple, dict[tuple, int]]:
    """``structure`` (whose parts key getitem and setitem by the functions themselves)
    with every integer that a Program could have lifted replaced by
    :data:`INDEX` (those of a getitem's or setitem's key made of integers and whole
    slices, whatever it indexes), and those integers by ``(node index, position)``
    (``position`` as in :data:`Lifted`). Two Programs with equal results here differ in
    those integers only: once one was validated, the other needs the integers checked, not
    a walk (see :class:`Validated`)."""
    parts = list(structure)
    found: dict[tuple, int] = {}
    for index, part in enumerate(parts):
        if len(part) < 4 or part[0] != "op" or part[1] != "call_function" or \
                (part[2] is not operator.getitem and part[2] is not setitem) or \
                type(part[3]) is not tuple:
            continue
        tag, items = part[3]
        if tag != "tuple" or len(items) < 2:
            continue
        key = items[1]
        if type(key) is int:
            found[(index, None)] = key
            key = INDEX
        elif type(key) is tuple and len(key) == 2 and key[0] == "tuple" and \
                all(type(item) is int or item == _WHOLE_KEY for item in key[1]):
            positions = [i for i, item in enumerate(key[1]) if type(item) is int]
            if not positions:
                continue
            for position in positions:
                found[(index, position)] = key[1][position]
            key = ("tuple", tuple(INDEX if type(item) is int else item for item in key[1]))
        else:
            continue
        parts[index] = (*part[:3], (tag, (items[0], key, *items[2:])), *part[4:])
    return tuple(parts), found


_WHOLE_KEY = ("slice", None, None, None)  # ``:`` in a structure key


class Validated:
    """What the walk of a Program found about its integers: which it lifted (and the sizes
    they index), and the values of the others (constants of its graph). Another Program
    whose :func:`candidates` structure is the same needs only its integers checked:
    the constants equal, the lifted ones in range (the shapes of ``x[:, i]`` and of the
    rest of the walk do not depend on ``i``)."""

    __slots__ = ("lifted", "sizes", "constants")

    def __init__(self, program: Program, lifted: Lifted, values: dict,
                 integers: dict[tuple, int]):
        self.lifted = lifted
        nodes = program.nodes
        self.sizes: dict[tuple, int] = {}
        for index, positions in lifted.items():
            sizes = _sizes(_indexed(nodes[index], values), positions)
            for position, size in zip(positions or (None,), sizes):
                self.sizes[(index, position)] = size
        self.constants = {k: v for k, v in integers.items() if k not in self.sizes}

    def index_values(self, integers: dict[tuple, int]) -> list[int] | None:
        """The lifted integers of this Program, or of one alike but for its ``integers``
        (from :func:`candidates`), in the order of the graph's placeholders and counted
        from the start (``-1`` of a size 7 is ``6``: a compiled graph never sees a negative
        index, as inductor (torch 2.13) computes ``x[:, i] += v`` wrongly for a negative
        symbolic ``i``); ``None`` where a constant differs or an index is out of range
        (the walk decides, and says why)."""
        for key, value in self.constants.items():
            if integers.get(key) != value:
                return None
        found = []
        for index, positions in self.lifted.items():
            for position in positions or (None,):
                value, size = integers.get((index, position)), self.sizes[(index, position)]
                if value is None or not -size <= value < size:
                    return None
                found.append(value + size if value < 0 else value)
        return found
