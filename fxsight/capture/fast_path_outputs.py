"""Module outputs whose fake value differs from the real one in kind, not just in data.

``nn.MultiheadAttention``'s fused fast path (eval, no gradients, ``need_weights=False``)
returns the fused native attention kernel's outputs: the real kernel gives no
weights (``None``), its fake kernel an empty tensor of shape ``(0,)``. The scan learns a
module's value from the fake run; :func:`as_plain_output` gives the value the real
forward returns, so that a write or ``.skip()`` of ``(v, None)`` is checked against what
the plain module returns (as on the fx backend, whose captured slow path returns None).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def as_plain_output(module: nn.Module | None, value: Any) -> Any:
    """``value`` (a module's output from a fake run) as the real forward returns it."""
    if isinstance(module, nn.MultiheadAttention) and isinstance(value, tuple) and \
            len(value) == 2 and isinstance(value[1], torch.Tensor) and \
            tuple(value[1].shape) == (0,):
        return (value[0], None)
    return value
