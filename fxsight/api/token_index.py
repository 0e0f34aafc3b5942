"""``proxy.token[key]``: a language model's positions counted from each prompt's first
real token (prompts are left-padded to one length: a position is taken from the end, which
later invokes do not move; an encoder-decoder's are right-padded: from the start)."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import TokenIndexError, TraceError, at_line, user_line
from ..record.program import Kind


class TokenIndexer:
    """``proxy.token[key]``: index dimension 1 counting from each prompt's first real token
    (``proxy.token[0]`` is the first real token of every row, ``[-1]`` the last)."""

    def __init__(self, tracer, proxy, from_start: bool = False,
                 decoder_lengths: list[int] | None = None):
        self.tracer = tracer
        self.proxy = proxy
        # (the batch pads rows on the right; or the value is an encoder-decoder's
        # decoder's, of ``decoder_lengths`` tokens given per row, right-padded)
        self.from_start = from_start or decoder_lengths is not None
        self.decoder_lengths = decoder_lengths

    def __getitem__(self, key: Any):
        return self.proxy[self._key(key, user_line())]

    def __setitem__(self, key: Any, value: Any) -> None:
        self.proxy[self._key(key, user_line())] = value

    def _spans(self, line: str) -> tuple[str, list[int], list[int], list[int], bool]:
        """``(where, spans, gaps, firsts, whole)``: each row's count of positions from its
        first real token to its last, of pads after its last (an encoder-decoder's input
        keeps its right padding) and its first real token's position, for the rows the
        proxy holds."""
        tracer = self.tracer
        node = self.proxy._node
        invoke = node.invoke
        invokes = tracer.invokes if invoke is None else [tracer.invokes[invoke]]
        if not invokes:
            raise TraceError(at_line("token indexing needs an input: the trace has none yet",
                                     line))
        where = "the whole batch" if invoke is None else f"invoke #{invoke}"
        if self.decoder_lengths is not None:  # (each row its decoder's tokens first)
            rows = len(self.decoder_lengths)
            return where, list(self.decoder_lengths), [0] * rows, [0] * rows, invoke is None
        spans: list[int] = []
        gaps: list[int] = []
        firsts: list[int] = []
        for inv in invokes:
            kwargs = inv.prepared[1]
            # the mask of the input's own tokens (a mask may cover a cache's tokens first)
            mask = kwargs["attention_mask"][:, -kwargs["input_ids"].shape[1]:]
            first_real = mask.argmax(-1)  # the first 1 of each row
            after = (mask.flip(-1).cumsum(-1) == 0).sum(-1)  # pads after the last 1
            read = torch.stack([mask.shape[1] - first_real - after, after,
                                first_real]).tolist()
            spans.extend(read[0])  # (one read from the device for all three)
            gaps.extend(read[1])
            firsts.extend(read[2])
        return where, spans, gaps, firsts, invoke is None

    def _key(self, key: Any, line: str) -> Any:
        self.tracer._check_token_index(line)
        where, spans, gaps, firsts, whole = self._spans(line)
        if isinstance(key, slice):
            rows = [list(range(span))[key] for span in spans]
            if len({len(r) for r in rows}) > 1:
                raise TokenIndexError(at_line(
                    f"token slice {_show(key)} selects a different number of tokens in the "
                    f"prompts of {where} ({', '.join(str(len(r)) for r in rows)}); use an "
                    f"index each prompt has", line))
            negative = [[self._place(p, span, gap, first) for p in r]
                        for r, span, gap, first in zip(rows, spans, gaps, firsts)]
        elif isinstance(key, (list, torch.Tensor)) and not _scalar(key):
            indices = _index_list(key, line)  # (as torch's ``h[:, [0, 2]]``: in that order)
            for index in indices:
                _check_range(index, spans, where, line)
            negative = [[self._place(i % span, span, gap, first) for i in indices]
                        for span, gap, first in zip(spans, gaps, firsts)]
        else:
            try:
                index = int(key.__index__())
            except (AttributeError, TypeError):
                raise TokenIndexError(at_line(
                    f"token indexing takes an int, a slice or a list of ints (as "
                    f"`h[:, [0, 2]]` picks tokens), not {type(key).__name__}", line)) from None
            _check_range(index, spans, where, line)
            negative = [self._place(index % span, span, gap, first)
                        for span, gap, first in zip(spans, gaps, firsts)]
        self._check_uncached(key, spans, where, line)
        flat = [n for row in negative for n in (row if isinstance(row, list) else [row])]
        # (how many positions of dimension 1 the index needs: from the start where rows
        # are right-padded, else from the end)
        reach = max(flat, default=-1) + 1 if self.from_start else -min(flat, default=0)
        if self.decoder_lengths is None:  # (a decoder's: checked against its ids above)
            self.tracer._token_reads.append((self.proxy._node, reach, line))
        if whole:
            self.tracer.recorder.create_op("call_function", check_token_rows,
                                (self.proxy, len(spans)), {})
        if all(n == negative[0] for n in negative):  # every row at the same place: a view
            return (slice(None), _static_key(negative[0], self.from_start))
        count = len(spans)
        positions = torch.tensor(negative, dtype=torch.long)
        rows = torch.arange(count)
        if not isinstance(negative[0], int):  # (a slice or a list: one row of positions)
            rows = rows.reshape(count, 1)
        return (rows, positions)

    def _check_uncached(self, key: Any, spans: list[int], where: str, line: str) -> None:
        """Raise where ``key`` picks a token a cache given to ``generate`` holds: its step
        0 computes the tokens after the cache's only (with prompts of different lengths,
        a shorter row's cached token would be a pad's position of the batch)."""
        cached = self.tracer._cached_tokens()
        if not cached or self.from_start:
            return
        for row, span in enumerate(spans):
            picked = list(range(span))[key] if isinstance(key, slice) else [key % span]
            if picked and min(picked) < cached:
                shown = _show(key) if isinstance(key, slice) else key
                raise TokenIndexError(at_line(
                    f"token index {shown} picks token {min(picked)} of prompt {row} of "
                    f"{where}, one of the {cached} tokens the cache given to lm.generate "
                    f"holds: step 0 computes the tokens after the cache's only. Index "
                    f"those (.token[{cached}] on, or [:, -1])", line))

    def _place(self, offset: int, span: int, gap: int, first: int) -> int:
        """The position in the batch of a row's real token ``offset`` (from its first):
        counted from the end, where padding of the batch goes before the row, else from
        the start."""
        return first + offset if self.from_start else offset - span - gap


def _scalar(key: Any) -> bool:
    """Whether ``key`` is one index (a 0-d tensor), not a list of them."""
    return isinstance(key, torch.Tensor) and key.dim() == 0


def _index_list(key: Any, line: str) -> list[int]:
    """The ints of a list index (``[0, 2]``, a 1-D integer tensor); a list of bools (a
    mask to torch), of lists, or of anything but ints is a ``TokenIndexError``."""
    if isinstance(key, torch.Tensor):
        if key.dim() != 1 or key.dtype.is_floating_point or key.dtype == torch.bool:
            raise TokenIndexError(at_line(
                f"token indexing takes a 1-D tensor of ints, not one of shape "
                f"{tuple(key.shape)} and dtype {key.dtype}", line))
        return [int(i) for i in key.tolist()]
    try:
        if any(isinstance(i, bool) for i in key):
            raise TypeError("bools")  # (a mask to torch)
        return [int(i.__index__()) for i in key]
    except (AttributeError, TypeError, RuntimeError):
        raise TokenIndexError(at_line(
            f"token indexing with a list takes ints (positions, as `h[:, [0, 2]]`), not "
            f"{key!r}", line)) from None


def _check_range(index: int, spans: list[int], where: str, line: str) -> None:
    """Raises where position ``index`` is out of a prompt's range."""
    for r, span in enumerate(spans):
        if not -span <= index < span:
            side = "past the end" if index >= 0 else "before the start"
            raise TokenIndexError(at_line(
                f"token index {index} is {side} of prompt {r} of {where}, "
                f"which has {span} tokens", line))


def reads_under(node: Any, prefix: str) -> bool:
    """Whether recorded ``node`` is computed from a module read at or under the dotted
    path ``prefix`` (an encoder's values: its input's tokens, rather than the decoder's)."""
    seen, stack = set(), [node]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        site = getattr(current, "site", None)
        if getattr(current, "kind", None) is Kind.READ and site is not None:
            if site.path == prefix or site.path.startswith(prefix + "."):
                return True
            continue
        stack.extend(getattr(current, "all_input_nodes", ()))
    return False


def check_token_rows(value: Any, rows: int) -> None:
    """Raises where a token index recorded for ``rows`` rows meets a value with others."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] != rows:
        raise ValueError(
            f"token indexing over the whole batch was written when the batch had {rows} "
            f"rows, but it has {value.shape[0]}: put `tracer.invoke()` (no input) after "
            f"every invoke that adds prompts")


def _static_key(negative: Any, from_start: bool = False) -> Any:
    """The index of dimension 1 that picks positions ``negative`` (counted from the end,
    or from the start where ``from_start``)."""
    if isinstance(negative, int):
        return negative
    if not negative:
        return slice(0, 0)
    step = negative[1] - negative[0] if len(negative) > 1 else 1
    if step > 0 and all(b - a == step for a, b in zip(negative, negative[1:])):
        stop = negative[-1] + step
        return slice(negative[0], None if stop >= 0 and not from_start else stop, step)
    return torch.tensor(negative, dtype=torch.long)  # not a plain slice: index by a list


def _show(key: slice) -> str:
    """A slice as it is written (``1:3``, ``::2``)."""
    parts = (key.start, key.stop) if key.step is None else (key.start, key.stop, key.step)
    return ":".join("" if v is None else str(v) for v in parts)
