"""Attention without the mask a model builds only because it was exported.

Run eagerly, transformers calls ``scaled_dot_product_attention`` without a mask where none
is needed (no padding: ``is_causal=True``, or nothing at all for one query or a
bidirectional model), so that PyTorch can use its fastest kernels (flash attention on a
GPU). Under ``torch.export`` it cannot look at the padding mask's values, so the captured
graph builds the full boolean mask and hands it to every attention call, which converts
it (a ``where`` and two scalars per layer) and runs a masked kernel.

:func:`elide_model_masks` gives a rewritten graph the model's own path back where that is
exact. For each attention call whose mask is the model's own (no intervention wrote or
edited it, nothing it depends on is a parameter or a random draw) and whose only inputs
are ``attention_mask`` graph inputs, it evaluates the mask once with those inputs all
ones; where that mask is the causal one (or all true), the call becomes
``is_causal=True`` (or unmasked) whenever the inputs are all ones, as in the eager forward.
Whether they are is one check per run (as transformers' own ``padding_mask.all()``; none
where the inputs' maker knows on the host whether they are: :func:`known_masks`), and the mask
is computed only when they are not. A mask with no graph inputs at all (the
caller passed none) needs no check: those calls are rewritten outright.

Only graphs of static shapes are rewritten (the mask is evaluated for its sizes). A
compiled graph cannot read the padding masks' values: it keeps the mask
(:data:`KEEP`), and its Executable compiles a second graph made with
:data:`ASSUME_UNPADDED`, which it runs where it finds the padding masks all ones.
"""

from __future__ import annotations

import operator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx

from .._torch import is_op_overload, returns_alias
from ..stats import bump
from .grouped_attention import ungrouped_heads
from .single_query_attention import decidable, masked_single_query, single_query_heads

SDPA = torch.ops.aten.scaled_dot_product_attention.default
# the graph inputs a mask may be computed from (the models' own name for the padding mask,
# a 2-D tensor of integers or booleans)
MASK_INPUTS = ("attention_mask",)


@dataclass
class _Group:
    """Attention calls sharing one mask node."""

    mask: fx.Node
    calls: list[fx.Node]


# what to do where the mask is computed from padding masks (graph inputs)
CHECK = "check"  # check at each run whether they are all ones (eager graphs)
KEEP = "keep"  # keep the mask (a compiled graph cannot read the values)
ASSUME_UNPADDED = "assume-unpadded"  # the caller runs this graph only where they are ones


def elide_model_masks(gm: fx.GraphModule, padded: str = CHECK) -> list[str]:
    """Rewrite ``gm``'s attention calls as described in the module docstring (``gm`` is
    recompiled where one is); ``padded`` says what to do where the mask depends on padding
    masks (:data:`CHECK`, :data:`KEEP`, :data:`ASSUME_UNPADDED`). The names of the padding
    masks that decide whether the mask is needed: those checked, or those assumed all
    ones, or, with :data:`KEEP`, those that would have been."""
    graph = gm.graph
    groups: dict[fx.Node, _Group] = {}
    for node in graph.nodes:
        if node.op == "call_function" and node.target is SDPA:
            mask = _plain_mask(node)
            if mask is not None:
                groups.setdefault(mask, _Group(mask, [])).calls.append(node)
    rewritten, deciding = 0, {}
    for group in groups.values():
        cone = _cone(group.mask)
        if cone is None:
            continue
        inputs = [n for n in cone if n.op == "placeholder"]
        kind = _kind(group, cone, inputs)
        if kind is None or not _only_read(group, cone):
            continue
        deciding.update((node.name, None) for node in inputs)
        if inputs and padded == KEEP:
            continue
        rewritten += _rewrite(graph, group, cone, inputs if padded == CHECK else [],
                              kind == "causal")
        _erase_unused(cone)
    if rewritten:
        graph.lint()
        gm.recompile()
        bump("masks_elided", rewritten)
    return list(deciding)


def pack_single_queries(gm: fx.GraphModule) -> int:
    """Make ``gm``'s grouped-query attention calls of one query token that keep their
    mask (a dynamic graph's: every decoding step's) the eager forward's where a padding
    mask has a zero (:mod:`fxsight.splice.single_query_attention`); where every padding
    mask is all ones, the eager forward has no mask and the call stays as it is (whether
    transformers skips a mask is its mask functions' decision, not the attention's).
    Only for eager graphs (compiled, transformers repeats the heads as the graph does);
    ``gm`` is recompiled where a call is rewritten. How many are."""
    graph = gm.graph
    padding = [node for node in graph.nodes if node.op == "placeholder" and
               (node.target in MASK_INPUTS or node.name in MASK_INPUTS) and
               _padding_mask(node.meta.get("val"))]
    if not padding or not decidable():
        return 0
    plain, rewritten = None, 0
    for call in list(graph.nodes):
        if call.op != "call_function" or call.target is not SDPA:
            continue
        given = _arguments(call)
        single = single_query_heads(given)
        if single is None:
            continue
        if plain is None:  # (one check per run, before the first such call)
            with graph.inserting_before(call):
                plain = graph.call_function(all_ones, tuple(padding))
        (key_heads, value_heads), repeats = single
        call.target = kept_or_single_query
        call.args = (plain, given["query"], given["key"], given["value"],
                     given["attn_mask"], given.get("scale"), key_heads, value_heads, repeats)
        call.kwargs = {}
        rewritten += 1
    if rewritten:
        graph.lint()
        gm.recompile()
        bump("single_queries_packed", rewritten)
    return rewritten


def _erase_unused(cone: list[fx.Node]) -> None:
    """Erase what computed the mask where nothing uses it any more (only these nodes: the
    graph's in-place writes have no users either)."""
    for node in reversed(cone):
        if node.op != "placeholder" and not node.users:
            node.graph.erase_node(node)


# scaled_dot_product_attention's arguments, in order
_PARAMETERS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")


def _arguments(call: fx.Node) -> dict[str, Any]:
    """An attention call's arguments by name."""
    given = dict(zip(_PARAMETERS, call.args))
    given.update(call.kwargs)
    return given


def _plain_mask(call: fx.Node) -> fx.Node | None:
    """The mask node of an attention call without dropout or ``is_causal``, or None."""
    given = _arguments(call)
    mask = given.get("attn_mask")
    if not isinstance(mask, fx.Node) or given.get("dropout_p", 0.0) != 0.0 or \
            given.get("is_causal", False):
        return None
    return mask


def _cone(mask: fx.Node) -> list[fx.Node] | None:
    """The nodes ``mask`` is computed from, in graph order (``mask`` last), where they are
    the model's own pure operations on ``attention_mask`` inputs of static shapes; None
    otherwise."""
    seen: set[fx.Node] = set()
    stack = [mask]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if node.meta.get("fxsight") or not _static(node):
            return None
        if node.op == "placeholder":
            if (node.target not in MASK_INPUTS and node.name not in MASK_INPUTS) or \
                    not _padding_mask(node.meta.get("val")):
                return None
            continue
        if node.op != "call_function" or not _pure(node.target):
            return None
        stack.extend(node.all_input_nodes)
    order = {node: i for i, node in enumerate(mask.graph.nodes)}
    return sorted(seen, key=order.__getitem__)


def _padding_mask(value: Any) -> bool:
    """A 2-D mask of 0s and 1s (the tokenizer's kind; not a 4-D mask a caller built)."""
    return isinstance(value, torch.Tensor) and value.dim() == 2 and \
        (value.dtype is torch.bool or not value.dtype.is_floating_point)


def _static(node: fx.Node) -> bool:
    value = node.meta.get("val")
    if isinstance(value, (tuple, list)):
        return all(_static_value(v) for v in value)
    return _static_value(value)


def _static_value(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return all(type(size) is int for size in value.shape)
    return not isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool))


def _pure(target: Any) -> bool:
    if target is operator.getitem:
        return True
    return is_op_overload(target) and not target._schema.is_mutable and \
        torch.Tag.nondeterministic_seeded not in target.tags


def _only_read(group: _Group, cone: list[fx.Node]) -> bool:
    """Whether nothing but reads touches the memory of the mask and of what it is made of
    (the padding masks among them): every user of those, and of views of them, outside
    the cone and the group's calls, is a pure operation or a graph output. An in-place
    edit, or a function of an intervention's, keeps the mask as it is."""
    inside = set(cone) | set(group.calls)
    stack = list(cone)
    seen: set[fx.Node] = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for user in node.users:
            if user in inside or user.op == "output":
                continue
            if user.op != "call_function" or not _pure(user.target):
                return False
            if user.target is operator.getitem or returns_alias(user.target):
                stack.append(user)  # (a view: its users touch the same memory)
    return True


def _kind(group: _Group, cone: list[fx.Node], inputs: list[fx.Node]) -> str | None:
    """``"causal"`` where the mask, for inputs of all ones, is the causal mask of as many
    queries as keys, ``"full"`` where it is all true, else None."""
    mask = _evaluate(cone, inputs)
    if not isinstance(mask, torch.Tensor) or mask.dtype is not torch.bool or mask.dim() < 2:
        return None
    queries, keys = mask.shape[-2:]
    for call in group.calls:
        query, key = (_shape(arg) for arg in call.args[:2])
        if query is None or key is None or query[-2] != queries or key[-2] != keys:
            return None
    if bool(mask.all()):
        return "full"
    # (as many queries as keys, as where transformers takes ``is_causal=True`` eagerly;
    # it keeps the mask of a first step into a larger static cache)
    causal = torch.ones(queries, keys, dtype=torch.bool, device=mask.device).tril()
    if queries == keys and bool((mask == causal).all()):
        return "causal"
    return None


def _shape(node: Any) -> tuple | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _evaluate(cone: list[fx.Node], inputs: list[fx.Node]) -> Any:
    """The cone's last value with every input all ones (on the device it was captured on)."""
    env: dict[fx.Node, Any] = {}
    for node in inputs:
        value = node.meta["val"]
        env[node] = torch.ones(tuple(value.shape), dtype=value.dtype, device=value.device)
    try:
        with torch.no_grad():
            for node in cone:
                if node in env:
                    continue
                args, kwargs = fx.node.map_arg((node.args, node.kwargs), env.__getitem__)
                env[node] = node.target(*args, **kwargs)
    except Exception:  # noqa: BLE001 - a mask that cannot be evaluated is kept as it is
        return None
    return env[cone[-1]]


def _rewrite(graph: fx.Graph, group: _Group, cone: list[fx.Node],
             inputs: list[fx.Node], causal: bool) -> int:
    """Rewrite the group's calls; with ``inputs``, behind a check that they are all ones
    (and the mask computed only where they are not)."""
    if not inputs:
        for call in group.calls:
            repeats = _repeats(call)
            _unmasked(call, causal)
            _erase_unused(repeats)
        return len(group.calls)
    separable = _feeds_only(cone, group)
    with graph.inserting_before(_first_user(cone, group)):
        plain = graph.call_function(all_ones, tuple(inputs))
        mask = group.mask
        if separable:
            mask = graph.call_function(_mask_unless(cone, inputs), (plain, *inputs))
    for call in group.calls:
        given = _arguments(call)
        grouped = ungrouped_heads(given["query"], given["key"], given["value"])
        single = single_query_heads(given) if decidable() else None
        call.target = either_attention(causal)
        call.args = (plain, *_attention_args(call, mask), *(grouped or ()))
        call.kwargs = {} if single is None else {"single_query": (*single[0], single[1])}
    return len(group.calls)


def _repeats(call: fx.Node) -> list[fx.Node]:
    """The nodes that repeat a grouped-query call's key/value heads (none where it is
    not one), in graph order: erased where the unmasked call no longer uses them."""
    given = _arguments(call)
    if ungrouped_heads(given["query"], given["key"], given["value"]) is None:
        return []
    chains = []
    for repeated in (given["key"], given["value"]):
        expanded = repeated.args[0]
        chains += [expanded.args[0], expanded, repeated]
    order = {node: i for i, node in enumerate(call.graph.nodes)}
    return sorted(set(chains), key=order.__getitem__)


def _first_user(cone: list[fx.Node], group: _Group) -> fx.Node:
    """Where the check goes: before the first node of the cone that is not an input."""
    for node in cone:
        if node.op != "placeholder":
            return node
    return group.calls[0]


def _feeds_only(cone: list[fx.Node], group: _Group) -> bool:
    """Whether the mask and what it is made of (but the graph inputs) feed nothing but
    the group's calls: then it can be computed apart, only where it is needed."""
    inside = set(cone) | set(group.calls)
    return all(user in inside for node in cone if node.op != "placeholder"
               for user in node.users)


def _unmasked(call: fx.Node, causal: bool) -> None:
    """Make an attention call unmasked, ``is_causal=causal``; on the key/value heads
    before their repeat, ``enable_gqa=True``, where the eager forward calls it so
    (:mod:`fxsight.splice.grouped_attention`)."""
    given = _arguments(call)
    grouped = ungrouped_heads(given["query"], given["key"], given["value"])
    if grouped is not None:
        given["key"], given["value"] = grouped
        given["enable_gqa"] = True
    given["attn_mask"] = None
    given["is_causal"] = causal
    call.args = tuple(given.pop(name) for name in _PARAMETERS[:3])
    call.kwargs = given


def _attention_args(call: fx.Node, mask: fx.Node) -> tuple:
    """``(query, key, value, mask, scale, enable_gqa)`` of an attention call."""
    given = _arguments(call)
    return (given["query"], given["key"], given["value"], mask, given.get("scale"),
            given.get("enable_gqa", False))


# padding masks whose maker knows on the host whether they are all ones (a LanguageModel's
# batch of invokes it prepared), for the run in progress in this context (:func:`known_masks`)
_KNOWN: ContextVar[tuple] = ContextVar("fxsight_known_masks", default=())


@contextmanager
def known_masks(masks: tuple):
    """Inside: :func:`all_ones` takes each ``(tensor, ones)`` of ``masks`` (that very
    tensor) as all ones or not, as ``ones`` says, without reading it (on a GPU, a wait for
    its queue at every run)."""
    token = _KNOWN.set(masks)
    try:
        yield
    finally:
        _KNOWN.reset(token)


def all_ones(*inputs: torch.Tensor) -> bool:
    """Whether every padding mask is all ones: as its maker said (:func:`known_masks`),
    else one reduction and one read per mask, as the eager forward's own check."""
    known = _KNOWN.get()
    for mask in inputs:
        ones = next((said for tensor, said in known if tensor is mask), None)
        if ones is None:
            ones = bool((mask == 1).all())
        if not ones:
            return False
    return True


def either_attention(causal: bool) -> Callable:
    """The attention call of the eager forward: unmasked where the padding masks are all
    ones (``is_causal=causal``), with the model's mask otherwise. Given the key/value
    heads before their repeat too (``key_heads``, ``value_heads``), the unmasked call
    takes those, ``enable_gqa=True`` (:mod:`fxsight.splice.grouped_attention`). Given
    ``single_query`` (key/value heads before their repeat, and how many repeats), the
    masked call is one query token's as the eager forward makes it
    (:mod:`fxsight.splice.single_query_attention`)."""
    return _causal_or_masked if causal else _full_or_masked


def _causal_or_masked(plain: bool, query, key, value, mask, scale, enable_gqa,
                      key_heads=None, value_heads=None, single_query=None):
    if plain:
        return _unmasked_attention(query, key, value, True, scale, enable_gqa, key_heads,
                                   value_heads)
    return _masked_attention(query, key, value, mask, scale, enable_gqa, single_query)


def _full_or_masked(plain: bool, query, key, value, mask, scale, enable_gqa,
                    key_heads=None, value_heads=None, single_query=None):
    if plain:
        return _unmasked_attention(query, key, value, False, scale, enable_gqa, key_heads,
                                   value_heads)
    return _masked_attention(query, key, value, mask, scale, enable_gqa, single_query)


def _masked_attention(query, key, value, mask, scale, enable_gqa, single_query):
    """The masked call; of one query token on repeated key/value heads (``single_query``:
    the heads before their repeat, and how many repeats), as the eager forward makes it
    (:mod:`fxsight.splice.single_query_attention`)."""
    if single_query is not None:
        key_heads, value_heads, repeats = single_query
        return masked_single_query(query, key_heads, value_heads, mask, scale, repeats)
    return SDPA(query, key, value, mask, 0.0, False, scale=scale, enable_gqa=enable_gqa)


def kept_or_single_query(plain: bool, query, key, value, mask, scale, key_heads,
                         value_heads, repeats: int):
    """A masked attention call of one query token on key/value heads repeated
    ``repeats`` times (``key``, ``value``; before the repeat ``key_heads``,
    ``value_heads``): the graph's call where every padding mask is all ones (``plain``),
    else the eager forward's (:func:`pack_single_queries`)."""
    if plain:
        return SDPA(query, key, value, mask, 0.0, False, scale=scale)
    return masked_single_query(query, key_heads, value_heads, mask, scale, repeats)


def _unmasked_attention(query, key, value, causal, scale, enable_gqa, key_heads,
                        value_heads):
    if key_heads is not None:
        return SDPA(query, key_heads, value_heads, None, 0.0, causal, scale=scale,
                    enable_gqa=True)
    return SDPA(query, key, value, None, 0.0, causal, scale=scale, enable_gqa=enable_gqa)


class _MaskUnless:
    """Computes a model's mask from its inputs only where they are not all ones."""

    __name__ = "mask_unless_all_ones"
    # it runs the model's own mask code (a copy of the captured graph's ATen calls) on
    # plain tensors, and no user code: an eager graph calling it may still take torch's
    # Python bindings for its own ATen calls (``run.eager.bound_forward``)
    torch_operations_only = True

    def __init__(self, cone: list[fx.Node], inputs: list[fx.Node]):
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for node in inputs:
            env[node] = graph.placeholder(node.name)
        for node in cone:
            if node not in env:
                env[node] = graph.node_copy(node, env.__getitem__)
        graph.output(env[cone[-1]])
        self.module = fx.GraphModule(torch.nn.Module(), graph, class_name="ModelMask")

    def __call__(self, plain: bool, *inputs: torch.Tensor) -> Any:
        return None if plain else self.module(*inputs)


def _mask_unless(cone: list[fx.Node], inputs: list[fx.Node]) -> _MaskUnless:
    return _MaskUnless(cone, inputs)
