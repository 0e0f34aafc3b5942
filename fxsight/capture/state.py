"""Model state: what a capture bakes in besides its inputs, watched cheaply between traces.

A captured graph holds the parameter and buffer objects it read, their dtypes, the module
tree as it was, every module's ``training`` flag, the plain Python attributes (numbers,
strings, tuples, small containers of those and of tensors, settings objects such as
transformers' configs, with a ``__dict__`` or slots) the forward read, and
what the hooks that ran did. A change to any of these between traces must
lead to a new capture: :func:`state_token` names the model's current state with a number
that changes when one of them did (and comes back when the state does).

Nothing is installed anywhere: each call compares a snapshot with the model in a few
C-level passes (``map`` over the modules, tuple and dict comparisons whose elements are
mostly the very same objects, compared by identity). Where CPython's dict version tags can
be read (PEP 509; through dynamo's reader, tried on a probe dict first), a call first reads
the tags of the dicts every such change goes through (each module's ``__dict__`` and
``_modules``, the ``_parameters`` and ``_buffers`` dicts, settings objects' attributes): when
none changed since the state was last found, only what changes no dict is compared (plain
lists, dicts and sets changed in place, the first parameters' dtype and device, hooks),
which touches far less memory right after a forward pass. The snapshot refers to the
model's modules and to other objects that could lead back to the model only weakly, so it
never keeps a model alive.

Not seen (documented limits): the contents of a list, dict or set attribute (of a module
or of a settings object) of more than ``_MAX_CONTAINER`` elements changed in place;
settings objects nested more than one level down, and the attributes of other objects
(compared by identity: one that holds a module, a bound method, a closure); class
attributes (and ``module.__class__ = ...``), globals and closures that ``forward`` reads
(models with forward or backward hooks of the user's are not captured, see
:func:`user_hooks`); the parameters and buffers of modules that accelerate offloads (its
hook swaps them in every forward; such models run on hooks); ``param.data = ...`` with a
new dtype on a parameter other than the first of its module (``.to()``, ``.half()`` and
the like convert every parameter of a module, and are seen), or a new device on any but
the model's first.
"""

from __future__ import annotations

import collections
import enum
import itertools
import operator
import sys
import types
import weakref
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle
from .._torch import dict_version_reader, global_hook_keys
from .dispatch import is_accelerate_hook, offloads

# the bound on states remembered per model (a state seen again reuses its captures)
MAX_STATES = 8

_SCALARS = frozenset({type(None), bool, int, float, complex, str, bytes, torch.dtype,
                      torch.device, torch.layout, torch.memory_format})
_MAX_CONTAINER = 64  # elements of a plain list, dict or set compared by value each trace
# containers of plain values compared by value (a snapshot holds a copy of the mutable ones)
_SEQUENCES = frozenset({tuple, list, set, frozenset, torch.Size, collections.deque})
_MAPPINGS = frozenset({dict, collections.OrderedDict, collections.defaultdict})
_CONTAINERS = _SEQUENCES | _MAPPINGS
_MUTABLE = frozenset({list, set, collections.deque, *_MAPPINGS})

# internal dicts of nn.Module that no capture depends on
_IGNORED = frozenset({
    "_non_persistent_buffers_set", "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs",
    "_is_full_backward_hook", "_state_dict_hooks", "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks"})
_HOOKS = frozenset({"_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
                    "_backward_pre_hooks"})
_TENSORS = frozenset({"_parameters", "_buffers"})
# compared apart from a module's other values (or not at all)
_APART = _IGNORED | _HOOKS | _TENSORS | {"_modules"}

_call = operator.call
_dtype = operator.attrgetter("dtype")
_dict = operator.attrgetter("__dict__")  # (faster than ``vars``)
_submodules = operator.itemgetter("_modules")
_TOKENS = itertools.count(1)


def _plain(value: Any, budget: list[int] | None = None, inner: bool = False) -> bool:
    """A value compared by equality: scalars, enums and small containers of those, whose
    elements may be tensors too (``inner``: a steering module's dict of vectors; a
    container's copy holds the same tensors, so replacing one shows, by identity or, for
    one element, by value; a tensor changed in place is the one the graph reads)."""
    kind = type(value)
    if kind in _SCALARS or isinstance(value, enum.Enum) or \
            (inner and isinstance(value, torch.Tensor)):
        return True
    if budget is None:
        budget = [_MAX_CONTAINER]
    if kind in _SEQUENCES:
        budget[0] -= len(value)
        return budget[0] >= 0 and all(_plain(v, budget, True) for v in value)
    if kind in _MAPPINGS:
        if kind is collections.defaultdict and not (
                value.default_factory is None or isinstance(value.default_factory, type)):
            return False  # (a factory function could lead back to the model)
        budget[0] -= len(value)
        return budget[0] >= 0 and all(_plain(k, budget) and _plain(v, budget, True)
                                      for k, v in value.items())
    return False


def _copy(value: Any) -> Any:
    """A plain value as it is now (mutable containers copied: an in-place change shows)."""
    kind = type(value)
    if kind is list:
        return [_copy(v) for v in value]
    if kind in _MAPPINGS:
        items = {k: _copy(v) for k, v in value.items()}
        if kind is collections.defaultdict:
            return collections.defaultdict(value.default_factory, items)
        return items if kind is dict else kind(items)
    if kind is set:
        return set(value)
    if kind is collections.deque:
        return collections.deque(map(_copy, value), value.maxlen)
    return value


def _weak(value: Any) -> Any:
    """A weak proxy of ``value`` where it can be: it compares equal to its referent alone
    (through the referent's own comparison) and keeps nothing alive."""
    if value is None or type(value) in _SCALARS:
        return value
    try:
        return weakref.proxy(value)
    except TypeError:
        return value


def _plain_any_size(value: Any) -> bool:
    """A container of plain values of any size (a config's ``id2label`` of 1000 labels, its
    ``layer_types`` of 80 layers): a settings object holds it, compared by identity (its
    contents changed in place are not seen, as a module's large containers)."""
    return type(value) in _CONTAINERS and _plain(value, [sys.maxsize])


def _named_function(value: Any) -> bool:
    """A function or class a settings object may hold (its ``act_fn``), compared by
    identity: a class, a builtin function of a module or class (``torch.relu``), or a
    Python function with no closure and plain defaults (a module's ``def``); none of
    them leads back to a model."""
    kind = type(value)
    if isinstance(value, type):
        return True
    if kind is types.BuiltinFunctionType:
        owner = getattr(value, "__self__", None)
        return owner is None or isinstance(owner, (types.ModuleType, type))
    return kind is types.FunctionType and value.__closure__ is None and \
        _plain(value.__defaults__ or ()) and _plain(value.__kwdefaults__ or {})


def _data(value: Any, depth: int = 2) -> bool:
    """A settings object (a config, a steering helper): attributes in a ``__dict__`` that
    are plain (small containers of plain values compared by value, larger ones by
    identity), tensors (by identity), functions (:func:`_named_function`, by identity) or
    settings objects themselves; held strongly, it cannot lead back to a model."""
    if isinstance(value, (type, torch.nn.Module, torch.Tensor, dict, list, tuple, set,
                          frozenset)) or callable(value) or is_accelerate_hook(value):
        return False
    attributes = getattr(value, "__dict__", None)
    if type(attributes) is not dict or depth == 0:
        return False
    return all(_plain(v, None, True) or _plain_any_size(v) or _named_function(v) or
               _data(v, depth - 1) for v in attributes.values())


def _slots(value: Any) -> tuple[str, ...] | None:
    """The attribute names of a settings object without a ``__dict__`` (a dataclass made
    with ``slots=True``) whose attributes are all set and plain, else ``None``."""
    kind = type(value)
    if kind in _SCALARS or kind in _CONTAINERS or "__slots__" not in kind.__dict__ or \
            isinstance(value, (type, torch.nn.Module, torch.Tensor)) or callable(value):
        return None
    try:
        if hasattr(value, "__dict__"):
            return None
        names = []
        for base in kind.__mro__:
            declared = base.__dict__.get("__slots__", ())
            names += [declared] if isinstance(declared, str) else list(declared)
        names = tuple(n for n in dict.fromkeys(names) if n not in ("__weakref__", "__dict__"))
        plain = names and all(_plain(v) or _plain_any_size(v) or _named_function(v)
                              for v in (getattr(value, n) for n in names))
    except Exception:  # noqa: BLE001 - a slot never set, an object's own __getattr__
        return None
    return names if plain else None


def _slot_values(value: Any, names: tuple[str, ...]) -> tuple:
    """The values of ``value``'s slots ``names``."""
    return tuple(getattr(value, n) for n in names)


class Watch:
    """A snapshot of one model's state; :meth:`unchanged` compares it with the model now."""

    def __init__(self, model: torch.nn.Module, token: int):
        self.token = token
        modules = list(model.modules())
        index = {id(m): i for i, m in enumerate(modules)}
        self.paths = {id(m): p for p, m in reversed(list(model.named_modules()))}
        self.refs = [weakref.ref(m) for m in modules]
        dicts = [vars(m) for m in modules]
        self.lens = [len(d) for d in dicts]
        # the module tree: the children of the modules that have some, as indices into
        # ``modules`` (``len(modules)`` standing for a ``None`` child); a leaf's (empty)
        # ``_modules`` is compared with its other values
        parents = [i for i, d in enumerate(dicts) if d["_modules"]]
        self.parents = _getter(parents)
        children = [index.get(id(c), len(modules)) if c is not None else len(modules)
                    for i in parents for c in dicts[i]["_modules"].values()]
        self.children = _getter(children)
        self.keys: list[tuple] = []
        self.getters: list = []
        self.values: list = []
        self.exact: list = []     # (module index, key, name or None, object): by identity
        self.first_parameters: list = []  # (the dtype of each module's first parameter)
        self.objects: list = []   # (settings object, a copy of its attributes)
        # (settings object without a ``__dict__``, its slots' names, a copy of their
        # values): no dict version shows a change, so compared on every check
        self.slotted: list = []
        # every ``_parameters`` and ``_buffers`` dict (held: tensors lead to no module)
        # and a copy of each
        self.tensor_dicts: list = []
        self.tensor_copies: list = []
        self.tensor_owners: list = []  # (module index, key) of each
        self.mutables: list = []  # (module index, key, copy) of lists, dicts, sets
        tensors: list = []
        objects: set[int] = set()
        for i, d in enumerate(dicts):
            # (accelerate loads an offloaded module's weights in each forward and puts new
            # meta tensors back after it: those tensors are the hook's, never captured)
            hook_owned = "_hf_hook" in d and offloads(d["_hf_hook"])
            for key in () if hook_owned else _TENSORS:
                self._tensors(i, key, d[key], tensors)
            keys = tuple(k for k in d if k not in _APART or (k == "_modules" and not d[k]))
            snapshot = tuple(self._snapshot(i, k, d[k], tensors, objects) for k in keys)
            # (a copy: a container too large to copy is the live one, never seen changed)
            self.mutables += [(i, k, v) for k, v in zip(keys, snapshot)
                              if k != "_modules" and v is not d[k] and _holds_mutable(v)]
            self.keys.append(keys)
            self.getters.append(operator.itemgetter(*keys))
            self.values.append(snapshot if len(keys) > 1 else snapshot[0])
        self.dtypes = list(map(_dtype, self.first_parameters))
        # (and the device of the first: the model's, unless it is spread over devices)
        self.device = self.first_parameters[0].device if self.first_parameters else None
        self.tensor_ids = tuple(map(id, tensors))  # a new set of tensors: old states go
        # what :meth:`unchanged` compares: the dicts that held tensors with their copies,
        # the others (most ``_buffers``, containers' ``_parameters``) by their length
        self.held = [d for d in self.tensor_dicts if d]
        self.held_copies = [c for c in self.tensor_copies if c]
        self.empty = [d for d in self.tensor_dicts if not d]
        # hooks: by the keys of every hook dict; the global count of hook handles ever
        # made tells, while there are none, that none was added since
        self.hook_keys = _hook_keys(modules)
        self.hooked = any(map(any, self.hook_keys))
        self.next_id = RemovableHandle.next_id
        # the fast path of :meth:`unchanged`: the version tags of the dicts a change goes
        # through (each module's ``__dict__`` and ``_modules``, every ``_parameters`` and
        # ``_buffers``, every settings object's attributes), and what changes no dict
        # (plain lists, dicts and sets changed in place; ``param.data = ...``; hooks)
        self.object_mutables = [(attributes, key, value)
                                for attributes, keys, values in self.objects
                                for key, value in zip(keys, values)
                                if value is not attributes[key] and _holds_mutable(value)]
        self.fixed_dicts = [*self.tensor_dicts,
                            *(attributes for attributes, _, _ in self.objects)]
        # the same comparisons grouped by dict: one C-level getter per dict, one
        # comparison of the lists (most models have a few such dicts: PreTrainedModel's
        # plan lists, a config's label maps)
        self.mutable_sources, self.mutable_getters, self.mutable_values = _grouped(
            [*self.mutables, *self.object_mutables])
        self.read_version = dict_version_reader()
        self.versions = self._versions(dicts) if self.read_version is not None else None

    def _tensors(self, index: int, key: str, value: dict, tensors: list) -> None:
        first = key == "_parameters"
        for name, tensor in value.items():
            if tensor is None:
                continue
            tensors.append(tensor)
            if first:
                self.first_parameters.append(tensor)
                first = False
            if tensor.numel() <= 1:  # (a one-element tensor compares by value)
                self.exact.append((index, key, name, tensor))
        self.tensor_dicts.append(value)
        self.tensor_copies.append(dict(value))
        self.tensor_owners.append((index, key))

    def _snapshot(self, index: int, key: str, value: Any, tensors: list,
                  objects: set[int]) -> Any:
        if _plain(value):
            return _copy(value)
        if isinstance(value, torch.Tensor):  # a plain tensor attribute: by identity
            self.exact.append((index, key, None, value))
            return value
        if _data(value):
            self._settings(value, objects)
            return value
        names = _slots(value)
        if names is not None:
            if id(value) not in objects:
                objects.add(id(value))
                # (small containers copied, larger ones held: as a ``__dict__``'s)
                self.slotted.append((value, names, tuple(
                    _copy(v) if _plain(v) else v for v in _slot_values(value, names))))
            return value
        return _weak(value)

    def _slots_unchanged(self) -> bool:
        """The slotted settings objects' attributes as in the snapshot."""
        return all(_slot_values(value, names) == values
                   for value, names, values in self.slotted)

    def _settings(self, value: Any, objects: set[int]) -> None:
        """Watch a settings object's attributes, and those of the settings objects it holds
        (a config's ``text_config``): each is compared by value, as the model's own."""
        if id(value) in objects:
            return
        objects.add(id(value))
        # (its ``__dict__`` is held: a config's ``__getattribute__`` is slow)
        attributes = object.__getattribute__(value, "__dict__")
        self.objects.append((attributes, list(attributes),
                             [_copy(v) if _plain(v) else v for v in attributes.values()]))
        for nested in attributes.values():
            if _data(nested, 1):
                self._settings(nested, objects)

    def _versions(self, dicts: list[dict]) -> list[int]:
        read = self.read_version
        return [*map(read, dicts), *map(read, map(_submodules, dicts)),
                *map(read, self.fixed_dicts)]

    def _unchanged_besides_dicts(self, dicts: list[dict]) -> bool:
        """What a dict's version does not show: plain lists, dicts and sets changed in
        place, the first parameters' dtype and the first's device (``param.data = ...``)."""
        if self.mutable_getters:
            sources = [dicts[i] if type(i) is int else i for i in self.mutable_sources]
            if list(map(_call, self.mutable_getters, sources)) != self.mutable_values:
                return False
        return self._parameters_alike() and (not self.slotted or self._slots_unchanged())

    def _parameters_alike(self) -> bool:
        """The first parameters' dtypes and the first's device as in the snapshot."""
        return list(map(_dtype, self.first_parameters)) == self.dtypes and \
            (self.device is None or self.first_parameters[0].device == self.device)

    def _hooks_unchanged(self, modules: list) -> bool:
        """Hooks, by their handles' keys, compared where there were some or a handle was
        made since (torch numbers every hook handle it makes)."""
        if self.hooked or RemovableHandle.next_id != self.next_id:
            if _hook_keys(modules) != self.hook_keys:
                return False
            if not self.hooked:
                self.next_id = RemovableHandle.next_id
        return True

    def unchanged(self) -> bool:
        """Whether the model is in this state still (any doubt answers ``False``).

        Where no dict the snapshot covers has changed since it was last found unchanged
        (their version tags, a few C calls per module), only what no dict shows is
        compared; otherwise everything, value by value."""
        try:
            modules = list(map(_call, self.refs))
            dicts = list(map(_dict, modules))  # (a dead module: AttributeError)
            if self.versions is not None and self._versions(dicts) == self.versions:
                return self._unchanged_besides_dicts(dicts) and self._hooks_unchanged(modules)
            if not self._unchanged_values(modules, dicts):
                return False
            if self.versions is not None:
                self.versions = self._versions(dicts)
            return True
        except Exception:  # noqa: BLE001 - a dead referent, a missing key, tensors compared
            return False

    def _unchanged_values(self, modules: list, dicts: list[dict]) -> bool:
        """The whole comparison, value by value."""
        if list(map(len, dicts)) != self.lens or \
                list(map(_call, self.getters, dicts)) != self.values or \
                self.held != self.held_copies or any(map(len, self.empty)) or \
                not self._parameters_alike():
            return False
        children = itertools.chain.from_iterable(
            map(dict.values, map(_submodules, self.parents(dicts))))
        if tuple(children) != self.children([*modules, None]):
            return False
        for i, key, name, obj in self.exact:
            found = dicts[i][key] if name is None else dicts[i][key][name]
            if found is not obj:
                return False
        for attributes, keys, values in self.objects:  # (renamed, same values: no)
            if list(attributes.values()) != values:
                return False
        if self.slotted and not self._slots_unchanged():
            return False
        return self._hooks_unchanged(modules)

    def _modules_now(self):
        for ref, keys, values in zip(self.refs, self.keys, self.values):
            module = ref()
            if module is not None:
                yield module, keys, values if len(keys) > 1 else (values,)

    def changes(self, plain: bool = False) -> list[str]:
        """What differs now, in words (``"module 'a.b', attribute 'calls'"``); slow.

        With ``plain``, only plain attributes and settings objects are compared (while a
        capture runs, parameters are fake tensors and fxsight's hooks are in place)."""
        found = []
        for module, keys, values in self._modules_now():
            where = f"module {self.paths.get(id(module)) or 'model'!r}"
            now = vars(module)
            for key, old in zip(keys, values):
                if plain and not (_plain(old) or _data(old)):
                    continue
                if key not in now:
                    found.append(f"{where}, attribute {key!r} (deleted)")
                elif not _same(now[key], old):
                    found.append(f"{where}, attribute {key!r}")
            found += [f"{where}, attribute {key!r} (added)" for key in now
                      if key not in keys and key not in _APART
                      and key not in TRACED_HOOK_FLAGS
                      and not _instrumented(key, now[key])]
        for (index, key), now, old in zip(self.tensor_owners, self.tensor_dicts,
                                          self.tensor_copies):
            if not plain and not _same(now, old):
                module = self.refs[index]()
                path = self.paths.get(id(module)) or "model"
                found.append(f"module {path!r}, {key[1:]}")
        for now, keys, values in self.objects:
            old = dict(zip(keys, values))
            found += [f"a settings object's attribute {key!r}"
                      for key in {*now, *old}
                      if not _same(now.get(key, _MISSING), old.get(key, _MISSING))]
        for value, names, values in self.slotted:
            found += [f"a settings object's attribute {name!r}" for name, old
                      in zip(names, values) if not _same(getattr(value, name), old)]
        return found

    def only_traced_hooks_added(self) -> bool:
        """Whether the model differs from the snapshot only by hooks it installed on
        itself that a capture traces, with the attribute that marks them installed
        (transformers' output-capturing hooks, on the first forward that asks for
        ``output_attentions`` or ``output_hidden_states``): a plain forward installs them
        once and keeps them, so a capture keeps them too."""
        try:
            modules = list(map(_call, self.refs))
            dicts = list(map(_dict, modules))
        except AttributeError:  # (a dead module)
            return False
        flags = [sum(1 for k in TRACED_HOOK_FLAGS if k in d and k not in keys)
                 for d, keys in zip(dicts, self.keys)]
        if not any(flags) or \
                list(map(len, dicts)) != [n + f for n, f in zip(self.lens, flags)] or \
                not self._parameters_alike() or self.changes():
            return False
        now = _hook_keys(modules)
        shared = len(now) - len(modules)  # (torch's global hook dicts come first)
        if len(now) != len(self.hook_keys) or now[:shared] != self.hook_keys[:shared]:
            return False
        return all(_only_traced_added(m, old, new) for m, old, new
                   in zip(modules, self.hook_keys[shared:], now[shared:]))

    def restore(self) -> None:
        """Put back what the snapshot holds (plain attributes, tensors, parameters and
        buffers) where it changed, and remove plain attributes added since: after a
        capture whose forward changed them, on fake tensors."""
        for module, keys, values in self._modules_now():
            now = vars(module)
            for key, old in zip(keys, values):
                current = now.get(key, _MISSING)
                if key != "_modules" and \
                        (_plain(old) or isinstance(old, torch.Tensor) or _data(old)) \
                        and not _same(current, old):
                    now[key] = _copy(old)
            for key in [k for k in now if k not in keys and k not in _APART
                        and k not in TRACED_HOOK_FLAGS]:  # (a flag stays with its hooks)
                del now[key]
        for now, old in zip(self.tensor_dicts, self.tensor_copies):
            if not _same(now, old):
                now.clear()
                now.update(old)
        for now, keys, values in self.objects:
            if list(now.values()) != values or list(now) != keys:
                now.clear()
                # (a container too large to copy was held as it is: put back as it is)
                now.update({k: _copy(v) if _plain(v) else v for k, v in zip(keys, values)})
        for value, names, values in self.slotted:
            for name, old in zip(names, values):
                if not _same(getattr(value, name), old):
                    object.__setattr__(value, name, _copy(old))  # (a frozen one too)


_MISSING = object()


def _only_traced_added(module: torch.nn.Module, old: tuple, new: tuple) -> bool:
    """Whether ``module``'s hook keys went from ``old`` to ``new`` by adding forward hooks
    or pre-hooks that a capture traces, and nothing else."""
    for i, (before, now) in enumerate(zip(old, new)):
        if before == now:
            continue
        if i > 1 or now[:len(before)] != before:
            return False
        hooks = module._forward_hooks if i == 0 else module._forward_pre_hooks
        if not all(is_traced_hook(hooks[key]) for key in now[len(before):]):
            return False
    return True


def _instrumented(key: str, value: Any) -> bool:
    """fxsight's own instrumented ``forward`` (``capture.operations``), bound to a module
    while events are installed."""
    return key == "forward" and getattr(value, "__fxsight_operations__", False)


def _getter(indices: list) -> Any:
    """``items -> tuple(items[i] for i in indices)`` (indices or keys), in C."""
    if len(indices) == 1:
        index = indices[0]
        return lambda items: (items[index],)
    return operator.itemgetter(*indices) if indices else lambda items: ()


def _grouped(entries: list) -> tuple[list, list, list]:
    """``(source, key, value)`` entries (a source: a module's index, whose ``__dict__`` is
    found at check time, or a dict itself) grouped by source: ``(sources, getters,
    values)`` with one C-level getter per source (``d -> (d[key], ...)``) and the tuple
    of values it should return."""
    groups: dict = {}
    for source, key, value in entries:
        group = source if type(source) is int else ("dict", id(source))
        _, keys, values = groups.setdefault(group, (source, [], []))
        keys.append(key)
        values.append(value)
    return ([source for source, _, _ in groups.values()],
            [_getter(keys) for _, keys, _ in groups.values()],
            [tuple(values) for _, _, values in groups.values()])


def _hook_keys(modules: list) -> list:
    """The keys (unique handle ids) of every hook dict of ``modules`` and torch's global
    ones."""
    keys = global_hook_keys()
    for m in modules:
        keys.append((tuple(m._forward_hooks), tuple(m._forward_pre_hooks),
                     tuple(m._backward_hooks), tuple(m._backward_pre_hooks)))
    return keys


def _holds_mutable(value: Any) -> bool:
    """Whether a snapshot's value is or holds a list, dict, set or deque (changed in
    place, the dict that holds it keeps its version)."""
    kind = type(value)
    if kind in _MUTABLE:
        return True
    if kind is tuple or kind is frozenset or kind is torch.Size:
        return any(map(_holds_mutable, value))
    return False


def _same(now: Any, old: Any) -> bool:
    if now is old:
        return True
    try:
        return type(now) is old.__class__ and bool(now == old)
    except Exception:  # noqa: BLE001 - tensors compared, a dead proxy
        return False


class KeptAttributes:
    """``with KeptAttributes(model):`` around ``torch.export``: each module attribute that
    export put back as an equal copy (it does so with every container its pytree knows:
    transformers' ``_tp_plan`` dicts, a LayerNorm's ``normalized_shape``, OrderedDicts,
    defaultdicts, deques, named tuples) is the model's own object again, so a reference
    the caller holds to it stays the model's. An attribute whose value changed is left as
    it is (:class:`Watch` decides about it)."""

    def __init__(self, model: torch.nn.Module):
        self.entries = [(d, key, value) for d in map(vars, model.modules())
                        for key, value in d.items()
                        if key not in _APART and value is not None and
                        type(value) not in _SCALARS and
                        not isinstance(value, (torch.Tensor, torch.nn.Module))]

    def __enter__(self) -> "KeptAttributes":
        return self

    def __exit__(self, *exc: Any) -> None:
        for attributes, key, value in self.entries:
            now = attributes.get(key, value)
            if now is not value and _same(now, value):
                attributes[key] = value


_STATES: "weakref.WeakKeyDictionary[torch.nn.Module, list[Watch]]" = \
    weakref.WeakKeyDictionary()


def state_token(model: torch.nn.Module, dropped: Any = None) -> int:
    """A number for ``model``'s current state: the same while nothing a capture depends on
    changed, the same again when a recent state comes back (``model.train()`` then
    ``model.eval()``), new otherwise.

    ``dropped(model, tokens)`` is called with the states forgotten, whose captures are of no use
    any more: the oldest beyond :data:`MAX_STATES`, and all those whose parameters and
    buffers were other tensors (their captures hold the old tensors)."""
    watches = _STATES.get(model)
    if watches:
        if watches[0].unchanged():
            return watches[0].token
        for i in range(1, len(watches)):
            if watches[i].unchanged():
                watches.insert(0, watches.pop(i))
                return watches[0].token
    else:
        watches = _STATES[model] = []
    watch = Watch(model, next(_TOKENS))
    kept = [w for w in watches if w.tensor_ids == watch.tensor_ids][:MAX_STATES - 1]
    forgotten = {w.token for w in watches} - {w.token for w in kept}
    watches[:] = [watch, *kept]
    if forgotten and dropped is not None:
        dropped(model, forgotten)
    return watch.token


def current_watch(model: torch.nn.Module) -> Watch | None:
    """The snapshot that :func:`state_token` last matched for ``model``."""
    watches = _STATES.get(model)
    return watches[0] if watches else None


def forget(model: torch.nn.Module) -> None:
    _STATES.pop(model, None)


def user_hooks(model: torch.nn.Module) -> tuple[str | None, list]:
    """The forward and backward hooks on ``model``: ``(a description of torch's global
    module hooks, or None; [(path, module, description of its first hook)] of the
    modules with some)``.

    Export runs a forward hook while capturing, on fake tensors, and keeps what it did to
    the values then; the captured graph never runs it again, and it calls no module, so a
    module's backward hook (``register_full_backward_hook``, ``..._pre_hook``,
    ``register_backward_hook``) never runs either and the gradients are not the plain
    backward's. So ``capture`` refuses a model with such hooks (the hooks backend runs
    them on real values, as a plain forward and backward do)."""
    forward, forward_pre, backward, backward_pre = global_hook_keys()
    global_hooks = None
    if forward or forward_pre:
        global_hooks = "torch has global forward hooks (register_module_forward_hook)"
    elif backward or backward_pre:
        global_hooks = ("torch has global backward hooks "
                        "(register_module_full_backward_hook)")
    hooked = []
    for path, sub in model.named_modules():
        for kind, hooks in (("forward pre-hook", sub._forward_pre_hooks),
                            ("forward hook", sub._forward_hooks),
                            ("backward pre-hook", sub._backward_pre_hooks),
                            ("backward hook", sub._backward_hooks)):
            hook = next((h for h in hooks.values() if not is_traced_hook(h)), None)
            if hook is not None:
                hooked.append((path, sub, f"module {path or 'model'!r} has a {kind} "
                                          f"({describe_hook(hook)})"))
                break
    return global_hooks, hooked


# Hooks a model installs on itself whose whole effect happens inside its own forward:
# transformers' output-capturing hooks (installed once ``output_attentions`` or
# ``output_hidden_states`` is first asked for) append a module's output to a collector
# that the model's forward sets and turns into its own output; export traces that, so the
# captured graph returns what a plain forward returns, for the arguments it was captured
# with (part of the capture's key).
_TRACED_HOOK_MODULES = frozenset({"transformers.utils.output_capturing"})
# the attributes by which a model marks such hooks installed (set with them, on the first
# forward that asks for them): never a change of state, never removed (its hooks stay)
TRACED_HOOK_FLAGS = frozenset({"_output_capturing_hooks_installed"})


def is_traced_hook(hook: Any) -> bool:
    """Whether ``hook`` is one a capture may trace into the graph (see above)."""
    return getattr(hook, "__module__", None) in _TRACED_HOOK_MODULES


def describe_hook(hook: Any) -> str:
    """A hook as messages name it: its qualified name and where it is defined."""
    code = getattr(hook, "__code__", None)
    name = getattr(hook, "__qualname__", None) or type(hook).__name__
    if code is not None:
        return f"{name} at {code.co_filename}:{code.co_firstlineno}"
    return name
