"""Run: a rewritten GraphModule executed eagerly or under torch.compile, cached by structure."""

from __future__ import annotations

import warnings
import weakref
from typing import Any, Callable

import torch

from . import counters as stats
from .splice import Spliced


class Runner:
    """Executes one rewritten forward pass; compiles it on first use when asked."""

    def __init__(self, spliced: Spliced, compile_options: dict | None):
        self.spliced = spliced
        self.compile_options = compile_options
        self._fn: Callable | None = None if compile_options is not None else spliced.graph_module

    @property
    def graph_module(self) -> torch.fx.GraphModule:
        return self.spliced.graph_module

    def _function(self) -> Callable:
        if self._fn is None:
            options = dict(self.compile_options or {})
            self._fn = torch.compile(self.spliced.graph_module, **options)
            self._compiled = True
        return self._fn

    def __call__(self, flat_inputs: list[Any]) -> tuple[Any, list[Any]]:
        fn = self._function()
        try:
            outputs = fn(*flat_inputs)
        except Exception as error:  # noqa: BLE001
            if fn is self.spliced.graph_module:
                raise
            warnings.warn(f"fxsight: torch.compile failed ({type(error).__name__}: "
                          f"{str(error).splitlines()[0] if str(error) else ''}); "
                          f"running this trace eagerly", RuntimeWarning, stacklevel=3)
            stats.bump("compile_failures")
            self._fn = self.spliced.graph_module
            outputs = self._fn(*flat_inputs)
        spliced = self.spliced
        model_output = spliced.model_output.build(outputs) if spliced.model_output else None
        return model_output, [plan.build(outputs) for plan in spliced.saves]


_RUNNERS: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def cached_runner(model: torch.nn.Module, key: tuple, build: Callable[[], Runner]) -> Runner:
    """The runner for ``key`` (capture signature + Program structure), built once."""
    per_model = _RUNNERS.setdefault(model, {})
    runner = per_model.get(key)
    if runner is None:
        runner = per_model[key] = build()
    else:
        stats.bump("runner_hits")
    return runner


def forget(model: torch.nn.Module) -> None:
    _RUNNERS.pop(model, None)
