"""nnsight's options of a trace that say where or how nnsight runs it, not what it computes:
``remote=`` (``True``: on NDIF's servers; ``False``, its default: locally) and, before 0.5,
``scan=`` / ``validate=`` (a pass on fake tensors first; checks of the interventions).

fxsight always runs locally and always checks shapes before running, so ``remote=False``
and nnsight's ``scan=`` / ``validate=`` change nothing; ``remote=True`` cannot be honoured
and is refused before anything runs. A model whose ``forward`` names such a keyword itself
gets it, as in a plain call.
"""

from __future__ import annotations

import torch

from ..errors import TraceError, at_line, user_line
from .inputs import forward_signature

# nnsight's tracer options before 0.5 (no effect on values)
_CHECKS = ("scan", "validate")


def without_remote(module: torch.nn.Module | None, kwargs: dict, where: str) -> dict:
    """``kwargs`` without nnsight's ``remote=`` (``False``: the local run fxsight makes);
    ``remote=True`` is a ``TraceError`` at the user's line. Kept where ``module.forward``
    names a ``remote`` keyword of its own."""
    if "remote" not in kwargs or _named_by_forward(module, "remote"):
        return kwargs
    kwargs = dict(kwargs)
    remote = kwargs.pop("remote")
    if remote:
        raise TraceError(at_line(
            f"{where}: remote={remote!r} runs nnsight's trace on NDIF's servers; fxsight "
            f"runs every trace on this machine: leave it out (or pass remote=False)",
            user_line()))
    return kwargs


def without_checks(module: torch.nn.Module | None, kwargs: dict) -> dict:
    """``kwargs`` without nnsight's ``scan=`` / ``validate=`` booleans (before 0.5: a fake
    pass for shapes, and checks of the interventions, which fxsight makes in every trace);
    kept where ``module.forward`` names them."""
    found = [name for name in _CHECKS if type(kwargs.get(name)) is bool
             and not _named_by_forward(module, name)]
    if not found:
        return kwargs
    return {k: v for k, v in kwargs.items() if k not in found}


def _named_by_forward(module: torch.nn.Module | None, name: str) -> bool:
    """Whether ``module.forward`` takes a keyword ``name`` by name."""
    signature = forward_signature(module) if module is not None else None
    return signature is not None and name in signature.keywords
