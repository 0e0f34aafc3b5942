"""Counting reads of tensor values into Python that fxsight's own code makes (on a GPU each
waits for its queue to drain), for tests of per-trace cost."""

from __future__ import annotations

import sys

import torch

_READS = {torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__int__,
          torch.Tensor.__float__, torch.Tensor.__index__, torch.equal, torch.Tensor.equal,
          torch.is_nonzero}


def _fxsight_path(path: str) -> bool:
    path = path.replace("\\", "/")
    return "/fxsight/" in path or path.startswith("<fxsight")


class CountReads(torch.overrides.TorchFunctionMode):
    """Every read of a tensor's values into Python that fxsight's code makes (its
    rewritten graphs' included; not the model's own), as the fxsight functions it was made
    in, innermost first, in ``reads``."""

    def __init__(self):
        super().__init__()
        self.reads: list[list[str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _READS and _fxsight_path(sys._getframe(1).f_code.co_filename):
            frame, names = sys._getframe(1), []
            while frame is not None:
                path = frame.f_code.co_filename.replace("\\", "/")
                if _fxsight_path(path):
                    names.append(f"{path.rsplit('/fxsight/', 1)[-1]}:{frame.f_code.co_name}")
                frame = frame.f_back
            self.reads.append(names)
        return func(*args, **(kwargs or {}))
