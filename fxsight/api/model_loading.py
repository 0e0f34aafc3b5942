"""Loading a language model: its structure on the meta device and its tokenizer from a
local path (the weights are loaded when it first runs), the tokenizer prepared for left
padding, and what a wrapper drops when its module is replaced by the loaded one.

The structure on the meta device is built from the config ``from_pretrained`` would use
(the saved config, or ``config=``, with the keywords that are config attributes applied,
``LanguageModel(path, num_hidden_layers=1)``), so it is the loaded model's. The loading is
one :class:`LazyLoad` shared by every wrapper of the model (an edited copy,
``model.edit()``, shares its original's): the weights are loaded once, whichever wrapper
runs first. A change made to the structure before the weights are loaded (a parameter or
module replaced, ``.half()``, a hook) would be lost with it: the load refuses, naming it.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch

from ..capture import captures as capture
from ..capture import scan
from ..capture.model_hooks import is_traced_hook
from ..capture.state import Watch
from ..errors import TraceError, at_line, user_line
from ..run import executable as runner


_CONFIG_KWARGS = ("trust_remote_code", "revision", "token", "cache_dir", "local_files_only",
                  "subfolder")
_FROM_CONFIG_KWARGS = ("dtype", "torch_dtype", "attn_implementation", "trust_remote_code")
# keywords transformers' auto classes keep off the config (a dtype of "auto", a
# quantization config: the config's own stays)
_NOT_CONFIG_KWARGS = ("config", "quantization_config")


def _prepare_tokenizer(tokenizer: Any) -> None:
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None):
        tokenizer.pad_token = tokenizer.eos_token
    if hasattr(tokenizer, "padding_side"):
        tokenizer.padding_side = "left"


def apply_tokenizer_settings(tokenizer: Any, settings: dict, loaded: bool) -> None:
    """Set nnsight's ``tokenizer_kwargs`` that are attributes of ``tokenizer`` on it
    (``padding_side``, ...: after fxsight's own defaults). The others are options of
    loading the tokenizer: taken where fxsight ``loaded`` it with them, else a
    ``TypeError`` naming them (a tokenizer given or found loaded already)."""
    if tokenizer is None:
        raise TypeError(f"LanguageModel(tokenizer_kwargs={settings!r}): the model has no "
                        f"tokenizer to apply them to (give one: tokenizer=...)")
    unknown = [key for key in settings if not hasattr(tokenizer, key)]
    if unknown and not loaded:
        raise TypeError(f"LanguageModel(tokenizer_kwargs=...): {', '.join(map(repr, unknown))} "
                        f"{'is not an attribute' if len(unknown) == 1 else 'are not attributes'}"
                        f" of the {type(tokenizer).__name__} given, and fxsight did not load "
                        f"it (load it yourself with them: AutoTokenizer.from_pretrained(path, "
                        f"...))")
    for key, value in settings.items():
        if hasattr(tokenizer, key):
            setattr(tokenizer, key, value)


def _tokenizer_beside(module: torch.nn.Module) -> Any:
    """The tokenizer saved beside a loaded model's weights, if its path is a local folder."""
    name = getattr(getattr(module, "config", None), "_name_or_path", None)
    if not name or not os.path.isdir(name):
        return None
    try:
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(name)
    except Exception:  # noqa: BLE001 - no tokenizer there: token ids still work
        return None


def _load_meta(path: str, tokenizer: Any, automodel: Any, kwargs: dict,
               tokenizer_kwargs: dict | None = None):
    """The model of ``path`` on the meta device (structure only) and its tokenizer
    (loaded with ``tokenizer_kwargs`` where none is given)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoTokenizer

    config_kwargs = {k: kwargs[k] for k in _CONFIG_KWARGS if k in kwargs}
    config = _config(path, kwargs, config_kwargs, AutoConfig)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(path, **{**config_kwargs,
                                                           **(tokenizer_kwargs or {})})
    build_kwargs = {k: kwargs[k] for k in _FROM_CONFIG_KWARGS if k in kwargs
                    and kwargs[k] != "auto"}
    with init_empty_weights(include_buffers=False):
        module = automodel.from_config(config, **build_kwargs)
    return module.eval(), tokenizer


def _config(path: str, kwargs: dict, config_kwargs: dict, auto_config: Any) -> Any:
    """The config ``automodel.from_pretrained(path, **kwargs)`` builds its model from: a
    config given (``config=``), else the saved one, with the keywords that name its
    attributes (``num_hidden_layers=1``, ``use_cache=False``) applied, as transformers'
    auto classes do (``return_unused_kwargs``: the others are loading options)."""
    from transformers import PretrainedConfig

    given = kwargs.get("config")
    if isinstance(given, PretrainedConfig):
        return copy.deepcopy(given)
    overrides = {k: v for k, v in kwargs.items()
                 if k not in _NOT_CONFIG_KWARGS and k not in config_kwargs
                 and not (k in ("dtype", "torch_dtype") and isinstance(v, str))}
    config, _ = auto_config.from_pretrained(given if given is not None else path,
                                            return_unused_kwargs=True, **config_kwargs,
                                            **overrides)
    return config


class LazyLoad:
    """The weights of a model built on the meta device, loaded on first use
    (``automodel.from_pretrained(path, **kwargs)``), once for every wrapper that shares it
    (an edited copy shares its original's: ``model.edit()`` makes a new wrapper of the
    same module)."""

    def __init__(self, path: str, automodel: Any, kwargs: dict, meta: torch.nn.Module):
        self.path = path
        self.automodel = automodel
        self.kwargs = dict(kwargs)
        self.module: torch.nn.Module | None = None  # (once loaded)
        # the meta model as built, to find a change made to it before the load
        self._meta: torch.nn.Module | None = meta
        self._built = _Built(meta)

    def load(self) -> torch.nn.Module:
        """The loaded model (loaded now if no wrapper did yet). Raises where the meta
        model was changed since it was built: the load would lose that change."""
        if self.module is None:
            changes = self._built.changes(self._meta)
            if changes:
                more = f" and {len(changes) - 3} more" if len(changes) > 3 else ""
                raise TraceError(at_line(
                    f"the model was changed before its weights were loaded "
                    f"({'; '.join(changes[:3])}{more}): until its first run it is only "
                    f"a structure on the meta device, and loading the weights builds it "
                    f"again from {self.path!r}, which would drop that change; load the "
                    f"weights first (LanguageModel(path, dispatch=True), or "
                    f"model.dispatch() on a new LanguageModel) and change the loaded "
                    f"model", user_line()))
            module = self.automodel.from_pretrained(self.path, **self.kwargs)
            module.eval()
            self.module = module
            self._meta = self._built = None  # (its buffers are real tensors: dropped)
        return self.module


class _Built:
    """A meta model as it was built: what a user's change of it is found by."""

    def __init__(self, meta: torch.nn.Module):
        self.watch = Watch(meta, 0)
        self.tree = dict(meta.named_modules(remove_duplicate=False))
        self.training = {path: module.training for path, module in self.tree.items()}
        self.hooks = _hook_counts(meta)
        self.flags = _tensor_flags(meta)

    def changes(self, meta: torch.nn.Module) -> list[str]:
        """What differs in ``meta`` from when it was built, in words (empty: nothing)."""
        flags = _tensor_flags(meta)
        if self.watch.unchanged() and flags == self.flags:
            return []
        tree = dict(meta.named_modules(remove_duplicate=False))
        moved = [(path, "replaced" if path in self.tree else "added")
                 for path, module in tree.items() if self.tree.get(path) is not module]
        moved += [(path, "removed") for path in self.tree if path not in tree]
        tops = [(path, how) for path, how in moved  # (not the modules below one of them)
                if not any(path.startswith(other + ".") for other, _ in moved)]
        found = [f"module {_label(path)} {how}" for path, how in tops]
        dtypes = {name: dtype for name, (dtype, _) in flags.items()}
        if dtypes != {name: dtype for name, (dtype, _) in self.flags.items()
                      if name in dtypes}:
            now = sorted({str(d).removeprefix("torch.") for d in dtypes.values()})
            found.append(f"the dtype of its tensors (now {', '.join(now)}: .half(), "
                         f".to(dtype))")
        if any(flags[name][1] != grad for name, (_, grad) in self.flags.items()
               if name in flags):
            found.append("its parameters' requires_grad (requires_grad_())")
        if any(m.training != self.training[path] for path, m in tree.items()
               if self.tree.get(path) is m):
            found.append("its training mode (.train())")
        hooks = _hook_counts(meta)
        found += [f"module {_label(path)}: hooks" for path in sorted({*hooks, *self.hooks})
                  if hooks.get(path) != self.hooks.get(path)]
        if not found:  # (anything else: an attribute, a config's setting, a tensor)
            if self.watch.only_traced_hooks_added():  # (transformers' own, on a scan)
                return []
            found = self.watch.changes() or ["its state"]
        return found


def _label(path: str) -> str:
    return repr(path) if path else "(the model itself)"


def _tensor_flags(model: torch.nn.Module) -> dict[str, tuple[torch.dtype, bool]]:
    """Each parameter's and buffer's dtype and ``requires_grad``, by name."""
    return {name: (tensor.dtype, tensor.requires_grad) for name, tensor in
            [*model.named_parameters(), *model.named_buffers()]}


def _hook_counts(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """The number of each kind of hook of the modules that have some, by path, but for
    those transformers installs on a forward itself (``output_attentions=True`` in a scan
    of the meta model: the loaded model installs its own)."""
    counts = {}
    for path, module in model.named_modules():
        numbers = tuple(sum(1 for hook in getattr(module, name).values()
                            if not is_traced_hook(hook)) for name in _HOOK_DICTS)
        if any(numbers):
            counts[path] = numbers
    return counts


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
               "_backward_pre_hooks")


def _refresh_envoys(envoy: Any, root: torch.nn.Module) -> None:
    """Point every cached envoy below ``envoy`` at the module of its path in ``root``."""
    children = envoy._children
    for name, child in list(children.items()):
        try:
            module = root.get_submodule(child._path)
        except AttributeError:
            del children[name]
            continue
        object.__setattr__(child, "_module", module)
        _refresh_envoys(child, root)


def _forget(module: torch.nn.Module) -> None:
    """Drop the engine's caches of a module that has been replaced."""
    capture.forget(module)
    runner.forget(module)
    getattr(scan, "_CACHE", {}).pop(module, None)
