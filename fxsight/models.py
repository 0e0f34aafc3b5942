"""NNsight: wrap any torch module for tracing."""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree

from .envoy import Envoy
from .errors import TraceError, at_line, user_line


class NNsight(Envoy):
    """Wrap ``module`` for tracing: ``with NNsight(module).trace(x) as tracer: ...``.

    ``backend`` (``"auto"``, ``"fx"`` or ``"hooks"``) and ``compile`` set the defaults of
    every trace of this wrapper.
    """

    _token_indexing = False

    def __init__(self, module: torch.nn.Module, *, backend: str = "auto",
                 compile: Any = None):
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"NNsight wraps a torch.nn.Module, not {type(module).__name__}")
        super().__init__(module, "")
        object.__setattr__(self, "_backend", backend)
        object.__setattr__(self, "_compile", compile)
        object.__setattr__(self, "_fallback_warned", set())

    # --- entry points ----------------------------------------------------------------------
    def trace(self, *args, trace: bool = True, backend: str | None = None,
              compile: Any = None, prune: bool = True, **kwargs):
        """Open a trace over ``self(*args, **kwargs)``; with ``trace=False`` just run it."""
        if not trace:
            prepared = self._prepare_invoke(args, kwargs, None)
            self._before_run()
            return self._module(*prepared[0], **prepared[1])
        from .tracer import Tracer
        return Tracer(self, args, kwargs, backend=backend or self._backend,
                      compile=compile, prune=prune)

    def to(self, *args, **kwargs) -> "NNsight":
        """Move the wrapped module; returns the wrapper."""
        self._module.to(*args, **kwargs)
        return self

    # --- inputs (overridden by LanguageModel) ---------------------------------------------
    def _prepare_invoke(self, args: tuple, kwargs: dict, invoke: Any) -> tuple[tuple, dict, int]:
        """An invoke's inputs as the model takes them, and its number of rows."""
        size = _batch_size(args, kwargs)
        if size is None:
            raise TraceError(at_line("an invoke's inputs hold no tensor with a batch "
                                     "dimension", user_line()))
        return args, kwargs, size

    def _batch_inputs(self, prepared: list[tuple[tuple, dict, int]]) -> tuple[tuple, dict]:
        """Concatenate several invokes' inputs along the batch dimension."""
        if len(prepared) == 1:
            return prepared[0][0], prepared[0][1]
        flats = [pytree.tree_flatten((a, k)) for a, k, _ in prepared]
        spec = flats[0][1]
        for flat, other_spec in flats[1:]:
            if other_spec != spec:
                raise TraceError("invokes must pass inputs of the same structure to be "
                                 "batched together")
        leaves = []
        for column in zip(*(flat for flat, _ in flats)):
            if isinstance(column[0], torch.Tensor):
                leaves.append(torch.cat(column, dim=0))
            else:
                if any(v != column[0] for v in column[1:]):
                    raise TraceError(f"invokes disagree on a non-tensor input: {column}")
                leaves.append(column[0])
        args, kwargs = pytree.tree_unflatten(leaves, spec)
        return tuple(args), dict(kwargs)

    def _before_run(self) -> None:
        """Last preparations before the model runs (LanguageModel dispatches weights)."""

    def _device(self) -> torch.device:
        first = next(self._module.parameters(), None)
        return first.device if first is not None else torch.device("cpu")

    def _token_indexer(self, tracer, proxy):
        raise AttributeError("token indexing is available on LanguageModel")


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    for leaf in pytree.tree_leaves((args, kwargs)):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return leaf.shape[0]
    return None
