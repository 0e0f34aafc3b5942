"""The token positions of a :class:`~fxsight.api.language_model.LanguageModel`'s batch:
``position_ids`` counted from the attention mask (each row's real tokens, as
transformers' ``generate`` counts them) where a row is padded; the model's own positions
where it counts the mask itself (OPT), or where an input continues a cache whose rows are
padded and gives none (refused where the batch cannot keep them); and the caches a run
filled counting real tokens remembered, so that a continuation goes on counting them."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import TraceError, at_line
from ..locks import model_lock
from .counted_caches import counted, remember_in
from .mask_reads import places_by_mask
from .token_inputs import CACHE_KEYWORDS, past_width
from .token_rows import left_pad, real_positions

_UNKNOWN = object()  # (an argument not given)
# the values a row is padded with, by key of a dict input (the token ids: the tokenizer's)
PAD_VALUES = {"attention_mask": 0, "labels": -100, "position_ids": 1}


class TokenPositions:
    """The positions of a ``LanguageModel``'s batch (a mixin: it needs ``_module``,
    ``_device()``, ``_accepts()``, ``_encoder_decoder()``, ``_pads_right()`` and
    ``_position_embedding()``)."""

    def _position_layout(self, positions: Any = _UNKNOWN) -> tuple[int, int]:
        """``(first position, position of a pad)`` the model's own positions take: a
        learned position embedding (``positions``, found where not given) with a
        ``padding_idx`` (RoBERTa's, XLM-R's) counts real tokens from ``padding_idx + 1`` and
        puts pads at ``padding_idx``; otherwise transformers' ``generate`` convention (from
        0, pads at 1)."""
        if positions is _UNKNOWN:
            positions = self._position_embedding()
        padding = getattr(positions, "padding_idx", None)
        if isinstance(padding, int) and padding >= 0:
            return padding + 1, padding
        return 0, PAD_VALUES["position_ids"]

    def _with_positions(self, batched: dict, invokes: list[tuple[dict, int]],
                        padded: bool | None = None, made: list[bool] | None = None) -> dict:
        """``batched`` with ``position_ids`` that count real tokens only, where needed
        (``padded``: whether a row of its mask is padded, where known; ``made``: for each
        invoke, whether its ``position_ids`` are these already, where known)."""
        if padded is False and all(kw.get("position_ids") is None for kw, _ in invokes):
            return {k: v for k, v in batched.items() if k != "position_ids"}
        if all(kw.get("position_ids") is None or (made and made[i])
               for i, (kw, _) in enumerate(invokes)) and self._places_by_mask():
            # (the model counts real tokens from the mask itself, pads where it puts them:
            # its own positions are the plain forward's, every row's its prompt's alone)
            return {k: v for k, v in batched.items() if k != "position_ids"}
        parts, explicit = [], False
        first, pad = self._position_layout()
        # (a right-padded row's pads go on counting where the model's own positions count
        # columns: transformers' default; a padding_idx's model puts its pads there)
        trailing = (first, pad) == (0, PAD_VALUES["position_ids"])
        right = self._pads_right()
        for i, (kw, length) in enumerate(invokes):
            mask = kw["attention_mask"]
            given = kw.get("position_ids")
            if mask.dim() != 2:  # (the caller's own mask: positions only where given)
                if given is None:
                    return {k: v for k, v in batched.items() if k != "position_ids"}
                explicit = True
                parts.append(left_pad(given, length, pad, right))
                continue
            if given is not None and (made and made[i]):
                positions = given  # (counted from the mask already)
            elif given is not None:
                # (a caller's own go to the model as given, also where they are the ones
                # counted from the mask: the same values, and no read to compare them)
                explicit, positions = True, given
            else:  # (the input's own tokens: a mask that covers a cache's past counts it)
                positions = real_positions(mask, first, pad, trailing)[
                    :, mask.shape[1] - kw["input_ids"].shape[1]:]
            parts.append(left_pad(positions, length, pad, right))
        out = {k: v for k, v in batched.items() if k != "position_ids"}
        if padded is None:
            padded = explicit or not bool(batched["attention_mask"].all())
        if (explicit or padded) and (self._accepts("position_ids") or explicit):
            positions = torch.cat(parts).to(batched["input_ids"].device)
            ordered = {}
            for key, value in out.items():
                ordered[key] = value
                if key == "attention_mask":
                    ordered["position_ids"] = positions
            out = ordered
        return out

    def _places_by_mask(self) -> bool:
        """Whether the model, given no ``position_ids``, places its tokens by counting the
        attention mask's real tokens itself (OPT): read once per model, where it takes
        ``position_ids`` (``mask_reads.places_by_mask``)."""
        if self._mask_positions is None:
            module = self._module
            with model_lock(module):  # (its scan, as a trace's)
                found = self._accepts("position_ids") and \
                    places_by_mask(module, self._device())
            object.__setattr__(self, "_mask_positions", found)
        return self._mask_positions

    def _counted_cache(self, cache: Any, where: str, line: str) -> bool:
        """Whether ``cache``, continued by an input whose mask pads a row among its tokens
        and that gives no position ids, came out of a run of fxsight's whose positions
        counted each row's real tokens (``counted_caches``): its input goes on counting
        them. Where that is not known (a cache that cannot be weakly referenced), a
        ``TraceError`` before the run, unless the model counts the mask itself (OPT)."""
        known = counted(cache)
        if known is None and not self._places_by_mask():
            raise TraceError(at_line(
                f"{where} continues a cache whose rows are padded (zeros in the attention "
                f"mask's columns of the cache) and gives no position_ids: the positions "
                f"the cache's tokens were computed at are not known (its "
                f"{type(cache).__name__} cannot be weakly referenced, so fxsight cannot "
                f"remember whether its own run made it counting real tokens). Pass "
                f"position_ids= as the cache's were made (counted from the mask: "
                f"(mask.cumsum(-1) - 1).clamp(min=0)[:, -n:], where generate or a trace "
                f"of a padded batch made it; past + torch.arange(n), where a plain "
                f"forward without them did)", line))
        return bool(known)

    def _after_run(self, invokes: list, kwargs: dict, values: list) -> None:
        """After a run of the batched ``kwargs`` (of the ``invokes``, an ``Alone`` for a
        plain run): where its positions counted each row's real tokens in a padded batch
        (fxsight's ``position_ids``, none a caller's), remember the caches it filled or
        returned (passed in, or among the output and the saved ``values``), so that a
        continuation without position ids goes on counting them."""
        if self._encoder_decoder() or not _counts_positions(invokes, kwargs):
            return
        remember_in([*(kwargs.get(name) for name in CACHE_KEYWORDS), *values])

    def _after_generate(self, tracer: Any, kwargs: dict, values: list) -> None:
        """After ``generate`` of the batched ``kwargs`` (``tracer``: its Generator):
        transformers' ``generate`` counts positions from the mask where the model takes
        ``position_ids``; where a prompt is padded, remember the caches it filled or
        returned (passed to it, or among its output and the saved ``values``)."""
        if self._encoder_decoder() or not self._accepts("position_ids"):
            return
        mask = kwargs.get("attention_mask")
        lengths = {inv.prepared[1]["input_ids"].shape[1] for inv in tracer.invokes}
        padded = len(lengths) > 1 or any(inv.padded for inv in tracer.invokes)
        if not padded and any(inv.padded is None for inv in tracer.invokes):
            padded = isinstance(mask, torch.Tensor) and not bool(mask.all())
        if not padded:
            return
        given = {**tracer._generate_kwargs, **kwargs}
        remember_in([*(given.get(name) for name in CACHE_KEYWORDS), *values])


def known_padding(invokes: list | None, prepared: list[dict], length: int) -> bool | None:
    """Whether a row of the batch of ``prepared`` inputs (left-padded to ``length``) is
    padded, from what its ``invokes``' preparation found (``None`` where one did not
    know, or the invokes are not known)."""
    if not invokes or len(invokes) != len(prepared) or \
            any(invoke.padded is None for invoke in invokes):
        return None
    return any(invoke.padded for invoke in invokes) or \
        any(kw["input_ids"].shape[1] != length for kw in prepared)


def _counts_positions(invokes: list, kwargs: dict) -> bool:
    """Whether the batched ``kwargs`` of ``invokes`` pass ``position_ids`` that fxsight
    counted from the mask (each row's real tokens) and no caller's: where fxsight passes
    them, a row is padded."""
    return "position_ids" in kwargs and bool(invokes) and \
        all(invoke.positions_made or "position_ids" not in invoke.prepared[1]
            for invoke in invokes)


def model_positions(invokes: list | None, prepared: list[dict]) -> list[bool]:
    """For each of the ``prepared`` inputs, whether it continues a cache whose rows are
    padded and has no position ids (the model's own positions: the plain call's), from its
    invoke's preparation where ``invokes`` are known, else read from its mask."""
    if invokes and len(invokes) == len(prepared):
        return [invoke.model_positions is not None for invoke in invokes]
    found = []
    for kw in prepared:
        mask, past = kw.get("attention_mask"), past_width(kw.get("attention_mask"), kw)
        found.append(bool(past) and "position_ids" not in kw and
                     not bool(mask[:, :past].all()))
    return found


def check_model_positions(invokes: list | None, prepared: list[dict], length: int,
                           by_mask: bool) -> None:
    """Raise before the run where an input continuing a cache of padded rows without
    position ids (its positions the model's own) shares the batch with an input whose
    position ids the batch passes, or is padded to the batch's ``length``: its tokens'
    positions, which the model counts by columns, would move (``by_mask``: the model
    counts the mask's real tokens itself, which pads do not move; the batch passes only
    a caller's position ids)."""
    own = model_positions(invokes, prepared)
    known = invokes if invokes and len(invokes) == len(prepared) else None
    where, line = known[own.index(True)].model_positions if known else ("the input", None)
    for i, (kw, mine) in enumerate(zip(prepared, own)):
        shorter = not by_mask and kw["input_ids"].shape[1] < length
        passed = not mine and "position_ids" in kw and \
            (known is None or (known[i].padded and not by_mask) or
             not known[i].positions_made)
        if not (shorter or passed):
            continue
        reason = f"invoke #{i} is shorter than the batch's {length} tokens (left pads would " \
            f"go between the cache's tokens and its own)" if shorter else \
            f"invoke #{i} has position ids the batch passes"
        raise TraceError(at_line(
            f"{where} continues a cache whose rows are padded (zeros in the attention "
            f"mask's columns of the cache) and gives no position_ids: the model places its "
            f"tokens as the plain call does, which the batch cannot keep: {reason}. Pass "
            f"position_ids= as the cache's were made (counted from the mask: "
            f"(mask.cumsum(-1) - 1).clamp(min=0)[:, -n:], where generate made it; "
            f"past + torch.arange(n), where a plain forward without them did), or give the "
            f"invokes inputs of one length", line))
