"""The padding checks of a :class:`~fxsight.api.language_model.LanguageModel`: a batch
whose rows are padded (prompts of different lengths, or an attention mask with zeros) is
refused before anything runs where the model would not keep the rows from the pads (it
ignores its attention mask, or reads it only as positions), and what the invokes'
preparation found about their padding spares the run a read of the mask."""

from __future__ import annotations

from typing import Any

import torch

from ..capture import scan
from ..capture.captures import flat_inputs
from ..errors import TraceError, at_line, user_line
from .generation import Generator
from .inputs import earlier_invokes, forward_signature
from .mask_reads import UnknownReads, mask_unread

# transformers model types whose forward takes an attention_mask and ignores it: a recurrent
# model that reads every token of a row in order (RWKV's forward logs "`attention_mask` was
# passed, but it is unused in this model"), so padding changes the rows it pads
_MASK_IGNORING_TYPES = frozenset({"rwkv"})


class PaddingChecks:
    """The padding checks of a ``LanguageModel`` (a mixin: it needs ``_module``,
    ``_encoder_decoder()`` and the tracer's ``_run_source``)."""

    def _takes_mask(self) -> bool:
        """Whether the model's ``forward`` can be passed an ``attention_mask``."""
        signature = forward_signature(self._module)
        return signature is None or signature.var_keyword or \
            "attention_mask" in signature.keywords

    def _mask_ignored(self) -> str | None:
        """Why the model would not honour an attention mask (so that a padded row would
        compute other values than the prompt alone), or ``None`` where it does."""
        name = type(self._module).__name__
        if not self._takes_mask():
            return f"{name}.forward takes no attention_mask"
        model_type = getattr(getattr(self._module, "config", None), "model_type", None)
        if model_type in _MASK_IGNORING_TYPES:
            return f"{name} ignores the attention_mask it is given (a recurrent model: " \
                   f"every token, padding included, changes its state)"
        return None

    def _check_padding(self, ids: torch.Tensor, padded: bool, invoke: Any, where: str,
                       line: str) -> None:
        """Raise where this invoke's rows, or the batch it joins, would be padded for a
        model that ignores the attention mask: its padded rows would be silently wrong."""
        reason = self._mask_ignored()
        if reason is None:
            return
        if padded:
            what = f"{where}: its rows are padded (prompts of different lengths, or an " \
                   f"attention_mask with zeros)"
        elif earlier_invokes(invoke):
            first = earlier_invokes(invoke)[0].prepared[1]["input_ids"].shape[1]
            if first == ids.shape[1]:
                return
            what = f"{where} is {ids.shape[1]} tokens long and invoke #0 {first}: the " \
                   f"shorter rows would be padded to share the batch"
        else:
            return
        raise TraceError(at_line(
            f"{what}, but {reason}: the padding would change the values of the rows it pads. "
            f"Run prompts of different lengths in separate traces (or invokes of equal "
            f"lengths)", line))

    def _check_batch(self, tracer: Any, args: tuple, kwargs: dict,
                     padded: bool | None = None) -> None:
        """Raise before the run where the batch's rows are padded but the model does not
        keep them from the pads: the outputs the rows are read from (its logits; an
        encoder-decoder's encoder hidden states too) are not computed from the attention
        mask's values in its captured graph (or, on the hooks backend and in ``generate``,
        in a forward pass on fake tensors): the mask is ignored, or read only as token
        positions (``mask.cumsum(-1)`` as an index, as angles or as ALiBi's bias) or only
        by a loss, or an encoder-decoder's decoder reads the encoder's hidden states
        without it (``mask_reads``), so the pads would change the rows they pad. Where
        the check's own forward pass cannot run, the batch is refused too, naming the
        failure. A model known to ignore its mask was refused as its invoke was added
        (``_check_padding``).
        ``tracer``: ``None`` for a plain run (``trace=False``) of ``kwargs``, whose
        ``padded`` says whether its rows are padded, where its preparation knew."""
        mask = kwargs.get("attention_mask")
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            return
        lengths = [invoke.prepared[1]["input_ids"].shape[1] for invoke in tracer.invokes] \
            if tracer is not None else [kwargs["input_ids"].shape[1]]
        if len(set(lengths)) == 1 and not _padded(tracer, mask, padded):
            return  # (no row is padded)
        if not any(value is mask for value in flat_inputs(args, kwargs)[0]):
            return
        name = type(self._module).__name__
        line = tracer._line if tracer is not None else user_line()
        try:
            if isinstance(tracer, Generator):  # (the first step's decoder ids, as generate's)
                kwargs = _with_first_decoder_ids(tracer, kwargs, self._encoder_decoder())
            source = tracer._run_source(args, kwargs) if tracer is not None else \
                scan.cached_scan(self._module, args, kwargs)
            reason = mask_unread(self._module, source, args, kwargs, mask)
        except TraceError:
            raise
        except Exception as error:  # noqa: BLE001 - the check's forward cannot run
            why = str(error) if isinstance(error, UnknownReads) else \
                f"a forward pass of the batch failed: {type(error).__name__}: {error}"
            raise TraceError(at_line(
                f"the batch's rows are padded, and whether {name} keeps them from the pads "
                f"cannot be told ({why}). Run prompts of different lengths in separate "
                f"traces (or invokes of equal lengths)", line)) from error
        if reason is None:
            return
        if len(set(lengths)) > 1:
            longest = max(range(len(lengths)), key=lengths.__getitem__)
            shorter = next(i for i, n in enumerate(lengths) if n < lengths[longest])
            what = f"invoke #{shorter} is {lengths[shorter]} tokens long and invoke " \
                   f"#{longest} {lengths[longest]}: the shorter rows would be padded " \
                   f"to share the batch"
        else:
            what = "the batch's rows are padded (prompts of different lengths, or an " \
                   "attention_mask with zeros)"
        raise TraceError(at_line(
            f"{what}, but {name} ignores the attention_mask it is given ({reason}): the "
            f"padding would change the values of the rows it pads. Run prompts of "
            f"different lengths in separate traces (or invokes of equal lengths)", line))

    def _known_masks(self, tracer: Any, kwargs: dict) -> tuple:
        """``((attention_mask, whether it is all ones),)`` for the batch where every
        invoke's preparation knew whether its rows are padded (invokes of other lengths
        are padded to the longest): the rewritten graph's check of it then reads nothing
        (on a GPU, no wait for its queue at each run); else none."""
        mask = kwargs.get("attention_mask")
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or not tracer.invokes:
            return ()
        known = [invoke.padded for invoke in tracer.invokes]
        if None in known:
            return ()
        lengths = {invoke.prepared[1]["attention_mask"].shape[1] for invoke in tracer.invokes}
        return ((mask, not any(known) and len(lengths) == 1),)


def _with_first_decoder_ids(tracer: Generator, kwargs: dict, encoder_decoder: bool) -> dict:
    """``kwargs`` with the decoder's ids of generate's first step, where it needs them."""
    ids = tracer._first_decoder_ids(kwargs)
    if ids is not None:
        return {**kwargs, "decoder_input_ids": ids}
    if encoder_decoder and "decoder_input_ids" not in kwargs and \
            "decoder_inputs_embeds" not in kwargs:
        raise UnknownReads("its decoder's first token is unknown: no decoder_start_token_id "
                           "or bos_token_id is given to generate or set in its configs")
    return kwargs


def _padded(tracer: Any, mask: torch.Tensor, alone: bool | None = None) -> bool:
    """Whether a row of the batch's ``mask`` has a zero, where its invokes are all as long:
    from what each invoke's preparation found on the host where every one knows (a GPU
    does not wait for its queue once per trace for it), else read from ``mask``.
    ``alone``: a plain run's (no ``tracer``) knowledge of its one input."""
    known = [invoke.padded for invoke in tracer.invokes] if tracer is not None else [alone]
    if None not in known:
        return any(known)
    return not bool(mask.all())
