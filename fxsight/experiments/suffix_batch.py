"""One packed batch of the suffix path: the cells' suffixes packed into rows
(:class:`Packing`, :func:`pack`), the corrupted run's prefix cache expanded to them
(:func:`cache_for`), the trace of one (site, layer)'s cells (:func:`run_layer`) and the
self-check that a packed run reproduces the model's own logits (:func:`reproduces`). See
:mod:`.suffix`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..api.envoy import Envoy
from .sweeps import Target, forward_parameters, hidden, logits_of, with_hidden

# a cell of a (site, layer): the position patched, and the columns of the site's value
# patched there (``None``: all of them; a slice: one head's)
Unit = tuple[int, "slice | None"]
ATOL = 1e-4  # the self-check's tolerance, relative to the logits' scale


@dataclass
class Packing:
    """Cells of one prompt packed into rows: ``ids``/``position_ids``/``source`` (R, C): the
    token, its position in the prompt; ``mask`` (R, 1, C, T + C) additive; ``segments``:
    per cell, (row, start) of its segment; ``starts``/``ends``: the (row, column) of each
    cell's first token (its patched position) and of its last one, in cell order."""

    ids: torch.Tensor
    position_ids: torch.Tensor
    mask: torch.Tensor
    segments: list[tuple[int, int]]
    starts: tuple[torch.Tensor, torch.Tensor]
    ends: tuple[torch.Tensor, torch.Tensor]

    @property
    def rows(self) -> int:
        return self.ids.shape[0]

    def to(self, device: torch.device) -> "Packing":
        """The packing with its tensors on ``device`` (the model's: its inputs and the
        indices into its values)."""
        def moved(pair: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            return pair[0].to(device), pair[1].to(device)
        return Packing(self.ids.to(device), self.position_ids.to(device),
                       self.mask.to(device), self.segments, moved(self.starts),
                       moved(self.ends))


def pack(ids: torch.Tensor, positions: list[int], dtype: torch.dtype) -> Packing:
    """Pack the suffixes ``ids[0, p:]`` for each ``p`` in ``positions`` (cell order kept in
    ``segments``) into rows one token longer than the longest (``T + 1`` where position 0
    is among them: with every position from ``p0`` on, the suffixes pair up to fill the
    rows exactly)."""
    ids = ids.cpu()  # (built on the CPU; see Packing.to)
    length = ids.shape[1]
    capacity = length - min(positions) + 1
    order = sorted(range(len(positions)), key=lambda i: positions[i])  # longest first
    bins: list[list[int]] = []
    used: list[int] = []
    for i in order:
        size = length - positions[i]
        for b, fill in enumerate(used):
            if fill + size <= capacity:
                bins[b].append(i)
                used[b] += size
                break
        else:
            bins.append([i])
            used.append(size)
    rows = len(bins)
    low = torch.finfo(dtype).min
    tokens = torch.zeros(rows, capacity, dtype=torch.long)
    where = torch.full((rows, capacity), length - 1, dtype=torch.long)
    mask = torch.full((rows, 1, capacity, length + capacity), low, dtype=dtype)
    causal = torch.triu(torch.full((capacity, capacity), low, dtype=dtype), 1)
    segments: list[tuple[int, int]] = [(0, 0)] * len(positions)
    for r, members in enumerate(bins):
        start = 0
        for i in members:
            p = positions[i]
            n = length - p
            span = slice(start, start + n)
            tokens[r, span] = ids[0, p:]
            where[r, span] = torch.arange(p, length)
            mask[r, 0, span, :p] = 0
            mask[r, 0, span, length + start:length + start + n] = causal[:n, :n]
            segments[i] = (r, start)
            start += n
        for j in range(start, capacity):  # padding: sees itself only
            mask[r, 0, j, length + j] = 0
    rows_of = torch.tensor([r for r, _ in segments])
    starts = (rows_of, torch.tensor([s for _, s in segments]))
    ends = (rows_of, torch.tensor([s + length - positions[i] - 1
                                   for i, (_, s) in enumerate(segments)]))
    return Packing(tokens, where, mask, segments, starts, ends)


def cache_for(layers: list, rows: int) -> Any:
    """A ``DynamicCache`` of ``rows`` rows holding the prefix (views of the one-row one)."""
    from transformers.cache_utils import DynamicCache

    return DynamicCache(ddp_cache_data=[(k.expand(rows, *k.shape[1:]),
                                         v.expand(rows, *v.shape[1:])) for k, v in layers])


# --- the self-check ----------------------------------------------------------------------
def reproduces(model: Envoy, name: str, head: Envoy, ids: torch.Tensor, layers: list,
               kwargs: dict, logits: torch.Tensor, tail: Envoy | None = None,
               local: list | None = None, corrupt: dict | None = None) -> str | None:
    """Whether a packed suffix run of the unpatched prompt gives its own last-position
    logits (and the head on its saved input gives them too): ``None``, or what differs.
    With ``tail`` (the last block's MLP), the run applies it to the segments' last tokens
    only (:func:`tail_on_ends`); with ``local`` (module outputs, each a ``Target``), each
    of those modules runs on the segments' first tokens only and takes its output in the
    unpatched run (``corrupt``, by key) elsewhere (:func:`on_tokens`)."""
    length = ids.shape[1]
    positions = [p for p in (length // 3, length - 1 - length // 3) if 0 < p < length]
    positions = sorted(set(positions)) or [0]
    packing = pack(ids, positions, logits.dtype).to(logits.device)
    keep = {"logits_to_keep": packing.ends[1]} if packing.rows == 1 and \
        "logits_to_keep" in forward_parameters(model) else {}
    try:
        with torch.no_grad(), model.trace(packing.ids, **{name: cache_for(layers, packing.rows)},
                                          attention_mask=packing.mask,
                                          position_ids=packing.position_ids, **kwargs,
                                          **keep, backend="hooks") as tracer:
            computed = [(target, on_tokens(target.envoy, packing.starts,
                                           packed_value(corrupt[target.key], packing)).save())
                        for target in local or ()]
            if tail is not None:
                tail_on_ends(tail, packing.ends)
            saved = head.input.save()
            output = model.output.save()
    except Exception as error:  # noqa: BLE001 - the model does not take it: full path
        return f"the packed suffix run failed ({type(error).__name__}: {error})"
    saved = getattr(saved, "value", saved)
    output = getattr(output, "value", output)
    got = logits_of(output)
    got = got[0] if keep else got[packing.ends]
    want = logits[0, -1].expand_as(got)
    scale = float(want.abs().max()) + 1.0
    if got.shape != want.shape or not torch.allclose(got, want, atol=ATOL * scale, rtol=0):
        return "a packed suffix run over the cache does not give the model's own logits"
    again = head._module(hidden(saved)[0] if keep else hidden(saved)[packing.ends])
    if not torch.allclose(again, want, atol=ATOL * scale, rtol=0):
        return "the head applied to its input does not give the model's logits"
    for target, value in computed:  # (each on one-token rows, against the whole run)
        got = getattr(value, "value", value)[:, 0]
        want = corrupt[target.key][0, positions]
        if got.shape != want.shape or not torch.allclose(
                got, want, atol=ATOL * (float(want.abs().max()) + 1e-6), rtol=0):
            return f"{target.envoy.path} on one-token rows does not give its own outputs"
    del tracer
    return None


# --- one batch ---------------------------------------------------------------------------
def on_tokens(module: Envoy, tokens: tuple[torch.Tensor, torch.Tensor], rest: Any,
              inputs: Any = None) -> Any:
    """(Inside a trace.) ``module`` runs on the tokens at ``tokens`` (rows, columns) only,
    as a batch of one-token rows whose values are ``inputs`` (its own input there, unless
    given): it is skipped with ``rest`` holding those outputs at those tokens. Returns
    those outputs (one-token rows)."""
    if inputs is None:
        inputs = module.input[tokens]
    outputs = module(inputs[:, None])
    module.skip(torch.index_put(rest, tokens, outputs[:, 0]))
    return outputs


def tail_on_ends(mlp: Envoy, ends: tuple[torch.Tensor, torch.Tensor]) -> None:
    """(Inside a trace.) ``mlp`` runs on the tokens at ``ends`` (rows, columns) only: it is
    skipped with its output on those tokens (as a batch of one-token rows) and zeros
    elsewhere (which nothing reads)."""
    on_tokens(mlp, ends, torch.zeros_like(mlp.input))


def packed_value(value: Any, packing: Packing, patched: torch.Tensor | None = None) -> Any:
    """A saved one-row module output gathered onto the packed tokens (its hidden state
    ``patched`` when given)."""
    state = hidden(value)
    rows = packing.rows
    new = patched if patched is not None else \
        state[0, packing.position_ids.reshape(-1)].reshape(rows, packing.ids.shape[1], -1)
    return with_hidden(value, new, rows) if not isinstance(value, torch.Tensor) else new


def run_layer(model: Envoy, name: str, head: Envoy, layers: list, packing: Packing,
              target: Target, prefix: list[Target], clean: dict, corrupt: dict,
              units: list[Unit], kwargs: dict, options: dict, tail: Envoy | None = None,
              local: list[Target] = ()):
    """One trace of the packed cells of one (site, layer), a cell per unit (its position,
    and the columns of the site patched there: ``None`` for all): returns the head's input
    at each cell's last token, in cell order, and the tracer. ``tail``: the last block's
    MLP, to run on the cells' last tokens only (it must come after ``target``). ``local``:
    module outputs after ``target`` in its block to compute at the patched tokens only
    (the first may be the module whose input ``target`` is: it is given the patched
    values there), with the corrupted run's outputs elsewhere."""
    state, clean_state = hidden(corrupt[target.key]), hidden(clean[target.key])
    rows = packing.rows
    # each cell's value at its patched token: the corrupted one with its columns clean
    patched = state[0, [p for p, _ in units]].clone()
    for i, (p, columns) in enumerate(units):
        where = slice(None) if columns is None else columns
        patched[i, where] = clean_state[0, p, where]
    replacements = [(t, packed_value(corrupt[t.key], packing)) for t in prefix]
    # the first local module is given the patched values as its input; otherwise the
    # target is replaced by the packed corrupted values with the patched ones in place
    given = bool(local) and local[0].envoy is target.envoy and target.accessor == "input"
    if not given:
        width = packing.ids.shape[1]
        packed = state[0, packing.position_ids.reshape(-1)].reshape(rows, width, -1)
        packed[packing.starts] = patched
        replacements.append((target, packed_value(corrupt[target.key], packing, packed)))
    with model.trace(packing.ids, **{name: cache_for(layers, rows)},
                     attention_mask=packing.mask, position_ids=packing.position_ids,
                     **kwargs, **options) as tracer:
        for t, value in replacements:
            t.replace(value)
        for i, t in enumerate(local):
            on_tokens(t.envoy, packing.starts, packed_value(corrupt[t.key], packing),
                      patched if i == 0 and given else None)
        if tail is not None:
            tail_on_ends(tail, packing.ends)
        saved = head.input.save()
        tracer.stop()
    saved = getattr(saved, "value", saved)
    return hidden(saved)[packing.ends], tracer
