"""Whether a value indexed by ``.token[...]`` holds the prompts' tokens along dimension 1:
checks made before a trace runs, from the shapes of its recorded values (a meta-tensor
walk of the Program), refusing (naming the line) a value whose dimension 1 is something
else: attention weights ``(batch, heads, query, key)``, a value split into heads, a
transposed or pooled value."""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Any

import torch

from .._torch import FAKE_TENSOR_LOGGER
from ..capture.captures import MAX_CAPTURES
from ..capture.quiet_logs import quiet_logger
from ..capture.scan import cached_scan
from ..errors import TokenIndexError, at_line
from ..record.program import Node
from ..splice.meta_walker import MetaWalker
from ..splice.rows import Rows

# the verdicts of ``check_tokens_follow``, per model (the last ``MAX_CAPTURES``): (id of the
# source, structure, rows, reads and their shapes) -> (a weak reference to the source,
# {node index: why refused, or None})
_VERDICTS: "weakref.WeakKeyDictionary[torch.nn.Module, OrderedDict]" = \
    weakref.WeakKeyDictionary()


def check_tokens_follow(tracer: Any, args: tuple, kwargs: dict, rows: dict[Any, Rows],
                        values: dict, needed: set[Node], source: Any) -> None:
    """A value indexed by ``.token`` whose dimension 1 is as long as the input's tokens
    may still hold something else there: attention weights ``(batch, heads, q, k)`` or a
    ``(batch, heads, head_dim)`` value with as many heads as tokens, a pooled
    ``(batch, hidden)``. Its shapes are walked again for an input one token longer (a
    fake-tensor scan; where that cannot run, one token shorter): a dimension 1 that
    does not follow the input's length is refused naming the line, and so is one where
    neither walk runs (the model fails on another length, the recorded lines fit this
    one alone), naming why. The verdicts are kept per (``source``: the shapes of these
    inputs, the Program's structure, its rows and reads), so a trace that repeats
    another walks nothing more. Called holding the model's lock (``fxsight.locks``)."""
    ids = kwargs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        return
    length = ids.shape[1]
    reads = [(node, line) for node, _, line in tracer._token_reads
             if _along_tokens(values.get(node), length)]
    if not reads:
        return
    key = (id(source), tracer.program.structure_key(), tuple(rows.items()),
           tuple((node.index, values[node].shape) for node, _ in reads))
    module = tracer.model._module  # (the caller holds its lock: see fxsight.locks)
    per_model = _VERDICTS.get(module)
    if per_model is None:
        per_model = _VERDICTS[module] = OrderedDict()
    known = per_model.get(key)
    if known is not None and known[0]() is source:
        per_model.move_to_end(key)
        verdicts = known[1]
    else:
        verdicts = _token_verdicts(tracer, args, kwargs, rows, needed,
                                   [node for node, _ in reads], values)
        per_model[key] = (weakref.ref(source), verdicts)
        while len(per_model) > MAX_CAPTURES:
            per_model.popitem(last=False)
    for node, line in reads:
        if verdicts[node.index] is not None:
            raise TokenIndexError(at_line(verdicts[node.index], line))


def _token_verdicts(tracer: Any, args: tuple, kwargs: dict, rows: dict[Any, Rows],
                    needed: set[Node], nodes: list[Node], values: dict) -> dict:
    """For each of ``nodes`` (values whose dimension 1 is as long as the tokens), by its
    index: ``None`` where that dimension follows the input's length, else why it is
    refused."""
    ids = kwargs["input_ids"]
    length = ids.shape[1]
    verdicts: dict[int, str | None] = {}
    failures = []
    for step in (1, -1):
        pending = [node for node in nodes if node.index not in verdicts]
        if not pending or length + step < 1:
            continue
        walker = None
        try:  # (the model may fail on another length, or the lines recorded)
            other = _tokens_changed(kwargs, ids, step)
            # (a failure is reported below, if at all: not by torch's fake-tensor logger)
            with quiet_logger(FAKE_TENSOR_LOGGER, errors_too=True):
                scanned = cached_scan(tracer.model._module, args, other,
                                      tracer._operations())
                walker = MetaWalker(tracer.program, rows, scanned)
                walker.run([node for node in tracer.program.nodes if node in needed])
        except Exception as error:  # noqa: BLE001 (refused below, naming it)
            failures.append(f"one token {'longer' if step > 0 else 'shorter'}: "
                            f"{_first_line(error)}")
        walked = walker.values if walker is not None else {}
        for node in pending:  # (those walked before a failure are known too)
            meta = walked.get(node)
            if isinstance(meta, torch.Tensor):
                follows = meta.dim() >= 2 and meta.shape[1] == length + step
                verdicts[node.index] = None if follows else _fixed(values[node], length)
    for node in nodes:
        if node.index not in verdicts:
            verdicts[node.index] = _unknown(values[node], length, failures)
    return verdicts


def check_token_reads(values: dict, reads: list[tuple[Node, int, Any]],
                      kwargs: dict) -> None:
    """``value.token[i]`` indexes dimension 1 as the prompts' token dimension, from its end
    (from its start where the rows are right-padded), as far as the prompts' padded
    length. Refused before the run, naming the line:
    a value whose dimension 1 is not as long as the input's tokens (attention weights
    ``(batch, heads, q, k)``, a transposed or pooled value), which would pick along that
    dimension wherever the index is in range; and the logits of a forward given
    ``logits_to_keep``, which hold the last positions only, indexed further back (was: an
    IndexError from inside the run, naming no line)."""
    ids = kwargs.get("input_ids")
    length = ids.shape[-1] if isinstance(ids, torch.Tensor) and ids.dim() > 0 else None
    kept = _kept_logits(kwargs, length)
    for node, extent, line in reads:
        meta = values.get(node)
        if not isinstance(meta, torch.Tensor):
            continue
        shape = tuple(meta.shape)
        if length is not None and (meta.dim() < 2 or shape[1] not in (length, kept)):
            found = f"has {shape[1]}" if meta.dim() >= 2 else "does not exist"
            raise TokenIndexError(at_line(
                f"token indexing indexes dimension 1 as the prompts' token dimension, but "
                f"this value's shape is {shape}: its dimension 1 {found}, not the input's "
                f"{length} tokens (attention weights are (batch, heads, query, key); a "
                f"transposed or pooled value has no token dimension 1). Index the dimension "
                f"meant directly (e.g. weights[:, :, -1])", line))
        if meta.dim() < 2 or shape[1] >= extent:
            continue
        raise TokenIndexError(at_line(
            f"token indexing counts positions of dimension 1 from each prompt's first "
            f"token and needs {extent} of them here, but this value's dimension 1 has only "
            f"{shape[1]} (shape {shape}; a forward given `logits_to_keep` returns the "
            f"last positions only, as lm.generate's steps are given 1: one position per "
            f"step; in lm.generate with a cache, step 0 holds the tokens after the "
            f"cache's): index it directly (e.g. [:, -1])", line))


def _along_tokens(meta: Any, length: int) -> bool:
    """Whether a value's dimension 1 is as long as the input's ``length`` tokens."""
    return isinstance(meta, torch.Tensor) and meta.dim() >= 2 and meta.shape[1] == length


def _fixed(meta: torch.Tensor, length: int) -> str:
    """Why a value whose dimension 1 does not follow the input's length is refused."""
    return (f"token indexing indexes dimension 1 as the prompts' token dimension, but this "
            f"value's shape is {tuple(meta.shape)}: its dimension 1 is as long as the "
            f"input's {length} tokens without being them (it does not grow or shrink with "
            f"the input; attention weights are (batch, heads, query, key), a value split "
            f"into heads (batch, heads, head_dim)). Index the dimension meant directly "
            f"(e.g. weights[:, :, -1])")


def _unknown(meta: torch.Tensor, length: int, failures: list[str]) -> str:
    """Why a value is refused where no walk of another length tells what its dimension 1
    is."""
    return (f"token indexing indexes dimension 1 as the prompts' token dimension, and this "
            f"value's shape is {tuple(meta.shape)}: its dimension 1 is as long as the "
            f"input's {length} tokens, but fxsight cannot tell whether it is them (or heads, "
            f"say): it tells them apart by walking the shapes again for an input one token "
            f"longer or shorter, and neither walk runs here ({'; '.join(failures)}). Index "
            f"the dimension meant directly (e.g. h[:, -1])")


def _first_line(error: Exception) -> str:
    """An error's type and the first line of its message (at most 200 characters)."""
    text = str(error).strip().splitlines()
    line = text[0] if text else ""
    line = line if len(line) <= 200 else line[:197] + "..."
    return f"{type(error).__name__}: {line}" if line else type(error).__name__


def _tokens_changed(kwargs: dict, ids: torch.Tensor, step: int) -> dict:
    """``kwargs`` with one token more (``step`` 1) or fewer (-1): every tensor of the
    input's rows and tokens (ids, a 2-D mask, also one that covers a cache's tokens first,
    positions, labels) repeats or drops its last column, ``cache_position`` goes on one
    further or one less; a decoder's own tokens are left as they are."""
    def changed(value: torch.Tensor, dim: int) -> torch.Tensor:
        if step < 0:
            return value.narrow(dim, 0, value.shape[dim] - 1)
        last = value.narrow(dim, value.shape[dim] - 1, 1)
        return torch.cat([value, last + 1 if dim == 0 else last], dim=dim)

    other = dict(kwargs)
    positions = kwargs.get("cache_position")
    if isinstance(positions, torch.Tensor) and positions.dim() == 1 and \
            positions.shape[0] == ids.shape[1]:
        other["cache_position"] = changed(positions, 0)
    for key, value in kwargs.items():
        if not isinstance(value, torch.Tensor) or value.dim() < 2 or \
                key.startswith("decoder_") or value.shape[0] != ids.shape[0]:
            continue
        if value.shape[1] == ids.shape[1] or (key == "attention_mask" and value.dim() == 2):
            other[key] = changed(value, 1)
    return other


def _kept_logits(kwargs: dict, length: int | None) -> int | None:
    """How many last positions the logits hold where the forward is given
    ``logits_to_keep`` (an int, fewer than the input's tokens), else ``None``."""
    for name in ("logits_to_keep", "num_logits_to_keep"):
        keep = kwargs.get(name)
        if isinstance(keep, int) and not isinstance(keep, bool) and keep > 0 and \
                (length is None or keep < length):
            return keep
    return None
