"""Which inputs of a forward pass its output is computed from, and how.

A model can take an input and ignore it: a causal LM whose ``forward`` accepts an
``attention_mask`` and never reads it (a recurrent model, a model of the user's own). Its
left-padded rows then read the pads, so a batch of prompts of different lengths is silently
wrong for the shorter ones. A mask can also be read and still not keep the rows from the
pads: read for the token positions only (``mask.cumsum(-1)`` as the rows of a position
embedding, or as rotary angles), or only in a loss. What the output is computed from is
known two ways:

- from a captured graph: each node carries the placeholders its inputs carry
  (:func:`output_flows`);
- from a forward pass run on fake tensors (the scan): each tensor an operator makes from an
  input's tensors (or writes into their memory) carries that input on (:class:`InputFlow`).

Both skip operators whose result depends on their input's shape and dtype only
(``torch.ones_like(mask)``, ``mask.new_zeros(n)``): an output made that way does not read
the input. Both tell an input's *values* from its use as *positions*: what flows through
an integer index (the rows an embedding looks up, the elements a gather takes), a running
count (``mask.cumsum(-1)``: the tokens' positions, as ALiBi's bias is built from them, also
scaled per token by the mask, ``(mask.cumsum(-1) - 1) * mask`` as Bloom has it) or an
angle (``sin``, ``cos``: rotary and sinusoidal positions) only places or selects values,
so from there on it carries the input as a position. :class:`InputReads` says, for each
input, whether the outputs the rows are read from (the logits, the hidden states)
carry its values.

A mask that reaches the logits through one layer's attention says nothing of another's:
a layer whose attention drops it reads every key, pads included. So each attention
(``scaled_dot_product_attention`` and its kernels, a softmax over the last dimension of
scores: see :mod:`.attention_ops`) is recorded with what its arguments carry *near*: not
through an earlier attention (an attention's result, and its probabilities times the
values, carry what they carry only as far). An attention reads the mask where it
reaches it near (its key mask, its scores masked); it attends over the padded tokens
where its keys are as many as the mask's and it reads the padded inputs near (an
encoder-decoder's decoder self-attention reads the padded tokens only through its
cross-attention). A product of positions and the mask (``mask.cumsum(-1) * mask``)
keeps the mask's values aside (*gated*): compared with a constant (``> 0``) it is a key
mask again, while ALiBi's bias made of it, and the positions compared with each other (a
causal mask of them), still carry the mask as positions only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx

from .._torch import after_each_operator, pytree, storage_key, written_arguments
from .attention_ops import Attentions, kernel_keys, kernel_residual, softmax_keys
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
# operators' index arguments (position, name): an integer tensor there selects or places
# the values of the others (a bool one masks them: its values are read as values)
_INDEX_ARGUMENTS = {
    _aten.embedding: (1, "indices"), _aten.embedding_bag: (1, "indices"),
    _aten.index: (1, "indices"), _aten._unsafe_index: (1, "indices"),
    _aten.index_put: (1, "indices"), _aten.index_put_: (1, "indices"),
    _aten._unsafe_index_put: (1, "indices"), _aten._index_put_impl_: (1, "indices"),
    _aten.gather: (2, "index"), _aten.index_select: (2, "index"),
    _aten.take: (1, "index"), _aten.take_along_dim: (1, "indices"),
    _aten.scatter: (2, "index"), _aten.scatter_: (2, "index"),
    _aten.scatter_add: (2, "index"), _aten.scatter_add_: (2, "index"),
    _aten.scatter_reduce: (2, "index"), _aten.scatter_reduce_: (2, "index"),
    _aten.index_add: (2, "index"), _aten.index_add_: (2, "index"),
    _aten.index_copy: (2, "index"), _aten.index_copy_: (2, "index"),
    _aten.index_fill: (2, "index"), _aten.index_fill_: (2, "index"),
}
# operators that make angles into values: positions through them stay positions
_ANGLES = frozenset({_aten.sin, _aten.sin_, _aten.cos, _aten.cos_, _aten.polar})
# running sums: of flags or of a value per token (``mask.cumsum(-1)``) they count the
# tokens, each one's position among the real ones (ALiBi's bias is made of them; it masks
# no key); of hidden states (three or more dimensions, floating) they are values
_RUNNING_SUMS = frozenset({_aten.cumsum, _aten.cumsum_})
# products: a position per token times a value per token (the mask) is still a position
_PRODUCTS = frozenset({_aten.mul, _aten.mul_})
# products of matrices: attention probabilities times the values carry the values only
# through the attention
_MATMULS = frozenset({_aten.bmm, _aten.mm, _aten.matmul, _aten.einsum})
# comparisons: gated positions compared with a constant mask by the values they kept aside
_COMPARISONS = frozenset({_aten.gt, _aten.ge, _aten.lt, _aten.le, _aten.eq, _aten.ne})
# the entries of a transformers output that hold the rows (one value per token); where an
# output has none of them, every tensor of two or more dimensions is taken instead
_ROW_OUTPUTS = ("logits", "last_hidden_state", "encoder_last_hidden_state")

# (inputs whose values it carries, inputs it carries as positions; of each, those it
# carries near: not through an attention; inputs whose values a product with positions
# kept aside: gated)
Flow = tuple[int, int, int, int, int]
_NONE: Flow = (0, 0, 0, 0, 0)
NO_FLOW = _NONE  # (what a leaf that is no graph node carries)


def _packet(target: Any) -> Any:
    return getattr(target, "overloadpacket", None)


def _shape_only(target: Any) -> bool:
    return _packet(target) in _SHAPE_ONLY


def _or(a: Flow, b: Flow) -> Flow:
    return a[0] | b[0], a[1] | b[1], a[2] | b[2], a[3] | b[3], a[4] | b[4]


def _as_positions(flow: Flow) -> Flow:
    return 0, flow[0] | flow[1], 0, flow[2] | flow[3], 0


def _attended(flow: Flow) -> Flow:
    """What an attention's result carries: its arguments' flow, none of it near."""
    return flow[0], flow[1], 0, 0, flow[4]


def _integer(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and not value.dtype.is_floating_point and \
        not value.dtype.is_complex and value.dtype is not torch.bool


def _operator_flow(target: Any, args: tuple, kwargs: dict, flow_of: Any,
                   tensor_of: Any) -> tuple[Flow, Flow]:
    """What an operator's result carries: its arguments' flows (``flow_of(leaf)``), an
    integer index argument's (``tensor_of(leaf)``: its tensor, for the dtype), a running
    count's and an angle's as positions, an attention's not near (but for the input an
    encoder layer's fused kernel adds back); and what its arguments carry (an attention's
    record)."""
    packet = _packet(target)
    index = _INDEX_ARGUMENTS.get(packet)
    index_arg = None
    if index is not None:
        position, name = index
        index_arg = args[position] if position < len(args) else kwargs.get(name)
    flow, positions_only, flowing, attended = _NONE, 0, 0, False
    for leaf in pytree.tree_leaves((args, kwargs)):
        carried = flow_of(leaf)
        if carried == _NONE:
            continue
        if index_arg is not None and _integer(tensor_of(leaf)) and \
                any(leaf is x for x in pytree.tree_leaves(index_arg)):
            carried = _as_positions(carried)
        flow = _or(flow, carried)
        positions_only |= carried[1] & ~carried[0]
        flowing += 1
        attended |= not (carried[2] | carried[3])  # (an attention's result)
    if packet in _ANGLES or (packet in _RUNNING_SUMS and args and _count(tensor_of(args[0]))):
        return _as_positions(flow), flow
    if kernel_keys(target, args, tensor_of) is not None or \
            softmax_keys(target, args, tensor_of) is not None:
        residual = kernel_residual(target, args)  # (an encoder layer's: added back)
        return _or(_attended(flow), _NONE if residual is None else flow_of(residual)), flow
    if attended and packet in _MATMULS:
        return _attended(flow), flow
    if positions_only and packet in _PRODUCTS and _per_token(args, tensor_of):
        # (a position per token scaled per token, ``(mask.cumsum(-1) - 1) * mask`` as
        # Bloom's ALiBi has it, is still a position; the values are kept aside, gated)
        return (flow[0] & ~positions_only, flow[1] | positions_only,
                flow[2] & ~positions_only, flow[3] | positions_only & flow[2],
                flow[4] | positions_only & flow[0]), flow
    if flow[4] and flowing == 1 and packet in _COMPARISONS:
        # (gated positions compared with a constant, ``mask.cumsum(-1) * mask > 0``:
        # which tokens are pads, a key mask)
        return (flow[0] | flow[4], flow[1], flow[2] | flow[4] & flow[3], flow[3], 0), flow
    return flow, flow


def _per_token(args: tuple, tensor_of: Any) -> bool:
    """Whether every tensor argument holds at most a value per token (two dimensions)."""
    tensors = [tensor_of(leaf) for leaf in args]
    return all(t.dim() <= 2 for t in tensors if isinstance(t, torch.Tensor))


def _count(summed: Any) -> bool:
    """Whether a running sum of ``summed`` counts tokens (flags, or a value per token)."""
    return isinstance(summed, torch.Tensor) and (
        not summed.dtype.is_floating_point or summed.dim() <= 2)


@dataclass(frozen=True)
class InputReads:
    """What the outputs of a forward pass carry of each of its tensor inputs (indices in
    ``captures.flat_inputs``): ``outputs`` holds, for each tensor leaf of the output, its
    entry's name (``""`` where it has none), whether the rows are read from it, and its
    :data:`Flow`; ``inputs`` the bits of the inputs followed."""

    outputs: tuple[tuple[str, bool, Flow], ...]
    inputs: int
    # each attention of the forward, in order: (the path of the module it runs in, its
    # keys' number, what its arguments carry)
    attentions: tuple[tuple[str, int, Flow], ...] = ()

    def unread(self) -> frozenset[int]:
        """The inputs no output carries at all."""
        reached = 0
        for _, _, flow in self.outputs:
            reached |= flow[0] | flow[1]
        missing = self.inputs & ~reached
        return frozenset(i for i in range(missing.bit_length()) if missing >> i & 1)

    def rows_unread(self, index: int, ignoring: tuple[str, ...] = ()) -> str | None:
        """Why the rows' outputs (the logits, the hidden states; those named in
        ``ignoring`` aside) are not computed from input ``index``'s values, or ``None``
        where each of them is."""
        bit = 1 << index
        if not self.inputs & bit:
            return None
        rows = [(name or "output", flow) for name, row, flow in self.outputs
                if row and name not in ignoring]
        missing = [(name, flow) for name, flow in rows if not flow[0] & bit]
        if rows and not missing:
            return None
        if not any((flow[0] | flow[1]) & bit for _, _, flow in self.outputs):
            return "no output of its forward is computed from it"
        if not rows:
            return "no output of its forward that holds a value per token is computed " \
                   "from it"
        names = ", ".join(dict.fromkeys(name for name, _ in missing))
        if any(flow[1] & bit for _, flow in missing):
            return f"its {names} read it only as token positions (an index into a table, a " \
                   f"running count, or angles), not in which tokens each token reads"
        others = ", ".join(dict.fromkeys(name or "output" for name, _, flow in self.outputs
                                         if (flow[0] | flow[1]) & bit))
        return f"its {names} is not computed from it, only its {others}"

    def keys_unmasked(self, index: int, tokens: int, keys: int,
                      within: str | None = None) -> str | None:
        """Why an attention over the padded tokens reads their pads where another masks
        them: an attention of ``keys`` keys (the mask's length) whose arguments carry the
        inputs ``tokens`` (bits: the token ids or embeddings the mask pads) near, not
        through an earlier attention, reads input ``index`` (the mask) near, or ``None``
        where each does, or none does (the mask is then read elsewhere, or not at all:
        :meth:`rows_unread` says). ``within``: only the attentions of the module of that
        path (an encoder-decoder's encoder)."""
        bit = 1 << index
        prefix = None if within is None else f"{within}." if within else ""
        over = [(path or "the model's forward", flow) for path, n, flow in self.attentions
                if n == keys and (flow[2] | flow[3]) & tokens and
                (prefix is None or path.startswith(prefix))]
        masked = [path for path, flow in over if flow[2] & bit]
        unmasked = [path for path, flow in over if not flow[2] & bit]
        if not masked or not unmasked:
            return None
        return f"the attention in {', '.join(dict.fromkeys(unmasked))} reads every key, " \
               f"pads included, where the one in {masked[0]} masks them by it"


def input_reads(output: Any, flow_of: Any, tensor_of: Any, inputs: int,
                attentions: tuple = ()) -> InputReads:
    """The :class:`InputReads` of ``output`` (a forward's output, its leaves whatever
    ``flow_of`` and ``tensor_of`` take: tensors, graph nodes) and ``attentions`` (see
    ``InputReads.attentions``)."""
    pairs = pytree.tree_flatten_with_path(output)[0]
    entries = []
    for path, leaf in pairs:
        tensor = tensor_of(leaf)
        if not isinstance(tensor, torch.Tensor):
            continue
        first = path[0] if path else None
        name = getattr(first, "key", getattr(first, "name", ""))
        entries.append((name if isinstance(name, str) else "", tensor, flow_of(leaf)))
    named = any(name in _ROW_OUTPUTS for name, _, _ in entries)
    return InputReads(tuple(
        (name, name in _ROW_OUTPUTS if named else
         tensor.dim() >= 2 and "loss" not in name, flow)
        for name, tensor, flow in entries), inputs, tuple(attentions))


def output_flows(graph: fx.Graph, marker: Any) -> tuple[list[Any], dict[Any, Flow], int,
                                                      tuple]:
    """The leaves of ``graph``'s output (graph nodes, constants), each node's
    :data:`Flow` of the placeholders (in placeholder order), the bits of its tensor
    placeholders and its attentions (as ``InputReads.attentions``). The memory an
    operator writes in place (``copy_`` into a slice of a tensor of the forward's own)
    carries what it writes: a later node reading that memory, through any view, carries it
    too (``marker``: the boundary marker, an identity)."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    carried: dict[fx.Node, Flow] = {node: (1 << i, 0, 1 << i, 0, 0)
                                    for i, node in enumerate(placeholders)}
    in_memory: dict[fx.Node, Flow] = {}  # root node -> what was written into its memory

    def carries(node: Any) -> Flow:
        if not isinstance(node, fx.Node):
            return _NONE
        flow = carried.get(node, _NONE)
        for root in memory_roots([node], marker):
            flow = _or(flow, in_memory.get(root, _NONE))
        return flow

    def tensor_of(node: Any) -> Any:
        return node.meta.get("val") if isinstance(node, fx.Node) else None

    leaves: list[Any] = []
    attentions = Attentions(lambda node: node if isinstance(node, fx.Node) else None,
                            tensor_of, carries)
    for node in graph.nodes:
        if node.op == "placeholder" or _shape_only(node.target):
            continue
        if node.op == "output":
            leaves = pytree.tree_leaves(node.args[0])
            continue
        flow, arguments = _operator_flow(node.target, node.args, node.kwargs, carries,
                                         tensor_of)
        attentions.after(node.target, node.args, [node], arguments,
                         lambda: _module_path(node))
        carried[node] = flow
        if flow != _NONE:
            for position, name in written_arguments(node.target):
                written = node.args[position] if position < len(node.args) else \
                    node.kwargs.get(name)
                for tensor in written if isinstance(written, (list, tuple)) else (written,):
                    if isinstance(tensor, fx.Node):
                        for root in memory_roots([tensor], marker):
                            in_memory[root] = _or(in_memory.get(root, _NONE), flow)
    tensors = 0
    for i, node in enumerate(placeholders):
        if isinstance(node.meta.get("val"), torch.Tensor):
            tensors |= 1 << i
    return leaves, {node: carries(node) for node in leaves if isinstance(node, fx.Node)}, \
        tensors, attentions.found()


def _module_path(node: fx.Node) -> str:
    """The path of the innermost module ``node`` was traced in (``""``: the root's)."""
    stack = node.meta.get("nn_module_stack") or {}
    for path, _ in reversed(list(stack.values())):
        return path
    return ""


class InputFlow:
    """While active (``with flow:``), follows the tensors of ``inputs`` (a flat list, as
    ``captures.flat_inputs`` makes it; only its tensors are followed) through every
    operator run: a result, and the memory of every tensor it shares storage with, carries
    the inputs its arguments carry. :meth:`reads` then says what an output carries. Enter
    it inside the fake tensor mode, with the tensors the forward is given. ``where()``:
    the path of the module running now (naming the attentions). ``observe``: called
    after each operator too, as ``after_each_operator``'s callback (in the same mode)."""

    def __init__(self, inputs: list[Any], where: Any = lambda: "",
                 observe: Callable[[Any, tuple, dict, Any], None] | None = None):
        self._carried: dict[int, Flow] = {}  # storage key -> flow
        self._kept: list[torch.Tensor] = []  # (storage keys are valid while these live)
        self._attentions = Attentions(self._storage, lambda leaf: leaf, self._flow_of)
        self._where = where
        self._observe = observe
        self._followed = 0
        for index, value in enumerate(inputs):
            if isinstance(value, torch.Tensor):
                self._mark(value, (1 << index, 0, 1 << index, 0, 0))
                self._followed |= 1 << index
        self._active = None

    def _mark(self, tensor: torch.Tensor, flow: Flow) -> None:
        key = storage_key(tensor)
        self._carried[key] = _or(self._carried.get(key, _NONE), flow)
        self._kept.append(tensor)

    @staticmethod
    def _storage(leaf: Any) -> int | None:
        return storage_key(leaf) if isinstance(leaf, torch.Tensor) else None

    def _flow_of(self, leaf: Any) -> Flow:
        if isinstance(leaf, torch.Tensor):
            return self._carried.get(storage_key(leaf), _NONE)
        return _NONE

    def _after(self, operator: Any, args: tuple, kwargs: dict, result: Any) -> None:
        if self._observe is not None:
            self._observe(operator, args, kwargs, result)
        if _shape_only(operator):
            return
        flow, arguments = _operator_flow(operator, args, kwargs, self._flow_of,
                                         lambda leaf: leaf)
        self._attentions.after(operator, args, pytree.tree_leaves(result), arguments,
                               self._where)
        if flow == _NONE:
            return
        written = [args[i] if i < len(args) else kwargs.get(name)
                   for i, name in written_arguments(operator)]
        for leaf in pytree.tree_leaves((result, written)):
            if isinstance(leaf, torch.Tensor):
                self._mark(leaf, flow)

    def __enter__(self) -> "InputFlow":
        self._active = after_each_operator(self._after)
        self._active.__enter__()
        return self

    def __exit__(self, *exc: Any) -> bool:
        active, self._active = self._active, None
        return bool(active.__exit__(*exc))

    def reads(self, output: Any) -> InputReads:
        """What ``output`` (the forward's output: any pytree of tensors) carries."""
        reads = input_reads(output, self._flow_of, lambda leaf: leaf, self._followed,
                            self._attentions.found())
        self._kept.clear()
        self._carried.clear()
        self._attentions = Attentions(self._storage, lambda leaf: leaf, self._flow_of)
        return reads
