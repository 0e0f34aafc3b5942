"""Row ranges of a batch: how each invoke sees and writes its own part of a batched value."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from .._torch import as_own_work, pytree, user_modes_suspended


class Rows(NamedTuple):
    """Rows ``start:stop`` of a batch of ``total`` rows (batch dimension 0)."""

    start: int
    stop: int
    total: int

    @property
    def whole(self) -> bool:
        return self.start == 0 and self.stop == self.total

    def expanded(self, factor: int) -> "Rows":
        """These rows once every row of the batch became ``factor`` consecutive rows (as
        transformers' ``generate`` expands each prompt for beams or several sequences)."""
        return Rows(self.start * factor, self.stop * factor, self.total * factor)


def expand_rows(rows: dict[Any, Rows], batch: int) -> dict[Any, Rows] | None:
    """The invokes' ``rows`` in a batch of ``batch`` rows that repeats each of their rows
    as consecutive rows (``repeat_interleave``); ``None`` where ``batch`` is no multiple
    of their batch. Rows that are the whole batch stay as they are."""
    total = rows[None].total
    if batch == total or all(part.whole for part in rows.values()):
        return rows
    if total == 0 or batch % total:
        return None
    factor = batch // total
    return {invoke: part.expanded(factor) for invoke, part in rows.items()}


def _batched(value: Any, rows: Rows) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows.total


def narrow_rows(value: Any, start: int, stop: int, total: int) -> Any:
    """The rows ``start:stop`` of every batched tensor in ``value`` (views, not copies):
    fxsight's own work (a prompt run alone is not narrowed), which a user's mode around
    the trace does not see."""
    return as_own_work(_narrow_rows, value, start, stop, total)


def _narrow_rows(value: Any, start: int, stop: int, total: int) -> Any:
    if isinstance(value, torch.Tensor):  # the common case (a read narrows leaf by leaf)
        return value[start:stop] if value.dim() > 0 and value.shape[0] == total else value
    rows = Rows(start, stop, total)
    return pytree.tree_map(lambda t: t[start:stop] if _batched(t, rows) else t, value)


def narrow_row_groups(value: Any, start: int, stop: int, total: int) -> Any:
    """The rows ``start:stop`` of a tensor whose every row of a batch of ``total`` is a
    group of consecutive rows, as many per row as its length is a multiple of ``total``
    (``generate``'s output: a row per prompt, or several beams or sequences per prompt);
    any other value is returned as it is."""
    return as_own_work(_narrow_row_groups, value, start, stop, total)


def _narrow_row_groups(value: Any, start: int, stop: int, total: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] > 0 and \
            value.shape[0] % total == 0:
        factor = value.shape[0] // total
        return value[start * factor:stop * factor]
    return value


def splice_rows(full: Any, part: Any, start: int, stop: int, total: int) -> Any:
    """``full`` with rows ``start:stop`` replaced by ``part`` (new tensors, ``full``
    untouched): fxsight's own work, unseen by a user's mode around the trace."""
    return as_own_work(_splice_rows, full, part, start, stop, total)


def _splice_rows(full: Any, part: Any, start: int, stop: int, total: int) -> Any:
    rows = Rows(start, stop, total)

    def splice(whole, piece):
        if not _batched(whole, rows):
            return piece
        piece = torch.as_tensor(piece, dtype=whole.dtype, device=whole.device)
        piece = piece.expand(stop - start, *whole.shape[1:])
        parts = [part for part in (whole[:start], piece, whole[stop:]) if part.shape[0]]
        return _laid_out_like(torch.cat(parts, dim=0), whole)

    if isinstance(full, torch.Tensor):  # the common case (a write splices leaf by leaf)
        return splice(full, part)
    full_leaves, spec = pytree.tree_flatten(full)
    part_leaves = pytree.tree_leaves(part) if not isinstance(part, torch.Tensor) else [part]
    if len(part_leaves) != len(full_leaves):
        raise ValueError(f"expected {len(full_leaves)} values, got {len(part_leaves)}")
    return pytree.tree_unflatten([splice(w, p) for w, p in zip(full_leaves, part_leaves)], spec)


def _laid_out_like(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` (a new tensor of ``like``'s shape) in ``like``'s memory layout where that
    differs (a ``channels_last`` batch: kernels run on it as the plain forward's do, bit
    for bit); a tensor whose layout already agrees is returned as it is."""
    if value.stride() == like.stride() or not _dense(like):
        return value
    return torch.empty_like(like).copy_(value)


def _dense(value: torch.Tensor) -> bool:
    """Whether ``value``'s strides are a permutation of a dense layout (no gaps, no
    overlaps: what ``torch.empty_like`` keeps)."""
    return value.is_contiguous() or value.is_contiguous(memory_format=torch.channels_last) \
        or (value.dim() == 5 and value.is_contiguous(memory_format=torch.channels_last_3d))


def dense_copy(value: torch.Tensor) -> torch.Tensor:
    """A dense copy of a tensor the caller brought in, written as a site's value (see
    ``Walker._copy``): fxsight's own, so that the forward's in-place changes do not reach
    the caller's tensor; a user's mode around the trace does not see it."""
    with user_modes_suspended():  # (a channels_last tensor stays one: see _laid_out_like)
        layout = torch.preserve_format if _dense(value) else torch.contiguous_format
        return torch.clone(value, memory_format=layout)


def conform(value: Any, like: Any) -> Any:
    """``value`` shaped like ``like`` (broadcast where a tensor's shape differs), on its
    device (a value read on one device and written where another one was). fxsight's own
    work on a write: a user's mode around the trace does not see it."""
    return as_own_work(_conform, value, like)


def _conform(value: Any, like: Any) -> Any:

    def fit(new, old):
        if isinstance(old, torch.Tensor):  # (read on one device, written on another: moved)
            return _conform_to(new, old.shape, old.device, old.dtype)
        return new

    if isinstance(like, torch.Tensor) or not isinstance(value, (tuple, list, dict)):
        return fit(value, like)
    like_leaves, spec = pytree.tree_flatten(like)
    return pytree.tree_unflatten(
        [fit(n, o) for n, o in zip(pytree.tree_leaves(value), like_leaves)], spec)


def conform_to(value: Any, shape: tuple[int, ...], device: torch.device,
               dtype: torch.dtype) -> Any:
    """:func:`conform` to a tensor of a known ``shape``, ``device`` and ``dtype`` (the value
    it replaces is then not needed: what only computes it is pruned)."""
    return as_own_work(_conform_to, value, shape, device, dtype)


def _conform_to(value: Any, shape: tuple[int, ...], device: torch.device,
                dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        if value.device != device:
            value = value.to(device)
        return value if value.shape == shape else value.expand(shape)
    if isinstance(value, (int, float, bool)):
        return torch.full(shape, value, dtype=dtype, device=device)
    return value
