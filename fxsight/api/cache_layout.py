"""Prompts of different lengths that continue a cache in ``lm.generate``.

Transformers' ``generate`` takes the whole sequence: a cache given to it
(``past_key_values=`` / ``cache=``) holds the first ``past`` columns of the ids. Each
prompt is taken to be the cache's tokens followed by its own (the cache of a shared
prefix, run once and expanded to the batch), so a batch of prompts of different lengths
is laid out ``[the cache's columns][pads][each prompt's own tokens]``: its attention mask
ones over the cache, zeros over the pads, and ``generate`` counts each row's positions
from it, going on from the cache's. Left padding (before the cache's columns) would feed
the shorter rows' last cached tokens again and mask real ones. What cannot be laid out so
is refused before the run (:func:`refusal`, :func:`check_cache_columns`).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import TraceError, at_line
from .token_inputs import is_batch_encoding
from .token_rows import token_aligned


def pads_after_cache(kwargs: dict, past: int) -> dict:
    """The batch ``kwargs`` (every row left-padded: its pads, then its real tokens, the
    first ``past`` of them the cache's) with each row's pads moved after its first
    ``past`` real tokens; every token-aligned input (ids, mask, token types, positions)
    moves with its tokens. No value is read from the device."""
    mask = kwargs.get("attention_mask")
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or \
            not token_aligned(mask, kwargs):
        return kwargs
    order = _order(mask, past)
    return {key: _reordered(value, order) if token_aligned(value, kwargs) else value
            for key, value in kwargs.items()}


def _order(mask: torch.Tensor, past: int) -> torch.Tensor:
    """For each row of a left-padded ``mask``, the column each column is taken from: the
    row's first ``past`` real tokens first, then its pads, then the rest of its tokens."""
    pads = (mask.cumsum(-1) == 0).sum(-1, keepdim=True)  # (the pads before a row's tokens)
    columns = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    # (a row of no more tokens than the cache's is refused before the run: in range here)
    cached = (columns + pads).clamp(max=mask.shape[1] - 1)
    return torch.where(columns < past, cached,
                       torch.where(columns < past + pads, columns - past, columns))


def _reordered(value: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    index = order.reshape(*order.shape, *[1] * (value.dim() - 2)).expand_as(value)
    return value.gather(1, index.to(value.device))


def refusal(module: torch.nn.Module, kwargs: dict, generate_kwargs: dict,
            past: int) -> str | None:
    """Why a batch of padded rows (prompts of different lengths) cannot continue a cache of
    ``past`` tokens exactly, or ``None``. ``kwargs``: the batch, laid out by
    :func:`pads_after_cache`; ``generate_kwargs``: the keywords given to ``generate``."""
    config = getattr(module, "config", None)
    name = type(module).__name__
    if getattr(config, "is_encoder_decoder", False):
        return f"{name} is an encoder-decoder model, whose cache holds its decoder's tokens"
    try:
        takes_positions = "position_ids" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        takes_positions = False
    if not takes_positions:  # (generate then gives none: positions would count the pads)
        return f"{name}.forward takes no position_ids, so the prompts' tokens cannot be " \
               f"given positions that go on from the cache's over the pads between them"
    if generate_kwargs.get("position_ids") is not None:
        return "position_ids are given to generate: the padding goes between the cache's " \
               "tokens and each prompt's own, where positions given for the prompts " \
               "cannot be; leave them out (generate counts them from the attention mask)"
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        counts = mask.sum(-1).tolist()
        short = next((row for row, count in enumerate(counts) if count <= past), None)
        if short is not None:
            return f"prompt {short} of the batch has {counts[short]} tokens, not more " \
                   f"than the cache's {past}: each prompt is the cache's tokens followed " \
                   f"by its own (at least one)"
    return None


def check_cache_columns(value: Any, past: int, where: str, line: str) -> None:
    """Raise where an input's own ``attention_mask`` (given to ``lm.generate`` with a
    cache of ``past`` tokens) pads a row within its first ``past`` columns, the cache's:
    the cache would hold pads for that row (a cache of padded rows, of different lengths
    per row), which the layout after the cache (:func:`pads_after_cache`) cannot tell
    from a row's pads before tokens that begin with the cache's."""
    if not past or not (isinstance(value, Mapping) or is_batch_encoding(value)):
        return
    mask = value.get("attention_mask")
    if mask is None:
        return
    mask = torch.as_tensor(mask)
    mask = mask.reshape(1, -1) if mask.dim() == 1 else mask
    if mask.dim() != 2 or mask.shape[1] < past or bool(mask[:, :past].all()):
        return
    row = int((mask[:, :past] == 0).any(-1).nonzero()[0, 0])
    raise TraceError(at_line(
        f"{where}: its attention_mask pads row {row} within its first {past} columns, "
        f"the tokens of the cache given to lm.generate: a cache of padded rows (of "
        f"different lengths per row) is not supported. Give each prompt's tokens (the "
        f"cache's, then its own) unpadded, as a list of strings or of token-id lists, or "
        f"right-padded with their mask, with the cache of the shared prefix; or generate "
        f"each prompt in its own lm.generate with its own cache", line))


def padded_rows(invokes: list) -> bool:
    """Whether a row of ``invokes`` is padded: invokes of different lengths, or one whose
    preparation found a pad (``padded``)."""
    lengths = {ids.shape[1] for ids in (inv.prepared[1].get("input_ids") for inv in invokes)
               if isinstance(ids, torch.Tensor) and ids.dim() == 2}
    return len(lengths) > 1 or any(getattr(inv, "padded", False) for inv in invokes)
