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
:func:`~.model_hooks.user_hooks`); the parameters and buffers of modules that accelerate
offloads (its hook swaps them in every forward; such models run on hooks);
``param.data = ...`` with a new dtype on a parameter other than the first of its module
(``.to()``, ``.half()`` and the like convert every parameter of a module, and are seen),
or a new device on any but the model's first.
"""

from __future__ import annotations

import itertools
import operator
import weakref
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle
from .._torch import dict_version_reader
from .dispatch import swaps_weights
from .model_hooks import TRACED_HOOK_FLAGS, _hook_keys, _only_traced_added
from .plain_values import (_SCALARS, _copy, _data, _holds_mutable, _plain, _same,
                           _slot_values, _slots, _weak)

# the bound on states remembered per model (a state seen again reuses its captures)
MAX_STATES = 8

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
            hook_owned = "_hf_hook" in d and swaps_weights(d["_hf_hook"])
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
