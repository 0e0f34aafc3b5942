"""The hooks on a model: those a capture refuses (:func:`user_hooks`: a graph runs no
Python hook), those it traces into the graph (:func:`is_traced_hook`: transformers'
output-capturing hooks), torch's weight reparametrizations among them
(:func:`is_weight_reparametrization`) and how messages name a hook (:func:`describe_hook`)."""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.utils.prune import BasePruningMethod
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from .._torch import forward_hook_dicts, global_hook_keys


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


def _hook_keys(modules: list) -> list:
    """The keys (unique handle ids) of every hook dict of ``modules`` and torch's global
    ones."""
    keys = global_hook_keys()
    for m in modules:
        keys.append((tuple(m._forward_hooks), tuple(m._forward_pre_hooks),
                     tuple(m._backward_hooks), tuple(m._backward_pre_hooks)))
    return keys


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
        pre_hooks, hooks = forward_hook_dicts()
        first = next(iter(pre_hooks.values()), None) or next(iter(hooks.values()))
        global_hooks = (f"torch has global forward hooks (register_module_forward_hook: "
                        f"{describe_hook(first)}{_installed_by(first)})")
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


def is_weight_reparametrization(hook: Any) -> bool:
    """Whether ``hook`` is a forward pre-hook by which torch computes a module's weight
    before each call, from tensors of the module's own: the hook-based
    ``torch.nn.utils.weight_norm`` and ``spectral_norm`` (whose power iteration updates
    the buffers ``weight_u``, ``weight_v`` in train mode) and ``torch.nn.utils.prune``'s
    masks (``weight = weight_orig * weight_mask``). Part of the module's own computation:
    a skipped call runs none (see :mod:`fxsight.run.skipping`)."""
    return isinstance(hook, _WEIGHT_REPARAMETRIZATIONS)


_WEIGHT_REPARAMETRIZATIONS = (BasePruningMethod, SpectralNorm, WeightNorm)


def describe_hook(hook: Any) -> str:
    """A hook as messages name it: its qualified name and where it is defined."""
    code = getattr(hook, "__code__", None)
    name = getattr(hook, "__qualname__", None) or type(hook).__name__
    if code is not None:
        return f"{name} at {code.co_filename}:{code.co_firstlineno}"
    return name


def _installed_by(hook: Any) -> str:
    """Who installs a global hook, where a message can say: torch's ``ModuleTracker``, which
    ``FlopCounterMode`` enters to count per module."""
    owner = getattr(hook, "__self__", None)
    if type(owner).__name__ == "ModuleTracker" and \
            type(owner).__module__.startswith("torch."):
        return "; torch.utils.flop_counter.FlopCounterMode installs it to count per module"
    return ""
