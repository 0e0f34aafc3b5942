"""The invokes of a :class:`~fxsight.api.language_model.LanguageModel` made one batch:
each invoke's input prepared (encoded as token rows, its keywords joined to them, checked
before anything runs), then the invokes' rows left-padded (an encoder-decoder's
right-padded) to the longest and concatenated, with positions counted where a row is
padded."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import InputError, TraceError, at_line, user_line
from .cache_layout import check_cache_columns
from .decoder_padding import decoder_padded, with_decoder_mask
from .generation import Generator
from .inputs import check_keywords, describe, earlier_invokes, forward_signature
from .text_encoding import TOKENIZER_KEYWORDS
from .token_inputs import (DECODER_PADS, TOKEN_KEYWORDS, aligned, as_row, batch_sized,
                           check_batchable, check_positions, keyword_input, past_cache,
                           past_length, past_width, split_past_mask, with_past_mask,
                           with_token_keywords)
from .token_positions import PAD_VALUES, check_model_positions, known_padding, model_positions
from .token_rows import left_pad, unpredicted_first


class InvokeBatching:
    """The preparation and batching of a ``LanguageModel``'s invokes (a mixin: it needs
    the wrapper's ``_module``, its encoding (``TokenEncoding``), padding, token and
    position checks (``PaddingChecks``, ``TokenChecks``, ``TokenPositions``))."""

    def _prepare_invoke(self, args: tuple, kwargs: dict, invoke: Any) -> tuple[tuple, dict, int]:
        where, line = describe(invoke), user_line()
        kwargs = dict(kwargs)
        if not args:
            args, kwargs = keyword_input(kwargs)
        if not args:
            among = f" among its keywords ({', '.join(kwargs)})" if kwargs else ""
            embeds = "; a language model's inputs are tokens: for inputs_embeds, wrap the " \
                "model in NNsight(model) and trace it with inputs_embeds=..." \
                if "inputs_embeds" in kwargs else ""
            raise InputError(at_line(
                f"{where} has no input: no input_ids{among}. Give a string, a list of "
                f"strings, token ids or a dict with 'input_ids' (or input_ids=... as a "
                f"keyword){embeds}", line))
        if len(args) != 1:
            raise TraceError(at_line(
                f"{where}: a language model takes one input (a string, a list of strings, "
                f"token ids or a dict of tensors), got {len(args)} positional inputs", line))
        # a mask of the caller's own that is no padding mask (a 4-D one: which key each
        # query sees) goes to the model as it is; the tokens are checked with ours
        own_mask = kwargs.get("attention_mask")
        if isinstance(own_mask, torch.Tensor) and own_mask.dim() != 2:
            kwargs.pop("attention_mask")
        else:
            own_mask = None
        # token-aligned keywords (labels=, position_ids=, a 2-D attention_mask=) join the
        # ids they belong to: re-laid out with them (in generate, a right-padded row rolled
        # to the left)
        value, kwargs = with_token_keywords(args[0], kwargs, where, line)
        if _generating(invoke):  # (a mask given must not pad the cache's columns)
            check_cache_columns(value, invoke.tracer._cached_tokens(kwargs), where, line)
        # a cache passed in to a forward pass: the mask covers its past tokens too (an
        # encoder-decoder's cache holds its decoder's tokens: the mask is the encoder's)
        past = 0 if _generating(invoke) or self._encoder_decoder() else \
            past_length(kwargs, value)
        value, past_mask = split_past_mask(value, past, where, line)
        # (a mask given is read with the other invokes' checks before the run, where its
        # facts are needed no sooner: not to re-pack it, nor to refuse its padding now)
        defer = getattr(invoke, "tracer", None) is not None and not _generating(invoke) \
            and not past and self._mask_ignored() is None
        ids, mask, extras, facts = self._encode(value, where, line,
                                                self._tokenizer_options(kwargs),
                                                pack_left=_generating(invoke), defer=defer)
        self._check_ids(ids, facts, where, line, past, invoke, mask)
        if past:
            mask = with_past_mask(mask, past_mask, past)
        prepared: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        prepared.update(extras)
        for key, value in kwargs.items():
            if key in prepared:
                raise TraceError(at_line(f"{where}: {key!r} is given twice (in the input and "
                                         f"as a keyword)", line))
            prepared[key] = as_row(value, ids) if key in TOKEN_KEYWORDS else value
        given = {k: v for k, v in prepared.items() if k != "attention_mask"}  # (always ours)
        check_keywords(self._module, (), given, where, line)
        check_positions(prepared, where, line)
        # (a row padded in the cache's tokens counts its real tokens too)
        past_padded = past_mask is not None and not bool(past_mask.all())
        padded = None if facts.ones is None else not facts.ones or past_padded
        self._check_padding(ids, padded, invoke, where, line)
        if invoke is not None and own_mask is None:
            invoke.padded = padded  # (the batch's check reads it, not the device)
        own_positions = prepared.get("position_ids") is None
        if past_padded and own_positions and \
                not self._counted_cache(past_cache(kwargs, value), where, line):
            # the cache's padded rows were computed at their columns (a plain forward's):
            # the model places the input's tokens, as in the plain call (_batch_inputs
            # refuses where it cannot); one that fxsight's run made counting real tokens
            # (a trace of a padded batch, generate) goes on counting them below
            if invoke is not None:
                invoke.model_positions = (where, line)
        else:
            # (where not known yet, positions counted from the mask: the batch drops them
            # where no row turns out padded)
            prepared = self._with_positions(prepared, [(prepared, ids.shape[1])],
                                            padded=True if padded is None else padded)
        if invoke is not None and own_positions and "position_ids" in prepared:
            invoke.positions_made = True  # (the batch's positions need not compare them)
        if own_mask is not None:
            prepared["attention_mask"] = own_mask
        if earlier_invokes(invoke):
            check_batchable(earlier_invokes(invoke)[0].prepared, prepared, ids.shape[0],
                             invoke.index, line, self._encoder_decoder(),
                             self._encoder_decoder() and not _generating(invoke))
        return (), self._to_device(prepared), ids.shape[0]

    def _batch_inputs(self, prepared: list[tuple[tuple, dict, int]],
                      invokes: list | None = None) -> tuple[tuple, dict]:
        """Left-pad every invoke's token-aligned tensors to the longest (right-pad an
        encoder-decoder's: ``_pads_right``), concatenate rows
        (``invokes``: those they were prepared for, where known: what their preparation
        found is not read from the device again)."""
        encoder_decoder = self._encoder_decoder()  # (a config's attribute: read once)
        # (a trace right-pads an encoder-decoder's decoder tokens; generate cannot)
        pad_decoder = encoder_decoder and not _generating(invokes[0] if invokes else None)
        for i, (_, kw, n) in enumerate(prepared[1:], 1):
            check_batchable(prepared[0], kw, n, i, None, encoder_decoder, pad_decoder)
        known, invokes = invokes, [kw for _, kw, _ in prepared]
        length = max(kw["input_ids"].shape[1] for kw in invokes)
        right = self._pads_right()  # (an encoder-decoder's rows: padded on the right)
        batched: dict[str, Any] = {}
        for key in [k for k in invokes[0] if k != "position_ids"]:
            column = [kw[key] for kw in invokes]
            if all(aligned(key, v, kw, encoder_decoder) for v, kw in zip(column, invokes)):
                pad = self._pad_id() if key == "input_ids" else PAD_VALUES.get(key, 0)
                if key == "labels" and self._shifts_labels():
                    column = [unpredicted_first(v, v.shape[1] < length) for v in column]
                batched[key] = torch.cat([left_pad(v, length, pad, right) for v in column])
            elif key == "attention_mask" and past_width(column[0], invokes[0]):
                # masks that cover a cache's past tokens: padded between past and input
                past = past_width(column[0], invokes[0])
                batched[key] = torch.cat([torch.cat([v[:, :past], left_pad(
                    v[:, past:], length, 0, right)], 1) for v in column])
            elif pad_decoder and key in DECODER_PADS and \
                    len({v.shape[1:] for v in column}) > 1:
                batched[key] = decoder_padded(key, column, self._decoder_pad_id)
            elif all(batch_sized(v, n) for v, (_, _, n) in zip(column, prepared)):
                batched[key] = torch.cat(column)
            else:
                batched[key] = column[0]
        if pad_decoder:
            batched = with_decoder_mask(batched, invokes,
                                        self._accepts("decoder_attention_mask"))
        # (an invoke of a model taking position_ids has them where a row is padded: where
        # none has and all are as long, no row of the batch is padded)
        unpadded = self._accepts("position_ids") and \
            all("position_ids" not in kw and kw["input_ids"].shape[1] == length
                for kw in invokes)
        if any(model_positions(known, invokes)):
            check_model_positions(known, invokes, length, self._places_by_mask())
            batched.pop("position_ids", None)  # (the plain call's: the model's own)
        else:
            batched = self._with_positions(batched, [(kw, length) for kw in invokes],
                                           padded=False if unpadded else
                                           known_padding(known, invokes, length),
                                           made=[i.positions_made for i in known or ()])
        if self._mask_ignored() is not None and not self._takes_mask():
            batched.pop("attention_mask")  # (all ones: _check_padding saw to it)
        return (), batched

    def _decoder_pad_id(self) -> int:
        """The id a decoder's tokens are padded with (the config's ``pad_token_id``, which
        transformers' shift of labels puts at their -100s), else the tokenizer's."""
        value = getattr(getattr(self._module, "config", None), "pad_token_id", None)
        return value if isinstance(value, int) else self._pad_id()

    def _tokenizer_options(self, kwargs: dict) -> dict:
        """The tokenizer's keywords among an invoke's (``truncation=True, max_length=4``),
        taken out of ``kwargs``: they apply to the tokenization, as nnsight applies them,
        where the model's ``forward`` does not take them (its ``**kwargs`` would ignore
        them)."""
        signature = forward_signature(self._module)
        if signature is None:
            return {}
        known = signature.known()
        return {name: kwargs.pop(name) for name in TOKENIZER_KEYWORDS
                if name in kwargs and name not in known}

    def _to_device(self, kwargs: dict) -> dict:
        device = self._device()
        if device.type == "meta":
            return kwargs
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v
                for k, v in kwargs.items()}


def _generating(invoke: Any) -> bool:
    """Whether ``invoke`` belongs to ``lm.generate`` (whose input ids include the tokens of a
    cache passed in: transformers' ``generate`` takes the full sequence and its mask)."""
    return invoke is not None and isinstance(getattr(invoke, "tracer", None), Generator)
