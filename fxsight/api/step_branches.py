"""Operations inside transformers' attention functions at ``generate``'s decoding steps.

As in a trace (:mod:`fxsight.run.attention_branches`), a read or write of an operation
inside an attention function (``attention_interface_0.source.repeat_kv_0``) that the
plain forward does not call at its decoding step is a ``TraceError`` before ``generate``
runs, on both backends; one that the fx backend's graph of the step does not hold as the
plain forward computes it makes ``generate`` run on the hooks backend (``backend="auto"``;
under ``backend="fx"`` that is the error).

Step 0 is the prompts' forward pass (the first step's inputs). A later step with a cache is
one query token after the prompts' tokens, with a padding mask where a prompt is padded (its
zeros stay in the mask): a forward pass of the prompts' last column stands for it (an
attention function's branch depends on whether it is given a mask, how many query tokens
there are and the heads, not on how many tokens the cache holds). Without a cache
(``use_cache=False``) each step is the whole sequence again, as step 0. Where the mask of a
later step depends on the cache's length (sliding-window or chunked attention), or a step is
not such a forward pass (a static cache, an encoder-decoder's decoder, ``inputs_embeds``),
later steps cannot be stood for: the hooks backend checks them as they run, and the fx
backend leaves them to it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..record.program import Program
from ..record.scope import ALL, Steps
from ..run.attention_branches import (attention_nodes, branch_refusal, nested_operation,
                                      plain_capture, plain_scan, unchecked)
from .token_inputs import CACHE_KEYWORDS


def step_branch_refusal(model: nn.Module, program: Program, args: tuple, first: dict,
                        generate_kwargs: dict, operations: frozenset, fx: bool
                        ) -> str | None:
    """Raise where ``program`` reads or writes, at a decoding step, an operation inside an
    attention function that the plain forward does not call there; on the fx backend
    (``fx``), why its graphs cannot run one as the plain forward does, else ``None``.
    ``first``: the model's keywords at decoding step 0 (``args``: its positional ones)."""
    if not operations or not any(nested_operation(node) for node in program.nodes):
        return None
    plain = plain_scan(model, args, first, operations)
    known = plain or plain_scan(model, args, first, operations, drop=False)
    nodes = attention_nodes(program.nodes, known.callees) if known is not None else []
    if not nodes:  # (none, or a model that cannot be scanned: the runs tell)
        return None
    captured = plain_capture(model, args, first, operations) if fx else None
    first_nodes = [(node, f) for node, f in nodes if node.steps is None or 0 in node.steps]
    later_nodes = [(node, f) for node, f in nodes if _later_step(node.steps) is not None]
    reason = branch_refusal(first_nodes, plain, captured, "decoding step 0", fx) \
        if first_nodes else None
    if not later_nodes:
        return reason
    later = _later_step_inputs(model, args, first, generate_kwargs)
    if later is None:
        node = later_nodes[0][0]
        return reason or (unchecked(
            node, f"decoding step {_later_step(node.steps)}",
            "whether transformers' attention takes the same branch in the captured graph "
            "as in the plain forward after step 0 is not known before the step runs for "
            "this model and these options (sliding-window or chunked attention, a static "
            "cache, an encoder-decoder, inputs_embeds)") if fx else None)
    kwargs, drop = later
    plain = plain_scan(model, (), kwargs, operations, drop)
    captured = plain_capture(model, (), kwargs, operations) if fx else None
    for node, function in later_nodes:
        where = f"decoding step {_later_step(node.steps)}"
        found = branch_refusal([(node, function)], plain, captured, where, fx)
        reason = reason or found
    return reason


def _later_step(steps: Steps | None) -> int | None:
    """The first decoding step after step 0 among ``steps`` (``None``: the first only),
    ``None`` where there is none."""
    if steps is None:
        return None
    choice = steps.choice
    if choice == ALL:
        return 1
    if isinstance(choice, int):
        return choice if choice > 0 else None
    if isinstance(choice, slice):
        start, stride = choice.start or 0, choice.step or 1
        step = start if start > 0 else start + stride * -(-(1 - start) // stride)
        return step if choice.stop is None or step < choice.stop else None
    return min((step for step in choice if step > 0), default=None)


def _later_step_inputs(model: nn.Module, args: tuple, first: dict, generate_kwargs: dict
                       ) -> tuple[dict, bool] | None:
    """The keywords of a forward pass that stands for the decoding steps after the first,
    and whether its padding masks are all ones (left out, as the plain forward's mask
    functions leave out the mask of a step of unpadded prompts); ``None`` where no forward
    pass does (see the module docstring)."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if args or getattr(config, "is_encoder_decoder", False) or "inputs_embeds" in first or \
            _windowed(text) or _static_cache(model, first, generate_kwargs):
        return None
    masks = [v for k, v in first.items() if k.endswith("attention_mask") and
             isinstance(v, torch.Tensor) and v.dim() == 2]
    unpadded = all(bool((mask == 1).all()) for mask in masks)
    if not _uses_cache(model, generate_kwargs):
        return first, unpadded
    ids = first.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        return None
    kwargs = {}
    for key, value in first.items():
        if key in CACHE_KEYWORDS:
            continue
        if isinstance(value, torch.Tensor) and value.dim() == 2 and \
                (key.endswith("attention_mask") or value.shape[-1] == ids.shape[-1]):
            value = value[:, -1:]
        kwargs[key] = value
    return kwargs, unpadded


def _windowed(config: Any) -> bool:
    """Whether some attention of the model looks at a window of the keys (its mask then
    depends on how many tokens the cache holds)."""
    types = getattr(config, "layer_types", None) or ()
    return getattr(config, "sliding_window", None) is not None or \
        getattr(config, "attention_chunk_size", None) is not None or \
        any(kind != "full_attention" for kind in types)


def _static_cache(model: nn.Module, first: dict, generate_kwargs: dict) -> bool:
    """Whether the steps run on a cache other than transformers' ``DynamicCache``."""
    given = [first.get(name, generate_kwargs.get(name)) for name in CACHE_KEYWORDS]
    if any(c is not None and type(c).__name__ != "DynamicCache" for c in given):
        return True
    configs = (generate_kwargs.get("generation_config"),
               getattr(model, "generation_config", None))
    return generate_kwargs.get("cache_implementation") is not None or any(
        getattr(c, "cache_implementation", None) is not None for c in configs)


def _uses_cache(model: nn.Module, generate_kwargs: dict) -> bool:
    if "use_cache" in generate_kwargs:
        return bool(generate_kwargs["use_cache"])
    for config in (generate_kwargs.get("generation_config"),
                   getattr(model, "generation_config", None)):
        use = getattr(config, "use_cache", None)
        if use is not None:
            return bool(use)
    return True
