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
does), so each row computes what it computes alone. An input given with its own
``attention_mask`` keeps its layout in a trace (a right-padded row stays right-padded, its
positions counted from the mask, so ``logits[i, lengths[i] - 1]`` is row ``i``'s last
token, and its pads' positions going on as the plain forward's do); shorter invokes get
left pads before it. In ``generate`` a right-padded mask is
re-packed to the left (its rows rolled so that the last real token is last). An
encoder-decoder's input is right-padded instead, and keeps a mask's padding: its encoder
may place tokens by index (BART's learned positions take no ``position_ids``).

Token indexing: ``proxy.token[i]`` / ``proxy.t[i]`` index dimension 1 counting from each
prompt's first real token. Because the batch pads on the left, a prompt's tokens are always
the same positions counted from the end (before its own right pads, if any), whatever the
other invokes pad to, so indices are taken from the end and do not depend on later
invokes. When the rows of one invoke (a list of
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
import sys
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from ..errors import InputError, TraceError, at_line, user_line
from ..locks import model_lock
from .edit import seed_tracer
from .generation import Generator, GeneratorEnvoy
from .inputs import check_keywords, describe, earlier_invokes, forward_signature
from .mask_reads import places_by_mask
from .model_loading import (LazyLoad, _forget, _load_meta, _prepare_tokenizer,
                            apply_tokenizer_settings,
                            _refresh_envoys, _tokenizer_beside)
from .nnsight import CLASS_ENVOYS, NNsight, plain_run_in_with, with_invoker_args
from .nnsight_options import without_checks, without_remote
from .padding_checks import PaddingChecks
from .cache_layout import check_cache_columns
from .call_site import entered_by_with, refuse_discarded, refuse_in_with
from .counted_caches import counted, remember_in
from .decoder_padding import decoder_padded, with_decoder_mask
from .text_encoding import TOKENIZER_KEYWORDS, TokenEncoding
from .token_index import TokenIndexer, reads_under
from .token_inputs import (CACHE_KEYWORDS, DECODER_PADS, TOKEN_KEYWORDS, aligned, as_row,
                           batch_sized, check_batchable, check_positions, keyword_input,
                           past_cache, past_length, past_width, split_past_mask,
                           with_past_mask, with_token_keywords)
from .token_rows import (TokenFacts, id_ranges, left_pad, read_facts, real_positions,
                         unpredicted_first)

_UNKNOWN = object()  # (an argument not given)
# keys of a dict input that are not forwarded as they come but re-laid out with the rows
_PAD_VALUES = {"attention_mask": 0, "labels": -100, "position_ids": 1}
# the token keywords beside an input of lm.generate that join it
_GENERATETOKEN_KEYWORDS = frozenset({"attention_mask", "token_type_ids"})


class LanguageModel(TokenEncoding, PaddingChecks, NNsight):
    """A transformers language model wrapped for tracing, with text inputs.

    ``LanguageModel(path_or_module, tokenizer=None, automodel=AutoModelForCausalLM,
    dispatch=False, tokenizer_kwargs=None, **kwargs)``: ``kwargs`` go to
    ``automodel.from_pretrained`` (``device_map``, ``dtype``, ...), except ``backend`` and
    ``compile`` (defaults of every trace). ``tokenizer_kwargs`` (nnsight's) go to
    ``AutoTokenizer.from_pretrained`` where the tokenizer is loaded from the path, and
    those that are the tokenizer's attributes (``padding_side``, ...) are set on it, after
    fxsight's own defaults, whichever way it came.
    """

    _token_indexing = True

    def __init__(self, model_or_path: Any, tokenizer: Any = None,
                 automodel: Any = AutoModelForCausalLM, dispatch: bool = False, *,
                 backend: str = "auto", compile: Any = None,
                 rename: dict | None = None, envoys: Any = CLASS_ENVOYS,
                 tokenizer_kwargs: dict | None = None, **kwargs: Any):
        given_tokenizer = tokenizer
        tokenizer_kwargs = dict(tokenizer_kwargs or {})
        if isinstance(model_or_path, torch.nn.Module):
            module, path = model_or_path, None
            if kwargs:  # (they are loading options: a module is loaded already)
                raise TypeError(
                    f"LanguageModel(module, ...): {', '.join(map(repr, kwargs))} "
                    f"{'applies' if len(kwargs) == 1 else 'apply'} to loading a path; "
                    f"a module given is used as it is (convert it yourself: "
                    f"module.to(dtype), module.to(device))")
            if tokenizer is None:
                tokenizer = _tokenizer_beside(module)
        elif isinstance(model_or_path, (str, os.PathLike)):
            path = os.fspath(model_or_path)
            module, tokenizer = _load_meta(path, tokenizer, automodel, kwargs,
                                           tokenizer_kwargs)
        else:
            raise TypeError("LanguageModel wraps a torch.nn.Module or loads a local path, "
                            f"not {type(model_or_path).__name__}")
        super().__init__(module, backend=backend, compile=compile, rename=rename,
                         envoys=envoys)
        if tokenizer is not None and given_tokenizer is None:
            _prepare_tokenizer(tokenizer)  # (fxsight's own; a user's tokenizer stays as it is)
        if tokenizer_kwargs:
            apply_tokenizer_settings(tokenizer, tokenizer_kwargs,
                                     loaded=path is not None and given_tokenizer is None)
        object.__setattr__(self, "tokenizer", tokenizer)
        object.__setattr__(self, "automodel", automodel)
        object.__setattr__(self, "_load_path", path)
        object.__setattr__(self, "_load_kwargs", dict(kwargs))
        # (shared with edited copies of this wrapper: the weights are loaded once)
        object.__setattr__(self, "_lazy_load", None if path is None or dispatch else
                           LazyLoad(path, automodel, kwargs, module))
        object.__setattr__(self, "_dispatched", path is None)
        object.__setattr__(self, "_forward_params", None)
        object.__setattr__(self, "_mask_positions", None)  # (places_by_mask, once)
        if dispatch:
            self.dispatch_model()

    # --- loading ---------------------------------------------------------------------------
    @property
    def dispatched(self) -> bool:
        """Whether the real weights are loaded (``False`` while the model is on meta)."""
        return self._dispatched

    def dispatch_model(self) -> None:
        """Load the real weights now (``automodel.from_pretrained(path, **kwargs)``), or
        take them from the wrapper this one was copied from (``model.edit()``) or to, if
        that one loaded them already."""
        if self._dispatched:
            return
        old = self._module
        lazy = self._lazy_load
        if lazy is not None:
            new = lazy.load()
        else:
            new = self.automodel.from_pretrained(self._load_path, **self._load_kwargs)
            new.eval()
        object.__setattr__(self, "_module", new)
        object.__setattr__(self, "_dispatched", True)
        object.__setattr__(self, "_forward_params", None)
        object.__setattr__(self, "_mask_positions", None)
        _refresh_envoys(self, new)
        _forget(old)

    def dispatch(self) -> None:
        """nnsight's name (≥ 0.5) of :meth:`dispatch_model`: load the real weights now (a
        model already loaded stays as it is, also inside an open trace, which loaded
        them)."""
        self.dispatch_model()

    def _before_run(self) -> None:
        self.dispatch_model()

    def trace(self, *inputs: Any, **kwargs: Any):
        """``with lm.trace(prompt, **forward_kwargs) as tracer:``; or ``lm.trace()`` and
        ``tracer.invoke(prompt)`` several times. The input may be given as keywords too
        (``input_ids=``, ``attention_mask=``, other tensors: ``**tokenizer(...)``). Loads
        the weights first if they are not loaded yet (so that modules applied inside the
        block, e.g. a logit lens, are the real ones)."""
        if not kwargs.get("trace", True):
            plain_run_in_with("trace", sys._getframe(1))  # (before the weights load)
        kwargs = with_invoker_args(kwargs)
        if not inputs:
            inputs, kwargs = keyword_input(kwargs)
        if kwargs.get("trace", True):
            refuse_discarded(sys._getframe(1), "model.trace(...)")  # (before the weights load)
        self.dispatch_model()
        return super().trace(*inputs, **kwargs)

    def generate(self, *inputs: Any, trace: bool | None = None, backend: str | None = None,
                 compile: Any = None, **kwargs: Any):
        """``with lm.generate(prompt, max_new_tokens=n) as tracer:``: interventions across
        decoding steps (``tracer.iter[...]``, ``tracer.all()``); ``kwargs`` go to
        transformers' ``generate`` (the input may be given as keywords, as in ``trace``).
        ``lm.generator.output`` is the generated ids. With ``trace=False``, generates at
        once and returns what ``generate`` returns (with the model's edits, if any), as a
        call that no ``with`` statement enters does (``ids = lm.generate(prompt, ...)``).

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
        if trace is None:  # (nnsight: called without a `with`, it generates at once)
            trace = entered_by_with(sys._getframe(1))
        elif not trace:
            plain_run_in_with("generate", sys._getframe(1))
        # (nnsight's options of where and how it runs; transformers' generate fails on them)
        kwargs = without_checks(self._module, without_remote(self._module, kwargs,
                                                             "lm.generate(...)"))
        if "invoker_args" in kwargs:  # (generate's keywords share names with them)
            raise TraceError(at_line(
                "lm.generate(..., invoker_args=...): keywords for the prompt's tokenization "
                "would meet generate's own (max_length=); give the prompt tokenized: "
                "lm.generate(lm.tokenizer(text, truncation=True, max_length=n, "
                "return_tensors='pt'), ...)", user_line()))
        if not inputs:  # lm.generate(**tokenizer(...), max_new_tokens=n)
            inputs, kwargs = keyword_input(kwargs)
            if not inputs and "inputs_embeds" in kwargs:
                raise TraceError(at_line(
                    "lm.generate(inputs_embeds=...): a language model's inputs are tokens "
                    "(a string, a list of strings, token ids); give the prompt's ids, or "
                    "call the model's own generate for embeddings", user_line()))
        elif len(inputs) == 1:  # lm.generate(ids, attention_mask=mask, max_new_tokens=n)
            value = inputs[0]
            if kwargs.pop("is_split_into_words", False):  # (the tokenizer's keyword)
                value = self._split_words(value, "lm.generate(...)", user_line())
            # (the mask and token types; position_ids and labels go to generate as given)
            value, kwargs = with_token_keywords(value, kwargs, "lm.generate(...)",
                                                 user_line(), _GENERATETOKEN_KEYWORDS)
            inputs = (value,)
        self.dispatch_model()
        tracer = Generator(self, inputs, kwargs,
                           self._run_options(backend, compile, prune=False))
        if self._edits:  # (as nnsight: an edit applies like a line outside tracer.iter)
            seed_tracer(tracer, self._edits)
        if not trace:
            with tracer:
                pass
            return tracer.result
        return tracer

    @property
    def generator(self):
        """``lm.generator.output``: the generated token ids, inside ``lm.generate(...)``."""
        return GeneratorEnvoy(self)

    def to(self, *args, **kwargs) -> "LanguageModel":
        """Move the model (loading its weights first if needed); returns the wrapper."""
        refuse_in_with(sys._getframe(1), "model.to(...)",
                       "the wrapper, after moving the model", "call it on a line of its own")
        self.dispatch_model()
        self._module.to(*args, **kwargs)
        return self

    def _converted(self, method: str, *args: Any) -> "LanguageModel":
        """``module.<method>(*args)`` of torch's device and dtype moves, the weights loaded
        first (on the meta structure the move would fail or be dropped by the load);
        returns the wrapper, as :meth:`to` does."""
        refuse_in_with(sys._getframe(2), f"model.{method}(...)",
                       "the wrapper, after moving the model", "call it on a line of its own")
        self.dispatch_model()
        getattr(self._module, method)(*args)
        return self

    def cpu(self) -> "LanguageModel":
        """Move the model to the CPU (loading its weights first if needed)."""
        return self._converted("cpu")

    def cuda(self, device: Any = None) -> "LanguageModel":
        """Move the model to a GPU (loading its weights first if needed)."""
        return self._converted("cuda", device)

    def half(self) -> "LanguageModel":
        """Cast the model's floating-point tensors to float16 (weights loaded first)."""
        return self._converted("half")

    def float(self) -> "LanguageModel":
        """Cast the model's floating-point tensors to float32 (weights loaded first)."""
        return self._converted("float")

    def double(self) -> "LanguageModel":
        """Cast the model's floating-point tensors to float64 (weights loaded first)."""
        return self._converted("double")

    def bfloat16(self) -> "LanguageModel":
        """Cast the model's floating-point tensors to bfloat16 (weights loaded first)."""
        return self._converted("bfloat16")

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
        return aligned(key, value, kwargs, self._encoder_decoder())

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
                pad = self._pad_id() if key == "input_ids" else _PAD_VALUES.get(key, 0)
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
        if any(_model_positions(known, invokes)):
            _check_model_positions(known, invokes, length, self._places_by_mask())
            batched.pop("position_ids", None)  # (the plain call's: the model's own)
        else:
            batched = self._with_positions(batched, [(kw, length) for kw in invokes],
                                           padded=False if unpadded else
                                           _known_padding(known, invokes, length),
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
        trailing = (first, pad) == (0, _PAD_VALUES["position_ids"])
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

    def _input_embeddings(self) -> Any:
        """The model's ``get_input_embeddings()``, or ``None`` where it has none."""
        try:
            return self._module.get_input_embeddings()
        except (AttributeError, NotImplementedError):
            return None

    def _position_embedding(self, embeddings: Any = _UNKNOWN) -> torch.nn.Embedding | None:
        """The model's learned position embedding (an ``nn.Embedding`` of
        ``max_position_embeddings`` rows, and its ``offset`` where it has one (OPT's), besides
        the input ``embeddings``, found where not given), or ``None``."""
        config = getattr(self._module, "config", None)
        limit = getattr(config, "n_positions", None) or \
            getattr(config, "max_position_embeddings", None)
        if not isinstance(limit, int):
            return None
        if embeddings is _UNKNOWN:
            embeddings = self._input_embeddings()
        return next((m for m in self._all_modules() if isinstance(m, torch.nn.Embedding)
                     and m is not embeddings and m.num_embeddings == limit + _offset(m)), None)

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
        return 0, _PAD_VALUES["position_ids"]

    def _check_ids(self, ids: torch.Tensor, facts: "TokenFacts", where: str,
                   line: str, past: int = 0, invoke: Any = None,
                   mask: torch.Tensor | None = None) -> None:
        """Raise where a token id is outside the vocabulary, or the input (after a cache's
        ``past`` tokens) goes beyond a learned position embedding. Ids whose range is not
        known yet (``facts.low`` None) are checked with the trace's other invokes' before
        the run (``_check_invokes``: one device read), or now where ``invoke`` has no
        tracer; so are those of ``mask``, the mask given, where unread (``facts.unread``)."""
        embeddings = self._input_embeddings()
        if facts.unread is not None:  # (with the mask's facts: ``_check_invokes``)
            invoke.unchecked = (facts.unread, where, line, mask)
        elif facts.low is None:
            extremes = torch.stack([ids.min(), ids.max()])
            if getattr(invoke, "tracer", None) is None:
                (low, high), = id_ranges([extremes])
                self._check_range(low, high, where, line, embeddings)
            else:
                invoke.unchecked = (extremes, where, line, None)
        else:
            self._check_range(facts.low, facts.high, where, line, embeddings)
        positions = self._position_embedding(embeddings)
        # a learned position embedding of `limit` rows, from the first position the model
        # counts from (rotary ones have no limit)
        limit = None if positions is None else positions.num_embeddings - \
            _offset(positions) - self._position_layout(positions)[0]
        if limit is not None and past + ids.shape[1] > limit:
            length = f"the input is {ids.shape[1]} tokens long" if not past else \
                f"the cache's {past} tokens and the input's {ids.shape[1]} are " \
                f"{past + ids.shape[1]} tokens"
            raise TraceError(at_line(f"{where}: {length}, longer than the model's {limit} "
                                     f"positions", line))

    def _check_range(self, low: int, high: int, where: str, line: str,
                     embeddings: Any = _UNKNOWN) -> None:
        """Raise where ``low``..``high`` (an input's token ids) leaves the vocabulary (the
        rows of the input ``embeddings``, found where not given)."""
        if embeddings is _UNKNOWN:
            embeddings = self._input_embeddings()
        size = getattr(embeddings, "num_embeddings", None)
        if low < 0 or (size is not None and high >= size):
            bad = low if low < 0 else high
            raise TraceError(at_line(f"{where}: token id {bad} is outside the model's "
                                     f"vocabulary of {size} tokens", line))

    def _check_invokes(self, invokes: list) -> None:
        """The range checks of the invokes' token ids left by their preparation, in one
        device read for all (in invoke order: the first that fails raises)."""
        unchecked = [invoke for invoke in invokes if invoke.unchecked is not None]
        if not unchecked:
            return
        ranges = id_ranges([invoke.unchecked[0] for invoke in unchecked])
        embeddings = self._input_embeddings()
        for invoke, values in zip(unchecked, ranges):
            _, where, line, mask = invoke.unchecked
            if mask is not None:  # (a mask given: its facts too, as its preparation's)
                facts = read_facts(values)
                self._check_mask(facts, mask, where, line)
                invoke.padded = not facts.ones
            self._check_range(values[0], values[1], where, line, embeddings)
        for invoke in unchecked:
            invoke.unchecked = None

    def _to_device(self, kwargs: dict) -> dict:
        device = self._device()
        if device.type == "meta":
            return kwargs
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v
                for k, v in kwargs.items()}

    # --- token indexing -----------------------------------------------------------------
    def _token_indexer(self, tracer, proxy) -> "TokenIndexer":
        # (an encoder's values are right-padded, counted from the start; so is a decoder's
        # made from the input shifted; a decoder's ids given to each invoke are not
        # padded: every row has all of them)
        if self._pads_right() and not self._encoder_decoder():
            return TokenIndexer(tracer, proxy, from_start=True)  # (an encoder's: all of it)
        encoder = self._encoder_path() if self._pads_right() else None
        if encoder is None:
            return TokenIndexer(tracer, proxy)
        if reads_under(proxy._node, encoder):
            return TokenIndexer(tracer, proxy, from_start=True)
        if isinstance(tracer, Generator):  # (a decoding step's: counted from the end)
            return TokenIndexer(tracer, proxy)
        lengths = _decoder_lengths(tracer, proxy._node.invoke)
        return TokenIndexer(tracer, proxy, from_start=lengths is None,
                            decoder_lengths=lengths)

    def _encoder_path(self) -> str | None:
        """The dotted path of an encoder-decoder's encoder (``get_encoder()``), or
        ``None`` where it has none found."""
        try:
            encoder = self._module.get_encoder()
        except (AttributeError, NotImplementedError, TypeError):
            return None
        return next((name for name, module in self._module.named_modules()
                     if module is encoder and name), None)


# --- helpers ---------------------------------------------------------------------------------
def _decoder_lengths(tracer: Any, invoke: int | None) -> list[int] | None:
    """For each row of ``invoke`` (of the whole batch where ``None``), the length of the
    decoder's tokens its invoke gave (``decoder_input_ids``, ``decoder_inputs_embeds``, or
    ``labels`` they are made from; a trace right-pads the shorter); ``None`` where they
    give none (the decoder's ids are then the input's, shifted)."""
    invokes = tracer.invokes if invoke is None else [tracer.invokes[invoke]]
    lengths: list[int] = []
    for inv in invokes:
        kwargs = inv.prepared[1]
        value = next((kwargs[name] for name in ("decoder_input_ids", "decoder_inputs_embeds",
                                                "labels")
                      if isinstance(kwargs.get(name), torch.Tensor) and
                      kwargs[name].dim() >= 2), None)
        if value is None:
            return None
        lengths.extend([value.shape[1]] * inv.prepared[2])
    return lengths


def _known_padding(invokes: list | None, prepared: list[dict], length: int) -> bool | None:
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


def _model_positions(invokes: list | None, prepared: list[dict]) -> list[bool]:
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


def _check_model_positions(invokes: list | None, prepared: list[dict], length: int,
                           by_mask: bool) -> None:
    """Raise before the run where an input continuing a cache of padded rows without
    position ids (its positions the model's own) shares the batch with an input whose
    position ids the batch passes, or is padded to the batch's ``length``: its tokens'
    positions, which the model counts by columns, would move (``by_mask``: the model
    counts the mask's real tokens itself, which pads do not move; the batch passes only
    a caller's position ids)."""
    own = _model_positions(invokes, prepared)
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


def _offset(positions: Any) -> int:
    """The ``offset`` a learned position embedding adds to the positions it is given
    (OPT's: 2), 0 where it has none."""
    offset = getattr(positions, "offset", 0)
    return offset if isinstance(offset, int) and not isinstance(offset, bool) else 0


def _generating(invoke: Any) -> bool:
    """Whether ``invoke`` belongs to ``lm.generate`` (whose input ids include the tokens of a
    cache passed in: transformers' ``generate`` takes the full sequence and its mask)."""
    return invoke is not None and isinstance(getattr(invoke, "tracer", None), Generator)
