"""Partial capture: where ``torch.export`` fails inside a module, capture again with that
module as one opaque call (:mod:`fxsight.capture.opaque`), so that everything around it
stays in the graph."""

from __future__ import annotations

import torch

from ..errors import CaptureError
from ..stats import bump
from . import opaque as opaque_calls
from .export import Captured, capture
from .fast_paths import fast_path_modules

# modules taking a fast path made opaque in one capture, at most (one capture for all:
# a vision transformer's attention in every layer)
MAX_FAST_PATH = 256


def _capture_fast_paths(model: torch.nn.Module, args: tuple, kwargs: dict,
                        fast: dict[str, str], operations: frozenset) -> Captured:
    """:func:`capture` with the modules that may take torch's fused fast path (``fast``:
    path -> reason) as opaque calls; a :class:`CaptureError` where that cannot be done
    (a capture through their slow path would differ from the plain forward in the last
    bits: the hooks backend runs them as the plain forward does)."""
    first = next(iter(fast))
    if len(fast) > MAX_FAST_PATH:
        raise CaptureError(f"could not capture the model: {len(fast)} modules may take "
                           f"torch's fused fast path (more than {MAX_FAST_PATH} opaque calls "
                           f"in one graph): {fast[first]}", first)
    try:
        outputs = opaque_calls.record_outputs(model, args, kwargs, model)
        captured = capture(model, args, kwargs, opaque=fast, outputs=outputs,
                           operations=operations)
    except Exception as error:  # noqa: BLE001 - whatever stops it: the hooks backend runs
        raise CaptureError(f"could not capture the model with {', '.join(map(repr, fast))} "
                           f"as opaque calls ({fast[first]}): {type(error).__name__}: "
                           f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}",
                           first) from error
    bump("partial_captures")
    return captured


def capture_partly(model: torch.nn.Module, args: tuple, kwargs: dict,
                   events_on: torch.nn.Module | None = None,
                   operations: frozenset = frozenset()) -> Captured:
    """:func:`capture`; where it fails inside a module (the culprit of its
    :class:`CaptureError`, or the module whose Python state the forward changes), capture
    again with that module as one opaque call (``capture/opaque.py``), up to
    ``opaque.MAX_OPAQUE`` modules. The modules that may take a fast path
    (``fast_paths``) are opaque calls from the start. Raises the first error where an
    opaque call does not help, the last one where something outside a module (the
    output) stops the capture."""
    fast = {} if events_on is not None else fast_path_modules(model)
    reasons: dict[str, str] = {}
    if fast:  # (their eager forward, not the slow path export would trace)
        try:
            return _capture_fast_paths(model, args, kwargs, fast, operations)
        except CaptureError as failed:
            # (a module around them that export cannot capture either: an encoder's
            # data-dependent check of its mask, made opaque below, as anywhere)
            first, error = failed, failed.__cause__
            if not isinstance(error, CaptureError) or not error.module_path:
                raise
            reasons = dict(fast)
    else:
        try:
            return capture(model, args, kwargs, events_on=events_on, operations=operations)
        except CaptureError as failed:
            first = error = failed
    if _hooks_error(first) or _hooks_error(error) or events_on is not None:
        raise first  # (not for decoding steps)
    top = model if events_on is None else events_on
    outputs = None
    while True:
        path = getattr(error, "changed_module", None) if getattr(
            error, "changes_state", False) else error.module_path
        if path in reasons or \
                sum(1 for p in reasons if p not in fast) >= opaque_calls.MAX_OPAQUE:
            raise first
        if not path or _hooks_error(error) or not _is_submodule(top, path):
            if error is first:
                raise first
            # what stops the capture once the modules before are opaque
            last = CaptureError(f"{error} (with {', '.join(map(repr, reasons))} as opaque "
                                f"calls)", error.module_path)
            last.changes_state = getattr(error, "changes_state", False)
            raise last from error
        # (a module inside an opaque one does not run; an opaque one inside it neither)
        reasons = {p: r for p, r in reasons.items() if not p.startswith(path + ".")}
        reasons[path] = str(error).split(": ", 1)[-1] if ": " in str(error) else str(error)
        if outputs is None:
            try:
                outputs = opaque_calls.record_outputs(model, args, kwargs, top)
            except Exception:  # noqa: BLE001 - not even a plain forward runs: no retry
                raise first from None
        try:
            captured = capture(model, args, kwargs, events_on=events_on, opaque=reasons,
                               outputs=outputs, operations=operations)
        except CaptureError as again:
            error = again
            continue
        except Exception:  # noqa: BLE001 - the retry's own failure: the first error stands
            raise first from None
        bump("partial_captures")
        return captured


def _is_submodule(model: torch.nn.Module, path: str) -> bool:
    try:
        return model.get_submodule(path) is not model
    except AttributeError:  # (the root, which state changes call 'model')
        return False


def _hooks_error(error: CaptureError) -> bool:
    """A capture refused for the whole model (its hooks, a forward replaced by another
    package), not a failure inside a module: no partial capture can help."""
    return getattr(error, "whole_model", False)
