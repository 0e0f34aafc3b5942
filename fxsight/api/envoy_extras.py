"""nnsight 0.8's attributes of an envoy that its module does not have: ``parent``,
``root``, ``device``, ``devices``, and on the model the deprecated ``model.iter`` (nnsight
0.8's alias of ``tracer.iter``). They are looked up only where the module has no attribute
of that name (a submodule or attribute of the model's own comes first), so they never hide
the model's names."""

from __future__ import annotations

import warnings
from typing import Any

from ..errors import NNsightDeprecationWarning
from ..record.active import current_tracer

MISSING = object()  # (no attribute of that name here)


def envoy_extra(envoy: Any, name: str) -> Any:
    """nnsight's attribute ``name`` of ``envoy`` (whose module has none), else
    :data:`MISSING`."""
    if name == "root":
        return envoy._root
    if name == "parent":
        return _parent(envoy)
    if name == "device":
        return next((p.device for p in envoy._module.parameters()), None)
    if name == "devices":
        return {p.device for p in envoy._module.parameters()}
    if name == "iter" and envoy is envoy._root and current_tracer(envoy) is not None:
        warnings.warn("model.iter is deprecated in nnsight 0.8; use tracer.iter instead",
                      NNsightDeprecationWarning, stacklevel=3)
        return envoy._tracer("iter").iter
    return MISSING


def _parent(envoy: Any) -> Any:
    """The envoy of the module whose submodule ``envoy``'s is, by the path it was reached
    by (``None`` for the model)."""
    if envoy is envoy._root:
        return None
    path = envoy._natural or envoy._path
    head, _, _ = path.rpartition(".")
    return envoy._root.get(head) if head else envoy._root

