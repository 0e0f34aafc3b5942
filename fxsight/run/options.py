"""How a trace runs: frozen option objects, made once from what the user passed.

A :class:`RunOptions` says which backend runs the trace (``"auto"``: the fx backend, with
the hooks backend where the model cannot be captured; ``"fx"``; ``"hooks"``), whether
unneeded computation is pruned, and how the fx graph is compiled (a
:class:`CompileOptions`, or ``None`` for eager). Both are frozen and hashable: they are
part of the cache keys of rewritten graphs as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from .._torch import inductor_mode_options

BACKENDS = ("auto", "fx", "hooks")
# torch.compile options fxsight passes through; anything else is an error (as in torch)
COMPILE_KEYS = ("backend", "mode", "options", "dynamic", "fullgraph")
# modes that ask a backend for CUDA graphs (inductor's, and a custom backend's by name)
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


def _frozen(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, list):
        return tuple(_frozen(v) for v in value)
    return value


@dataclass(frozen=True)
class CompileOptions:
    """``torch.compile`` options of a trace: inductor and ``fullgraph=True`` by default.

    ``options`` is kept frozen (a sorted tuple of items); :meth:`inductor_options` gives
    the dict back."""

    backend: Any = "inductor"
    mode: str | None = None
    options: tuple | None = None
    dynamic: bool | None = None
    fullgraph: bool = True

    @classmethod
    def of(cls, value: Any) -> "CompileOptions | None":
        """From a ``compile=`` argument: ``None``/``False`` (eager), ``True`` (defaults), a
        dict of torch.compile options, or a ``CompileOptions``."""
        if value is None or value is False:
            return None
        if isinstance(value, CompileOptions):
            return value
        if value is True:
            return _DEFAULT
        if isinstance(value, dict):
            unknown = set(value) - set(COMPILE_KEYS)
            if unknown:
                raise TypeError(f"unknown torch.compile option(s) {sorted(unknown)}; fxsight "
                                f"passes {', '.join(COMPILE_KEYS)} through")
            given = dict(value)
            if given.get("options") is not None:
                given["options"] = _frozen(given["options"])
            return cls(**given)
        raise TypeError(f"compile must be a bool or a dict of torch.compile options, not "
                        f"{value!r}")

    def inductor_options(self) -> dict | None:
        """``options`` as the dict torch.compile takes."""
        return None if self.options is None else dict(self.options)

    @property
    def reuses_outputs(self) -> bool:
        """Whether the compiled graph may hand out memory that its next run overwrites:
        CUDA graphs (inductor's ``mode="reduce-overhead"`` or ``"max-autotune"``, its
        ``triton.cudagraphs`` option, dynamo's ``"cudagraphs"`` backend, or a custom
        backend given one of those modes) replay into the same static output buffers.
        Such outputs are copied before fxsight hands them on (``run.executable``)."""
        if self.backend == "cudagraphs":
            return True
        if self.backend != "inductor":
            return self.mode in CUDA_GRAPH_MODES
        chosen = {**inductor_mode_options(self.mode), **(self.inductor_options() or {})}
        return bool(chosen.get("triton.cudagraphs"))

    @property
    def dynamic_policy(self) -> str:
        """How compiled traces use dynamic-shape captures: ``"auto"`` (after a second input
        shape; ``dynamic=None``), ``"always"`` (``dynamic=True``), ``"never"`` (``False``)."""
        if self.dynamic is False:
            return "never"
        return "always" if self.dynamic else "auto"


_DEFAULT = CompileOptions()


@dataclass(frozen=True)
class RunOptions:
    """Which backend runs a trace, whether it prunes, and how it is compiled."""

    backend: str = "auto"
    compile: CompileOptions | None = None
    prune: bool = True

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, not {self.backend!r}")

    @classmethod
    def of(cls, backend: str = "auto", compile: Any = None, prune: bool = True) -> "RunOptions":
        """From a trace's ``backend=``, ``compile=`` and ``prune=`` arguments."""
        return cls(backend, CompileOptions.of(compile), prune)

    @property
    def dynamic_policy(self) -> str:
        """Dynamic-shape captures are for compiled traces only (see
        :attr:`CompileOptions.dynamic_policy`)."""
        return "never" if self.compile is None else self.compile.dynamic_policy

    def with_compile(self, **changes: Any) -> "RunOptions":
        """These options with some compile options changed (where compiling at all)."""
        if self.compile is None:
            return self
        return replace(self, compile=replace(self.compile, **changes))
