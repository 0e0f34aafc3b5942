"""Cache: every (or some) module's inputs and outputs of a trace, in one dictionary.

``cache = tracer.cache(...)`` inside a trace returns an empty :class:`CacheDict`; when the
block ends, the requested reads are added to the Program (after every intervention the user
recorded, so cached values are the values *after* interventions), each followed by one
conversion node (detach / device / dtype) and saved; after the run the dictionary is filled.
A conversion is taken where its module returns, as a cache hook there would take it: an
in-place edit at a later boundary sharing the tensor (the next module's input) is not in a
copy (``dtype``, a ``device`` off the model's), and is in an unconverted entry (the tensor).

Keys follow nnsight: ``"model"`` is the root, ``"model.transformer.h.0"`` a block. Values are
:class:`Entry` objects (``.output``, ``.inputs`` = ``(args, kwargs)``, ``.input``), or a list
of entries for a module called several times in one forward pass. Navigation by attribute
and index works too: ``cache.model.transformer.h[0].output``; ``rename`` / ``alias`` give
modules shorter names (``rename={"transformer.h": "layers"}`` or, equivalently,
``alias={"layers": "transformer.h"}``: ``cache.model.layers[0]``, ``cache["model.layers.0"]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch

from .._torch import pytree, unflatten_keeping_sizes
from ..errors import TraceError, at_line, user_line
from ..record.program import Program, own_rows
from ..record.scope import Scope
from ..record.sites import INPUT, OUTPUT, Site, is_operation
from ..capture.events import module_paths
from ..capture.operations import split_path
from .envoy import Envoy
from .source import OperationEnvoy

ROOT = "model"


def convert(value: Any, device: torch.device | None, dtype: torch.dtype | None,
            detach: bool) -> Any:
    """A cached value: every tensor detached, moved to ``device`` and (floating-point ones)
    cast to ``dtype``, as asked. Runs as one graph node per cached site."""

    def one(tensor: torch.Tensor) -> torch.Tensor:
        if detach:
            tensor = tensor.detach()
        if device is not None and not tensor.is_meta:
            tensor = tensor.to(device)
        if dtype is not None and (tensor.is_floating_point() or tensor.is_complex()):
            tensor = tensor.to(dtype)
        return tensor

    if isinstance(value, torch.Tensor):  # (most sites: without the pytree walk)
        return one(value)
    leaves, spec = pytree.tree_flatten(value)  # (a PackedSequence, rebuilt unchecked)
    return unflatten_keeping_sizes(
        [one(v) if isinstance(v, torch.Tensor) else v for v in leaves], spec)


@dataclass
class Entry:
    """One call of one module: its output and/or its inputs ``(args, kwargs)``."""

    output: Any = None
    inputs: tuple[tuple[Any, ...], dict[str, Any]] | None = None

    @property
    def input(self) -> Any:
        """The first positional input (else the first keyword input); None if not cached."""
        if self.inputs is None:
            return None
        args, kwargs = self.inputs
        values = [*args, *kwargs.values()]
        return values[0] if values else None


class Entries(list):
    """The entries of a module called several times (each decoding step of ``generate``, or
    a module a forward calls more than once), one per call in order; ``.output``,
    ``.inputs`` and ``.input`` are lists of the calls' values, as nnsight's entry holds them
    (``cache["model.transformer.h.0"].output[2]`` is step 2's output)."""

    @property
    def output(self) -> list:
        """The output of each call."""
        return [entry.output for entry in self]

    @property
    def inputs(self) -> list:
        """The inputs ``(args, kwargs)`` of each call."""
        return [entry.inputs for entry in self]

    @property
    def input(self) -> list:
        """The first input of each call."""
        return [entry.input for entry in self]


def _key(path: str) -> str:
    """A module path (``""`` for the root) as a cache key (``"model..."``)."""
    return f"{ROOT}.{path}" if path else ROOT


class CacheDict(dict):
    """Cached activations by module: ``cache["model.transformer.h.0"].output`` or
    ``cache.model.transformer.h[0].output`` (also ``.inputs``, ``.input``).

    A navigated value (``cache.model.transformer.h``) is a CacheDict too, holding the
    entries under that path. Keys are real module paths (a module registered at several
    paths under its first); ``keys(alias=True)`` lists the other names they are reachable
    by: the renamed ones, and the other paths of such a module.
    """

    def __init__(self, data: Any = (), path: str = "", alias: dict[str, str] | None = None,
                 rename: dict[str, str] | None = None,
                 alias_paths: dict[str, str] | None = None,
                 spellings: dict[str, list[str]] | None = None):
        super().__init__(data)
        object.__setattr__(self, "_path", path)
        renames = _normalize_renames(rename, alias)
        object.__setattr__(self, "_rename", renames)
        # the wrapper's rename=: module path -> its other spellings (``api.aliases``)
        object.__setattr__(self, "_spellings", spellings or {})
        object.__setattr__(self, "_alias_paths", dict(alias_paths or {}))
        if alias_paths is None:
            for key in self:
                self._add_alias_path(key)

    # --- building ---------------------------------------------------------------------
    def _aliases_of(self, key: str) -> list[str]:
        """The other names of the key (or other path) ``key``: its spellings under the
        wrapper's ``rename=``, each also under the cache's own ``rename`` / ``alias``."""
        path = key[len(ROOT) + 1:] if key.startswith(ROOT + ".") else None
        spelled = [_key(other) for other in self._spellings.get(path, ())] if path else []
        found = [_apply_renames(name, self._rename) for name in (key, *spelled)]
        return [name for name in dict.fromkeys([*spelled, *found]) if name != key]

    def _add_alias_path(self, key: str) -> None:
        for aliased in self._aliases_of(key):
            self._alias_paths[aliased] = key

    def _add(self, key: str, entry: Any) -> None:
        dict.__setitem__(self, key, entry)
        self._add_alias_path(key)

    def _add_shared_paths(self, first_paths: dict[str, str]) -> None:
        """Make the entries of a module registered at several paths (``self.b = self.a``)
        reachable by each of them: ``first_paths`` maps each other path (``h.1``) to the
        module's first path (``h.0``), whose keys hold its calls; the entries under it
        (its submodules, its operations) are reachable under the other path too."""
        for other, first in first_paths.items():
            first_key, other_key = _key(first), _key(other)
            for key in list(dict.keys(self)):
                if key == first_key or key.startswith(first_key + "."):
                    shared = other_key + key[len(first_key):]
                    if not dict.__contains__(self, shared):
                        self._alias_paths.setdefault(shared, key)
                        for aliased in self._aliases_of(shared):
                            self._alias_paths.setdefault(aliased, key)

    # --- lookup ---------------------------------------------------------------------------
    def _real(self, name: str) -> str | None:
        """The real key of ``name`` (a real or renamed path), or None."""
        if dict.__contains__(self, name):
            return name
        return self._alias_paths.get(name)

    def _names(self) -> Iterable[str]:
        yield from dict.keys(self)
        yield from self._alias_paths

    def _has_prefix(self, path: str) -> bool:
        prefix = path + "."
        return any(name == path or name.startswith(prefix) for name in self._names())

    def _view(self, path: str) -> "CacheDict":
        prefix = path + "."
        real = {self._real(n) for n in self._names() if n == path or n.startswith(prefix)}
        data = {k: dict.__getitem__(self, k) for k in dict.keys(self) if k in real}
        aliases = {a: r for a, r in self._alias_paths.items() if r in data}
        return CacheDict(data, path, rename=self._rename, alias_paths=aliases,
                         spellings=self._spellings)

    def _entry(self, what: str) -> Any:
        path = self._path
        real = self._real(path) if path else None
        if real is None:
            where = f"{path!r}" if path else "the cache itself"
            raise AttributeError(
                f"{where} is not a cached module, so it has no .{what}; cached modules "
                f"under it: {', '.join(list(dict.keys(self))[:8]) or '(none)'}")
        return dict.__getitem__(self, real)

    def _field(self, what: str) -> Any:
        entry = self._entry(what)
        if isinstance(entry, list):
            return [getattr(e, what) for e in entry]
        return getattr(entry, what)

    @property
    def output(self) -> Any:
        """The output of the module at this path (a list if it ran several times)."""
        return self._field("output")

    @property
    def inputs(self) -> Any:
        """The inputs ``(args, kwargs)`` of the module at this path."""
        return self._field("inputs")

    @property
    def input(self) -> Any:
        """The first input of the module at this path."""
        return self._field("input")

    @property
    def path(self) -> str:
        return self._path

    def keys(self, alias: bool = False):  # type: ignore[override]
        if alias:
            return self._alias_paths.keys()
        return super().keys()

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._real(key) is not None \
            or dict.__contains__(self, key)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, int):
            return self._index(key)
        if not isinstance(key, str):
            raise KeyError(key)
        for name in (key, f"{self._path}.{key}" if self._path else None):
            if name is None:
                continue
            real = self._real(name)
            if real is not None:
                return dict.__getitem__(self, real)
        raise KeyError(f"{key!r} was not cached"
                       + (f" (cached: {', '.join(list(dict.keys(self))[:8])}"
                          f"{', ...' if len(self) > 8 else ''})" if len(self) else ""))

    def _index(self, index: int) -> "CacheDict":
        prefix = f"{self._path}." if self._path else ""
        children = sorted({int(part) for part in
                           (n[len(prefix):].split(".")[0] for n in self._names()
                            if n.startswith(prefix)) if part.isdigit()})
        if not children:
            raise KeyError(f"{self._path or 'the cache'!r} holds no indexed modules (no module "
                           f"of it is named by a number)")
        if index < 0:
            index += children[-1] + 1
        if index not in children:
            raise IndexError(f"{self._path!r}[{index}] was not cached (cached indices: "
                             f"{children})")
        return self._view(f"{prefix}{index}")

    def __getattr__(self, name: str) -> "CacheDict":
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        if name in ("output", "inputs", "input"):  # the property raised: say why
            return self._field(name)
        path = f"{self._path}.{name}" if self._path else name
        if self._has_prefix(path):
            return self._view(path)
        if not self._path and self._has_prefix(f"{ROOT}.{name}"):
            # (``cache.transformer.h[0]``, as nnsight's newer docs write it, is
            # ``cache.model.transformer.h[0]``)
            return self._view(f"{ROOT}.{name}")
        raise AttributeError(f"module path {path!r} was never cached")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a CacheDict is read-only through attributes")

    def __repr__(self) -> str:
        return f"CacheDict({self._path or ''}: {list(dict.keys(self))})"


def _normalize_renames(rename: dict[str, str] | None,
                       alias: dict[str, str] | None) -> dict[str, str]:
    """``{real path: short name}`` from ``rename`` and its inverse ``alias``."""
    renames: dict[str, str] = {}
    for real, short in (rename or {}).items():
        renames[_path_of(real)] = short.strip(".")
    for short, real in (alias or {}).items():
        renames[_path_of(real)] = short.strip(".")
    return renames


def _path_of(module: Any) -> str:
    path = getattr(module, "_path", module)
    if not isinstance(path, str):
        raise TypeError(f"rename/alias take module paths or envoys, not {module!r}")
    return path.strip(".")


def _apply_renames(key: str, renames: dict[str, str]) -> str:
    """``model.transformer.h.0`` with ``{"transformer.h": "layers"}`` -> ``model.layers.0``
    (whole path components only)."""
    if not renames or key == ROOT:
        return key
    parts = key.split(".")[1:]
    for real, short in renames.items():
        pattern = real.split(".")
        out, i = [], 0
        while i < len(parts):
            if parts[i:i + len(pattern)] == pattern:
                out.extend(short.split("."))
                i += len(pattern)
            else:
                out.append(parts[i])
                i += 1
        parts = out
    return ".".join([ROOT, *parts])


class CacheRequest:
    """One ``tracer.cache(...)`` call: which sites to read, how to convert, where to put
    the values. ``record`` adds its nodes to the Program before the run; ``fill`` fills
    the CacheDict from the run's results."""

    def __init__(self, model: Any, modules: Any, device: torch.device | None,
                 dtype: torch.dtype | None, detach: bool, include_output: bool,
                 include_inputs: bool, rename: dict | None, alias: dict | None,
                 scope: Scope):
        self.line = user_line()
        self.paths = None if modules is None else self._resolve(model, modules)
        self.device = torch.device(device) if isinstance(device, str) else device
        self.dtype = dtype
        self.detach = bool(detach)
        self.include_output = include_output
        self.include_inputs = include_inputs
        self.scope = scope
        # the wrapper's rename= names keys too (the call's own rename=/alias= on top)
        # (the wrapper's rename= spellings, made again only where its module tree changed)
        self.cache = CacheDict(rename=rename, alias=alias, spellings=getattr(
            model, "_alias_spellings", dict)())
        # (its other paths of shared modules, after the run: the wrapper's, walked again
        # only where its module tree changed)
        self.other_paths = getattr(model, "_other_paths", lambda: _other_paths(model._module))
        # (site, node, layout of the value, whether it is converted after the run)
        self.nodes: list[tuple[Site, Any, Any, bool]] = []
        # (path, kind, node): the calls of a module inside a call made with hook=True
        self.hooked: list[tuple[str, str, Any]] = []

    def _resolve(self, model: Any, modules: Any) -> list[str]:
        if isinstance(modules, (str, Envoy, OperationEnvoy)):
            modules = [modules]
        known = {path for path, _ in model._module.named_modules()}
        paths = []
        for module in modules:
            if isinstance(module, OperationEnvoy):
                if module._source._root is not model:
                    raise TraceError(at_line(
                        f"tracer.cache(modules=...) got an operation of another model "
                        f"({module.label})", self.line))
                path = module.path
            elif isinstance(module, str) and is_operation(module.strip(".")):
                path = _operation_path(model, module, known, self.line)
            elif isinstance(module, Envoy):
                if module._root is not model:
                    raise TraceError(at_line(
                        f"tracer.cache(modules=...) got a module of another model "
                        f"({module._path or 'model'})", self.line))
                path = module._path
            elif isinstance(module, str):
                path = _module_path(module, known)
                if path is None and getattr(model, "_rules", ()):
                    path = _renamed_path(model, module)
                if path is None:
                    raise TraceError(at_line(
                        f"tracer.cache(modules=...): {module!r} is not a module of this "
                        f"model (paths look like 'model.transformer.h.0' or "
                        f"'transformer.h.0')", self.line))
            else:
                raise TypeError(f"tracer.cache(modules=...) takes envoys, operations "
                                f"(envoy.source.<name>) or path strings, not "
                                f"{type(module).__name__}")
            if path not in paths:
                paths.append(path)
        return paths

    def record(self, program: Program, source: Any, rows: dict[Any, Any],
               before_stop: list | None = None, hooked: dict | None = None) -> None:
        """Add a read + conversion + save per cached site (in forward order). ``source``
        (a capture or a scan) says which sites run and how their values are laid out;
        ``rows``: the invokes' rows (a module skipped for the whole batch does not run:
        the modules inside it have no entries); ``before_stop``: in a trace with
        ``tracer.stop()``, the nodes recorded before it (the forward pass ends after the
        last event they use: later sites do not run and have no entries)."""
        index = source.index
        kinds = ([INPUT] if self.include_inputs else []) + \
            ([OUTPUT] if self.include_output else [])
        wanted = None if self.paths is None else set(self.paths)
        # every module, or the modules and operations (``.source``) asked for
        call = self.scope.call  # (in `tracer.iter[i]` of a plain trace: call i only)
        sites = [s for s in sorted(index, key=index.__getitem__) if s.kind in kinds and (
            not is_operation(s.path) if wanted is None else s.path in wanted) and (
            call is None or s.call == call)]
        hooked = {prefix: proxy._node for prefix, (proxy, _) in (hooked or {}).items()}
        if wanted is not None:
            ran = {s.path for s in sites}
            missing = [p for p in self.paths if p not in ran and _hooked_call_of(p, hooked)
                       is None]
            if missing and kinds:
                what = "is never called" if is_operation(missing[0]) else "never runs"
                if call is not None and any(s.path == missing[0] for s in index):
                    what = f"has no call {call} (tracer.iter[{call}])"
                raise TraceError(at_line(
                    f"tracer.cache: {_key(missing[0])} {what} in this forward pass, so "
                    f"it cannot be cached", self.line))
        if before_stop is not None:
            last = max((index[n.site] for n in before_stop
                        if n.site is not None and n.site in index), default=-1)
            sites = [s for s in sites if index[s] <= last]
        skipped = _skipped_spans(program, index, rows)
        sites = [s for s in sites
                 if not any(start < index[s] < end for start, end in skipped)]
        convert_args = (self.device, self.dtype, self.detach)
        needs_convert = self.detach or self.device is not None or self.dtype is not None
        for site in sites:
            accessor = "inputs" if site.kind == INPUT else "output"
            node = program.read(site, accessor, self.scope, self.line)
            leaves, spec = _layout(source, site)
            # a value holding objects a graph cannot take as an argument (an attention
            # function's module argument) is converted after the run instead
            later = not all(_graph_argument(leaf) for leaf in leaves)
            if needs_convert and not later:
                # (converted where the module returns, as a cache hook would: an
                # in-place edit at a later module's boundary is not in a copy)
                node = program.op("call_function", convert, (node, *convert_args), {},
                                  self.scope, self.line, at_read=True)
            program.save(node)
            self.nodes.append((site, node, spec, later))
        convert_args = convert_args if needs_convert else None
        for prefix, call in hooked.items():
            self._record_hooked(program, prefix, call, wanted, kinds, convert_args)

    def _record_hooked(self, program: Program, prefix: str, call: Any, wanted: Any,
                       kinds: list[str], convert_args: tuple | None) -> None:
        """The module called with ``hook=True`` at ``prefix`` (an SAE attached to the model)
        and its submodules: their calls in that call, as a forward's modules are cached."""
        for relative, _ in call.target.module.named_modules():
            path = ".".join(p for p in (prefix, relative) if p)
            if wanted is not None and path not in wanted:
                continue
            for kind in kinds:
                node = program.op("call_function", _hooked_values, (call, relative, kind),
                                  {}, self.scope, self.line)
                if call.invoke is None and self.scope.invoke is not None:  # (an edit's)
                    node = program.op("call_function", own_rows, (node,), {}, self.scope,
                                      self.line)
                if convert_args is not None:
                    node = program.op("call_function", convert, (node, *convert_args), {},
                                      self.scope, self.line)
                program.save(node)
                self.hooked.append((path, kind, node))

    def fill(self, results: dict[Any, Any]) -> None:
        """Put the run's values into the CacheDict, one Entry per module call."""
        entries: dict[str, dict[Any, Entry]] = {}
        for site, node, spec, later in self.nodes:
            if node not in results:
                continue
            steps = node.steps
            if steps is None or steps.single:  # one forward pass (or one decoding step)
                values = [((0, site.call), results[node])]
            else:  # inside generate: one value per decoding step, in step order
                values = [((step, site.call), value)
                          for step, value in enumerate(results[node])]
            for call, value in values:
                if later:
                    value = convert(value, self.device, self.dtype, self.detach)
                value = _relayout(value, spec)
                entry = entries.setdefault(site.path, {}).setdefault(call, Entry())
                if site.kind == INPUT:
                    args, kwargs = value
                    entry.inputs = (tuple(args), dict(kwargs))
                else:
                    entry.output = value
        for path, kind, node in self.hooked:
            for call, value in enumerate(results.get(node, ())):
                entry = entries.setdefault(path, {}).setdefault((0, call), Entry())
                if kind == INPUT:
                    args, kwargs = value
                    entry.inputs = (tuple(args), dict(kwargs))
                else:
                    entry.output = value
        for path, calls in entries.items():
            ordered = [calls[c] for c in sorted(calls)]
            self.cache._add(_key(path), ordered[0] if len(ordered) == 1 else Entries(ordered))
        self.cache._add_shared_paths(self.other_paths())


def _hooked_values(value: dict, relative: str, kind: str) -> list:
    """The inputs (or outputs) of each call of the submodule at ``relative`` in the value of
    a call made with ``hook=True`` (see :class:`~fxsight.record.program.HookedCall`)."""
    return [call["inputs" if kind == INPUT else "output"]
            for call in value["calls"].get(relative, ())]


def _hooked_call_of(path: str, hooked: dict) -> Any:
    """The call made with ``hook=True`` that the module at ``path`` is inside, or None."""
    for prefix, call in hooked.items():
        if not prefix or path == prefix or path.startswith(prefix + "."):
            return call
    return None


def _other_paths(model: torch.nn.Module) -> dict[str, str]:
    """Each path of a module registered at several paths but its first -> its first path
    (the one its events, and so its cache entries, use)."""
    first = module_paths(model)
    return {path: first[module]
            for path, module in model.named_modules(remove_duplicate=False)
            if first[module] != path}


def _skipped_spans(program: Program, index: dict[Site, int],
                   rows: dict[Any, Any]) -> list[tuple[int, int]]:
    """``(input position, output position)`` of each module call skipped for the whole
    batch: what lies strictly between does not run."""
    spans = []
    for node in program.nodes:
        if node.skip and rows[node.invoke].whole:
            site = node.site
            start = index.get(Site(site.path, INPUT, site.call))
            end = index.get(site)
            if start is not None and end is not None:
                spans.append((start, end))
    return spans


def _layout(source: Any, site: Site) -> tuple[list[Any], pytree.TreeSpec]:
    """The leaves of ``site``'s value (tensors may be left out) and its pytree layout: a
    capture's, made once per site; a scan's, from its meta value."""
    layout = getattr(source, "value_layout", None)
    if layout is not None:
        return layout(site)
    return pytree.tree_flatten(source.meta_value(site))


def _graph_argument(value: Any) -> bool:
    """Whether ``value`` (a leaf of a site's value) can be an argument of a graph node."""
    return value is None or isinstance(value, (torch.Tensor, bool, int, float, str,
                                               torch.dtype, torch.device, torch.SymInt))


def _relayout(value: Any, spec: pytree.TreeSpec) -> Any:
    """``value`` in the layout the module produced (a graph returns a ``ModelOutput`` as a
    plain dict: give it its class back)."""
    if type(value) is torch.Tensor and spec.is_leaf():
        return value  # (a module's tensor: as it is)
    leaves = pytree.tree_leaves(value)
    if len(leaves) != spec.num_leaves:
        return value
    return pytree.tree_unflatten(leaves, spec)


def _module_path(name: str, known: set[str]) -> str | None:
    """A user's module path string as a path of the model (``"model"`` is the root;
    ``"model.x"`` is ``"x"`` unless only ``"model.x"`` itself is a module)."""
    name = name.strip(".")
    if name in (ROOT, ""):
        return ""
    if name.startswith(ROOT + ".") and name[len(ROOT) + 1:] in known:
        return name[len(ROOT) + 1:]
    return name if name in known else None


def _renamed_path(model: Any, name: str) -> str | None:
    """The real path of a module path string spelled with the wrapper's ``rename=``
    aliases (``"model.layers.0"``), or None."""
    name = name.strip(".")
    for path in (name[len(ROOT) + 1:] if name.startswith(ROOT + ".") else None, name):
        if not path:
            continue
        try:
            envoy = model.get(path)
        except (AttributeError, KeyError, IndexError, TypeError):
            continue
        if isinstance(envoy, Envoy):
            return envoy._path
    return None


def _operation_path(model: Any, name: str, known: set[str], line: str) -> str:
    """A user's operation path string (``"model.transformer.h.0.attn.source.split_1"``)
    as the operation's site path, checked name by name (an unknown operation lists the
    nearest names, as ``envoy.source.<name>`` does)."""
    name = name.strip(".")
    if name.startswith(ROOT + ".") and split_path(model._module, name[len(ROOT) + 1:]):
        name = name[len(ROOT) + 1:]
    found = split_path(model._module, name)
    if found is None or found[0] not in known:
        raise TraceError(at_line(
            f"tracer.cache(modules=...): {name!r} is not an operation of this model (paths "
            f"look like 'model.transformer.h.0.attn.source.attention_interface_0')", line))
    module_path, ops = found
    envoy = model
    for part in module_path.split(".") if module_path else ():
        envoy = envoy._child(part, envoy._module._modules[part])
    operation = getattr(envoy.source, ops[0])
    for op in ops[1:]:
        operation = getattr(operation.source, op)
    return operation.path
