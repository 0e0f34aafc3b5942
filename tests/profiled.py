"""Running a test's code under a profile function (``sys.setprofile``) that sees Python
calls, to count them without patching any class."""

from __future__ import annotations

import sys
from typing import Any, Callable


def run_profiled(run: Callable[[], Any], profile: Callable) -> None:
    """Call ``run()`` with ``profile`` as the profile function, then put back the one
    there was."""
    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(previous)
