"""NNsight: wrap any torch module for tracing."""

from __future__ import annotations

import functools
import sys
from types import FrameType
from typing import Any

import torch

from .._torch import OptimizedModule, uncompiled
from ..capture.module_tree import ModuleTree
from ..errors import InputError, TraceError, at_line, user_line
from ..run.options import CompileOptions, RunOptions
from .call_site import is_with_statement, refuse_discarded, refuse_in_with
from .edit import EditTracer, export, seed_tracer
from .aliases import check, normalize, spellings
from .envoy import Envoy
from .envoy_classes import normalize as envoy_classes
from .inputs import (batch, batch_size, check_batchable, check_keywords, describe,
                     earlier_invokes, expand_mapping, named_inputs, plain_batch_size,
                     plainly_batchable)
from .invokes import Alone
from .nnsight_options import without_remote
from .session import Session
from .tracer import ScanTracer, Tracer


CLASS_ENVOYS: Any = object()  # (``envoys=`` not given: the class's ``envoys``)
_PLAIN_VALUES = frozenset({bool, int, float, str, type(None)})
# a wrapper makes the options of ``trace(backend=..., compile=True/False, prune=...)`` once
# (the same object each time: a trace's runner is remembered for the options it ran with)
_MAX_OPTIONS = 64


class NNsight(Envoy):
    """Wrap ``module`` for tracing: ``with NNsight(module).trace(x) as tracer: ...``.

    ``dispatch`` is accepted as nnsight's (a module given is loaded already).
    ``backend`` (``"auto"``, ``"fx"`` or ``"hooks"``) and ``compile`` set the defaults of
    every trace of this wrapper. ``rename={"transformer.h": "layers", "mlp": "ffn"}``
    adds aliases (``model.layers[0].ffn``, also in ``tracer.cache()`` keys): each key is
    a module path relative to any module, bound where it resolves (a value may list
    several aliases; ``*`` stands for any submodule; see :mod:`fxsight.api.aliases`).
    Printing it shows the module tree; attributes fall through to the module;
    ``model.layers[3]`` indexes module lists.

    >>> import torch, fxsight
    >>> net = fxsight.NNsight(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()))
    >>> net[0].out_features
    4
    >>> with net.trace(torch.randn(2, 4)):
    ...     net[0].output[:] = -1.0  # every pre-activation negative...
    ...     out = net.output.save()
    >>> out.abs().sum().item()  # ...so the ReLU gives zeros
    0.0
    """

    _modules_tree: ModuleTree | None = None  # (the model's modules, as last walked)
    # (the tree of the latest walk of ``_other_paths`` and what it found)
    _shared_walk: tuple[ModuleTree, dict[str, str]] | None = None
    # (the tree of the latest ``_alias_spellings`` and what it found)
    _spellings_walk: tuple[ModuleTree, dict[str, list[str]]] | None = None

    @property
    def generate(self) -> Any:
        """The model's own ``generate`` (attributes fall through to the model). In a ``with``
        statement it is a ``TraceError`` before anything runs: nnsight traces any method of
        the model called there, fxsight traces generation with a ``LanguageModel``."""
        if "generate" in self._module._modules:  # a submodule of that name: its envoy
            return Envoy.__getattr__(self, "generate")
        method = getattr(self._module, "generate")  # (AttributeError: the envoy's message)
        module_type = type(self._module).__name__

        def generate(*args: Any, **kwargs: Any) -> Any:
            if is_with_statement(sys._getframe(1)):
                raise TraceError(at_line(
                    f"`with NNsight(model).generate(...)`: nnsight traces a method of the "
                    f"model called in a with statement, fxsight traces generation with a "
                    f"LanguageModel: `lm = LanguageModel(model, tokenizer=tokenizer)`, then "
                    f"`with lm.generate(...) as tracer:` (without a with, "
                    f"`NNsight(model).generate(...)` is {module_type}.generate)",
                    user_line()))
            return method(*args, **kwargs)

        return functools.wraps(method)(generate)

    _token_indexing = False

    # nnsight's class default of ``envoys=`` (a subclass may set it; see __init__)
    envoys: Any = None

    def __init__(self, module: torch.nn.Module, *, backend: str = "auto",
                 compile: Any = None, rename: dict | None = None,
                 envoys: Any = CLASS_ENVOYS, dispatch: bool = False):
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"NNsight wraps a torch.nn.Module, not {type(module).__name__}")
        module, compile = _uncompiled(module, compile)
        super().__init__(module, "")
        object.__setattr__(self, "_options", RunOptions.of(backend, compile))
        object.__setattr__(self, "_fallback_warned", set())
        object.__setattr__(self, "_last_run", {})  # (run.forward.LastRun)
        object.__setattr__(self, "_options_made", {})  # (see _run_options)
        object.__setattr__(self, "_edits", [])  # Programs of model.edit(), oldest first
        rules = normalize(rename)
        check(module, rules, type(self), Envoy)
        object.__setattr__(self, "_rules", rules)
        object.__setattr__(self, "_alias_names",
                           frozenset(alias for _, aliases in rules for alias in aliases))
        if envoys is CLASS_ENVOYS:
            envoys = type(self).envoys
        object.__setattr__(self, "_envoy_spec", envoy_classes(envoys, Envoy))
        object.__setattr__(self, "_single_names", {
            key[0]: aliases for key, aliases in rules
            if isinstance(key, tuple) and len(key) == 1 and key[0] != "*"})

    @property
    def _model(self) -> torch.nn.Module:
        """The wrapped ``torch.nn.Module``, under nnsight's name for it (``model._model``)."""
        return self._module

    def _run_options(self, backend: str | None, compile: Any, prune: bool = True) -> RunOptions:
        """A trace's options: its own where given, else this wrapper's."""
        defaults = self._options
        if backend is None and compile is None and prune == defaults.prune:
            return defaults  # (the common case: frozen, shared)
        made = self._options_made
        key = (backend, compile, prune)
        options = made.get(key) if type(compile) in _PLAIN_VALUES else None
        if options is None:
            options = RunOptions(backend or defaults.backend,
                                 defaults.compile if compile is None else
                                 CompileOptions.of(compile), prune)
            if type(compile) in _PLAIN_VALUES and len(made) < _MAX_OPTIONS:
                made[key] = options
        return options

    # --- entry points ----------------------------------------------------------------------
    def trace(self, *args, trace: bool = True, backend: str | None = None,
              compile: Any = None, prune: bool = True, **kwargs) -> Any:
        """Open a trace over ``self(*args, **kwargs)``; with ``trace=False`` just run it.

        ``backend``: ``"auto"`` (fx, or hooks where the model cannot be captured), ``"fx"``
        or ``"hooks"``; ``compile``: ``True`` or a dict of ``torch.compile`` options;
        ``prune=False`` computes the model's output even where no saved value needs it.

        >>> import torch, fxsight
        >>> net = fxsight.NNsight(torch.nn.Linear(2, 2))
        >>> with net.trace(torch.ones(1, 2)):
        ...     net.output = net.output * 0 + 7
        ...     seven = net.output.save()
        >>> seven.tolist()
        [[7.0, 7.0]]
        >>> net.trace(torch.ones(1, 2), trace=False).shape  # a plain forward
        torch.Size([1, 2])
        """
        if not trace:
            plain_run_in_with("trace", sys._getframe(1))
            if not args and not kwargs:
                raise InputError(at_line(
                    "model.trace(trace=False) has no input: without a trace it runs the "
                    "model at once, on the inputs given to it (`model.trace(x, "
                    "trace=False)`)", user_line()))
        kwargs = without_remote(self._module, with_invoker_args(kwargs), "model.trace(...)")
        options = self._run_options(backend, compile, prune)
        if not trace:
            if self._edits:  # an edited model runs with its edits
                with Tracer(self, args, kwargs, options) as tracer:
                    seed_tracer(tracer, self._edits)
                return tracer.result
            alone = Alone()  # (what its preparation knows: no device read to check it)
            prepared = alone.prepared = self._prepare_invoke(args, kwargs, alone)
            self._before_run()
            self._check_batch(None, prepared[0], prepared[1], alone.padded)
            output = self._module(*prepared[0], **prepared[1])
            self._after_run([alone], prepared[1], [output])
            return output
        tracer = Tracer(self, args, kwargs, options)
        if self._edits:
            seed_tracer(tracer, self._edits)
        refuse_discarded(sys._getframe(1), "model.trace(...)")
        return tracer

    def scan(self, *args, **kwargs) -> ScanTracer:
        """``with model.scan(inputs):`` -- nothing runs for real: shapes and dtypes of
        every module's inputs and outputs are known inside, interventions are checked
        (shape errors raise) and saved values are bound to meta tensors.

        >>> import torch, fxsight
        >>> net = fxsight.NNsight(torch.nn.Linear(3, 5))
        >>> with net.scan(torch.ones(7, 3)):
        ...     shape = net.output.shape
        >>> shape
        torch.Size([7, 5])
        """
        tracer = ScanTracer(self, args, kwargs)
        seed_tracer(tracer, self._edits)
        refuse_discarded(sys._getframe(1), "model.scan(...)")
        return tracer

    def edit(self, *args, inplace: bool = False, **kwargs) -> EditTracer:
        """``with model.edit() as edited:`` -- the interventions recorded in the block are
        applied first in every later trace of ``edited`` (a new wrapper of the same module;
        ``model`` is unchanged), or of ``model`` itself with ``inplace=True``. Inputs are
        optional (they make shapes known inside the block and validate the edit).

        >>> import torch, fxsight
        >>> net = fxsight.NNsight(torch.nn.Linear(2, 2))
        >>> with net.edit() as edited:
        ...     net.output[:] = 0
        >>> edited.trace(torch.ones(1, 2), trace=False).tolist()
        [[0.0, 0.0]]
        >>> net.trace(torch.ones(1, 2), trace=False).abs().sum().item() > 0  # unchanged
        True
        """
        tracer = EditTracer(self, args, kwargs, self._run_options(None, None), inplace=inplace)
        refuse_discarded(sys._getframe(1), "model.edit(...)")
        return tracer

    def session(self, remote: bool = False) -> Session:
        """``with model.session():`` several traces as one unit: a value of an earlier
        trace is used in a later one without ``.save()`` (see :mod:`fxsight.api.session`).
        ``remote=False`` (nnsight's option) is accepted: fxsight runs locally."""
        without_remote(None, {"remote": remote}, "model.session(...)")
        refuse_discarded(sys._getframe(1), "model.session()")
        return Session(self)

    def clear_edits(self) -> None:
        """Forget every edit of this wrapper (``model.edit(inplace=True)``)."""
        refuse_in_with(sys._getframe(1), "model.clear_edits()", "None",
                       "call it on a line of its own")
        object.__setattr__(self, "_edits", [])

    def export(self, *args, **kwargs) -> torch.nn.Module:
        """The model with its edits as a plain ``torch.fx.GraphModule`` for these example
        inputs: it runs, saves (``torch.save``) and exports (``torch.export``) without
        fxsight, and is called like the model with inputs of the same shapes.

        >>> import torch, fxsight
        >>> net = fxsight.NNsight(torch.nn.Linear(2, 2))
        >>> with net.edit(inplace=True):
        ...     net.output[:] = 1
        >>> plain = net.export(torch.zeros(3, 2))
        >>> type(plain).__name__, plain(torch.zeros(3, 2)).tolist()
        ('EditedModel', [[1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
        """
        refuse_in_with(sys._getframe(1), "model.export(...)", "a plain module",
                       "call it without a with: `plain = model.export(x)`")
        return export(self, args, kwargs)

    def to(self, *args, **kwargs) -> "NNsight":
        """Move the wrapped module; returns the wrapper."""
        refuse_in_with(sys._getframe(1), "model.to(...)",
                       "the wrapper, after moving the model", "call it on a line of its own")
        self._module.to(*args, **kwargs)
        return self

    # --- inputs (overridden by LanguageModel) ---------------------------------------------
    def _prepare_invoke(self, args: tuple, kwargs: dict, invoke: Any) -> tuple[tuple, dict, int]:
        """An invoke's inputs as the model takes them, and its number of rows: a single
        dict of inputs (a ``BatchEncoding``) is spread into keywords, keywords are checked
        against ``forward``, batch sizes against each other and against invoke #0's
        inputs (see :mod:`fxsight.api.inputs`)."""
        module = self._module
        size = plain_batch_size(module, args, kwargs)  # (the common case, in one pass)
        line = None
        if size is None:
            where, line = describe(invoke), user_line()
            args, kwargs = expand_mapping(module, args, kwargs, where, line)
            check_keywords(module, args, kwargs, where, line)
            size = batch_size(named_inputs(module, args, kwargs), bool(args), where, line)
        prepared = (args, kwargs, size)
        if earlier_invokes(invoke):
            first = earlier_invokes(invoke)[0].prepared
            if not plainly_batchable(first, prepared):
                check_batchable(first, prepared, invoke.index, line or user_line())
        return prepared

    def _batch_inputs(self, prepared: list[tuple[tuple, dict, int]],
                      invokes: list | None = None) -> tuple[tuple, dict]:
        """Concatenate several invokes' inputs along the batch dimension (``invokes``: the
        invokes they were prepared for, where known)."""
        if len(prepared) == 1:
            return prepared[0][0], prepared[0][1]
        if _tensors_and_same_options(prepared):
            return tuple(torch.cat(column, dim=0) for column in
                         zip(*(a for a, _, _ in prepared))), dict(prepared[0][1])
        return batch(prepared)

    def _before_run(self) -> None:
        """Last preparations before the model runs (LanguageModel dispatches weights)."""

    def _after_run(self, invokes: list, kwargs: dict, values: list) -> None:
        """After a run of the batched ``kwargs`` (of the ``invokes``), whose output and
        saved values are among ``values`` (LanguageModel remembers the caches made
        counting real tokens: ``counted_caches``); nothing here."""

    def _check_batch(self, tracer: Any, args: tuple, kwargs: dict,
                     padded: bool | None = None) -> None:
        """Raise before the run where the batched inputs cannot give each invoke its own
        values (LanguageModel: padded rows of a model that ignores the attention mask).
        ``tracer``: ``None`` for a plain run (``trace=False``), whose ``padded`` says
        whether its rows are padded, where its preparation knew (``None``: not known)."""

    def _check_invokes(self, invokes: list) -> None:
        """Make the checks the invokes' preparation left to be made together (one device
        read for all: LanguageModel's token ids), raising for the first that fails; none
        here."""

    def _known_masks(self, tracer: Any, kwargs: dict) -> tuple:
        """``(mask, whether it is all ones)`` of the padding masks among the batched
        ``kwargs`` known without reading them (LanguageModel: from its invokes'
        preparation); none here."""
        return ()

    def _device(self) -> torch.device:
        """The device of the model's first parameter (the CPU where it has none)."""
        module = self._module
        if type(module).parameters is _PARAMETERS and \
                type(module).named_parameters is _NAMED_PARAMETERS:
            # (``parameters()``'s first without its walk of the modules: the first
            # parameter, not None, of the first module that has one)
            first = next((p for m in self._all_modules() for p in m._parameters.values()
                          if p is not None), None)
        else:
            first = next(module.parameters(), None)
        return first.device if first is not None else torch.device("cpu")

    def _all_modules(self) -> list[torch.nn.Module]:
        """``list(self._module.modules())``, walked again only where the module tree
        changed since the last walk (:class:`~fxsight.capture.module_tree.ModuleTree`)."""
        tree = self._modules_tree
        if tree is not None and tree.unchanged(self._module):
            return tree.modules
        modules = list(self._module.modules())
        object.__setattr__(self, "_modules_tree", ModuleTree.of(modules))
        return modules

    def _alias_spellings(self) -> dict[str, list[str]]:
        """Each module path with the other spellings ``rename=`` gives it
        (:func:`~fxsight.api.aliases.spellings`), made again only where the module tree
        changed since (the dict is the caller's to read, not to change)."""
        if not self._rules:
            return {}
        walk = self._spellings_walk
        if walk is not None and walk[0].unchanged(self._module):
            return walk[1]
        found = spellings(self._module, self._rules)
        tree = ModuleTree.of(list(self._module.modules()))
        object.__setattr__(self, "_spellings_walk", (tree, found) if tree is not None else None)
        return found

    def _other_paths(self) -> dict[str, str]:
        """Each path of a module registered at several paths (``self.b = self.a``) but its
        first -> its first path, walked again only where the module tree changed since
        the last walk (the dict is the caller's to read, not to change)."""
        module = self._module
        walk = self._shared_walk
        if walk is not None and walk[0].unchanged(module):
            return walk[1]
        first: dict[torch.nn.Module, str] = {}
        others = {}
        for path, child in module.named_modules(remove_duplicate=False):
            if first.setdefault(child, path) != path:
                others[path] = first[child]
        tree = ModuleTree.of(list(first))
        object.__setattr__(self, "_shared_walk", (tree, others) if tree is not None else None)
        return others

    def _token_indexer(self, tracer, proxy):
        raise AttributeError("token indexing is available on LanguageModel")


_PARAMETERS = torch.nn.Module.parameters
_NAMED_PARAMETERS = torch.nn.Module.named_parameters


def with_invoker_args(kwargs: dict) -> dict:
    """``trace(x, invoker_args={...})`` (nnsight's keywords of the input's invoke: the
    tokenizer's ``truncation=``, ``max_length=`` for a ``LanguageModel``) as keywords of the
    trace, which go to the invoke as nnsight's do; one given both ways is an error."""
    if "invoker_args" not in kwargs:
        return kwargs
    kwargs = dict(kwargs)
    given = kwargs.pop("invoker_args") or {}
    if not isinstance(given, dict):
        raise TypeError(f"invoker_args= takes a dict of keywords, not {type(given).__name__}")
    twice = sorted(set(given) & set(kwargs))
    if twice:
        raise TypeError(f"{', '.join(map(repr, twice))} given both in invoker_args= and as "
                        f"a keyword of trace()")
    return {**kwargs, **given}


def plain_run_in_with(method: str, frame: FrameType) -> None:
    """Refuse ``with model.<method>(..., trace=False):`` in ``frame`` before it runs."""
    refuse_in_with(frame, f"model.{method}(..., trace=False)", "the model's output",
                   f"drop trace=False to trace (`with model.{method}(...):`), or call it "
                   f"without a with")


def _uncompiled(module: torch.nn.Module, compile: Any) -> tuple[torch.nn.Module, Any]:
    """A ``torch.compile``d module is unwrapped (and traced with ``compile=True`` unless
    told otherwise): hooks added to a compiled module are silently ignored, and fxsight
    compiles the rewritten graph itself. A compiled *submodule* cannot be unwrapped
    without changing the user's model: it is refused, as is a TorchScript module (no hook
    or capture sees inside it)."""
    if isinstance(module, OptimizedModule):
        module = uncompiled(module)
        compile = True if compile is None else compile
    for path, sub in module.named_modules():
        if isinstance(sub, torch.jit.ScriptModule):
            raise TypeError(
                f"{'model.' + path if path else 'model'} is a TorchScript module "
                f"(torch.jit.script or torch.jit.trace): its forward runs outside Python, "
                f"where no forward hook can be added (torch: 'register_forward_hook is not "
                f"supported on ScriptModules') and no capture sees its calls. Wrap the "
                f"Python module it was made from.")
        if isinstance(sub, OptimizedModule):
            raise TypeError(
                f"model.{path} is a torch.compile'd module: forward hooks added after "
                f"compilation are silently ignored and its graph cannot be captured with "
                f"module boundaries. Wrap the uncompiled model and trace with compile=True "
                f"(fxsight compiles the whole rewritten forward pass).")
    return module, compile


def _tensors_and_same_options(prepared: list[tuple[tuple, dict, int]]) -> bool:
    """Whether every invoke passes tensors of one row per example positionally (as many)
    and the same plain keyword values (``use_cache=False``): the common case, batched
    without flattening."""
    first_args, first_kwargs, _ = prepared[0]
    for args, kwargs, size in prepared:
        if len(args) != len(first_args):
            return False
        for value in args:
            if type(value) is not torch.Tensor or value.dim() == 0 or value.shape[0] != size:
                return False
        for value in kwargs.values():
            if type(value) not in _PLAIN_VALUES:
                return False
        if kwargs != first_kwargs:
            return False
    return True

