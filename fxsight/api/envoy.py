"""Envoys: the wrapper tree that mirrors a model's modules inside and outside traces."""

from __future__ import annotations

import difflib
import functools
import inspect
import operator
import sys
import warnings
from types import MethodType
from typing import Any, Callable, Iterator

import torch

from ..capture.events import module_paths
from ..capture.module_tree import ModuleTree
from ..errors import TraceError, at_line, outside_a_trace, user_line, user_stacklevel
from ..record.active import current_tracer
from ..record.program import HookedCall, ModuleCall, own_rows
from ..record.proxy import Proxy
from ..record.recorder import Recorder
from ..record.sites import INPUT, OUTPUT, Site, module_label
from ..capture.operations import innermost
from .aliases import resolve
from .call_site import refuse_in_with, refuse_with
from .envoy_classes import class_for
from .envoy_extras import MISSING, envoy_extra
from .legacy_steps import envoy_all
from .source import source_of


_MAX_SITES = 64  # sites an envoy keeps made (its output and inputs, for a few calls)


class Envoy:
    """A module of the wrapped model. ``.output``, ``.input`` and ``.inputs`` read (and,
    assigned, overwrite) its activations inside a trace; other attributes fall through to
    the real module; submodules are envoys too."""

    _is_envoy = True  # (recorders refuse an envoy where a value is expected)
    # ``rename=`` of the wrapper (set on the root): its rules (``api.aliases``) and every
    # alias they name
    _rules: tuple = ()
    _alias_names: frozenset[str] = frozenset()
    # ``envoys=`` of the wrapper (set on the root; ``api.envoy_classes``): the classes of
    # its submodules' envoys, and each module name's single-name ``rename=`` aliases
    _envoy_spec: Any = None
    _single_names: dict[str, tuple[str, ...]] = {}

    def __init__(self, module: torch.nn.Module, path: str, root: "Envoy | None" = None,
                 natural: str | None = None):
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_path", path)
        # the path the user reached it by, where sites use another (a module registered
        # at several paths: ``self.b = self.a``, one block twice in a ModuleList); None
        # where they are the same
        object.__setattr__(self, "_natural", natural if natural != path else None)
        object.__setattr__(self, "_said_shared", False)
        object.__setattr__(self, "_root", root if root is not None else self)
        object.__setattr__(self, "_children", {})
        object.__setattr__(self, "_call", 0)
        object.__setattr__(self, "_sites", {})  # (kind, call) -> Site
        object.__setattr__(self, "_paths", None)  # (the root's) module -> canonical path
        object.__setattr__(self, "_tree", None)  # (the root's) the tree ``_paths`` is of

    # --- tree navigation ---------------------------------------------------------------
    def _child(self, name: str, module: torch.nn.Module) -> "Envoy":
        children = self._children
        base = self._natural or self._path
        natural = f"{base}.{name}" if base else name
        child = children.get(name)
        # (the path its sites use may have changed since: ``model.a = new`` with
        # ``model.b`` the old ``a``, or ``model.a = model.b`` registering it earlier)
        if child is None or child._module is not module or \
                self._root._canonical(module, natural) != child._path:
            root = self._root
            kind = Envoy if root._envoy_spec is None else \
                class_for(root._envoy_spec, module, natural, root._single_names, Envoy)
            child = children[name] = kind(module, root._canonical(module, natural), root,
                                          natural)
        return child

    def _forget_paths(self) -> None:
        """Have the next envoy reached find its module's first path anew where the module
        tree changed since the paths were found (at a trace's start: the model's modules
        may have been registered elsewhere since)."""
        tree = self._tree
        if self._paths is not None and tree is not None and \
                tree.unchanged(self._module):
            return  # (the same tree: the same first paths; no walk per trace)
        object.__setattr__(self, "_paths", None)

    def _canonical(self, module: torch.nn.Module, path: str) -> str:
        """The path sites use for ``module``: a module registered under several names
        (``self.b = self.a``) has its events under the first (``capture.events``), so every
        alias reads and writes the same sites."""
        paths = self._paths
        known = paths.get(module) if paths is not None else None
        if known is None or not _resolves(self._module, known, module):  # changed model
            paths = module_paths(self._module)
            object.__setattr__(self, "_paths", paths)
            object.__setattr__(self, "_tree", ModuleTree.of(list(paths)))
            known = paths.get(module)
        return path if known is None else known

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        module = self._module
        submodules = module._modules
        submodule = submodules.get(name)
        if submodule is not None:
            child = self._children.get(name)  # (the common case inline: no call)
            if child is not None and child._module is submodule and child._natural is None:
                paths = self._root._paths
                if paths is not None and paths.get(submodule) == child._path:
                    return child
            return self._child(name, submodule)
        aliased = self._aliased(name)
        if aliased is not None:
            return aliased
        try:
            value = getattr(module, name)
        except AttributeError:
            # (``tracer`` bound to the model by an in-place edit: the hint below says so)
            extra = MISSING if name in _TRACER_ATTRIBUTES and _in_place_edit_of(self) \
                else envoy_extra(self, name)
            if extra is not MISSING:
                return extra
            hint = _NNSIGHT_ENVOY_METHODS.get(name)
            if name in _MODEL_METHODS and self is not self._root:
                hint = _MODEL_METHODS[name]
            hint = f"; {hint}" if hint else \
                f"; its submodules are: {', '.join(submodules) or '(none)'}"
            if name in self._root._alias_names:
                hint += (f" ({name!r} is a rename= alias, but no key of it names a module "
                         f"from here)")
            if name in _TRACER_ATTRIBUTES and self is self._root and \
                    _in_place_edit_of(self):
                hint += ("; `with model.edit(inplace=True) as tracer:` binds the model in "
                         "fxsight (nnsight >= 0.5 binds the edit's tracer): write `with "
                         "model.edit(inplace=True) as (tracer, edited):` to have both")
            raise AttributeError(at_line(
                f"{module_label(self._path)} ({type(module).__name__}) has no submodule or "
                f"attribute {name!r}{hint}", user_line())) from None
        if type(value) is MethodType and value.__self__ is module:
            return _refused_in_with(value, f"{module_label(self._path)}.{name}", self)
        return value

    def _aliased(self, name: str) -> "Envoy | None":
        """The envoy a ``rename=`` alias stands for here (its real path), or None."""
        root = self._root
        if name not in root._alias_names:
            return None
        relative = resolve(self._module, name, root._rules, self is root)
        if relative is None:
            return None
        envoy = self
        for part in relative.split("."):
            envoy = envoy._child(part, envoy._module._modules[part])
        return envoy

    def __getitem__(self, key: Any) -> "Envoy | list[Envoy]":
        """``envoy[i]``: a module of a list; ``envoy[:6]``: a list of those modules'
        envoys (as nnsight slices a list's envoys); ``envoy["name"]``: the submodule
        ``name`` (the way to a submodule named like an envoy attribute: ``layer["output"]``
        is BERT's ``BertLayer.output`` module, ``layer.output`` the layer's activation)."""
        module = self._module
        if type(key) is str and not isinstance(module, torch.nn.ModuleDict):
            child = module._modules.get(key)
            if child is not None:
                return self._child(key, child)
            aliased = self._aliased(key)
            if aliased is not None:
                return aliased
            raise KeyError(at_line(
                f"{module_label(self._path)} ({type(module).__name__}) has no submodule "
                f"{key!r}; its submodules are: {', '.join(module._modules) or '(none)'}",
                user_line()))
        if type(module) is torch.nn.ModuleList and type(key) is int:
            # the common case (``h[3]``): a ModuleList names its modules "0", "1", ...
            modules = module._modules
            length = len(modules)
            if -length <= key < length:
                name = str(key % length)
                submodule = modules[name]
                child = self._children.get(name)  # (the common case inline: no call)
                if child is not None and child._module is submodule and \
                        child._natural is None:
                    return child
                return self._child(name, submodule)
        if isinstance(module, torch.nn.ModuleDict):
            return self._child(str(key), module[key])
        if isinstance(module, (torch.nn.ModuleList, torch.nn.Sequential)):
            if not isinstance(key, (int, slice, str)) and hasattr(type(key), "__index__"):
                key = operator.index(key)  # (a NumPy integer; a step number refuses here)
            if isinstance(key, slice):
                names = list(module._modules)[key]
                return [self._child(name, module._modules[name]) for name in names]
            if isinstance(key, int):
                length = len(module)
                if not -length <= key < length:
                    raise IndexError(at_line(f"{module_label(self._path)} has {length} "
                                             f"modules; index {key} is out of range",
                                             user_line()))
                index = key % length
                return self._child(str(index), module[index])
        raise TypeError(at_line(f"{module_label(self._path)} ({type(module).__name__}) "
                                f"cannot be indexed with {key!r}", user_line()))

    def __iter__(self) -> Iterator["Envoy"]:
        for name, module in self._module.named_children():
            yield self._child(name, module)

    def __len__(self) -> int:
        return len(self._module)

    def modules(self, include_fn: Callable[["Envoy"], bool] | None = None,
                names: bool = False) -> list:
        """The envoys of this module's tree, as nnsight lists them: each submodule's (its
        own tree first), then this one's; only those ``include_fn(envoy)`` accepts; with
        ``names=True``, ``(path, envoy)`` pairs. (``envoy._module.modules()`` gives the
        torch modules.)"""
        refuse_in_with(sys._getframe(1), "model.modules()", "a list",
                       "call it without a with")
        found: list = []
        for child in self:
            found.extend(child.modules(include_fn=include_fn, names=names))
        if include_fn is None or include_fn(self):
            found.append((self._path, self) if names else self)
        return found

    def get(self, path: str) -> Any:
        """nnsight's ``model.get("transformer.h.0.mlp")``: the envoy at a dotted path from
        this one; inside a trace, a path ending in an accessor (``"...mlp.output"``) is
        that value."""
        refuse_in_with(sys._getframe(1), "model.get(...)", "an envoy or a value",
                       "call it without a with")
        value: Any = self
        for part in path.split("."):
            value = getattr(value, part)
        return value

    def named_modules(self, include_fn: Callable[["Envoy"], bool] | None = None) -> list:
        """``(path, envoy)`` of each envoy of this module's tree (see :meth:`modules`)."""
        refuse_in_with(sys._getframe(1), "model.named_modules()", "a list",
                       "call it without a with")
        return self.modules(include_fn=include_fn, names=True)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _ACCESSORS:
            object.__setattr__(self, name, value)  # routed to the property setter
            return
        module = self._module
        if not hasattr(module, name) and current_tracer(self._root) is not None:
            # inside a trace, a new attribute is a typo of an accessor far more often
            # than a wish to change the real module: refuse it, module untouched
            raise AttributeError(at_line(_unknown_attribute(self, name), user_line()))
        setattr(module, name, value)  # (outside a trace: as on the module itself)

    def __repr__(self) -> str:
        shadowed = sorted({path for path, _ in self._module.named_modules()
                           if path and path.rsplit(".", 1)[-1] in _SHADOWING})
        if not shadowed:
            return repr(self._module)
        names = sorted({path.rsplit(".", 1)[-1] for path in shadowed})
        example = shadowed[0].rsplit(".", 1)
        example = (f"{example[0]}[{example[1]!r}]" if len(example) == 2
                   else f"[{example[0]!r}]")
        return (f"{self._module!r}\n(submodules named {', '.join(names)} are reached by "
                f"item, e.g. {example}: the attributes of those names are the envoy's)")

    @property
    def path(self) -> str:
        """The module's dotted path in the model (``""`` for the model itself)."""
        return self._path

    @property
    def source(self) -> Any:
        """The operations inside this module's ``forward``, each named as in nnsight
        (print it to read the names); ``.source.<name>.output`` / ``.input`` / ``.inputs``
        read and write a call's values inside a trace (see :mod:`fxsight.api.source`).

        >>> import torch, fxsight
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc = torch.nn.Linear(2, 2)
        ...     def forward(self, x):
        ...         return torch.relu(self.fc(x))
        >>> net = fxsight.NNsight(Net())
        >>> net.source.operations
        ['self_fc_0', 'torch_relu_0']
        >>> with net.trace(torch.ones(1, 2)):
        ...     before = net.source.torch_relu_0.input.save()
        ...     net.source.torch_relu_0.output = torch.full((1, 2), 7.0)
        ...     out = net.output.save()
        >>> out.tolist(), torch.equal(before, net.fc(torch.ones(1, 2)))
        ([[7.0, 7.0]], True)
        """
        cached = self.__dict__.get("_source_envoy")
        if cached is None or cached.function is not _source_function(self._module):
            cached = source_of(self)
            object.__setattr__(self, "_source_envoy", cached)
        return cached

    # --- activations ---------------------------------------------------------------------
    def _tracer(self, what: str) -> Any:
        """The innermost open trace of this model (raises outside one)."""
        tracer = current_tracer(self._root)
        if tracer is None:
            raise TraceError(at_line(outside_a_trace(module_label(self._path), what),
                                     user_line()))
        return tracer

    def _recorder(self, what: str) -> Recorder:
        return self._tracer(what).recorder

    def _site(self, kind: str, tracer: Any = None) -> Site:
        if tracer is None:
            tracer = current_tracer(self._root)
        # (in `for i in tracer.iter[...]`: call i)
        call = tracer.recorder.scope.call if tracer is not None else None
        if call is None and self._natural is not None:
            self._warn_shared()
        key = (kind, self._call if call is None else call)
        sites = self._sites
        site = sites.get(key)
        if site is None:  # (made once per envoy, kind and call: sites are immutable)
            site = Site(self._path, *key)
            if len(sites) < _MAX_SITES:
                sites[key] = site
        return site

    def _warn_shared(self) -> None:
        """Say (once per envoy) that a module reached by a path other than the first of
        its module object counts the calls made through every path."""
        if self._said_shared:
            return
        object.__setattr__(self, "_said_shared", True)
        natural, path = module_label(self._natural), module_label(self._path)
        warnings.warn(
            f"fxsight: {natural} is the module object registered first as {path}: its "
            f"calls are counted over every path it is registered at (as a forward hook "
            f"on it sees them), so {natural}.output and .input are its first call, "
            f"wherever it is made from; choose a later call with `with tracer.iter[i]:` "
            f"or `for i in tracer.iter[...]:`", RuntimeWarning,
            stacklevel=user_stacklevel())

    def _read(self, kind: str, accessor: str) -> Proxy:
        tracer = current_tracer(self._root)
        if tracer is None:
            tracer = self._tracer(accessor)  # (raises)
        recorder = tracer.recorder
        if getattr(tracer, "hooked_calls", None):
            hooked = _hooked_call(tracer, self._path)
            if hooked is not None:  # inside a module called with hook=True
                return _from_hooked_call(recorder, hooked, self, accessor)
        # (the innermost open trace of this thread: the recorder need not check it is open)
        return recorder.create_read(self._site(kind, tracer), accessor, current=True)

    def _write(self, kind: str, accessor: str, value: Any) -> None:
        tracer = self._tracer(accessor)
        if getattr(tracer, "hooked_calls", None):
            _refuse_write_in_hooked_call(tracer, self, accessor)
        tracer.recorder.create_write(self._site(kind, tracer), accessor, value)

    @property
    def output(self) -> Proxy:
        """The module's output (a proxy inside a trace); assign to replace it.

        >>> import torch, fxsight
        >>> net = fxsight.NNsight(torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1)))
        >>> with net.trace(torch.ones(4, 2)):
        ...     h = net[0].output.save()
        ...     net[0].output = h * 0  # the second layer now sees zeros
        ...     out = net.output.save()
        >>> h.shape, torch.equal(out, net[1].bias.expand(4, 1))
        (torch.Size([4, 3]), True)
        """
        return self._read(OUTPUT, "output")

    @output.setter
    def output(self, value: Any) -> None:
        self._write(OUTPUT, "output", value)

    @property
    def inputs(self) -> Proxy:
        """The module's inputs as ``(args, kwargs)``; assign to replace them."""
        return self._read(INPUT, "inputs")

    @inputs.setter
    def inputs(self, value: Any) -> None:
        self._write(INPUT, "inputs", value)

    @property
    def input(self) -> Proxy:
        """The module's first input (first positional argument, else first keyword one).

        >>> import torch, fxsight
        >>> net = fxsight.NNsight(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU()))
        >>> with net.trace(torch.ones(1, 2)):
        ...     net[1].input = torch.tensor([[-1.0, 5.0]])
        ...     out = net.output.save()
        >>> out.tolist()
        [[0.0, 5.0]]
        """
        return self._read(INPUT, "input")

    @input.setter
    def input(self, value: Any) -> None:
        self._write(INPUT, "input", value)

    def skip(self, value: Any) -> None:
        """Replace this module's computation with ``value`` (shaped like its output): the
        module does not run, and nothing inside it may be read or written.

        >>> import torch, fxsight
        >>> net = fxsight.NNsight(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Tanh()))
        >>> with net.trace(torch.ones(1, 2)):
        ...     net[0].skip(torch.zeros(1, 2))
        ...     out = net.output.save()
        >>> out.tolist()
        [[0.0, 0.0]]
        """
        self._recorder("skip").create_skip(self._site(OUTPUT), value)

    def all(self) -> Any:
        """nnsight 0.4's ``envoy.all()`` inside ``lm.generate``: ``with
        lm.transformer.h[0].all():`` is ``with tracer.all():`` for lines of that module (and
        its submodules), ``with lm.all():`` for every module's; elsewhere a TraceError
        (see :mod:`fxsight.api.legacy_steps`)."""
        return envoy_all(self, self._tracer("all()"), sys._getframe(1))

    def __call__(self, *args, hook: bool = False, **kwargs) -> Any:
        """Inside a trace, apply this module to traced values (e.g. the logit lens);
        outside, call the module. With ``hook=True`` the call's inner boundaries are
        visible: after it, ``.output``/``.input``/``.inputs`` of the module and its
        submodules read this call (a module attached to the model, such as an SAE, that
        the model's own forward does not call)."""
        tracer = current_tracer(self._root)
        traced = any(isinstance(a, Proxy) for a in (*args, *kwargs.values()))
        if tracer is None or not traced:
            if tracer is None:
                refuse_in_with(sys._getframe(1), f"{module_label(self._path)}(...)",
                               "the module's output", _TRACE_INSTEAD)
            return self._module(*args, **kwargs)
        if hook:
            node = tracer.recorder.create_op("call_function",
                                             HookedCall(self._module, self._path), args,
                                             kwargs)
            tracer.hooked_calls[self._path] = (node, user_line())
            return node["result"]
        return tracer.recorder.create_op("call_function", ModuleCall(self._module, self._path),
                                         args, kwargs)


# what a call refused in a with statement says to write instead
_TRACE_INSTEAD = ("nnsight traces a method of the model called in a with statement, fxsight "
                  "traces the model's forward: `with model.trace(inputs):` (or call it "
                  "without a with)")


def _gives_context(function: Any) -> bool:
    """Whether a method may return a context manager: a generator function (behind
    ``contextlib.contextmanager``), or one annotated to return a context manager."""
    function = inspect.unwrap(function)
    if inspect.isgeneratorfunction(function):
        return True
    annotation = getattr(function, "__annotations__", {}).get("return")
    return annotation is not None and any(
        word in str(annotation) for word in ("Context", "Generator", "Iterator"))


def _refused_in_with(method: MethodType, label: str, envoy: "Envoy") -> Callable:
    """``method`` (of the module, reached through its ``envoy``) that raises a TraceError
    before it runs where its call is a with statement's context manager: inside a trace of
    the model always (the with statement would end before the model runs), outside one
    where it is not known to give a context manager. Where it returns the module itself
    (``to``, ``cpu``, ``train``: torch's methods that chain), it returns the envoy, as
    nnsight's ``to``/``cpu``/``cuda`` do."""
    gives_context = _gives_context(method.__func__)
    root, module = envoy._root, method.__self__

    def call(*args: Any, **kwargs: Any) -> Any:
        frame = sys._getframe(1)
        if current_tracer(root) is not None:
            refuse_with(frame, f"`with {label}(...)` inside a trace: the trace records its "
                               f"block and runs the model when the trace ends, after this "
                               f"with statement has exited, so what the context manager "
                               f"sets (or undoes) would not apply to that forward pass; "
                               f"enter it around the trace: `with {label}(...):`, then "
                               f"`with model.trace(...):` inside it")
        elif not gives_context:
            refuse_with(frame, f"`with {label}(...)`: {_TRACE_INSTEAD}. fxsight enters a "
                               f"method's context manager where it can tell one is returned "
                               f"without calling it (a generator function, as behind "
                               f"@contextlib.contextmanager, or a method annotated to return "
                               f"one: `-> contextlib.AbstractContextManager`); or call it "
                               f"first: `cm = {label}(...)`, then `with cm:`")
        result = method(*args, **kwargs)
        return envoy if result is module else result

    call = functools.wraps(method)(call)
    call.__self__, call.__func__ = method.__self__, method.__func__  # type: ignore[attr-defined]
    return call


def _hooked_call(tracer: Any, path: str) -> Any:
    """The latest ``envoy(..., hook=True)`` call of this trace that ``path`` is inside."""
    calls = getattr(tracer, "hooked_calls", None)
    if not calls:
        return None
    for prefix in sorted(calls, key=len, reverse=True):
        if not prefix or path == prefix or path.startswith(prefix + "."):
            return prefix, *calls[prefix]
    return None


def _from_hooked_call(recorder: Recorder, hooked: tuple, envoy: "Envoy",
                      accessor: str) -> Proxy:
    """``envoy.<accessor>`` inside a call made with ``hook=True``: the value of that call
    (the ``i``-th call of the submodule in a ``for i in tracer.iter[...]`` loop). A module
    the model's own forward also runs would be ambiguous: refused."""
    prefix, node, line = hooked
    tracer = current_tracer(envoy._root)
    if envoy._path in tracer._forward_paths():
        raise TraceError(at_line(
            f"{module_label(envoy._path)} runs in the model's forward and was also called "
            f"with hook=True ({line}): which call .{accessor} means is ambiguous; use the "
            f"value the hook=True call returns", user_line()))
    relative = envoy._path[len(prefix):].lstrip(".") if prefix else envoy._path
    call = recorder.scope.call or 0
    record = node["calls"][relative][call]
    if accessor == "output":
        value = record["output"]
    elif accessor == "inputs":
        value = record["inputs"]
    else:
        value = recorder.create_op("call_function", _first_input, (record["inputs"],), {})
    if node._node.invoke is None and recorder.scope.invoke is not None:
        # a call for every row (an edit's), read in an invoke: the invoke's rows of it
        value = recorder.create_op("call_function", own_rows, (value,), {})
    return value


def _refuse_write_in_hooked_call(tracer: Any, envoy: "Envoy", accessor: str) -> None:
    """A write of ``envoy.<accessor>`` where the module runs only inside a call made with
    ``hook=True`` (an attachment an edit calls): fxsight runs that call as one step of the
    block, so nothing can be replaced inside it; refused, naming the call, before the
    run (was: "has no output call #0")."""
    hooked = _hooked_call(tracer, envoy._path)
    if hooked is None or envoy._path in tracer._forward_paths():
        return
    _, _, line = hooked
    label = module_label(envoy._path)
    raise TraceError(at_line(
        f"{label} runs only inside the call made with hook=True ({line}), which fxsight "
        f"runs as one step: its .{accessor} can be read but not replaced (nnsight hooks "
        f"that call); change the value the call returns where it is used instead (in the "
        f"edit: `out = {label.rpartition('.')[2]}(h, hook=True) * 0`), or read "
        f"{label}.{accessor} and compute from it", user_line()))


def _first_input(inputs: tuple) -> Any:
    args, kwargs = inputs
    return args[0] if args else next(iter(kwargs.values()))


_ACCESSORS = ("output", "input", "inputs")
# names a submodule may have that an envoy attribute shadows (reach it by item)
_SHADOWING = frozenset(
    {*_ACCESSORS, "source", "skip", "path", "trace", "scan", "edit", "export", "to",
     "generate", "cache", "save", "get", "all"})


# envoy methods of older nnsight versions that fxsight spells another way: the rewrite
_NNSIGHT_ENVOY_METHODS = {
    "next": "nnsight's `envoy.next()` (the module's next call or decoding step) is written "
            "with the tracer: `with tracer.iter[1]: h = envoy.output` (or `for step in "
            "tracer.iter[0:3]:`), in generate and in a trace over a module called several "
            "times",
    "iter": "nnsight's `envoy.iter[...]` is written with the tracer: `with "
            "tracer.iter[1:3]: ...` (or `for step in tracer.iter[1:3]:`)",
}


# the model's methods that nnsight 0.8 also gives every envoy (a trace of the submodule
# alone, with the model's envoys): fxsight has them on the model only
_SUBMODULE_ALONE = ("fxsight runs these on the model: `model.{name}(...)`; for the submodule "
                    "alone, wrap it: `fxsight.NNsight(envoy._module).{name}(...)` (its "
                    "envoys are that wrapper's, `sub.output` rather than the model's path)")
_MODEL_METHODS = {name: _SUBMODULE_ALONE.format(name=name)
                  for name in ("trace", "scan", "edit", "session", "clear_edits", "export")}
_NNSIGHT_ENVOY_METHODS["interleave"] = (
    "nnsight's `interleave` (the low-level driver of a trace) has no counterpart: use "
    "`model.trace(...)`")


# a tracer's attributes that nnsight >= 0.5 code reads on ``tracer`` bound by
# ``with model.edit(inplace=True) as tracer:`` (which binds the model here)
_TRACER_ATTRIBUTES = frozenset({"iter", "invoke", "cache", "barrier", "stop", "result", "log"})


def _in_place_edit_of(root: "Envoy") -> bool:
    """Whether an edit of ``root`` itself (``inplace=True``) is being recorded."""
    from ..record.active import active_tracers
    return any(getattr(tracer, "edited", None) is root and tracer.model is root
               for tracer in active_tracers())


def _unknown_attribute(envoy: Envoy, name: str) -> str:
    """Why ``envoy.<name> = ...`` is refused inside a trace, with the nearest name that
    can be set."""
    module = envoy._module
    names = [*_ACCESSORS, *module._modules,
             *(n for n in dir(module) if not n.startswith("_") and n not in _ACCESSORS)]
    near = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    hint = f"did you mean {near[0]!r}? " if near else ""
    return (f"{module_label(envoy._path)} ({type(module).__name__}) has no attribute "
            f"{name!r}; inside a trace, setting it would add it to the real module, so "
            f"it is refused ({hint}a module's activations are set with .output, .input "
            f"and .inputs)")


def _source_function(module: torch.nn.Module) -> Any:
    return innermost(type(module).forward)


def _resolves(root: torch.nn.Module, path: str, module: torch.nn.Module) -> bool:
    try:
        return root.get_submodule(path) is module
    except AttributeError:
        return False
