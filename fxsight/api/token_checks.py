"""The checks of an invoke's token ids against a
:class:`~fxsight.api.language_model.LanguageModel`'s embeddings: every id inside the
vocabulary, the input no longer than a learned position embedding; ids whose range is not
known yet are checked for all the invokes of a trace in one device read before the run."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import TraceError, at_line
from .token_rows import TokenFacts, id_ranges, read_facts

_UNKNOWN = object()  # (an argument not given)


class TokenChecks:
    """The token-id checks of a ``LanguageModel`` (a mixin: it needs ``_module``,
    ``_all_modules()``, ``_position_layout()`` and ``_check_mask()``)."""

    def _input_embeddings(self) -> Any:
        """The model's ``get_input_embeddings()``, or ``None`` where it has none."""
        try:
            return self._module.get_input_embeddings()
        except (AttributeError, NotImplementedError):
            return None

    def _position_embedding(self, embeddings: Any = _UNKNOWN) -> torch.nn.Embedding | None:
        """The model's learned position embedding (an ``nn.Embedding`` of
        ``max_position_embeddings`` rows, and its ``offset`` where it has one (OPT's), besides
        the input ``embeddings``, found where not given), or ``None``."""
        config = getattr(self._module, "config", None)
        limit = getattr(config, "n_positions", None) or \
            getattr(config, "max_position_embeddings", None)
        if not isinstance(limit, int):
            return None
        if embeddings is _UNKNOWN:
            embeddings = self._input_embeddings()
        return next((m for m in self._all_modules() if isinstance(m, torch.nn.Embedding)
                     and m is not embeddings and m.num_embeddings == limit + _offset(m)), None)

    def _check_ids(self, ids: torch.Tensor, facts: "TokenFacts", where: str,
                   line: str, past: int = 0, invoke: Any = None,
                   mask: torch.Tensor | None = None) -> None:
        """Raise where a token id is outside the vocabulary, or the input (after a cache's
        ``past`` tokens) goes beyond a learned position embedding. Ids whose range is not
        known yet (``facts.low`` None) are checked with the trace's other invokes' before
        the run (``_check_invokes``: one device read), or now where ``invoke`` has no
        tracer; so are those of ``mask``, the mask given, where unread (``facts.unread``)."""
        embeddings = self._input_embeddings()
        if facts.unread is not None:  # (with the mask's facts: ``_check_invokes``)
            invoke.unchecked = (facts.unread, where, line, mask)
        elif facts.low is None:
            extremes = torch.stack([ids.min(), ids.max()])
            if getattr(invoke, "tracer", None) is None:
                (low, high), = id_ranges([extremes])
                self._check_range(low, high, where, line, embeddings)
            else:
                invoke.unchecked = (extremes, where, line, None)
        else:
            self._check_range(facts.low, facts.high, where, line, embeddings)
        positions = self._position_embedding(embeddings)
        # a learned position embedding of `limit` rows, from the first position the model
        # counts from (rotary ones have no limit)
        limit = None if positions is None else positions.num_embeddings - \
            _offset(positions) - self._position_layout(positions)[0]
        if limit is not None and past + ids.shape[1] > limit:
            length = f"the input is {ids.shape[1]} tokens long" if not past else \
                f"the cache's {past} tokens and the input's {ids.shape[1]} are " \
                f"{past + ids.shape[1]} tokens"
            raise TraceError(at_line(f"{where}: {length}, longer than the model's {limit} "
                                     f"positions", line))

    def _check_range(self, low: int, high: int, where: str, line: str,
                     embeddings: Any = _UNKNOWN) -> None:
        """Raise where ``low``..``high`` (an input's token ids) leaves the vocabulary (the
        rows of the input ``embeddings``, found where not given)."""
        if embeddings is _UNKNOWN:
            embeddings = self._input_embeddings()
        size = getattr(embeddings, "num_embeddings", None)
        if low < 0 or (size is not None and high >= size):
            bad = low if low < 0 else high
            raise TraceError(at_line(f"{where}: token id {bad} is outside the model's "
                                     f"vocabulary of {size} tokens", line))

    def _check_invokes(self, invokes: list) -> None:
        """The range checks of the invokes' token ids left by their preparation, in one
        device read for all (in invoke order: the first that fails raises)."""
        unchecked = [invoke for invoke in invokes if invoke.unchecked is not None]
        if not unchecked:
            return
        ranges = id_ranges([invoke.unchecked[0] for invoke in unchecked])
        embeddings = self._input_embeddings()
        for invoke, values in zip(unchecked, ranges):
            _, where, line, mask = invoke.unchecked
            if mask is not None:  # (a mask given: its facts too, as its preparation's)
                facts = read_facts(values)
                self._check_mask(facts, mask, where, line)
                invoke.padded = not facts.ones
            self._check_range(values[0], values[1], where, line, embeddings)
        for invoke in unchecked:
            invoke.unchecked = None


def _offset(positions: Any) -> int:
    """The ``offset`` a learned position embedding adds to the positions it is given
    (OPT's: 2), 0 where it has none."""
    offset = getattr(positions, "offset", 0)
    return offset if isinstance(offset, int) and not isinstance(offset, bool) else 0
