"""The modules a decoding step is captured from: the model's forward for one step of
``generate`` with the KV cache as tensors (:class:`DecodingStep`) or as a cache object of
fixed size (:class:`CacheStep`), one of each per model, held without keeping it alive.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import StaticLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

# the name of the KV cache in a model's keywords and outputs: ``cache`` since transformers
# 5.2x (``past_key_values`` still accepted, deprecated), ``past_key_values`` before
CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ \
    else "past_key_values"


class _ModelStep(torch.nn.Module):
    """A wrapper of a model's forward for one step of ``generate``. The model is its
    submodule ``model`` only while attached (``with step.attached():``, around each
    capture and cache lookup, so that its parameters and hooks are part of the capture's
    signature); otherwise the step holds it weakly, and the step, kept per model in a
    weak dictionary, does not keep the model alive."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self._target = weakref.ref(model)

    def attached(self) -> "_Attached":
        return _Attached(self)


class DecodingStep(_ModelStep):
    """The model's forward for one decoding step, with the KV cache as tensors.

    ``forward(input_ids, attention_mask, position_ids, keys, values)`` returns the logits
    and the cache the forward pass leaves (``None`` without a cache): built inside the
    graph from ``keys`` and ``values``, it is a cache the capture's forward pass makes,
    whose state a run writes into the cache object ``generate`` holds (see
    ``GraphSteps``), so that the model's output (and a cache object read at a module
    boundary) is that object, as in a plain ``generate``.
    """

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None, keys: list[torch.Tensor],
                values: list[torch.Tensor], use_cache: bool = True,
                logits_to_keep: int = 0) -> tuple[torch.Tensor, Any]:
        cache = None
        if use_cache:
            cache = DynamicCache(config=self.model.config)
            for layer, key, value in zip(cache.layers, keys, values):
                layer.lazy_initialization(key, value)
                layer.keys, layer.values = key, value
        extra = {"logits_to_keep": logits_to_keep} if logits_to_keep else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, use_cache=use_cache,
                         **{CACHE: cache}, **extra)
        return out.logits, (getattr(out, CACHE) if use_cache else None)


class CacheStep(_ModelStep):
    """The model's forward for one step with a cache object of fixed size (a
    ``StaticCache``): ``forward(input_ids, attention_mask, position_ids, cache)`` returns
    the logits; the cache passes through the graph as its tensors and is updated from
    the graph's outputs (``capture.caches``), as the forward updates it."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                position_ids: torch.Tensor | None, cache: Any, use_cache: bool = True,
                logits_to_keep: int = 0) -> torch.Tensor:
        extra = {"logits_to_keep": logits_to_keep} if logits_to_keep else {}
        return self.model(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids, use_cache=use_cache,
                          **{CACHE: cache}, **extra).logits


class _Attached:
    """``with step.attached():`` (a class, not a generator: it is entered at every step)."""

    __slots__ = ("step",)

    def __init__(self, step: _ModelStep):
        self.step = step

    def __enter__(self) -> _ModelStep:
        # (not ``step.model = ...``: torch's global registration hooks need not know)
        step = self.step
        step._modules["model"] = step._target()
        return step

    def __exit__(self, *exc: Any) -> bool:
        del self.step._modules["model"]
        return False


# model -> its DecodingStep and its CacheStep (kept as long as the model lives; nothing
# stored on the model)
_STEPS: "weakref.WeakKeyDictionary[torch.nn.Module, DecodingStep]" = \
    weakref.WeakKeyDictionary()
_CACHE_STEPS: "weakref.WeakKeyDictionary[torch.nn.Module, CacheStep]" = \
    weakref.WeakKeyDictionary()
_STEPS_GUARD = threading.Lock()


def decoding_step(model: torch.nn.Module) -> DecodingStep:
    """The (one, cached) DecodingStep of ``model``: its captures are cached with it."""
    return _step_of(model, _STEPS, DecodingStep)


def cache_step(model: torch.nn.Module) -> CacheStep:
    """The (one, cached) CacheStep of ``model``."""
    return _step_of(model, _CACHE_STEPS, CacheStep)


def _step_of(model: torch.nn.Module, steps: weakref.WeakKeyDictionary, kind: type) -> Any:
    step = steps.get(model)
    if step is None:
        with _STEPS_GUARD:
            step = steps.get(model)
            if step is None:
                step = steps[model] = kind(model)
    return step


def is_static_cache(cache: Any) -> bool:
    """Whether ``cache`` is transformers' ``StaticCache`` of plain full-attention layers
    (the cache a :class:`CacheStep` takes)."""
    return type(cache) is StaticCache and bool(cache.layers) and \
        all(type(layer) is StaticLayer for layer in cache.layers)
