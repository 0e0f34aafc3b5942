"""What decides a model's forward besides its weights: the rest of what tells a checkpoint of
a sweep which model wrote it (the weights are :mod:`.weights`).

:func:`model_configuration` describes, as ``{key: value}`` strings:

- **Every module's settings**: its class (module and qualified name: another class is
  another forward) and its public attributes of plain values (``None``, bools, numbers,
  strings, and lists, tuples and dicts of them). That is where torch modules keep the
  arguments their forward reads (a ``LayerNorm``'s ``eps``, a ``Dropout``'s ``p``, a
  ``GELU``'s ``approximate``, a ``Conv``'s ``stride``; ``training``, which turns dropout
  on), and where a plain module keeps its own (``self.scale = 0.5``). Left out: private
  attributes (hook bookkeeping, transformers' initialization flags, kernel caches: derived
  from the public ones, or not read by the forward), values of other types (tensors are the
  weights' digest; devices and dtypes are placement, and the digest has the dtypes), and
  two public attributes that say where a model came from, not how it computes:
  ``name_or_path`` and ``hf_device_map`` (transformers sets them on loading; an offloaded
  model computes as the same model in memory).
- **Every transformers config a module holds** (``module.config``, an attention module's
  config, a sub-config): its ``to_dict()``, flattened, less the fields that say where it
  came from (``_name_or_path``, ``transformers_version``, ``architectures``,
  ``_commit_hash``) and the dtype it was loaded in (``dtype``, ``torch_dtype``: the weights'
  digest has the real dtypes; a model loaded in float64 and one cast with ``.double()``
  compute alike), plus its private ``*_implementation*`` fields, which ``to_dict()`` leaves
  out and the forward dispatches on (``_attn_implementation``: eager and sdpa attention
  give other numbers).

The same model built again, deep-copied, saved and loaded again, or offloaded gives the
same description; lists and tuples read alike (a config read back from JSON has lists).
"""

from __future__ import annotations

import sys
from typing import Any, Iterator

import torch

_PLAIN = (bool, int, float, complex, str, type(None))
# public module attributes that say where a model came from, not how it computes
_NOT_THE_FORWARD = frozenset({"name_or_path", "hf_device_map"})
# config fields that say where a config came from or the dtype it was loaded in
_NOT_THE_FORWARD_CONFIG = frozenset({"_name_or_path", "transformers_version", "architectures",
                                     "_commit_hash", "dtype", "torch_dtype"})


def model_configuration(module: torch.nn.Module) -> dict[str, str]:
    """What decides ``module``'s forward besides its parameters and buffers, as
    ``{key: value}`` strings: each module's class and plain public attributes, each
    transformers config's fields (see the module's docstring for what is left out)."""
    description: dict[str, str] = {}
    configs: dict[int, tuple[str, Any]] = {}
    for path, sub in module.named_modules():
        name = f"module {path or '(model)'}"
        description[name] = f"{type(sub).__module__}.{type(sub).__qualname__}"
        for attribute, value in _settings(sub):
            description[f"{name}.{attribute}"] = value
        for attribute, value in vars(sub).items():
            if _is_config(value):
                _collect_configs(value, f"{path}.{attribute}" if path else attribute,
                                 configs)
    for label, config in configs.values():
        for key, value in _config_fields(config):
            description[f"{label}.{key}"] = value
    return description


def differences(then: dict[str, str], now: dict[str, str], most: int = 4) -> str:
    """The keys whose values differ between two descriptions, the first ``most`` of them
    with both values."""
    changed = sorted(k for k in {*then, *now} if then.get(k) != now.get(k))
    shown = [f"{key}: {then.get(key, '(absent)')} then, {now.get(key, '(absent)')} now"
             for key in changed[:most]]
    more = f"; and {len(changed) - most} more" if len(changed) > most else ""
    return "; ".join(shown) + more


def _settings(module: torch.nn.Module) -> Iterator[tuple[str, str]]:
    """The module's public attributes of plain values (those that can set its forward)."""
    for name, value in sorted(vars(module).items()):
        if not name.startswith("_") and name not in _NOT_THE_FORWARD and _is_plain(value):
            yield name, _canonical(value)


def _is_config(value: Any) -> bool:
    transformers = sys.modules.get("transformers")  # (a config exists only if imported)
    if transformers is None:
        return False
    base = getattr(transformers, "PreTrainedConfig", None) \
        or getattr(transformers, "PretrainedConfig", None)
    return base is not None and isinstance(value, base)


def _collect_configs(config: Any, label: str, configs: dict[int, tuple[str, Any]]) -> None:
    """``config`` and the configs it holds (sub-configs), each once, under the first
    name it is reached by."""
    if id(config) in configs:
        return
    configs[id(config)] = (label, config)
    for name, value in sorted(vars(config).items()):
        if _is_config(value):
            _collect_configs(value, f"{label}.{name}", configs)


def _config_fields(config: Any) -> Iterator[tuple[str, str]]:
    fields = {k: v for k, v in config.to_dict().items() if k not in _NOT_THE_FORWARD_CONFIG}
    for name, value in vars(config).items():  # the kernels the forward dispatches on
        if name.startswith("_") and "implementation" in name and _is_plain(value):
            fields[name] = value
    yield from sorted(_flatten(fields, ""))


def _flatten(fields: dict, prefix: str) -> Iterator[tuple[str, str]]:
    for key, value in fields.items():
        if isinstance(value, dict):
            # (a sub-config's dict: its own provenance fields are left out too)
            inner = {k: v for k, v in value.items() if k not in _NOT_THE_FORWARD_CONFIG}
            yield from _flatten(inner, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", _canonical(value)


def _is_plain(value: Any) -> bool:
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, _PLAIN) and _is_plain(v) for k, v in value.items())
    return False


def _canonical(value: Any) -> str:
    """A plain value as a string that is the same on every machine; lists and tuples
    alike, dicts by sorted key."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_canonical(v) for v in value) + "]"
    if isinstance(value, dict):
        items = sorted((str(k), _canonical(v)) for k, v in value.items())
        return "{" + ", ".join(f"{k}: {v}" for k, v in items) + "}"
    return repr(value)
