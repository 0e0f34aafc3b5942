"""A model's module tree as last walked, and a cheap test that it is still the same tree."""

from __future__ import annotations

import operator
import weakref

import torch

from .._torch import dict_version_reader

_dict = operator.attrgetter("__dict__")
_submodules = operator.itemgetter("_modules")
_WALK, _MODULES = torch.nn.Module.named_modules, torch.nn.Module.modules


class ModuleTree:
    """The ``_modules`` dicts of every module of a model at one walk, with their version
    tags (CPython's, through :func:`~fxsight._torch.dict_version_reader`).

    ``named_modules()`` reads nothing but these dicts: while each module walked holds the
    very same dict, unchanged since (``model.a = new``, ``del model.a`` and
    ``model._modules[k] = m`` change the parent's dict; ``m._modules = {...}`` replaces
    it), a walk from the root meets the same modules under the same names. Holds the
    modules it walked (the caller holds the root), until it is found out of date."""

    __slots__ = ("modules", "dicts", "versions", "read")

    def __init__(self, modules: list[torch.nn.Module], read):
        self.modules = modules
        self.dicts = list(map(_submodules, map(_dict, modules)))
        self.read = read
        self.versions = list(map(read, self.dicts))

    @classmethod
    def of(cls, modules: list[torch.nn.Module]) -> "ModuleTree | None":
        """The tree of the ``modules`` a walk met now (the root first), or ``None`` where no
        version tags can be read."""
        read = dict_version_reader()
        if read is None or any(type(m).named_modules is not _WALK or
                               type(m).modules is not _MODULES for m in modules):
            return None  # (a walk of a class's own may read more than these dicts)
        return cls(modules, read)

    def unchanged(self, root: torch.nn.Module) -> bool:
        """Whether a walk from ``root`` now would meet the same modules by the same names
        (any doubt answers ``False``)."""
        if not self.modules or self.modules[0] is not root:
            return False
        try:
            now = map(_submodules, map(_dict, self.modules))
            return all(map(operator.is_, now, self.dicts)) and \
                list(map(self.read, self.dicts)) == self.versions
        except Exception:  # noqa: BLE001 - a module without its dict: walk again
            return False


# model -> ((module, its ``_modules`` dict's version, its first path), ...) of the last
# walk, every module held weakly: the table keeps no module alive (a submodule that
# refers to its root would keep the entry's key alive through strong references)
_FIRST_PATHS: "weakref.WeakKeyDictionary[torch.nn.Module, tuple]" = \
    weakref.WeakKeyDictionary()


def first_paths(model: torch.nn.Module) -> dict[torch.nn.Module, str]:
    """Each module of ``model`` with its dotted path (the first path of a shared module),
    as ``named_modules()`` walks them; walked again only where a ``_modules`` dict of a
    module met changed or was replaced since (its version tag: CPython gives every dict,
    new or changed, a number of its own), a module met is gone, or a class walks its own
    way. The dict is the caller's."""
    read = dict_version_reader()
    walked = _FIRST_PATHS.get(model)
    if walked is not None and read is not None:
        found = _still_walked(walked, read)
        if found is not None:
            return found
    found = {}
    for path, module in model.named_modules():
        found.setdefault(module, path)
    if read is not None and all(type(m).named_modules is _WALK for m in found):
        try:
            _FIRST_PATHS[model] = tuple((weakref.ref(m), read(_submodules(_dict(m))), p)
                                        for m, p in found.items())
        except (KeyError, TypeError):  # (a module without its dict, or not weakly held)
            _FIRST_PATHS.pop(model, None)
    return found


def _still_walked(walked: tuple, read) -> dict[torch.nn.Module, str] | None:
    """The first paths of a stored walk where every module met is alive and holds a
    ``_modules`` dict of the same version (any doubt: ``None``)."""
    found: dict[torch.nn.Module, str] = {}
    try:
        for reference, version, path in walked:
            module = reference()
            if module is None or read(_submodules(_dict(module))) != version:
                return None
            found[module] = path
    except Exception:  # noqa: BLE001 - a module without its dict: walk again
        return None
    return found
