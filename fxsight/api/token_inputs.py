"""A language model's invoke inputs before they are laid out in rows: the forms token ids
come in, the token keywords given beside an input, a cache's past tokens and their mask, and
the checks that invokes can share one batch (used by :class:`~.language_model.LanguageModel`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .._torch import pytree
from ..errors import TraceError, at_line
from .token_rows import token_aligned

# keywords that are part of the input whatever their type (a tokenizer's lists)
TOKEN_KEYWORDS = frozenset({"input_ids", "attention_mask", "token_type_ids", "position_ids",
                            "labels"})
# the keywords of a cache passed in to a forward pass
CACHE_KEYWORDS = ("cache", "past_key_values")
# an encoder-decoder's decoder tokens that a trace's batch right-pads (with their pad value)
DECODER_PADS = {"decoder_input_ids": None, "decoder_attention_mask": 0, "labels": -100}


def check_batchable(first: tuple, kwargs: dict, rows: int, index: int,
                     line: str | None, encoder_decoder: bool,
                     pad_decoder: bool = False) -> None:
    """Raise unless an invoke's prepared inputs can share a batch with invoke #0's
    (``pad_decoder``: an encoder-decoder's decoder tokens of other lengths are right-padded,
    as a trace's batch pads them)."""
    _, base, base_rows = first
    keys = [k for k in base if k != "position_ids"]
    other = [k for k in kwargs if k != "position_ids"]
    if other != keys:
        raise TraceError(at_line(
            f"invoke #{index} passes other inputs than invoke #0 ({', '.join(other)} vs "
            f"{', '.join(keys)}); the invokes of a trace run in one batch", line))
    for key in keys:
        mine, theirs = kwargs[key], base[key]
        if aligned(key, mine, kwargs, encoder_decoder) and \
                aligned(key, theirs, base, encoder_decoder):
            continue
        if key == "attention_mask" and past_width(mine, kwargs) == past_width(theirs, base):
            continue  # (masks that cover the same cache's past tokens)
        if batch_sized(mine, rows) and batch_sized(theirs, base_rows) and \
                mine.shape[1:] == theirs.shape[1:]:
            continue
        if pad_decoder and key in DECODER_PADS and batch_sized(mine, rows) and \
                batch_sized(theirs, base_rows) and mine.dim() == theirs.dim() == 2 and \
                mine.dtype == theirs.dtype:
            continue  # (right-padded to the longest by the batch)
        if not same(mine, theirs):
            what = "decoder tokens of lm.generate (its new tokens go after the last " \
                "column)" if key in DECODER_PADS and not pad_decoder else \
                "decoder tokens and encoder outputs given"
            decoder = f"; an encoder-decoder's {what} are not padded: give every invoke " \
                "as many, or run them in separate traces" \
                if encoder_decoder and (key in ("labels", "encoder_outputs") or
                                        key.startswith("decoder_")) else ""
            raise TraceError(at_line(
                f"invokes #0 and #{index} disagree on {key!r} ({brief(theirs)} vs "
                f"{brief(mine)}); the invokes of a trace run in one batch{decoder}", line))


def with_token_keywords(value: Any, kwargs: dict, where: str, line: str,
                         names: frozenset = frozenset()) -> tuple[Any, dict]:
    """An invoke's input as a dict that holds the token keywords given beside token ids or a
    dict (``lm.trace(ids, attention_mask=m, labels=l)``), and the other keywords. Text and
    ragged id lists keep theirs as keywords (their rows are laid out by ``LanguageModel``).
    ``names``: the keywords that join the input (by default every token keyword)."""
    names = names or TOKEN_KEYWORDS - {"input_ids"}
    moved = {k: v for k, v in kwargs.items() if k in names}
    if not moved:
        return value, kwargs
    if isinstance(value, Mapping) or is_batch_encoding(value):
        data = dict(value.items())
    elif isinstance(value, torch.Tensor) or rectangular_ids(value):
        data = {"input_ids": value}
    else:
        return value, kwargs
    for key in moved:
        if key in data:
            raise TraceError(at_line(f"{where}: {key!r} is given twice (in the input and "
                                     f"as a keyword)", line))
    data.update(moved)
    return data, {k: v for k, v in kwargs.items() if k not in moved}


def rectangular_ids(value: Any) -> bool:
    """Whether ``value`` is a list of token ids or of equally long rows of them."""
    if not isinstance(value, (list, tuple)) or not value:
        return False
    if all(is_int(v) for v in value):
        return True
    return all(is_id_row(v) for v in value) and len({len(v) for v in value}) == 1


def aligned(key: str, value: Any, kwargs: dict, encoder_decoder: bool) -> bool:
    """Whether input ``key`` holds a value per token of the input's rows: a tensor of their
    shape, unless it is an encoder-decoder's decoder input (``labels``, ``decoder_*``), whose
    tokens are others even where as many."""
    if encoder_decoder and (key == "labels" or key.startswith("decoder_")):
        return False
    return token_aligned(value, kwargs)


def check_positions(prepared: dict, where: str, line: str) -> None:
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


def as_row(value: Any, ids: torch.Tensor) -> Any:
    """A 1-D tensor with a value per token of a single row of ``ids`` as that row
    (``position_ids=torch.arange(n)`` beside one prompt); any other value as it is."""
    if isinstance(value, torch.Tensor) and value.dim() == 1 and ids.shape[0] == 1 and \
            value.shape[0] == ids.shape[1]:
        return value.reshape(1, -1)
    return value


def past_width(mask: Any, kwargs: dict) -> int | None:
    """How many columns of a 2-D ``mask`` precede the input's own tokens (a cache's past
    tokens): ``None`` for a mask that is not of the input's rows."""
    ids = kwargs["input_ids"]
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or \
            mask.shape[0] != ids.shape[0] or mask.shape[1] < ids.shape[1]:
        return None
    return mask.shape[1] - ids.shape[1]


def past_length(kwargs: Mapping, value: Any) -> int:
    """How many tokens a cache passed in (``cache=`` / ``past_key_values=``, as a keyword or
    in a dict input) holds already: 0 where none is passed."""
    cache = past_cache(kwargs, value)
    return 0 if cache is None else int(cache.get_seq_length())


def past_cache(kwargs: Mapping, value: Any) -> Any:
    """The cache passed in (``cache=`` / ``past_key_values=``, as a keyword or in a dict
    input ``value``), or ``None``."""
    sources = [kwargs]
    if isinstance(value, Mapping) or is_batch_encoding(value):
        sources.append(value)
    for source in sources:
        for name in CACHE_KEYWORDS:
            cache = source.get(name)
            if callable(getattr(cache, "get_seq_length", None)):
                return cache
    return None


def split_past_mask(value: Any, past: int, where: str,
                     line: str) -> tuple[Any, torch.Tensor | None]:
    """A dict input whose ``attention_mask`` covers a cache's ``past`` tokens and its own
    ``input_ids`` (as transformers takes it) as the dict with the mask of its own tokens,
    and the mask's past columns (``None`` where the mask has only the input's columns)."""
    if not past or not (isinstance(value, Mapping) or is_batch_encoding(value)):
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


def with_past_mask(mask: torch.Tensor, past_mask: torch.Tensor | None,
                    past: int) -> torch.Tensor:
    """``mask`` (the input's own tokens) after the mask of a cache's ``past`` tokens: the
    caller's where given, else ones (every past token real, as a plain forward without a
    mask takes them)."""
    if past_mask is None:
        past_mask = torch.ones(mask.shape[0], past, dtype=mask.dtype, device=mask.device)
    return torch.cat([past_mask.to(device=mask.device, dtype=mask.dtype), mask], dim=1)


def keyword_input(kwargs: dict) -> tuple[tuple, dict]:
    """``input_ids=...`` and the other token inputs given as keywords (``**enc``) as one
    dict input, the rest (``use_cache=False``, trace options) as keywords."""
    if "input_ids" not in kwargs:
        return (), kwargs
    moved = {k: v for k, v in kwargs.items()
             if k in TOKEN_KEYWORDS or isinstance(v, torch.Tensor)}
    return (moved,), {k: v for k, v in kwargs.items() if k not in moved}


def batch_sized(value: Any, rows: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows


def brief(value: Any) -> str:
    """``value`` in a message: a tensor by its shape, a structure of tensors (a model's
    output given back, ``encoder_outputs=``) by its type and their shapes."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    leaves = [leaf for leaf in pytree.tree_leaves(value) if isinstance(leaf, torch.Tensor)]
    if leaves:
        shapes = ", ".join(str(tuple(leaf.shape)) for leaf in leaves)
        return f"a {type(value).__name__} of tensors of shapes {shapes}"
    return repr(value)


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and \
            a.shape == b.shape and bool((a == b).all())
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001
        return a is b


def is_int(value: Any) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point())


def is_id_row(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dim() == 1 and not value.is_floating_point() and value.dtype != torch.bool
    return isinstance(value, (list, tuple)) and all(is_int(v) for v in value)


def integer(tensor: torch.Tensor) -> bool:
    return not tensor.dtype.is_floating_point and not tensor.dtype.is_complex and \
        tensor.dtype != torch.bool


def is_batch_encoding(value: Any) -> bool:
    return type(value).__name__ == "BatchEncoding" and hasattr(value, "items")


def as_id_tensor(ids: Any, where: str, line: str) -> torch.Tensor:
    if isinstance(ids, torch.Tensor):
        tensor = ids
    else:
        try:
            tensor = torch.as_tensor(ids)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TraceError(at_line(f"{where}: input_ids must be a rectangular tensor or list "
                                     f"of token ids ({error})", line)) from None
    if not integer(tensor) or tensor.dim() not in (1, 2):
        raise TraceError(at_line(f"{where}: input_ids must be integers of 1 or 2 dimensions, "
                                 f"got {tensor.dtype} of shape {tuple(tensor.shape)}", line))
    return tensor.reshape(1, -1).long() if tensor.dim() == 1 else tensor.long()
