"""Token rows of a language model's invokes: the facts its checks read from the device at
once, position ids that count real tokens, left padding and the rolling of right-padded
rows."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch


class TokenFacts(NamedTuple):
    """What the checks of an invoke's tokens need to know, read from the device at once."""

    low: int | None  # the smallest token id (None: not read yet, see ``unpadded_facts``)
    high: int | None  # the largest
    binary: bool | None  # the mask holds only 0s and 1s (None: not read yet, see ``unread``)
    empty: bool | None  # a row's mask is all zeros
    trailing: bool | None  # a row has padding after its last real token
    ones: bool | None  # the mask is all ones (no row padded)
    # all of them, not read yet (:func:`unread_facts`; read with other invokes' checks)
    unread: torch.Tensor | None = None


def token_facts(ids: torch.Tensor, mask: torch.Tensor) -> tuple[TokenFacts, torch.Tensor]:
    """The facts of ``ids`` and ``mask`` in one read from the device (a GPU waits for its
    queue once, not once per check), and each row's count of trailing pads."""
    values, trailing = unread_facts(ids, mask)
    return read_facts(values.tolist()), trailing


def unread_facts(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The facts of ``ids`` and ``mask`` as one tensor, not read yet (see
    :func:`read_facts`, :func:`id_ranges`), and each row's count of trailing pads."""
    trailing = (mask.flip(-1).cumsum(-1) == 0).sum(-1)  # pads after the last real token
    return torch.stack([
        ids.min(), ids.max(), ((mask == 0) | (mask == 1)).all().long(),
        (mask.sum(-1) == 0).any().long(), (trailing > 0).any().long(),
        (mask == 1).all().long()]), trailing


def read_facts(values: tuple | list) -> TokenFacts:
    """:func:`unread_facts`' values, read, as facts."""
    low, high, binary, empty, right, ones = values
    return TokenFacts(low, high, bool(binary), bool(empty), bool(right), bool(ones))


def unpadded_facts(ids: torch.Tensor) -> TokenFacts:
    """The facts of ``ids`` under a mask of ones (one the wrapper made: its facts are known
    but the ids' range, which is left to be read with other invokes': ``id_ranges``)."""
    return TokenFacts(None, None, True, False, False, True)


def id_ranges(extremes: list[torch.Tensor]) -> list[tuple[int, ...]]:
    """Each ``torch.stack([ids.min(), ids.max()])`` of ``extremes`` as ``(low, high)`` (or
    each 1-D integer tensor as the tuple of its values: :func:`unread_facts`' too), read in
    one read per device (a GPU waits for its queue once, not once per invoke)."""
    found: dict[int, tuple[int, ...]] = {}
    devices: dict[torch.device, list[int]] = {}
    for i, values in enumerate(extremes):
        devices.setdefault(values.device, []).append(i)
    for indices in devices.values():
        values = torch.cat([extremes[i].long() for i in indices]).tolist()
        start = 0
        for i in indices:
            end = start + extremes[i].numel()
            found[i] = tuple(values[start:end])
            start = end
    return [found[i] for i in range(len(extremes))]


def row_facts(rows: list[list[int]], pad: int) -> TokenFacts:
    """The facts of rows of ids that are Python lists (none empty), left-padded with
    ``pad`` to the longest, under their mask (ones but for the pads): read from the lists,
    no tensor is made."""
    ragged = len({len(row) for row in rows}) > 1
    low = min(min(row) for row in rows)
    high = max(max(row) for row in rows)
    if ragged:  # (the pads are ids of the rows too)
        low, high = min(low, pad), max(high, pad)
    return TokenFacts(low, high, True, False, False, not ragged)


def real_positions(mask: torch.Tensor, first: int = 0, pad: int = 1,
                   trailing: bool = False) -> torch.Tensor:
    """Position ids that count real tokens only, from ``first``, and ``pad`` at the pads
    (by default transformers' ``generate`` convention: from 0, pads at 1). ``trailing``:
    the pads after a row's last real token go on counting (as a plain forward's positions
    of a right-padded row count its columns: its pads' values, and a loss over labels
    there, are then the plain forward's)."""
    positions = mask.long().cumsum(-1) - 1 + first
    counted = positions.masked_fill(mask == 0, pad)
    if not trailing:
        return counted
    after = (mask.flip(-1).cumsum(-1) == 0).flip(-1)  # the pads after the last real token
    return torch.where(after, positions + after.long().cumsum(-1), counted)


def left_pad(value: torch.Tensor, length: int, pad: Any, right: bool = False) -> torch.Tensor:
    """``value`` with ``pad`` put before its columns (after them where ``right``) up to
    ``length`` columns."""
    missing = length - value.shape[1]
    if missing == 0:
        return value
    filler = torch.full((value.shape[0], missing, *value.shape[2:]), pad, dtype=value.dtype,
                        device=value.device)
    return torch.cat([value, filler] if right else [filler, value], dim=1)


def roll_rows(value: torch.Tensor, shifts: list[int]) -> torch.Tensor:
    return torch.stack([torch.roll(row, s, dims=0) if s else row
                        for row, s in zip(value, shifts)])


def token_aligned(value: Any, kwargs: dict) -> bool:
    ids = kwargs["input_ids"]
    return isinstance(value, torch.Tensor) and value.dim() >= 2 and \
        tuple(value.shape[:2]) == tuple(ids.shape)


def unpredicted_first(labels: torch.Tensor, rows: Any) -> torch.Tensor:
    """``labels`` with the first column of ``rows`` (a bool, or a bool per row) ignored
    (-100): a causal LM's loss never predicts a row's first label, but once padding is put
    before it, the position before it (a pad) would. The other labels are as they were."""
    if isinstance(rows, bool):
        if not rows:
            return labels
        rows = torch.ones(labels.shape[0], dtype=torch.bool, device=labels.device)
    first = labels[:, :1].masked_fill(rows.reshape(-1, 1).to(labels.device), -100)
    return torch.cat([first, labels[:, 1:]], dim=1)
