"""One invoke's input as token rows: a string, strings, token ids or a dict of tensors
encoded as left-padded ``(input_ids, attention_mask, extras)`` (a mask given keeps its
padding; in ``generate`` a right-padded mask's rows are rolled to the left), for
:class:`~fxsight.api.language_model.LanguageModel`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import InputError, TraceError, at_line
from .inputs import BATCH_KEYWORDS
from .token_inputs import as_id_tensor, as_row, integer, is_batch_encoding, is_id_row, is_int
from .token_rows import (TokenFacts, roll_rows, row_facts, token_facts, unpadded_facts,
                         unread_facts, unpredicted_first)


class TokenEncoding:
    """The input-encoding half of ``LanguageModel`` (its base): reads the wrapper's
    ``tokenizer``, ``_module``, ``_encoder_decoder()``, ``_shifts_labels()`` and
    ``_aligned()``."""

    def _encode(self, value: Any, where: str, line: str, options: dict | None = None,
                pack_left: bool = False, defer: bool = False):
        """Token rows of one invoke's input: ``(input_ids, attention_mask, extras, facts)``;
        ``options``: the tokenizer's keywords given with it (``truncation=True,
        max_length=4``), for text only; ``pack_left``: roll a right-padded mask's rows
        to the left (a decoder-only ``generate`` appends tokens after the last column),
        else a mask given keeps its layout; ``defer`` (not with ``pack_left``): the facts
        of a mask given are left unread (``facts.unread``), to be read with the other
        invokes' (and checked: :meth:`_check_mask`) before the run."""
        options = options or {}
        if options.get("is_split_into_words"):  # words split already: one list a prompt
            options = {k: v for k, v in options.items() if k != "is_split_into_words"}
            return self._from_rows(self._tokenize(word_lists(value, where, line), where,
                                                  line, {**options,
                                                         "is_split_into_words": True}),
                                   None, {}, where, line)
        if options and not _is_text(value):
            name = next(iter(options))
            raise TraceError(at_line(
                f"{where}: {name}= is a keyword of the tokenizer, which this input (not "
                f"text) does not go through; tokenize the text with it yourself, or give "
                f"the tokens as you want them", line))
        if isinstance(value, str):
            return self._from_rows(self._tokenize([value], where, line, options), None, {},
                                   where, line)
        if isinstance(value, Mapping) or is_batch_encoding(value):
            return self._from_mapping(value, where, line, pack_left, defer)
        if isinstance(value, torch.Tensor):
            if not integer(value) or value.dim() not in (1, 2):
                raise TraceError(at_line(
                    f"{where}: token ids must be an integer tensor of 1 or 2 dimensions, got "
                    f"{value.dtype} of shape {tuple(value.shape)}", line))
            ids = value.reshape(1, -1) if value.dim() == 1 else value
            return self._from_rows(ids, None, {}, where, line)
        if isinstance(value, (list, tuple)):
            if len(value) == 0:
                raise TraceError(at_line(f"{where}: the prompt list is empty", line))
            if all(isinstance(v, str) for v in value):
                rows = self._tokenize(list(value), where, line, options)
                return self._from_rows(rows, None, {}, where, line)
            if all(is_int(v) for v in value):
                return self._from_rows([[int(v) for v in value]], None, {}, where, line)
            if all(is_id_row(v) for v in value):
                rows = [[int(t) for t in (v.tolist() if isinstance(v, torch.Tensor) else v)]
                        for v in value]
                return self._from_rows(rows, None, {}, where, line)
            if all(isinstance(v, (list, tuple)) and v and all(isinstance(w, str) for w in v)
                   for v in value):
                raise InputError(at_line(
                    f"{where}: a list of lists of strings is a batch of prompts split into "
                    f"words only with is_split_into_words=True (the tokenizer's keyword: "
                    f"`trace(words, is_split_into_words=True)`; without it transformers "
                    f"reads two strings as a pair of texts, and nnsight's tokenizer.pad "
                    f"refuses strings); or join each list into a string", line))
            kinds = sorted({type(v).__name__ for v in value})
            raise TraceError(at_line(
                f"{where}: a list input must hold strings, token ids (ints) or lists of "
                f"token ids, not a mix of {', '.join(kinds)}", line))
        raise TraceError(at_line(
            f"{where}: cannot use a {type(value).__name__} as a language model input (give a "
            f"string, a list of strings, token ids or a dict with 'input_ids')", line))

    def _split_words(self, value: Any, where: str, line: str) -> list[list[int]]:
        """The token ids of prompts split into words (``is_split_into_words=True``): a list
        of words, or a list of such lists; one list of ids a prompt, unpadded."""
        return self._tokenize(word_lists(value, where, line), where, line,
                              {"is_split_into_words": True})

    def _tokenize(self, prompts: list[str], where: str, line: str,
                  options: dict | None = None) -> list[list[int]]:
        if self.tokenizer is None:
            raise TraceError(at_line(f"{where}: text input needs a tokenizer; pass "
                                     f"LanguageModel(model, tokenizer=...)", line))
        try:
            encoded = self.tokenizer(prompts, **{"padding": False, "truncation": False,
                                                 **(options or {})})
        except Exception as error:  # noqa: BLE001 - the tokenizer's reason, with the line
            raise TraceError(at_line(f"{where}: the tokenizer rejected this input "
                                     f"({type(error).__name__}: {error})", line)) from None
        return [list(map(int, ids)) for ids in encoded["input_ids"]]

    def _from_mapping(self, value: Any, where: str, line: str, pack_left: bool = False,
                      defer: bool = False):
        data = dict(value.items())
        if "input_ids" not in data:
            raise TraceError(at_line(f"{where}: a dict input needs 'input_ids' (it has "
                                     f"{sorted(data)})", line))
        ids = data.pop("input_ids")
        mask = data.pop("attention_mask", None)
        ids = as_id_tensor(ids, where, line)
        if mask is not None:
            mask = torch.as_tensor(mask)
            if mask.dim() == 1:
                mask = mask.reshape(1, -1)
            if mask.shape != ids.shape:
                raise TraceError(at_line(f"{where}: attention_mask has shape "
                                         f"{tuple(mask.shape)}, input_ids {tuple(ids.shape)}",
                                         line))
        extras = {}
        for key, extra in data.items():
            if key in BATCH_KEYWORDS and isinstance(extra, (list, tuple)):
                extra = torch.as_tensor(extra)  # (a tokenizer's lists)
            extra = as_row(extra, ids)
            if key == "position_ids" and isinstance(extra, torch.Tensor) and \
                    extra.dim() == 2 and extra.shape[0] == 1:
                extra = extra.expand(ids.shape[0], -1)  # (one row for all, as transformers)
            if key in BATCH_KEYWORDS and isinstance(extra, torch.Tensor) and \
                    extra.dim() > 0 and extra.shape[0] != ids.shape[0]:
                raise TraceError(at_line(
                    f"{where}: the inputs disagree on the batch size (input_ids has "
                    f"{ids.shape[0]}, {key} has {extra.shape[0]} rows); every input of an "
                    f"invoke holds its rows", line))
            extras[key] = extra
        return self._from_rows(ids, mask, extras, where, line, pack_left, defer)

    def _from_rows(self, rows: Any, mask: torch.Tensor | None, extras: dict, where: str,
                   line: str, pack_left: bool = False, defer: bool = False):
        """Left-padded ``(input_ids, attention_mask, extras)`` from ragged rows or a tensor
        (with an optional mask, which keeps its padding: a right-padded row stays so, its
        positions counted from the mask; re-packed to the left where ``pack_left``); an
        encoder-decoder's rows are right-padded, and a mask given keeps its padding."""
        if isinstance(rows, torch.Tensor):
            ids = rows.long()
        else:
            if any(len(r) == 0 for r in rows):
                empty = next(i for i, r in enumerate(rows) if len(r) == 0)
                raise InputError(at_line(f"{where}: prompt {empty} has no tokens", line))
            length = max(len(r) for r in rows)
            pad = self._pad_id()
            # (an encoder-decoder's input is padded on the right: see _pads_right)
            right = self._pads_right()
            ids = torch.tensor([r + [pad] * (length - len(r)) if right else
                                [pad] * (length - len(r)) + r for r in rows], dtype=torch.long)
            mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) if right else
                                 [0] * (length - len(r)) + [1] * len(r) for r in rows],
                                dtype=torch.long)
            return ids, mask, extras, row_facts(rows, pad)  # padded already
        if ids.shape[0] == 0 or ids.shape[1] == 0:
            raise TraceError(at_line(f"{where}: the input holds no tokens (shape "
                                     f"{tuple(ids.shape)})", line))
        if mask is None:  # (ours, of ones: only the ids are read)
            return ids, torch.ones_like(ids), extras, unpadded_facts(ids)
        given, mask = mask, mask.to(ids.device).long()
        if mask is given:  # (the caller's own tensor: what the facts say of it must hold at
            mask = mask.clone()  # the run, whatever the caller writes into theirs)
        if defer and not pack_left:
            unread, _ = unread_facts(ids, mask)
            return ids, mask, extras, TokenFacts(None, None, None, None, None, None, unread)
        facts, trailing = token_facts(ids, mask)
        self._check_mask(facts, mask, where, line)
        # right-padded rows of a decoder-only generate: roll their real tokens to the end
        # (new tokens go after the last column); a trace keeps the caller's layout, and an
        # encoder-decoder's input its padding (its encoder may place tokens by index)
        if facts.trailing and pack_left and not self._encoder_decoder():
            shifts = trailing.tolist()
            ids, mask = roll_rows(ids, shifts), roll_rows(mask, shifts)
            rolled = {"input_ids": ids}
            if self._shifts_labels() and self._aligned("labels", extras.get("labels"), rolled):
                extras["labels"] = unpredicted_first(extras["labels"], trailing > 0)
            extras = {k: roll_rows(v, shifts) if self._aligned(k, v, rolled) else v
                      for k, v in extras.items()}
        return ids, mask, extras, facts

    @staticmethod
    def _check_mask(facts: TokenFacts, mask: torch.Tensor, where: str, line: str) -> None:
        """Raise where a mask given (whose ``facts`` are read) is no padding mask."""
        if not facts.binary:
            raise TraceError(at_line(f"{where}: attention_mask must hold 0s and 1s", line))
        if facts.empty:
            empty = (mask.sum(-1) == 0).nonzero().flatten().tolist()
            raise InputError(at_line(f"{where}: prompt {empty[0]} has no tokens (its "
                                     f"attention_mask is all zeros)", line))

    def _pads_right(self) -> bool:
        """Whether the input's rows are padded on the right: an encoder-decoder's (its
        encoder is bidirectional and masked, so right padding moves no real token, where
        left padding would move them to other positions in an encoder that places tokens
        by index and takes no ``position_ids``: BART's, Marian's, Pegasus's), and an
        encoder's, a model that does not generate (BERT: its pooler and a classifier read
        position 0, every row's first token only where the rows are padded on the right, as
        its tokenizer and nnsight pad them)."""
        return self._encoder_decoder() or not self._generates()

    def _generates(self) -> bool:
        """Whether the model generates (a decoder: transformers' ``can_generate()``); a
        model that does not say is taken to."""
        can_generate = getattr(self._module, "can_generate", None)
        if not callable(can_generate):
            return True
        try:
            return bool(can_generate())
        except Exception:  # (a remote-code model's own: taken to generate, as before)
            return True

    def _pad_id(self) -> int:
        for source in (self.tokenizer, getattr(self._module, "config", None)):
            for name in ("pad_token_id", "eos_token_id"):
                value = getattr(source, name, None) if source is not None else None
                if isinstance(value, (list, tuple)):
                    value = value[0] if value else None
                if isinstance(value, int):
                    return value
        return 0


# keywords of an invoke that are the tokenizer's (as nnsight passes them), where the model's
# forward does not take them: it would swallow them in its **kwargs and ignore them
TOKENIZER_KEYWORDS = ("add_special_tokens", "truncation", "max_length", "is_split_into_words")


def word_lists(value: Any, where: str, line: str) -> list[list[str]]:
    """``value`` (with ``is_split_into_words=True``) as a list of prompts, each a list of
    words: a list of words is one prompt."""
    if isinstance(value, (list, tuple)) and value and all(isinstance(w, str) for w in value):
        return [list(value)]
    if isinstance(value, (list, tuple)) and value and all(
            isinstance(v, (list, tuple)) and v and all(isinstance(w, str) for w in v)
            for v in value):
        return [list(v) for v in value]
    raise InputError(at_line(
        f"{where}: is_split_into_words=True takes a prompt split into words (a list of "
        f"strings) or a batch of them (a list of such lists), not a "
        f"{type(value).__name__}", line))


def _is_text(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, (list, tuple)) and bool(value) and
                                      all(isinstance(v, str) for v in value))
