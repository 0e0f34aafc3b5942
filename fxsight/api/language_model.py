"""LanguageModel: a transformers causal LM whose inputs are text, batched with left padding.

``LanguageModel(path)`` reads the config and the tokenizer saved in ``path`` and builds the
model on the meta device, so ``print(lm)`` shows its structure at once; the weights are
loaded with ``automodel.from_pretrained(path, **kwargs)`` when the model first runs (or at
once with ``dispatch=True``). ``LanguageModel(module, tokenizer=tok)`` wraps a loaded model.

Inputs of an invoke (or of ``trace(...)``): a string, a list of strings, token ids (a list
of ints, a list of lists, a 1-D or 2-D integer tensor) or a dict of tensors
(``input_ids``, optional ``attention_mask``, other token-aligned tensors), also given as
keywords (``trace(input_ids=..., attention_mask=...)``, ``invoke(**tokenizer(...))``). Keywords
are checked against the model's ``forward`` (:mod:`fxsight.api.inputs`). Every prompt is
left-padded: the invokes of a trace are padded to a common length, with the attention mask
and explicit ``position_ids`` (attention mask cumulative sum, as transformers' ``generate``
does), so each row computes what it computes alone. A right-padded ``attention_mask`` is
re-packed to the left (its rows are rolled so that the last real token is last).

Token indexing: ``proxy.token[i]`` / ``proxy.t[i]`` index dimension 1 counting from each
prompt's first real token. Because padding is on the left, a prompt's tokens are always the
last ``n`` positions of the batch, whatever the other invokes pad to, so indices are taken
from the end and do not depend on later invokes. When the rows of one invoke (a list of
prompts of different lengths) start at different positions, each row is gathered at its own
position (an advanced index, ``value[rows, positions]``); when they agree it is a plain
slice (a view). Reading ``.token`` of a value that spans the whole batch
(``tracer.invoke()`` with no input) uses every invoke recorded so far (an invoke added
after it is an error, raised before the model runs).

Invokes run as one forward pass, in dependency order, so a value flows between invokes in
either direction the forward order allows: a later invoke uses an earlier one's values
directly; an earlier invoke uses a later one's (computed at an earlier module) by entering
its block again: ``with tracer.invoke(a) as first: ...``, ``with tracer.invoke(b): h = ...``,
``with first: ... = h``. ``tracer.barrier(n)`` is accepted (and checked) for nnsight code.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from ..capture import captures as capture
from ..capture import scan
from ..errors import TraceError, at_line, user_line
from ..run import executable as runner
from .edit import seed
from .generation import Generator, GeneratorEnvoy
from .inputs import BATCH_KEYWORDS, check_keywords, describe
from .nnsight import NNsight
from .token_index import TokenIndexer
from .token_rows import (TokenFacts, left_pad, real_positions, roll_rows,
                         token_aligned, token_facts, unpredicted_first)

# keys of a dict input that are not forwarded as they come but re-laid out with the rows
_PAD_VALUES = {"attention_mask": 0, "labels": -100, "position_ids": 1}
# keywords that are part of the input whatever their type (a tokenizer's lists)
_TOKEN_KEYWORDS = frozenset({"input_ids", "attention_mask", "token_type_ids", "position_ids",
                             "labels"})
# the token keywords beside an input of lm.generate that join it
_GENERATE_TOKEN_KEYWORDS = frozenset({"attention_mask", "token_type_ids"})
# the keywords of a cache passed in to a forward pass
_CACHE_KEYWORDS = ("cache", "past_key_values")
_CONFIG_KWARGS = ("trust_remote_code", "revision", "token", "cache_dir", "local_files_only",
                  "subfolder")
_FROM_CONFIG_KWARGS = ("dtype", "torch_dtype", "attn_implementation", "trust_remote_code")


class LanguageModel(NNsight):
    """A transformers language model wrapped for tracing, with text inputs.

    ``LanguageModel(path_or_module, tokenizer=None, automodel=AutoModelForCausalLM,
    dispatch=False, **kwargs)``: ``kwargs`` go to ``automodel.from_pretrained`` (``device_map``,
    ``dtype``, ...), except ``backend`` and ``compile`` (defaults of every trace).
    """

    _token_indexing = True

    def __init__(self, model_or_path: Any, tokenizer: Any = None,
                 automodel: Any = AutoModelForCausalLM, dispatch: bool = False, *,
                 backend: str = "auto", compile: Any = None,
                 rename: dict[str, str] | None = None, **kwargs: Any):
        given_tokenizer = tokenizer
        if isinstance(model_or_path, torch.nn.Module):
            module, path = model_or_path, None
            if tokenizer is None:
                tokenizer = _tokenizer_beside(module)
        elif isinstance(model_or_path, (str, os.PathLike)):
            path = os.fspath(model_or_path)
            module, tokenizer = _load_meta(path, tokenizer, automodel, kwargs)
        else:
            raise TypeError("LanguageModel wraps a torch.nn.Module or loads a local path, "
                            f"not {type(model_or_path).__name__}")
        super().__init__(module, backend=backend, compile=compile, rename=rename)
        if tokenizer is not None and given_tokenizer is None:
            _prepare_tokenizer(tokenizer)  # (fxsight's own; a user's tokenizer stays as it is)
        object.__setattr__(self, "tokenizer", tokenizer)
        object.__setattr__(self, "automodel", automodel)
        object.__setattr__(self, "_load_path", path)
        object.__setattr__(self, "_load_kwargs", dict(kwargs))
        object.__setattr__(self, "_dispatched", path is None)
        object.__setattr__(self, "_forward_params", None)
        if dispatch:
            self.dispatch_model()

    # --- loading ---------------------------------------------------------------------------
    @property
    def dispatched(self) -> bool:
        """Whether the real weights are loaded (``False`` while the model is on meta)."""
        return self._dispatched

    def dispatch_model(self) -> None:
        """Load the real weights now (``automodel.from_pretrained(path, **kwargs)``)."""
        if self._dispatched:
            return
        old = self._module
        new = self.automodel.from_pretrained(self._load_path, **self._load_kwargs)
        new.eval()
        object.__setattr__(self, "_module", new)
        object.__setattr__(self, "_dispatched", True)
        object.__setattr__(self, "_forward_params", None)
        _refresh_envoys(self, new)
        _forget(old)

    def _before_run(self) -> None:
        self.dispatch_model()

    def trace(self, *inputs: Any, **kwargs: Any):
        """``with lm.trace(prompt, **forward_kwargs) as tracer:``; or ``lm.trace()`` and
        ``tracer.invoke(prompt)`` several times. The input may be given as keywords too
        (``input_ids=``, ``attention_mask=``, other tensors: ``**tokenizer(...)``). Loads
        the weights first if they are not loaded yet (so that modules applied inside the
        block, e.g. a logit lens, are the real ones)."""
        if not inputs:
            inputs, kwargs = _keyword_input(kwargs)
        self.dispatch_model()
        return super().trace(*inputs, **kwargs)

    def generate(self, *inputs: Any, backend: str | None = None, compile: Any = None,
                 **kwargs: Any):
        """``with lm.generate(prompt, max_new_tokens=n) as tracer:``: interventions across
        decoding steps (``tracer.iter[...]``, ``tracer.all()``); ``kwargs`` go to
        transformers' ``generate`` (the input may be given as keywords, as in ``trace``).
        ``lm.generator.output`` is the generated ids.

        On the fx backend every step runs as a rewritten graph; ``compile=True`` (or a
        dict of ``torch.compile`` options) compiles the first step and the decoding step
        once each, for every later step and sequence length.

        >>> import torch
        >>> from fxsight.experiments import demo
        >>> lm = demo.load()
        >>> with lm.generate("a3 f8 c", max_new_tokens=3, do_sample=False) as tracer:
        ...     with tracer.all():  # every decoding step
        ...         lm.transformer.h[1].output[:, -1] += torch.ones(64)
        ...         last = lm.transformer.h[1].output[:, -1].save()
        ...     tokens = lm.generator.output.save()
        >>> len(last), tokens.shape[1] - len(lm.tokenizer("a3 f8 c")["input_ids"])
        (3, 3)
        """
        if not inputs:  # lm.generate(**tokenizer(...), max_new_tokens=n)
            inputs, kwargs = _keyword_input(kwargs)
        elif len(inputs) == 1:  # lm.generate(ids, attention_mask=mask, max_new_tokens=n)
            # (the mask and token types; position_ids and labels go to generate as given)
            value, kwargs = _with_token_keywords(inputs[0], kwargs, "lm.generate(...)",
                                                 user_line(), _GENERATE_TOKEN_KEYWORDS)
            inputs = (value,)
        self.dispatch_model()
        tracer = Generator(self, inputs, kwargs,
                           self._run_options(backend, compile, prune=False))
        if self._edits:  # (as nnsight: an edit applies like a line outside tracer.iter)
            seed(tracer.program, self._edits)
        return tracer

    @property
    def generator(self):
        """``lm.generator.output``: the generated token ids, inside ``lm.generate(...)``."""
        return GeneratorEnvoy(self)

    def to(self, *args, **kwargs) -> "LanguageModel":
        """Move the model (loading its weights first if needed); returns the wrapper."""
        self.dispatch_model()
        self._module.to(*args, **kwargs)
        return self

    # --- inputs ------------------------------------------------------------------------------
    def _accepts(self, name: str) -> bool:
        params = self._forward_params
        if params is None:
            try:
                params = set(inspect.signature(self._module.forward).parameters)
            except (TypeError, ValueError):
                params = set()
            object.__setattr__(self, "_forward_params", params)
        return name in params

    def _encoder_decoder(self) -> bool:
        """Whether the model is an encoder-decoder (T5, BART): its ``labels`` and
        ``decoder_*`` inputs are the decoder's tokens, not the input's."""
        return bool(getattr(getattr(self._module, "config", None), "is_encoder_decoder",
                            False))

    def _aligned(self, key: str, value: Any, kwargs: dict) -> bool:
        """Whether input ``key`` holds a value per token of the input's rows."""
        return _aligned(key, value, kwargs, self._encoder_decoder())

    def _shifts_labels(self) -> bool:
        """Whether the model's loss predicts each token's label from the position before
        it (a causal LM: the label of a row's first column is never predicted)."""
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        name = type(self._module).__name__
        names = set()
        for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
            names.update(value if isinstance(value, (list, tuple)) else [value])
        return name in names or name.endswith(("ForCausalLM", "LMHeadModel"))

    def _prepare_invoke(self, args: tuple, kwargs: dict, invoke: Any) -> tuple[tuple, dict, int]:
        where, line = describe(invoke), user_line()
        kwargs = dict(kwargs)
        if not args:
            args, kwargs = _keyword_input(kwargs)
        if not args:
            among = f" among its keywords ({', '.join(kwargs)})" if kwargs else ""
            raise TraceError(at_line(
                f"{where} has no input: no input_ids{among}. Give a string, a list of "
                f"strings, token ids or a dict with 'input_ids' (or input_ids=... as a "
                f"keyword)", line))
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
        # ids they belong to: re-laid out with them (a right-padded row rolled to the left)
        value, kwargs = _with_token_keywords(args[0], kwargs, where, line)
        # a cache passed in to a forward pass: the mask covers its past tokens too
        past = 0 if _generating(invoke) else _past_length(kwargs, value)
        value, past_mask = _split_past_mask(value, past, where, line)
        ids, mask, extras, facts = self._encode(value, where, line)
        self._check_ids(ids, facts, where, line, past)
        if past:
            mask = _with_past_mask(mask, past_mask, past)
        prepared: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        prepared.update(extras)
        for key, value in kwargs.items():
            if key in prepared:
                raise TraceError(at_line(f"{where}: {key!r} is given twice (in the input and "
                                         f"as a keyword)", line))
            prepared[key] = _as_row(value, ids) if key in _TOKEN_KEYWORDS else value
        given = {k: v for k, v in prepared.items() if k != "attention_mask"}  # (always ours)
        check_keywords(self._module, (), given, where, line)
        _check_positions(prepared, where, line)
        # (a row padded in the cache's tokens counts its real tokens too)
        padded = not facts.ones or (past_mask is not None and not bool(past_mask.all()))
        prepared = self._with_positions(prepared, [(prepared, ids.shape[1])], padded=padded)
        if own_mask is not None:
            prepared["attention_mask"] = own_mask
        if invoke is not None and invoke.tracer.invokes:
            _check_batchable(invoke.tracer.invokes[0].prepared, prepared, ids.shape[0],
                             invoke.index, line, self._encoder_decoder())
        return (), self._to_device(prepared), ids.shape[0]

    def _batch_inputs(self, prepared: list[tuple[tuple, dict, int]]) -> tuple[tuple, dict]:
        """Left-pad every invoke's token-aligned tensors to the longest, concatenate rows."""
        for i, (_, kw, n) in enumerate(prepared[1:], 1):
            _check_batchable(prepared[0], kw, n, i, None, self._encoder_decoder())
        invokes = [kw for _, kw, _ in prepared]
        length = max(kw["input_ids"].shape[1] for kw in invokes)
        batched: dict[str, Any] = {}
        for key in [k for k in invokes[0] if k != "position_ids"]:
            column = [kw[key] for kw in invokes]
            if all(self._aligned(key, v, kw) for v, kw in zip(column, invokes)):
                pad = self._pad_id() if key == "input_ids" else _PAD_VALUES.get(key, 0)
                if key == "labels" and self._shifts_labels():
                    column = [unpredicted_first(v, v.shape[1] < length) for v in column]
                batched[key] = torch.cat([left_pad(v, length, pad) for v in column])
            elif key == "attention_mask" and _past_width(column[0], invokes[0]):
                # masks that cover a cache's past tokens: padded between past and input
                past = _past_width(column[0], invokes[0])
                batched[key] = torch.cat([torch.cat([v[:, :past], left_pad(v[:, past:],
                                                                           length, 0)], 1)
                                          for v in column])
            elif all(_batch_sized(v, n) for v, (_, _, n) in zip(column, prepared)):
                batched[key] = torch.cat(column)
            else:
                batched[key] = column[0]
        # (an invoke of a model taking position_ids has them where a row is padded: where
        # none has and all are as long, no row of the batch is padded)
        unpadded = self._accepts("position_ids") and \
            all("position_ids" not in kw and kw["input_ids"].shape[1] == length
                for kw in invokes)
        batched = self._with_positions(batched, [(kw, length) for kw in invokes],
                                       padded=False if unpadded else None)
        return (), batched

    def _with_positions(self, batched: dict, invokes: list[tuple[dict, int]],
                        padded: bool | None = None) -> dict:
        """``batched`` with ``position_ids`` that count real tokens only, where needed
        (``padded``: whether a row of its mask is padded, where known)."""
        if padded is False and all(kw.get("position_ids") is None for kw, _ in invokes):
            return {k: v for k, v in batched.items() if k != "position_ids"}
        parts, explicit = [], False
        for kw, length in invokes:
            mask = kw["attention_mask"]
            given = kw.get("position_ids")
            if mask.dim() != 2:  # (the caller's own mask: positions only where given)
                if given is None:
                    return {k: v for k, v in batched.items() if k != "position_ids"}
                explicit = True
                parts.append(left_pad(given, length, _PAD_VALUES["position_ids"]))
                continue
            # (the positions of the input's own tokens: a mask that covers a cache's past
            # tokens too counts them)
            auto = real_positions(mask)[:, mask.shape[1] - kw["input_ids"].shape[1]:]
            if given is not None and not torch.equal(given.to(auto.device), auto):
                explicit = True
                auto = given
            parts.append(left_pad(auto, length, _PAD_VALUES["position_ids"]))
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

    def _encode(self, value: Any, where: str, line: str):
        """Token rows of one invoke's input: ``(input_ids, attention_mask, extras)``."""
        if isinstance(value, str):
            return self._from_rows(self._tokenize([value], where, line), None, {}, where, line)
        if isinstance(value, Mapping) or _is_batch_encoding(value):
            return self._from_mapping(value, where, line)
        if isinstance(value, torch.Tensor):
            if not _integer(value) or value.dim() not in (1, 2):
                raise TraceError(at_line(
                    f"{where}: token ids must be an integer tensor of 1 or 2 dimensions, got "
                    f"{value.dtype} of shape {tuple(value.shape)}", line))
            ids = value.reshape(1, -1) if value.dim() == 1 else value
            return self._from_rows(ids, None, {}, where, line)
        if isinstance(value, (list, tuple)):
            if len(value) == 0:
                raise TraceError(at_line(f"{where}: the prompt list is empty", line))
            if all(isinstance(v, str) for v in value):
                return self._from_rows(self._tokenize(list(value), where, line), None, {},
                                       where, line)
            if all(_is_int(v) for v in value):
                return self._from_rows([[int(v) for v in value]], None, {}, where, line)
            if all(_is_id_row(v) for v in value):
                rows = [[int(t) for t in (v.tolist() if isinstance(v, torch.Tensor) else v)]
                        for v in value]
                return self._from_rows(rows, None, {}, where, line)
            kinds = sorted({type(v).__name__ for v in value})
            raise TraceError(at_line(
                f"{where}: a list input must hold strings, token ids (ints) or lists of "
                f"token ids, not a mix of {', '.join(kinds)}", line))
        raise TraceError(at_line(
            f"{where}: cannot use a {type(value).__name__} as a language model input (give a "
            f"string, a list of strings, token ids or a dict with 'input_ids')", line))

    def _tokenize(self, prompts: list[str], where: str, line: str) -> list[list[int]]:
        if self.tokenizer is None:
            raise TraceError(at_line(f"{where}: text input needs a tokenizer; pass "
                                     f"LanguageModel(model, tokenizer=...)", line))
        try:
            encoded = self.tokenizer(prompts, padding=False, truncation=False)
        except Exception as error:  # noqa: BLE001 - the tokenizer's reason, with the line
            raise TraceError(at_line(f"{where}: the tokenizer rejected this input "
                                     f"({type(error).__name__}: {error})", line)) from None
        return [list(map(int, ids)) for ids in encoded["input_ids"]]

    def _from_mapping(self, value: Any, where: str, line: str):
        data = dict(value.items())
        if "input_ids" not in data:
            raise TraceError(at_line(f"{where}: a dict input needs 'input_ids' (it has "
                                     f"{sorted(data)})", line))
        ids = data.pop("input_ids")
        mask = data.pop("attention_mask", None)
        ids = _as_id_tensor(ids, where, line)
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
            extra = _as_row(extra, ids)
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
        return self._from_rows(ids, mask, extras, where, line)

    def _from_rows(self, rows: Any, mask: torch.Tensor | None, extras: dict, where: str,
                   line: str):
        """Left-padded ``(input_ids, attention_mask, extras)`` from ragged rows or a tensor
        (with an optional mask, re-packed to the left where it is right-padded)."""
        if isinstance(rows, torch.Tensor):
            ids = rows.long()
        else:
            if any(len(r) == 0 for r in rows):
                empty = next(i for i, r in enumerate(rows) if len(r) == 0)
                raise TraceError(at_line(f"{where}: prompt {empty} has no tokens", line))
            length = max(len(r) for r in rows)
            pad = self._pad_id()
            ids = torch.tensor([[pad] * (length - len(r)) + r for r in rows], dtype=torch.long)
            mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows],
                                dtype=torch.long)
            return ids, mask, extras, token_facts(ids, mask)[0]  # left-padded already
        if ids.shape[0] == 0 or ids.shape[1] == 0:
            raise TraceError(at_line(f"{where}: the input holds no tokens (shape "
                                     f"{tuple(ids.shape)})", line))
        if mask is None:
            mask = torch.ones_like(ids)
        mask = mask.to(ids.device).long()
        facts, trailing = token_facts(ids, mask)
        if not facts.binary:
            raise TraceError(at_line(f"{where}: attention_mask must hold 0s and 1s", line))
        if facts.empty:
            empty = (mask.sum(-1) == 0).nonzero().flatten().tolist()
            raise TraceError(at_line(f"{where}: prompt {empty[0]} has no tokens (its "
                                     f"attention_mask is all zeros)", line))
        # right-padded rows: roll their real tokens to the end; an encoder-decoder's input
        # keeps its padding (its encoder may place tokens by index: BART's learned positions)
        if facts.trailing and not self._encoder_decoder():
            shifts = trailing.tolist()
            ids, mask = roll_rows(ids, shifts), roll_rows(mask, shifts)
            rolled = {"input_ids": ids}
            if self._shifts_labels() and self._aligned("labels", extras.get("labels"), rolled):
                extras["labels"] = unpredicted_first(extras["labels"], trailing > 0)
            extras = {k: roll_rows(v, shifts) if self._aligned(k, v, rolled) else v
                      for k, v in extras.items()}
        return ids, mask, extras, facts

    def _check_ids(self, ids: torch.Tensor, facts: "TokenFacts", where: str,
                   line: str, past: int = 0) -> None:
        """Raise where a token id is outside the vocabulary, or the input (after a cache's
        ``past`` tokens) goes beyond a learned position embedding."""
        embeddings = None
        try:
            embeddings = self._module.get_input_embeddings()
        except (AttributeError, NotImplementedError):
            pass
        size = getattr(embeddings, "num_embeddings", None)
        low, high = facts.low, facts.high
        if low < 0 or (size is not None and high >= size):
            bad = low if low < 0 else high
            raise TraceError(at_line(f"{where}: token id {bad} is outside the model's "
                                     f"vocabulary of {size} tokens", line))
        config = getattr(self._module, "config", None)
        limit = getattr(config, "n_positions", None) or \
            getattr(config, "max_position_embeddings", None)
        if isinstance(limit, int) and past + ids.shape[1] > limit and any(
                isinstance(m, torch.nn.Embedding) and m is not embeddings and
                m.num_embeddings == limit for m in self._module.modules()):
            # a learned position embedding of `limit` rows (rotary ones have no limit)
            length = f"the input is {ids.shape[1]} tokens long" if not past else \
                f"the cache's {past} tokens and the input's {ids.shape[1]} are " \
                f"{past + ids.shape[1]} tokens"
            raise TraceError(at_line(f"{where}: {length}, longer than the model's {limit} "
                                     f"positions", line))

    def _pad_id(self) -> int:
        for source in (self.tokenizer, getattr(self._module, "config", None)):
            for name in ("pad_token_id", "eos_token_id"):
                value = getattr(source, name, None) if source is not None else None
                if isinstance(value, (list, tuple)):
                    value = value[0] if value else None
                if isinstance(value, int):
                    return value
        return 0

    def _to_device(self, kwargs: dict) -> dict:
        device = self._device()
        if device.type == "meta":
            return kwargs
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v
                for k, v in kwargs.items()}

    # --- token indexing -----------------------------------------------------------------
    def _token_indexer(self, tracer, proxy) -> "TokenIndexer":
        return TokenIndexer(tracer, proxy)


# --- helpers ---------------------------------------------------------------------------------
def _check_batchable(first: tuple, kwargs: dict, rows: int, index: int,
                     line: str | None, encoder_decoder: bool) -> None:
    """Raise unless an invoke's prepared inputs can share a batch with invoke #0's."""
    _, base, base_rows = first
    keys = [k for k in base if k != "position_ids"]
    other = [k for k in kwargs if k != "position_ids"]
    if other != keys:
        raise TraceError(at_line(
            f"invoke #{index} passes other inputs than invoke #0 ({', '.join(other)} vs "
            f"{', '.join(keys)}); the invokes of a trace run in one batch", line))
    for key in keys:
        mine, theirs = kwargs[key], base[key]
        if _aligned(key, mine, kwargs, encoder_decoder) and \
                _aligned(key, theirs, base, encoder_decoder):
            continue
        if key == "attention_mask" and _past_width(mine, kwargs) == _past_width(theirs, base):
            continue  # (masks that cover the same cache's past tokens)
        if _batch_sized(mine, rows) and _batch_sized(theirs, base_rows) and \
                mine.shape[1:] == theirs.shape[1:]:
            continue
        if not _same(mine, theirs):
            raise TraceError(at_line(
                f"invokes #0 and #{index} disagree on {key!r} ({_brief(theirs)} vs "
                f"{_brief(mine)}); the invokes of a trace run in one batch", line))


def _with_token_keywords(value: Any, kwargs: dict, where: str, line: str,
                         names: frozenset = frozenset()) -> tuple[Any, dict]:
    """An invoke's input as a dict that holds the token keywords given beside token ids or a
    dict (``lm.trace(ids, attention_mask=m, labels=l)``), and the other keywords. Text and
    ragged id lists keep theirs as keywords (their rows are laid out by ``LanguageModel``).
    ``names``: the keywords that join the input (by default every token keyword)."""
    names = names or _TOKEN_KEYWORDS - {"input_ids"}
    moved = {k: v for k, v in kwargs.items() if k in names}
    if not moved:
        return value, kwargs
    if isinstance(value, Mapping) or _is_batch_encoding(value):
        data = dict(value.items())
    elif isinstance(value, torch.Tensor) or _rectangular_ids(value):
        data = {"input_ids": value}
    else:
        return value, kwargs
    for key in moved:
        if key in data:
            raise TraceError(at_line(f"{where}: {key!r} is given twice (in the input and "
                                     f"as a keyword)", line))
    data.update(moved)
    return data, {k: v for k, v in kwargs.items() if k not in moved}


def _rectangular_ids(value: Any) -> bool:
    """Whether ``value`` is a list of token ids or of equally long rows of them."""
    if not isinstance(value, (list, tuple)) or not value:
        return False
    if all(_is_int(v) for v in value):
        return True
    return all(_is_id_row(v) for v in value) and len({len(v) for v in value}) == 1


def _aligned(key: str, value: Any, kwargs: dict, encoder_decoder: bool) -> bool:
    """Whether input ``key`` holds a value per token of the input's rows: a tensor of their
    shape, unless it is an encoder-decoder's decoder input (``labels``, ``decoder_*``), whose
    tokens are others even where as many."""
    if encoder_decoder and (key == "labels" or key.startswith("decoder_")):
        return False
    return token_aligned(value, kwargs)


def _check_positions(prepared: dict, where: str, line: str) -> None:
    """Raise unless the ``position_ids`` given (if any) hold a position per token of the
    input's rows (one row for all of them, or one per row); one row is spread over all."""
    positions, ids = prepared.get("position_ids"), prepared["input_ids"]
    if not isinstance(positions, torch.Tensor):
        return
    if positions.dim() != 2 or positions.shape[1] != ids.shape[1] or \
            positions.shape[0] not in (1, ids.shape[0]):
        raise TraceError(at_line(
            f"{where}: position_ids has shape {tuple(positions.shape)}, input_ids "
            f"{tuple(ids.shape)}: give a position per token of each row (or of one row, "
            f"for every row)", line))
    prepared["position_ids"] = positions.expand(ids.shape[0], -1)


def _as_row(value: Any, ids: torch.Tensor) -> Any:
    """A 1-D tensor with a value per token of a single row of ``ids`` as that row
    (``position_ids=torch.arange(n)`` beside one prompt); any other value as it is."""
    if isinstance(value, torch.Tensor) and value.dim() == 1 and ids.shape[0] == 1 and \
            value.shape[0] == ids.shape[1]:
        return value.reshape(1, -1)
    return value


def _past_width(mask: Any, kwargs: dict) -> int | None:
    """How many columns of a 2-D ``mask`` precede the input's own tokens (a cache's past
    tokens): ``None`` for a mask that is not of the input's rows."""
    ids = kwargs["input_ids"]
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or \
            mask.shape[0] != ids.shape[0] or mask.shape[1] < ids.shape[1]:
        return None
    return mask.shape[1] - ids.shape[1]


def _generating(invoke: Any) -> bool:
    """Whether ``invoke`` belongs to ``lm.generate`` (whose input ids include the tokens of a
    cache passed in: transformers' ``generate`` takes the full sequence and its mask)."""
    return invoke is not None and isinstance(getattr(invoke, "tracer", None), Generator)


def _past_length(kwargs: Mapping, value: Any) -> int:
    """How many tokens a cache passed in (``cache=`` / ``past_key_values=``, as a keyword or
    in a dict input) holds already: 0 where none is passed."""
    sources = [kwargs]
    if isinstance(value, Mapping) or _is_batch_encoding(value):
        sources.append(value)
    for source in sources:
        for name in _CACHE_KEYWORDS:
            cache = source.get(name)
            length = getattr(cache, "get_seq_length", None)
            if callable(length):
                return int(length())
    return 0


def _split_past_mask(value: Any, past: int, where: str,
                     line: str) -> tuple[Any, torch.Tensor | None]:
    """A dict input whose ``attention_mask`` covers a cache's ``past`` tokens and its own
    ``input_ids`` (as transformers takes it) as the dict with the mask of its own tokens,
    and the mask's past columns (``None`` where the mask has only the input's columns)."""
    if not past or not (isinstance(value, Mapping) or _is_batch_encoding(value)):
        return value, None
    mask, ids = value.get("attention_mask"), value.get("input_ids")
    if mask is None or ids is None:
        return value, None
    mask, ids = torch.as_tensor(mask), torch.as_tensor(ids)
    if mask.dim() != 2 or ids.dim() != 2 or mask.shape[1] != past + ids.shape[1]:
        return value, None
    if mask.shape[0] != ids.shape[0]:
        raise TraceError(at_line(f"{where}: attention_mask has {mask.shape[0]} rows, "
                                 f"input_ids {ids.shape[0]}", line))
    rest = dict(value.items())
    rest["attention_mask"] = mask[:, past:]
    return rest, mask[:, :past]


def _with_past_mask(mask: torch.Tensor, past_mask: torch.Tensor | None,
                    past: int) -> torch.Tensor:
    """``mask`` (the input's own tokens) after the mask of a cache's ``past`` tokens: the
    caller's where given, else ones (every past token real, as a plain forward without a
    mask takes them)."""
    if past_mask is None:
        past_mask = torch.ones(mask.shape[0], past, dtype=mask.dtype, device=mask.device)
    return torch.cat([past_mask.to(device=mask.device, dtype=mask.dtype), mask], dim=1)


def _keyword_input(kwargs: dict) -> tuple[tuple, dict]:
    """``input_ids=...`` and the other token inputs given as keywords (``**enc``) as one
    dict input, the rest (``use_cache=False``, trace options) as keywords."""
    if "input_ids" not in kwargs:
        return (), kwargs
    moved = {k: v for k, v in kwargs.items()
             if k in _TOKEN_KEYWORDS or isinstance(v, torch.Tensor)}
    return (moved,), {k: v for k, v in kwargs.items() if k not in moved}


def _batch_sized(value: Any, rows: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows


def _brief(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return repr(value)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and \
            a.shape == b.shape and bool((a == b).all())
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001
        return a is b


def _is_int(value: Any) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point())


def _is_id_row(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dim() == 1 and not value.is_floating_point() and value.dtype != torch.bool
    return isinstance(value, (list, tuple)) and all(_is_int(v) for v in value)


def _integer(tensor: torch.Tensor) -> bool:
    return not tensor.dtype.is_floating_point and not tensor.dtype.is_complex and \
        tensor.dtype != torch.bool


def _is_batch_encoding(value: Any) -> bool:
    return type(value).__name__ == "BatchEncoding" and hasattr(value, "items")


def _as_id_tensor(ids: Any, where: str, line: str) -> torch.Tensor:
    if isinstance(ids, torch.Tensor):
        tensor = ids
    else:
        try:
            tensor = torch.as_tensor(ids)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TraceError(at_line(f"{where}: input_ids must be a rectangular tensor or list "
                                     f"of token ids ({error})", line)) from None
    if not _integer(tensor) or tensor.dim() not in (1, 2):
        raise TraceError(at_line(f"{where}: input_ids must be integers of 1 or 2 dimensions, "
                                 f"got {tensor.dtype} of shape {tuple(tensor.shape)}", line))
    return tensor.reshape(1, -1).long() if tensor.dim() == 1 else tensor.long()


def _prepare_tokenizer(tokenizer: Any) -> None:
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None):
        tokenizer.pad_token = tokenizer.eos_token
    if hasattr(tokenizer, "padding_side"):
        tokenizer.padding_side = "left"


def _tokenizer_beside(module: torch.nn.Module) -> Any:
    """The tokenizer saved beside a loaded model's weights, if its path is a local folder."""
    name = getattr(getattr(module, "config", None), "_name_or_path", None)
    if not name or not os.path.isdir(name):
        return None
    try:
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(name)
    except Exception:  # noqa: BLE001 - no tokenizer there: token ids still work
        return None


def _load_meta(path: str, tokenizer: Any, automodel: Any, kwargs: dict):
    """The model of ``path`` on the meta device (structure only) and its tokenizer."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoTokenizer

    config_kwargs = {k: kwargs[k] for k in _CONFIG_KWARGS if k in kwargs}
    config = AutoConfig.from_pretrained(path, **config_kwargs)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(path, **config_kwargs)
    build_kwargs = {k: kwargs[k] for k in _FROM_CONFIG_KWARGS if k in kwargs
                    and kwargs[k] != "auto"}
    with init_empty_weights(include_buffers=False):
        module = automodel.from_config(config, **build_kwargs)
    return module.eval(), tokenizer


def _refresh_envoys(envoy: Any, root: torch.nn.Module) -> None:
    """Point every cached envoy below ``envoy`` at the module of its path in ``root``."""
    children = envoy._children
    for name, child in list(children.items()):
        try:
            module = root.get_submodule(child._path)
        except AttributeError:
            del children[name]
            continue
        object.__setattr__(child, "_module", module)
        _refresh_envoys(child, root)


def _forget(module: torch.nn.Module) -> None:
    """Drop the engine's caches of a module that has been replaced."""
    capture.forget(module)
    runner.forget(module)
    getattr(scan, "_CACHE", {}).pop(module, None)
