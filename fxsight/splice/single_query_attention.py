"""Grouped-query attention of one query token with a mask, as the eager forward calls it.

transformers' SDPA attention (``transformers.integrations.sdpa_attention``) runs a
grouped-query attention (fewer key/value heads than query heads) of one query token
(every decoding step) with a mask (a padded batch) on the key/value heads as they are:
unless its ``use_gqa_in_sdpa`` says the kernel takes them with the mask
(``enable_gqa=True``), it folds each key/value head's query heads into the token
dimension (its ``pack_gqa``, of the query and of a per-head mask) and unfolds the output.
It does so only where it is not being compiled (``is_torchdynamo_compiling()``); compiled
or exported, it repeats the key/value heads to the query heads (``repeat_kv``), and that
is the call a captured graph holds. The values agree but for the last bits (the kernel
sums in another order).

:func:`single_query_heads` finds such a call in a captured graph: the query has one token,
the key and value are both the repeat of the same number of key/value heads (of the
query's head size), inside a transformers module; sizes may be symbolic (the decoding
steps' graphs are dynamic). :func:`masked_single_query` makes the call as the eager
forward does with a mask, with transformers' own functions, decided at each run
(:func:`fxsight.splice.attention_masks.pack_single_queries` and the masked branch of
:func:`fxsight.splice.attention_masks.either_attention` use it where a padding mask has
a zero: the eager forward has a mask then).
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.fx as fx

from .grouped_attention import _in_transformers

_aten = torch.ops.aten
SDPA = _aten.scaled_dot_product_attention.default
_SDPA_INTEGRATION = "transformers.integrations.sdpa_attention"
# transformers' functions the eager call is decided and made with
_DECIDERS = ("use_gqa_in_sdpa", "pack_gqa", "repeat_kv", "is_torchdynamo_compiling")


def decidable() -> bool:
    """Whether transformers' SDPA attention is loaded with the functions that decide and
    make the eager call (none where no transformers model was captured through it, or
    a version without them: then the graph's call is kept)."""
    integration = sys.modules.get(_SDPA_INTEGRATION)
    return integration is not None and all(hasattr(integration, n) for n in _DECIDERS)


def masked_single_query(query: torch.Tensor, key_heads: torch.Tensor,
                        value_heads: torch.Tensor, mask: torch.Tensor, scale: Any,
                        repeats: int) -> torch.Tensor:
    """A grouped-query attention of one query token on ``key_heads`` / ``value_heads``
    (each repeated ``repeats`` times to the query's heads) with ``mask``, as
    transformers' SDPA attention runs it (see the module docstring)."""
    integration = sys.modules[_SDPA_INTEGRATION]
    if integration.use_gqa_in_sdpa(mask, key_heads, value_heads):
        return SDPA(query, key_heads, value_heads, mask, 0.0, False, scale=scale,
                    enable_gqa=True)
    if not integration.is_torchdynamo_compiling():
        packed = SDPA(integration.pack_gqa(query, repeats), key_heads, value_heads,
                      integration.pack_gqa(mask, repeats), 0.0, False, scale=scale)
        return packed.reshape(packed.shape[0], -1, 1, value_heads.shape[-1])
    return SDPA(query, integration.repeat_kv(key_heads, repeats),
                integration.repeat_kv(value_heads, repeats), mask, 0.0, False, scale=scale)


def single_query_heads(given: dict[str, Any]) -> tuple[tuple[fx.Node, fx.Node], int] | None:
    """``((key heads, value heads), repeats)`` of a masked attention call of one query
    token on repeated key/value heads inside a transformers module; else ``None``."""
    mask = given.get("attn_mask")
    if not isinstance(mask, fx.Node) or given.get("dropout_p", 0.0) != 0.0 or \
            given.get("is_causal", False) or given.get("enable_gqa", False):
        return None
    queries = _value(given.get("query"))
    if queries is None or queries.dim() != 4 or not _is(queries.shape[2], 1):
        return None
    repeated = [_repeat_source(given[name], queries) for name in ("key", "value")]
    if repeated[0] is None or repeated[1] is None or repeated[0][1] != repeated[1][1]:
        return None
    if not all(_in_transformers(given[name]) for name in ("key", "value")):
        return None
    return (repeated[0][0], repeated[1][0]), repeated[0][1]


def _repeat_source(node: Any, queries: torch.Tensor) -> tuple[fx.Node, int] | None:
    """``(source, repeats)`` where ``node`` is transformers' ``repeat_kv`` of ``source`` as
    a captured graph holds it (``source[:, :, None]``, full slices of it, expanded to
    ``repeats`` copies of each head, reshaped to the query's heads) and nothing else uses
    the intermediate values; else ``None``. Sizes may be symbolic (dynamic graphs)."""
    if not _call_of(node, (_aten.reshape.default, _aten.view.default)):
        return None
    expanded = node.args[0]
    if not _call_of(expanded, (_aten.expand.default,)) or len(expanded.users) != 1:
        return None
    inner = expanded.args[0]
    while _full_slice(inner) and len(inner.users) == 1:
        inner = inner.args[0]
    if not _call_of(inner, (_aten.unsqueeze.default,)) or len(inner.users) != 1 or \
            inner.args[1] != 2:
        return None
    source = inner.args[0]
    result, wide, heads = (_value(n) for n in (node, expanded, source))
    if result is None or wide is None or heads is None or heads.dim() != 4 or \
            wide.dim() != 5 or result.dim() != 4:
        return None
    groups, repeats, size = heads.shape[1], wide.shape[2], heads.shape[3]
    if not all(type(s) is int for s in (groups, repeats, size)) or repeats < 2:
        return None
    same = all(_is(wide.shape[i], heads.shape[j]) for i, j in ((0, 0), (1, 1), (3, 2), (4, 3)))
    same = same and all(_is(result.shape[i], heads.shape[i]) for i in (0, 2, 3))
    return (source, repeats) if same and _is(result.shape[1], groups * repeats) and \
        _is(queries.shape[1], groups * repeats) and _is(queries.shape[3], size) and \
        _is(queries.shape[0], heads.shape[0]) else None


def _is(size: Any, other: Any) -> bool:
    """Whether two sizes are the same: equal integers, or the same symbolic expression
    (compared as expressions: nothing is guarded)."""
    if type(size) is int or type(other) is int:
        return type(size) is int and type(other) is int and size == other
    if isinstance(size, torch.SymInt) and isinstance(other, torch.SymInt):
        return size.node.expr == other.node.expr
    return False


def _full_slice(node: Any) -> bool:
    """A ``slice`` of a whole dimension (a view of the same elements)."""
    if not _call_of(node, (_aten.slice.Tensor,)):
        return False
    start, end, step = (list(node.args[2:]) + [None, None, None])[:3]
    return start in (None, 0) and (step in (None, 1)) and \
        (end is None or (type(end) is int and end >= sys.maxsize))


def _value(node: Any) -> torch.Tensor | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _call_of(node: Any, targets: tuple) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets
