"""The device and dtype moves of a :class:`~fxsight.api.language_model.LanguageModel`
(``lm.to(...)``, ``lm.cuda()``, ``lm.half()``, ...): the weights are loaded first, as a move
of the meta structure would fail or be dropped by the load, and the wrapper is returned."""

from __future__ import annotations

import sys
from typing import Any, TypeVar

from .call_site import refuse_in_with

_Moved = TypeVar("_Moved", bound="ModelMoves")  # (the wrapper, returned)


class ModelMoves:
    """The device and dtype moves of a ``LanguageModel`` (a mixin: it needs ``_module`` and
    ``dispatch_model()``)."""

    def to(self: _Moved, *args, **kwargs) -> _Moved:
        """Move the model (loading its weights first if needed); returns the wrapper."""
        refuse_in_with(sys._getframe(1), "model.to(...)",
                       "the wrapper, after moving the model", "call it on a line of its own")
        self.dispatch_model()
        self._module.to(*args, **kwargs)
        return self

    def _converted(self: _Moved, method: str, *args: Any) -> _Moved:
        """``module.<method>(*args)`` of torch's device and dtype moves, the weights loaded
        first (on the meta structure the move would fail or be dropped by the load);
        returns the wrapper, as :meth:`to` does."""
        refuse_in_with(sys._getframe(2), f"model.{method}(...)",
                       "the wrapper, after moving the model", "call it on a line of its own")
        self.dispatch_model()
        getattr(self._module, method)(*args)
        return self

    def cpu(self: _Moved) -> _Moved:
        """Move the model to the CPU (loading its weights first if needed)."""
        return self._converted("cpu")

    def cuda(self: _Moved, device: Any = None) -> _Moved:
        """Move the model to a GPU (loading its weights first if needed)."""
        return self._converted("cuda", device)

    def half(self: _Moved) -> _Moved:
        """Cast the model's floating-point tensors to float16 (weights loaded first)."""
        return self._converted("half")

    def float(self: _Moved) -> _Moved:
        """Cast the model's floating-point tensors to float32 (weights loaded first)."""
        return self._converted("float")

    def double(self: _Moved) -> _Moved:
        """Cast the model's floating-point tensors to float64 (weights loaded first)."""
        return self._converted("double")

    def bfloat16(self: _Moved) -> _Moved:
        """Cast the model's floating-point tensors to bfloat16 (weights loaded first)."""
        return self._converted("bfloat16")
