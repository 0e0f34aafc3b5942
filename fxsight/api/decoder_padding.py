"""An encoder-decoder's decoder tokens given by invokes of other lengths, right-padded into
one batch: its decoder is causal, so a real token reads no pad after it and each sits at its
own position; a ``decoder_attention_mask`` marks the pads where the model takes one."""

from __future__ import annotations

from typing import Callable

import torch

from .token_inputs import DECODER_PADS
from .token_rows import left_pad


def decoder_padded(key: str, column: list[torch.Tensor], pad_id: Callable[[], int]
                   ) -> torch.Tensor:
    """The invokes' decoder tokens ``key`` (``column``), of other lengths, right-padded to
    the longest (``labels`` with -100, ``decoder_attention_mask`` with 0, the ids with
    ``pad_id()``)."""
    width = max(value.shape[1] for value in column)
    pad = DECODER_PADS[key]
    pad = pad_id() if pad is None else pad
    return torch.cat([left_pad(value, width, pad, right=True) for value in column])


def with_decoder_mask(batched: dict, invokes: list[dict], accepted: bool) -> dict:
    """``batched`` with a ``decoder_attention_mask`` over the decoder tokens the invokes
    gave (ones, zeros at the pads of the shorter), where they were padded, no invoke gave
    one and the model takes it (``accepted``)."""
    name = next((k for k in ("decoder_input_ids", "labels") if k in batched), None)
    if name is None or "decoder_attention_mask" in batched or not accepted:
        return batched
    widths = [kw[name].shape[1] for kw in invokes]
    width = batched[name].shape[1]
    if all(w == width for w in widths):
        return batched
    device = batched[name].device
    mask = torch.cat([left_pad(torch.ones(kw[name].shape[:2], dtype=torch.long,
                                          device=device), width, 0, right=True)
                      for kw in invokes])
    return {**batched, "decoder_attention_mask": mask}
