"""Progress bars for sweeps: tqdm's (``tqdm.auto``: a widget in notebooks), without the
monitor thread tqdm starts with its first bar and never stops (a sweep would leave a thread
running in the caller's process; the bars here are updated once per batch and need none)."""

from __future__ import annotations

from typing import Any

_BAR: list = []  # [the bar class], made at the first bar (tqdm is imported then)


def progress_bar(**kwargs: Any) -> Any:
    """A ``tqdm.auto.tqdm`` bar made with ``kwargs``, whose class starts no monitor thread."""
    if not _BAR:
        from tqdm.auto import tqdm

        class Bar(tqdm):  # (tqdm reads ``monitor_interval`` from the bar's class)
            monitor_interval = 0

        _BAR.append(Bar)
    return _BAR[0](**kwargs)
