"""Whether a model's forward keeps a padded batch's rows from the pads: the outputs the rows
are read from are computed from the attention mask's values (see
:mod:`fxsight.capture.input_flow`), and an encoder-decoder's decoder reads the mask itself.

An encoder-decoder's logits carry the mask through its encoder's hidden states wherever
the encoder honours it; a decoder whose cross-attention drops it still reads the padded
positions of those states. So the decoder is checked apart: a forward pass on fake
tensors with the encoder's outputs given (``encoder_outputs``: of the shapes and types
the encoder's own forward pass on fake tensors makes, as ``generate``'s decoding steps run
it), whose logits must then be computed from the mask's values.
"""

from __future__ import annotations

from typing import Any

import torch

from .._torch import pytree
from ..capture import scan
from ..capture.captures import flat_inputs
from .inputs import forward_signature

# the output that is the encoder's hidden states, given to the decoder's check
_ENCODER_STATES = "encoder_last_hidden_state"


class UnknownReads(Exception):
    """The check's own forward pass cannot run, or says nothing of the mask."""


def mask_unread(module: torch.nn.Module, source: Any, args: tuple, kwargs: dict,
                mask: torch.Tensor) -> str | None:
    """Why the rows of ``module``'s forward of ``args, kwargs`` are not kept from the pads of
    ``mask`` (its ``attention_mask``), ``None`` where they are. ``source``: the capture or
    scan of that forward (its ``input_reads``). Raises :class:`UnknownReads` where a forward
    pass the check needs cannot run."""
    reads, index = source.input_reads, _index(args, kwargs, mask)
    if _encoder_decoder(module) and kwargs.get("encoder_outputs") is not None:
        # (the encoder's states given are returned as they are: the caller's, not computed
        # from the mask; the decoder's values must be)
        return reads.rows_unread(index, ignoring=(_ENCODER_STATES,))
    reason = reads.rows_unread(index)
    if reason is None and _encoder_decoder(module):
        reason = _decoder_unread(module, args, kwargs, mask)
    if reason is not None:
        return reason
    tokens, keys = _tokens(args, kwargs), mask.shape[-1]
    reason = reads.keys_unmasked(index, tokens, keys)
    if reason is None or not _encoder_decoder(module):
        return reason
    # (an encoder-decoder's decoder self-attention needs no mask: it is causal, over its
    # input right-padded, or over tokens of its own; its encoder's attentions are checked,
    # its cross-attention was above)
    within = _encoder_path(module)
    return None if within is False else reads.keys_unmasked(index, tokens, keys, within)


def places_by_mask(module: torch.nn.Module, device: Any) -> bool:
    """Whether ``module``'s forward, given token ids and an attention mask and no position
    ids, places its tokens by the mask: its rows' outputs carry the mask as token positions
    near, not only through an attention (OPT's position embedding indexed by the count of
    the mask's real tokens; an index made from hidden states, a mixture of experts' routing,
    is not), so its own positions count real tokens and put the pads where it puts them.
    Read from a forward pass on fake tensors of two tokens (``False`` where it cannot
    run)."""
    ids = torch.zeros(1, 2, dtype=torch.long, device=device)
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    try:
        reads = scan.cached_scan(module, (), kwargs).input_reads
    except Exception:  # (a forward that cannot run so: positions as without the check)
        return False
    bit = 1 << _index((), kwargs, kwargs["attention_mask"])
    return any(row and flow[3] & bit for _, row, flow in reads.outputs)


def _decoder_unread(module: torch.nn.Module, args: tuple, kwargs: dict,
                    mask: torch.Tensor) -> str | None:
    """Why an encoder-decoder's decoder does not keep its rows from the pads of the
    encoder's hidden states (its cross-attention drops ``mask``), ``None`` where it does."""
    signature = forward_signature(module)
    get_encoder = getattr(module, "get_encoder", None)
    if signature is None or "encoder_outputs" not in signature.known() or \
            not callable(get_encoder) or args:
        raise UnknownReads("its decoder cannot be run apart from its encoder (given the "
                           "encoder's outputs as encoder_outputs) to see that it reads the "
                           "mask")
    encoder = get_encoder()
    # (the encoder's outputs as generate makes them: its ids or embeddings, and the mask)
    encoded = scan.cached_scan(encoder, (), {
        key: kwargs[key] for key in ("input_ids", "inputs_embeds", "attention_mask")
        if kwargs.get(key) is not None}).output
    given = pytree.tree_map_only(torch.Tensor, lambda meta: torch.empty(
        meta.shape, dtype=meta.dtype, device=mask.device), encoded)
    decoder = {**kwargs, "encoder_outputs": given}
    reads = scan.cached_scan(module, args, decoder).input_reads
    inner = reads.rows_unread(_index(args, decoder, mask), ignoring=(_ENCODER_STATES,))
    if inner is None:
        return None
    return f"its decoder's cross-attention reads the encoder's hidden states without it, " \
           f"pads included: with those states given, {inner}"


def _index(args: tuple, kwargs: dict, mask: torch.Tensor) -> int:
    flat = flat_inputs(args, kwargs)[0]
    return next(i for i, value in enumerate(flat) if value is mask)


def _tokens(args: tuple, kwargs: dict) -> int:
    """The bits (in ``flat_inputs``) of the inputs the mask pads: the token ids or
    embeddings (given by keyword, or first)."""
    padded = [kwargs.get("input_ids"), kwargs.get("inputs_embeds"), *args[:1]]
    return sum(1 << i for i, value in enumerate(flat_inputs(args, kwargs)[0])
               if isinstance(value, torch.Tensor) and any(value is p for p in padded))


def _encoder_path(module: torch.nn.Module) -> str | bool:
    """The path of an encoder-decoder's encoder, ``False`` where it is not found."""
    get_encoder = getattr(module, "get_encoder", None)
    encoder = get_encoder() if callable(get_encoder) else None
    return next((path for path, inner in module.named_modules() if inner is encoder), False)


def _encoder_decoder(module: torch.nn.Module) -> bool:
    return bool(getattr(getattr(module, "config", None), "is_encoder_decoder", False))
