"""Hand-written plain-PyTorch references made with forward hooks, shared by the tests (a
helper module, not a test file): hooks installed for one block of code, the logits of one
plain forward pass with hooks, and transformers' own ``generate`` with hooks."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch


@contextlib.contextmanager
def reference_hooks(model: torch.nn.Module, hooks: dict[str, Callable] | None = None,
                    pre_hooks: dict[str, Callable] | None = None) -> Iterator[None]:
    """Install plain PyTorch forward hooks ``{path: fn}`` and forward pre-hooks
    ``{path: fn}`` on ``model``'s submodules for the ``with`` block; removed afterwards.
    Pre-hooks get ``(module, args, kwargs)`` and may return ``(args, kwargs)``."""
    handles = []
    try:
        for path, fn in (hooks or {}).items():
            handles.append(model.get_submodule(path).register_forward_hook(fn))
        for path, fn in (pre_hooks or {}).items():
            handles.append(model.get_submodule(path).register_forward_pre_hook(
                fn, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def hooked_logits(model: torch.nn.Module, ids: torch.Tensor,
                  hooks: dict[str, Callable] | None = None,
                  pre_hooks: dict[str, Callable] | None = None) -> torch.Tensor:
    """The logits of one plain forward pass of a language model on ``ids`` (no gradients,
    no cache) with the forward hooks and pre-hooks of :func:`reference_hooks` installed."""
    with reference_hooks(model, hooks, pre_hooks), torch.no_grad():
        return model(ids, use_cache=False).logits


def hooked_generate(model: torch.nn.Module, *args, hooks: dict[str, Callable] | None = None,
                    pre_hooks: dict[str, Callable] | None = None, **generate_kwargs):
    """transformers' own ``model.generate(*args, **generate_kwargs)`` (no gradients) with
    the forward hooks and pre-hooks of :func:`reference_hooks` installed; returns what it
    returns."""
    with reference_hooks(model, hooks, pre_hooks), torch.no_grad():
        return model.generate(*args, **generate_kwargs)
