"""Loading a language model: its structure on the meta device and its tokenizer from a
local path (the weights are loaded when it first runs), the tokenizer prepared for left
padding, and what a wrapper drops when its module is replaced by the loaded one."""

from __future__ import annotations

import os
from typing import Any

import torch

from ..capture import captures as capture
from ..capture import scan
from ..run import executable as runner


_CONFIG_KWARGS = ("trust_remote_code", "revision", "token", "cache_dir", "local_files_only",
                  "subfolder")
_FROM_CONFIG_KWARGS = ("dtype", "torch_dtype", "attn_implementation", "trust_remote_code")


def _prepare_tokenizer(tokenizer: Any) -> None:
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None):
        tokenizer.pad_token = tokenizer.eos_token
    if hasattr(tokenizer, "padding_side"):
        tokenizer.padding_side = "left"


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


def _load_meta(path: str, tokenizer: Any, automodel: Any, kwargs: dict):
    """The model of ``path`` on the meta device (structure only) and its tokenizer."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoTokenizer

    config_kwargs = {k: kwargs[k] for k in _CONFIG_KWARGS if k in kwargs}
    config = AutoConfig.from_pretrained(path, **config_kwargs)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(path, **config_kwargs)
    build_kwargs = {k: kwargs[k] for k in _FROM_CONFIG_KWARGS if k in kwargs
                    and kwargs[k] != "auto"}
    with init_empty_weights(include_buffers=False):
        module = automodel.from_config(config, **build_kwargs)
    return module.eval(), tokenizer


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
