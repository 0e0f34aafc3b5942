"""The inputs of ``generate``'s first decoding step, as transformers' ``generate`` gives
them to the model (an encoder-decoder's decoder start ids, ``logits_to_keep``, the ids
after a cache given, each prompt row repeated for beams or sequences), for the checks and
scans of a :class:`~fxsight.api.generation.Generator` made before it runs."""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ..generate.first_step import repeated_rows, row_repeats
from ..splice.rows import Rows, expand_rows
from .cache_layout import padded_rows, pads_after_cache
from .token_inputs import CACHE_KEYWORDS, past_length


class FirstStepInputs:
    """The first decoding step's inputs of a ``Generator`` (a mixin: it needs ``model``,
    ``_generate_kwargs``)."""

    def _first_step_inputs(self, kwargs: dict) -> dict:
        """``kwargs`` as ``generate`` gives them to the model at the first decoding step:
        an encoder-decoder's decoder ids (:meth:`_first_decoder_ids`), and
        ``logits_to_keep`` where the model's forward takes it (``generate`` passes 1,
        unless given one: the logits hold the prompts' last position only)."""
        decoder_ids = self._first_decoder_ids(kwargs)
        if decoder_ids is not None:
            kwargs = {**kwargs, "decoder_input_ids": decoder_ids}
        keep = self._generate_kwargs.get("logits_to_keep", 1)
        if "logits_to_keep" not in kwargs and _takes_logits_to_keep(self.model._module):
            kwargs = {**kwargs, "logits_to_keep": keep}
        config = getattr(self.model._module, "config", None)
        if getattr(config, "is_encoder_decoder", False):  # (a cache of the decoder's)
            return kwargs
        return _after_the_cache(kwargs, self._generate_kwargs)

    def _row_repeats(self, kwargs: dict) -> int | None:
        """How many consecutive rows decoding step 0 runs each prompt row as (beams,
        sequences: :func:`row_repeats`); ``None`` where that is more than one beside a
        cache given (``generate`` expands the cache's rows itself)."""
        repeats = row_repeats(self.model._module, self._generate_kwargs)
        if repeats != 1:
            given = {**self._generate_kwargs, **kwargs}
            if any(given.get(name) is not None for name in CACHE_KEYWORDS):
                return None
        return repeats

    def _as_step_zero(self, kwargs: dict, rows: dict[Any, Rows]
                      ) -> tuple[dict, dict[Any, Rows], bool]:
        """The batch's ``kwargs`` and the invokes' ``rows`` as decoding step 0 has them:
        each prompt row repeated as ``generate`` expands its inputs for beams or
        sequences; and whether that is known (else both as given)."""
        repeats = self._row_repeats(kwargs)
        if repeats == 1:
            return kwargs, rows, True
        total = rows[None].total
        expanded = None if repeats is None else expand_rows(rows, total * repeats)
        if expanded is None:
            return kwargs, rows, False
        return repeated_rows(kwargs, repeats, total), expanded, True

    def _after_cache_layout(self, kwargs: dict, invokes: list) -> dict:
        """``kwargs`` (the rows of ``invokes``, left-padded) laid out after a cache given
        to ``generate`` where a row is padded (:mod:`fxsight.api.cache_layout`)."""
        past = self._cached_tokens(kwargs)
        if not past or not padded_rows(invokes):
            return kwargs
        return pads_after_cache(kwargs, past)

    def _cached_tokens(self, kwargs: dict | None = None) -> int:
        """How many of the prompts' first tokens a cache given to ``generate`` holds (a
        decoder-only model's: step 0 computes the tokens after them); else 0."""
        config = getattr(self.model._module, "config", None)
        if getattr(config, "is_encoder_decoder", False):
            return 0
        return past_length({**self._generate_kwargs, **(kwargs or {})}, None)

    def _first_decoder_ids(self, kwargs: dict) -> torch.Tensor | None:
        """For an encoder-decoder model, the decoder's ids at the first decoding step
        where the inputs give none: those given to ``generate``, else its start token
        per row, as ``generate`` chooses it (``None``: not an encoder-decoder model, or
        no start token known)."""
        module = self.model._module
        if not getattr(getattr(module, "config", None), "is_encoder_decoder", False) or \
                "decoder_input_ids" in kwargs or "decoder_inputs_embeds" in kwargs:
            return None
        ids = kwargs.get("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            return None
        given = self._generate_kwargs.get("decoder_input_ids")
        if isinstance(given, torch.Tensor):
            # (given for the whole batch; an invoke's scan has its own rows: the shapes
            # it learns are alike, as generate's decoder ids are one length)
            return given if given.dim() != 2 or given.shape[0] == ids.shape[0] else \
                given[:1].expand(ids.shape[0], -1)
        # (as generate chooses it: its keyword, else a config's, else the bos token)
        start = self._generate_kwargs.get("decoder_start_token_id")
        configs = (self._generate_kwargs.get("generation_config"),
                   getattr(module, "generation_config", None), module.config)
        for name in ("decoder_start_token_id", "bos_token_id"):
            for config in configs:
                if start is None:
                    start = getattr(config, name, None)
        if not isinstance(start, int):
            return None
        return torch.full((ids.shape[0], 1), start, dtype=torch.long, device=ids.device)


def _after_the_cache(kwargs: dict, generate_kwargs: dict) -> dict:
    """A decoder-only model's first-step ``kwargs`` where a cache is given to ``generate``
    (``past_key_values=`` / ``cache=``, holding the first ``past`` tokens of the ids it
    takes): the cache, and the ids (and their positions, token types) after its tokens, as
    ``generate`` gives them; the mask covers both. Without it, step 0 would be taken for a
    forward pass of the whole sequence (a shape read ``past`` tokens longer, silently)."""
    ids = kwargs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        return kwargs
    given = {**generate_kwargs, **kwargs}
    past = past_length(given, None)
    mask = kwargs.get("attention_mask")
    if not 0 < past < ids.shape[1] or (isinstance(mask, torch.Tensor) and
                                       mask.shape[-1] != ids.shape[1]):
        return kwargs  # (no cache, or these are the ids after it already)
    name = next(name for name in CACHE_KEYWORDS if name in given)
    kwargs = {**kwargs, name: given[name]}
    for key, value in kwargs.items():
        if key != "attention_mask" and isinstance(value, torch.Tensor) and \
                value.dim() == 2 and value.shape == ids.shape:
            kwargs[key] = value[:, past:]
    return kwargs


def _takes_logits_to_keep(module: torch.nn.Module) -> bool:
    """Whether ``module``'s forward takes ``logits_to_keep`` (as transformers' ``generate``
    asks, to pass it)."""
    try:
        return "logits_to_keep" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False
