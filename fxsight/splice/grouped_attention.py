"""Grouped-query attention as the eager forward calls it once its mask is gone.

transformers' SDPA attention (``transformers.integrations.sdpa_attention``) runs a
grouped-query attention (fewer key/value heads than query heads) one of two ways: with
no mask it hands the key/value heads to the kernel as they are (``enable_gqa=True``),
which matches each query head with its key/value head itself; with a mask it first
repeats the key/value heads (``repeat_kv``: ``x[:, :, None].expand(...).reshape(...)``).
Exported, the model always has a mask, so the captured graph holds the repeat. Where
:mod:`fxsight.splice.attention_masks` takes the mask away again (the eager forward has
none), the call must also go back to the unrepeated heads: the values are the same,
but not the gradients of the keys and values. Backward through the repeat sums each
key/value head's gradient over its query heads in autograd's order; the grouped kernel
sums them in its own (on a CPU, four or more query heads per key/value head already
differ in the last bits, and so every parameter the keys and values come from).

:func:`ungrouped_heads` finds such a call: its key and value are both the repeat of
tensors of the query's batch, tokens and head size with ``query heads / repeats``
heads, it runs inside a transformers module, and transformers' own
``use_gqa_in_sdpa`` (asked with no mask, as the eager forward asks) says the eager call
passes ``enable_gqa=True``.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.fx as fx

_aten = torch.ops.aten
# the operators of transformers' ``repeat_kv``, as the captured graph holds them
_UNSQUEEZES = frozenset({_aten.unsqueeze.default})
_EXPANDS = frozenset({_aten.expand.default})
_RESHAPES = frozenset({_aten.reshape.default, _aten.view.default})
# the module of transformers' SDPA attention, whose own test says how the eager call runs
_SDPA_INTEGRATION = "transformers.integrations.sdpa_attention"


def ungrouped_heads(query: Any, key: Any, value: Any) -> tuple[fx.Node, fx.Node] | None:
    """The key and value before transformers' ``repeat_kv``, where an attention call of
    ``query`` on ``key`` and ``value`` (graph nodes) would be made eagerly, without a
    mask, on those with ``enable_gqa=True`` (see the module docstring); else ``None``."""
    queries = _value(query)
    if queries is None or queries.dim() != 4:
        return None
    repeated = [_repeat_source(node, queries) for node in (key, value)]
    if any(r is None for r in repeated) or repeated[0][1] != repeated[1][1]:
        return None
    (key_heads, _), (value_heads, _) = repeated
    if not (_in_transformers(key) and _in_transformers(value)):
        return None
    return (key_heads, value_heads) if _eager_passes_gqa(key_heads, value_heads) else None


def _value(node: Any) -> torch.Tensor | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _repeat_source(node: Any, queries: torch.Tensor) -> tuple[fx.Node, int] | None:
    """``(source, repeats)`` where ``node`` is ``source[:, :, None].expand(batch, heads,
    repeats, tokens, size).reshape(batch, heads * repeats, tokens, size)`` with
    ``heads * repeats`` the query's heads (``repeats`` > 1) and nothing else uses the
    intermediate values; else ``None``."""
    if not _call_of(node, _RESHAPES):
        return None
    expanded = node.args[0]
    if not _call_of(expanded, _EXPANDS) or len(expanded.users) != 1:
        return None
    unsqueezed = expanded.args[0]
    if not _call_of(unsqueezed, _UNSQUEEZES) or len(unsqueezed.users) != 1 or \
            unsqueezed.args[1] != 2:
        return None
    source = unsqueezed.args[0]
    result, wide, heads = (_sizes(_value(n)) for n in (node, expanded, source))
    asked = _sizes(queries)
    if result is None or wide is None or heads is None or asked is None or \
            len(heads) != 4 or len(wide) != 5:
        return None
    batch, groups, tokens, size = heads
    repeats = wide[2]
    same = repeats > 1 and wide == (batch, groups, repeats, tokens, size) and \
        result == (batch, groups * repeats, tokens, size) and \
        (asked[0], asked[1], asked[-1]) == (batch, groups * repeats, size)
    return (source, repeats) if same else None


def _sizes(value: torch.Tensor | None) -> tuple[int, ...] | None:
    """A tensor's sizes, ``None`` where one is symbolic (static graphs only)."""
    if value is None or not all(type(size) is int for size in value.shape):
        return None
    return tuple(value.shape)


def _call_of(node: Any, targets: frozenset) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _in_transformers(node: fx.Node) -> bool:
    """Whether ``node`` was traced inside a module of a transformers model."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return False
    _, kind = list(stack.values())[-1]
    name = kind if isinstance(kind, str) else \
        f"{getattr(kind, '__module__', '')}.{getattr(kind, '__qualname__', '')}"
    return name.startswith("transformers.")


def _eager_passes_gqa(key: fx.Node, value: fx.Node) -> bool:
    """What transformers' SDPA attention decides, in this process, for an unmasked call
    on these key and value heads (``None`` where its module is not loaded: then no
    transformers model was captured through it)."""
    integration = sys.modules.get(_SDPA_INTEGRATION)
    decide = getattr(integration, "use_gqa_in_sdpa", None)
    keys, values = _value(key), _value(value)
    if decide is None or keys is None or values is None:
        return False
    try:
        return bool(decide(None, keys, values))
    except Exception:  # noqa: BLE001 - a version that asks otherwise: keep the call as it is
        return False
