"""Torch's loggers kept quiet about what fxsight itself tries and handles (a capture that
falls back to hooks, a scan of another input length that fails): for this thread only,
while fxsight's own pass runs. Nothing process-wide is swapped: a filter is added to the
logger and removed after (even on an exception), so its level, handlers, propagation and
other filters stay as they are, and other threads log as usual."""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Iterator


class _OtherThreads(logging.Filter):
    """Lets through the records of other threads, and those at ``passed`` or above."""

    def __init__(self, passed: int):
        super().__init__()
        self.thread = threading.get_ident()
        self.passed = passed

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread != self.thread or record.levelno >= self.passed


@contextlib.contextmanager
def quiet_logger(name: str, errors_too: bool = False) -> Iterator[None]:
    """While active, the logger ``name`` drops the records this thread logs: its warnings
    and below, its errors too where ``errors_too``."""
    logger = logging.getLogger(name)
    quiet = _OtherThreads(logging.CRITICAL + 1 if errors_too else logging.ERROR)
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)
