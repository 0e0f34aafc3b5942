"""Which inputs of a forward pass its output is computed from.

A model can take an input and ignore it: a causal LM whose ``forward`` accepts an
``attention_mask`` and never reads it (a recurrent model, a model of the user's own). Its
left-padded rows then read the pads, so a batch of prompts of different lengths is silently
wrong for the shorter ones. What the output is computed from is known two ways:

- from a captured graph: a placeholder from which no path of users reaches the output
  (:func:`unread_placeholders`);
- from a forward pass run on fake tensors (the scan): each tensor an operator makes from an
  input's tensors (or writes into their memory) carries that input on (:class:`InputFlow`).

Both skip operators whose result depends on their input's shape and dtype only
(``torch.ones_like(mask)``, ``mask.new_zeros(n)``): an output made that way does not read
the input.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from .._torch import after_each_operator, pytree, storage_key, written_arguments
from .memory import memory_roots

_aten = torch.ops.aten
# operators whose result is made from their tensor arguments' shapes, dtypes and devices
# only, never their values
_SHAPE_ONLY = frozenset({
    _aten.empty_like, _aten.zeros_like, _aten.ones_like, _aten.full_like,
    _aten.rand_like, _aten.randn_like, _aten.randint_like,
    _aten.new_empty, _aten.new_empty_strided, _aten.new_zeros, _aten.new_ones,
    _aten.new_full, _aten.sym_size, _aten.sym_stride, _aten.sym_numel,
    _aten.sym_storage_offset, _aten.size, _aten.stride, _aten.dim, _aten.numel,
})


def _shape_only(target: Any) -> bool:
    return getattr(target, "overloadpacket", None) in _SHAPE_ONLY


def unread_placeholders(graph: fx.Graph, marker: Any) -> frozenset[int]:
    """The indices (in placeholder order) of the tensor placeholders of ``graph`` that no
    output is computed from. Each node carries the placeholders its inputs carry, and so
    does the memory an operator writes in place (``copy_`` into a slice of a tensor of the
    forward's own): a later node reading that memory, through any view, carries them too
    (``marker``: the boundary marker, an identity)."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    carried: dict[fx.Node, int] = {node: 1 << i for i, node in enumerate(placeholders)}
    in_memory: dict[fx.Node, int] = {}  # root node -> what was written into its memory

    def carries(node: fx.Node) -> int:
        bits = carried.get(node, 0)
        for root in memory_roots([node], marker):
            bits |= in_memory.get(root, 0)
        return bits

    reached = 0
    for node in graph.nodes:
        if node.op == "placeholder" or _shape_only(node.target):
            continue
        bits = 0
        for given in node.all_input_nodes:
            bits |= carries(given)
        if node.op == "output":
            reached |= bits
            continue
        carried[node] = bits
        if bits:
            for position, name in written_arguments(node.target):
                written = node.args[position] if position < len(node.args) else \
                    node.kwargs.get(name)
                for tensor in written if isinstance(written, (list, tuple)) else (written,):
                    if isinstance(tensor, fx.Node):
                        for root in memory_roots([tensor], marker):
                            in_memory[root] = in_memory.get(root, 0) | bits
    return frozenset(i for i, node in enumerate(placeholders) if not reached >> i & 1
                     and isinstance(node.meta.get("val"), torch.Tensor))


class InputFlow:
    """While active (``with flow:``), follows the tensors of ``inputs`` (a flat list, as
    ``captures.flat_inputs`` makes it; only its tensors are followed) through every
    operator run: a result, and the memory of every tensor it shares storage with, carries
    the inputs its arguments carry. :meth:`unread` then names the inputs an output does
    not carry. Enter it inside the fake tensor mode, with the tensors the forward is given."""

    def __init__(self, inputs: list[Any]):
        self._carried: dict[int, int] = {}  # storage key -> bit set of inputs
        self._kept: list[torch.Tensor] = []  # (storage keys are valid while these live)
        self._followed = 0
        for index, value in enumerate(inputs):
            if isinstance(value, torch.Tensor):
                self._mark(value, 1 << index)
                self._followed |= 1 << index
        self._active = None

    def _mark(self, tensor: torch.Tensor, bits: int) -> None:
        key = storage_key(tensor)
        self._carried[key] = self._carried.get(key, 0) | bits
        self._kept.append(tensor)

    def _carries(self, value: Any) -> int:
        bits = 0
        for leaf in pytree.tree_leaves(value):
            if isinstance(leaf, torch.Tensor):
                bits |= self._carried.get(storage_key(leaf), 0)
        return bits

    def _after(self, operator: Any, args: tuple, kwargs: dict, result: Any) -> None:
        if _shape_only(operator):
            return
        bits = self._carries((args, kwargs))
        if not bits:
            return
        written = [args[i] if i < len(args) else kwargs.get(name)
                   for i, name in written_arguments(operator)]
        for leaf in pytree.tree_leaves((result, written)):
            if isinstance(leaf, torch.Tensor):
                self._mark(leaf, bits)

    def __enter__(self) -> "InputFlow":
        self._active = after_each_operator(self._after)
        self._active.__enter__()
        return self

    def __exit__(self, *exc: Any) -> bool:
        active, self._active = self._active, None
        return bool(active.__exit__(*exc))

    def unread(self, output: Any) -> frozenset[int]:
        """The followed inputs ``output`` (any pytree of tensors) carries none of."""
        missing = self._followed & ~self._carries(output)
        self._kept.clear()
        self._carried.clear()
        return frozenset(i for i in range(missing.bit_length()) if missing >> i & 1)
