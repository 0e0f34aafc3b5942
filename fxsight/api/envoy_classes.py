"""``envoys=`` of a wrapper: which :class:`~fxsight.api.envoy.Envoy` subclass wraps each
submodule, as nnsight documents it.

The value is ``None`` (every submodule a plain ``Envoy``), an ``Envoy`` subclass (every
submodule), or a dict whose values are ``Envoy`` subclasses and whose keys are module
classes (the first of a module's classes, in its MRO, that is a key) or dotted path
suffixes (``"mlp"``, ``"attn.c_proj"``, ``"h.*"``; a component also matches an alias a
single-name ``rename=`` key gives it). Class keys win over path keys; a submodule no key
matches is a plain ``Envoy``. The wrapper itself stays the wrapper.
"""

from __future__ import annotations

from typing import Any

import torch

# (default class or None, ((module class, envoy class), ...), ((path parts, envoy class), ...))
Spec = tuple[Any, tuple, tuple]


def normalize(envoys: Any, base: type) -> Spec | None:
    """The ``envoys=`` value, checked: every class given subclasses ``base`` (fxsight's
    ``Envoy``)."""
    if envoys is None:
        return None
    if isinstance(envoys, type):
        return (_checked(envoys, base, "envoys"), (), ())
    if not isinstance(envoys, dict):
        raise TypeError(f"envoys= takes an Envoy subclass or a dict of them, not "
                        f"{type(envoys).__name__}")
    classes, paths = [], []
    for key, value in envoys.items():
        value = _checked(value, base, f"envoys={{{key!r}: ...}}")
        if isinstance(key, type) and issubclass(key, torch.nn.Module):
            classes.append((key, value))
        elif isinstance(key, str) and key.strip("."):
            paths.append((tuple(key.strip(".").split(".")), value))
        else:
            raise TypeError(f"envoys={{{key!r}: ...}}: a key is a torch.nn.Module class or "
                            f"a dotted module path suffix (\"mlp\", \"h.*\")")
    return (None, tuple(classes), tuple(paths))


def _checked(value: Any, base: type, where: str) -> type:
    if not (isinstance(value, type) and issubclass(value, base)):
        raise TypeError(f"{where}: {value!r} is not a subclass of fxsight's Envoy "
                        f"(`from fxsight import Envoy`; nnsight's envoy classes are "
                        f"nnsight's own)")
    return value


def class_for(spec: Spec, module: torch.nn.Module, path: str,
              names: dict[str, tuple[str, ...]], base: type) -> type:
    """The envoy class of the submodule ``module`` at ``path`` (``names``: each module
    name's single-name ``rename=`` aliases)."""
    default, classes, paths = spec
    if default is not None:
        return default
    if classes:
        for kind in type(module).__mro__:
            for key, value in classes:
                if key is kind:
                    return value
    parts = path.split(".")
    for key, value in paths:
        if len(key) <= len(parts) and all(
                k == "*" or k == p or k in names.get(p, ())
                for k, p in zip(key, parts[-len(key):])):
            return value
    return base
