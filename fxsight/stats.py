"""Counters of what the engine did: captures, splices, compilations, cache hits, fallbacks."""

from __future__ import annotations

from collections import Counter

_COUNTS: Counter = Counter()


def bump(name: str, by: int = 1) -> None:
    _COUNTS[name] += by


def stats() -> dict[str, int]:
    """A snapshot of the engine's counters (``captures``, ``splices``, ``runner_hits``,
    ``compilations``, ``direct_runs`` (compiled graphs called without dynamo, see
    ``fxsight.run.direct``), ``fallbacks``, ``walks_skipped`` (Programs validated by
    checking their indices against an alike Program's walk, see
    ``fxsight.splice.indices.Validated``), ...)."""
    keys = ("traces", "captures", "capture_failures", "splices", "runner_hits",
            "compilations", "compile_failures", "direct_runs", "fallbacks", "scans")
    return {k: _COUNTS.get(k, 0) for k in keys} | dict(_COUNTS)


def reset_stats() -> None:
    """Set every counter back to zero."""
    _COUNTS.clear()
