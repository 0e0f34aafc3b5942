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

from ..errors import TraceError, at_line, user_line
from .call_site import entered_by_with, refuse_discarded
from .edit import seed_tracer
from .generation import Generator
from .generator_envoys import GeneratorEnvoy
from .invoke_batching import InvokeBatching
from .model_loading import (LazyLoad, _forget, _load_meta, _prepare_tokenizer,
                            apply_tokenizer_settings,
                            _refresh_envoys, _tokenizer_beside)
from .model_moves import ModelMoves
from .nnsight import CLASS_ENVOYS, NNsight, plain_run_in_with, with_invoker_args
from .nnsight_options import without_checks, without_remote
from .padding_checks import PaddingChecks
from .text_encoding import TokenEncoding
from .token_checks import TokenChecks
from .token_index import TokenIndexer, reads_under
from .token_inputs import aligned, keyword_input, with_token_keywords
from .token_positions import TokenPositions

# the token keywords beside an input of lm.generate that join it
_GENERATETOKEN_KEYWORDS = frozenset({"attention_mask", "token_type_ids"})


class LanguageModel(TokenEncoding, PaddingChecks, TokenChecks, TokenPositions, InvokeBatching,
                    ModelMoves, NNsight):
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
