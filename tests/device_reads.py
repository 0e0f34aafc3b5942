"""Counting reads of tensor values into Python that fxsight's own code makes (on a GPU each
waits for its queue to drain), for tests of per-trace cost.

fxsight hides its own work from a user's torch function and dispatch modes (a mode around a
trace sees the model's operations only), so the reads are counted below any mode: the
reading methods of ``torch.Tensor`` and the reading functions of ``torch`` are wrapped for
the duration of the ``with`` block (test instrumentation only; put back on exit)."""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch

_TENSOR_READS = ("__bool__", "item", "tolist", "__int__", "__float__", "__index__", "equal")
_TORCH_READS = ("equal", "is_nonzero")


def _fxsight_path(path: str) -> bool:
    path = path.replace("\\", "/")
    return "/fxsight/" in path or path.startswith("<fxsight")


class CountReads:
    """Every read of a tensor's values into Python that fxsight's code makes (its
    rewritten graphs' included; not the model's own), as the fxsight functions it was made
    in, innermost first, in ``reads``."""

    def __init__(self):
        self.reads: list[list[str]] = []
        self._originals: list[tuple[Any, str, Callable, bool]] = []

    def _counting(self, original: Callable) -> Callable:
        def read(*args, **kwargs):
            frame = sys._getframe(1)
            if _fxsight_path(frame.f_code.co_filename):
                names = []
                while frame is not None:
                    path = frame.f_code.co_filename.replace("\\", "/")
                    if _fxsight_path(path):
                        names.append(f"{path.rsplit('/fxsight/', 1)[-1]}:"
                                     f"{frame.f_code.co_name}")
                    frame = frame.f_back
                self.reads.append(names)
            return original(*args, **kwargs)
        return read

    def __enter__(self) -> "CountReads":
        for owner, names in ((torch.Tensor, _TENSOR_READS), (torch, _TORCH_READS)):
            for name in names:
                original = getattr(owner, name)
                self._originals.append((owner, name, original, name in vars(owner)))
                setattr(owner, name, self._counting(original))
        return self

    def __exit__(self, *exc) -> None:
        for owner, name, original, own in reversed(self._originals):
            if own:
                setattr(owner, name, original)
            else:  # (inherited: the class is left without an attribute of its own)
                delattr(owner, name)
        self._originals.clear()
