"""``rename=`` of a wrapper: what each key names, where its aliases are bound, and every
spelling of a module path under them (for ``tracer.cache()`` keys).

As nnsight documents ``rename``, a key is resolved from every module of the model: a
dotted key (``"transformer.h"``, ``"attn.c_proj"``) is a path relative to a module and
binds its aliases on each module it resolves from (``"mlp"``: on every block that has an
``mlp``; ``"transformer.h"``: on the model), a ``*`` component stands for any one
submodule (``"*.h"``: the ``h`` under whichever child has one), and a class key
(``{GPT2MLP: "ffn"}``) names the one direct submodule of that class. A value is one alias
or a list of them (``{"transformer": ["model", "mdl"]}``); a leading ``.`` on a key or
alias is ignored (``{".model.layers": ".layers"}``). A key that resolves from no module is
skipped, so one ``rename`` serves models that spell a module differently
(``{"attn": "att", "self_attn": "att"}``). An alias that would shadow a name, or a key
naming two modules from one, is a ``ValueError`` when the model is wrapped.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from ..record.sites import module_label

# a rule: (key: dotted path parts or a module class, aliases)
Rule = tuple[Any, tuple[str, ...]]


def normalize(rename: dict | None) -> tuple[Rule, ...]:
    """The rules of ``rename`` (checked: keys are module paths or classes, values an alias
    or a list of aliases, each a plain attribute name)."""
    rules = []
    for key, value in (rename or {}).items():
        aliases = (value,) if isinstance(value, str) else value
        if not isinstance(aliases, (list, tuple)) or not aliases or \
                not all(isinstance(a, str) and a.lstrip(".").isidentifier() for a in aliases):
            raise ValueError(f"rename={{{key!r}: {value!r}}}: the value is the name (or a "
                             f"list of names) to reach the module by")
        aliases = tuple(a.lstrip(".") for a in aliases)
        if isinstance(key, type) and issubclass(key, torch.nn.Module):
            rules.append((key, aliases))
            continue
        parts = key.lstrip(".").split(".") if isinstance(key, str) else None
        if not parts or not all(p == "*" or p.isidentifier() or p.isdigit() for p in parts):
            raise ValueError(f"rename={{{key!r}: {value!r}}}: give a module path relative "
                             f"to a module (\"mlp\", \"transformer.h\", \"*.h\") or a module "
                             f"class")
        rules.append((tuple(parts), aliases))
    return tuple(rules)


def named(module: torch.nn.Module, key: Any) -> list[tuple[str, torch.nn.Module]]:
    """The submodules ``key`` names from ``module``, as (relative path, module); a module
    held under two names counts once."""
    if isinstance(key, type):
        found = [(name, child) for name, child in module._modules.items()
                 if isinstance(child, key)]
    else:
        found = [("", module)]
        for part in key:
            step = []
            for path, owner in found:
                children = owner._modules.items() if part == "*" else \
                    [(part, owner._modules.get(part))]
                step += [(f"{path}.{name}" if path else name, child)
                         for name, child in children if child is not None]
            found = step
    unique: dict[int, tuple[str, torch.nn.Module]] = {}
    for path, child in found:
        unique.setdefault(id(child), (path, child))
    return list(unique.values())


def resolve(module: torch.nn.Module, alias: str, rules: tuple[Rule, ...],
            root: bool) -> str | None:
    """The path (relative to ``module``) that ``alias`` stands for there, or None. At the
    root, a path key may also start with ``model.`` (the root's name in cache keys)."""
    for key, aliases in rules:
        if alias not in aliases:
            continue
        matches = named(module, key)
        if not matches and root:
            matches = named(module, _without_root_name(key))
        if len(matches) == 1:
            return matches[0][0]
    return None


def _without_root_name(key: Any) -> Any:
    if isinstance(key, tuple) and len(key) > 1 and key[0] == "model":
        return key[1:]
    return ()


def bindings(root: torch.nn.Module, rules: tuple[Rule, ...]
             ) -> Iterator[tuple[str, torch.nn.Module, str, str, str]]:
    """``(owner path, owner, key, alias, target path from the root)`` of every alias the
    rules bind, over every path of every module. A key naming two modules from one is a
    ``ValueError``."""
    for path, owner in root.named_modules(remove_duplicate=False):
        for key, aliases in rules:
            matches = named(owner, key)
            if not matches and not path:
                matches = named(owner, _without_root_name(key))
            if len(matches) > 1:
                name = key.__name__ if isinstance(key, type) else ".".join(key)
                raise ValueError(
                    f"rename: the key {name!r} names {len(matches)} modules under "
                    f"{module_label(path)} ({', '.join(p for p, _ in matches)}); an alias "
                    f"names one module: key those by name")
            if matches:
                relative = matches[0][0]
                target = f"{path}.{relative}" if path else relative
                for alias in aliases:
                    yield path, owner, _key_text(key), alias, target


def _key_text(key: Any) -> str:
    return key.__name__ if isinstance(key, type) else ".".join(key)


def check(root: torch.nn.Module, rules: tuple[Rule, ...], wrapper: type,
          envoy: type) -> None:
    """Refuse an alias that a name would shadow where it is bound (an attribute of the
    ``wrapper`` class at the root, of the ``envoy`` class below it: ``output``; a module's
    ``config``; a sibling module; another key's alias to another module): reading it
    would give that, not the module renamed."""
    bound: dict[tuple[str, str], str] = {}
    for path, owner, key, alias, target in bindings(root, rules):
        relative = target[len(path) + 1:] if path else target
        earlier = bound.setdefault((path, alias), target)
        if earlier != target:
            raise ValueError(f"rename: the alias {alias!r} is bound on {module_label(path)} "
                             f"to {earlier!r} already, and {key!r} binds it to {target!r}")
        if alias == relative:
            continue  # (``{"attn": "attn"}``: nothing renamed)
        if hasattr(envoy if path else wrapper, alias):
            where = f"of every envoy ({module_label(path)}.{alias})" if path else \
                f"of the wrapper itself (model.{alias})"
            raise ValueError(f"rename: the alias {alias!r} for {key!r} is a name {where}; "
                             f"choose another name")
        if alias in owner._modules or hasattr(owner, alias):
            what = "a submodule" if alias in owner._modules else "an attribute"
            raise ValueError(f"rename: the alias {alias!r} for {key!r} would shadow "
                             f"{what} of that name of {module_label(path)} "
                             f"({type(owner).__name__}); choose another name")


def spellings(root: torch.nn.Module, rules: tuple[Rule, ...]) -> dict[str, list[str]]:
    """Each module path (every path of a module registered at several) with the other
    spellings the aliases give it: under ``{"transformer.h": "layers", "attn": "att"}``,
    ``transformer.h.0.attn`` is also ``layers.0.attn``, ``transformer.h.0.att`` and
    ``layers.0.att``."""
    if not rules:
        return {}
    aliased: dict[str, list[tuple[str, str]]] = {}  # target -> (owner path, alias)
    for path, _, _, alias, target in bindings(root, rules):
        if alias != target.rsplit(".", 1)[-1] or path != target.rpartition(".")[0]:
            aliased.setdefault(target, []).append((path, alias))
    memo: dict[str, list[str]] = {"": [""]}

    def spell(path: str) -> list[str]:
        known = memo.get(path)
        if known is not None:
            return known
        parent, _, last = path.rpartition(".")
        found = [f"{p}.{last}" if p else last for p in spell(parent)]
        for owner, alias in aliased.get(path, ()):
            found += [f"{p}.{alias}" if p else alias for p in spell(owner)]
        memo[path] = list(dict.fromkeys(found))
        return memo[path]

    out = {}
    for path, _ in root.named_modules(remove_duplicate=False):
        others = spell(path)[1:] if path else []
        if others:
            out[path] = others
    return out
