"""NNsight: wrap any torch module for tracing."""

from __future__ import annotations

from typing import Any

import torch
import torch.utils._pytree as pytree

from ..capture.export import flat_inputs
from ..api.envoy import Envoy
from ..errors import TraceError, at_line, user_line


_PLAIN_VALUES = frozenset({bool, int, float, str, type(None)})


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
        module, compile = _uncompiled(module, compile)
        super().__init__(module, "")
        object.__setattr__(self, "_backend", backend)
        object.__setattr__(self, "_compile", compile)
        object.__setattr__(self, "_fallback_warned", set())
        object.__setattr__(self, "_edits", [])  # Programs of model.edit(), oldest first

    # --- entry points ----------------------------------------------------------------------
    def trace(self, *args, trace: bool = True, backend: str | None = None,
              compile: Any = None, prune: bool = True, **kwargs):
        """Open a trace over ``self(*args, **kwargs)``; with ``trace=False`` just run it."""
        Tracer = _tracer_class()
        if not trace:
            if self.__dict__.get("_edits"):  # an edited model runs with its edits
                with Tracer(self, args, kwargs, backend=backend or self._backend,
                            compile=compile) as tracer:
                    from ..api.edit import seed
                    seed(tracer.program, self._edits)
                return tracer.result
            prepared = self._prepare_invoke(args, kwargs, None)
            self._before_run()
            return self._module(*prepared[0], **prepared[1])
        tracer = Tracer(self, args, kwargs, backend=backend or self._backend,
                        compile=compile, prune=prune)
        if self.__dict__.get("_edits"):
            from ..api.edit import seed
            seed(tracer.program, self._edits)
        return tracer

    def scan(self, *args, **kwargs):
        """``with model.scan(inputs):`` -- nothing runs for real: shapes and dtypes of
        every module's inputs and outputs are known inside, interventions are checked
        (shape errors raise) and saved values are bound to meta tensors."""
        from ..api.tracer import ScanTracer
        tracer = ScanTracer(self, args, kwargs)
        if self.__dict__.get("_edits"):
            from ..api.edit import seed
            seed(tracer.program, self._edits)
        return tracer

    def edit(self, *args, inplace: bool = False, **kwargs):
        """``with model.edit() as edited:`` -- the interventions recorded in the block are
        applied first in every later trace of ``edited`` (a new wrapper of the same module;
        ``model`` is unchanged), or of ``model`` itself with ``inplace=True``. Inputs are
        optional (they make shapes known inside the block and validate the edit)."""
        from ..api.edit import EditTracer
        return EditTracer(self, args, kwargs, inplace=inplace)

    def clear_edits(self) -> None:
        """Forget every edit of this wrapper (``model.edit(inplace=True)``)."""
        object.__setattr__(self, "_edits", [])

    def export(self, *args, **kwargs) -> torch.nn.Module:
        """The model with its edits as a plain ``torch.fx.GraphModule`` for these example
        inputs: it runs, saves (``torch.save``) and exports (``torch.export``) without
        fxsight, and is called like the model with inputs of the same shapes."""
        from ..api.edit import export
        return export(self, args, kwargs)

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
        if _tensors_and_same_options(prepared):
            return tuple(torch.cat(column, dim=0) for column in
                         zip(*(a for a, _, _ in prepared))), dict(prepared[0][1])
        flats = [flat_inputs(a, k) for a, k, _ in prepared]
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
        if isinstance(spec, tuple):  # flat_inputs' fast layout: (args..., kwargs values...)
            _, n_args, names = spec
            return tuple(leaves[:n_args]), dict(zip(names, leaves[n_args:]))
        args, kwargs = pytree.tree_unflatten(leaves, pytree.tree_structure(
            (prepared[0][0], prepared[0][1])))
        return tuple(args), dict(kwargs)

    def _before_run(self) -> None:
        """Last preparations before the model runs (LanguageModel dispatches weights)."""

    def _device(self) -> torch.device:
        first = next(self._module.parameters(), None)
        return first.device if first is not None else torch.device("cpu")

    def _token_indexer(self, tracer, proxy):
        raise AttributeError("token indexing is available on LanguageModel")


def _uncompiled(module: torch.nn.Module, compile: Any) -> tuple[torch.nn.Module, Any]:
    """A ``torch.compile``d module is unwrapped (and traced with ``compile=True`` unless
    told otherwise): hooks added to a compiled module are silently ignored, and fxsight
    compiles the rewritten graph itself. A compiled *submodule* cannot be unwrapped
    without changing the user's model: it is refused."""
    from torch._dynamo.eval_frame import OptimizedModule

    while isinstance(module, OptimizedModule):
        module = module._orig_mod
        compile = True if compile is None else compile
    for path, sub in module.named_modules():
        if isinstance(sub, OptimizedModule):
            raise TypeError(
                f"model.{path} is a torch.compile'd module: forward hooks added after "
                f"compilation are silently ignored and its graph cannot be captured with "
                f"module boundaries. Wrap the uncompiled model and trace with compile=True "
                f"(fxsight compiles the whole rewritten forward pass).")
    return module, compile


def _tensors_and_same_options(prepared: list[tuple[tuple, dict, int]]) -> bool:
    """Whether every invoke passes tensors positionally (as many) and the same plain
    keyword values (``use_cache=False``): the common case, batched without flattening."""
    first_args, first_kwargs, _ = prepared[0]
    for args, kwargs, _ in prepared:
        if len(args) != len(first_args):
            return False
        for value in args:
            if type(value) is not torch.Tensor:
                return False
        for value in kwargs.values():
            if type(value) not in _PLAIN_VALUES:
                return False
        if kwargs != first_kwargs:
            return False
    return True


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    if args and type(args[0]) is torch.Tensor and args[0].dim() > 0:
        return args[0].shape[0]  # the common case: a batch of inputs first
    for leaf in flat_inputs(args, kwargs)[0]:
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return leaf.shape[0]
    return None


def _tracer_class() -> type:
    """``fxsight.tracer.Tracer`` (imported on first use: the tracer imports this module)."""
    global _TRACER
    if _TRACER is None:
        from ..api.tracer import Tracer
        _TRACER = Tracer
    return _TRACER


_TRACER: type | None = None
