"""What passes in and out of a decoding step around its graph: a static cache's leaves
listed without the generic flattening (:class:`CacheObjectLayout`), and the output
object ``generate`` receives, made without transformers' slow constructor
(:class:`StepOutput`).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..capture.caches import PLAIN_VALUES
from ..capture.captures import flat_inputs
from .steps import CACHE

class CacheObjectLayout:
    """``flat_inputs((), inputs)`` for :class:`CacheStep`'s inputs with a static cache: the
    generic flattening walks the cache and formats its layout at every step (a large part
    of a small model's step); once it has run, later steps list the same leaves directly
    where the cache is laid out as it was (its class, its layers' classes, their attribute
    names and plain values alike: what the layout's key says), and the generic one runs
    again otherwise."""

    def __init__(self) -> None:
        self.plan: tuple | None = None
        self.spec: Any = None

    def flat(self, inputs: dict) -> tuple[list[Any], Any]:
        if self.plan is not None:
            leaves = self._listed(inputs)
            if leaves is not None:
                return leaves, self.spec
        flat, spec = flat_inputs((), inputs)
        self.plan, self.spec = self._learnt(inputs, flat), spec
        return flat, spec

    def _state(self, obj: Any, skip: str | None = None) -> tuple | None:
        """``(class, attribute names, plain values, tensor names)`` of a cache object, or
        None where it holds anything else (but ``skip``)."""
        attributes = vars(obj)
        plain, tensors = [], []
        for name, value in attributes.items():
            if name == skip:
                continue
            if isinstance(value, torch.Tensor):
                tensors.append(name)
            elif type(value) in PLAIN_VALUES:
                plain.append((name, value))
            else:
                return None
        return type(obj), tuple(attributes), tuple(plain), tuple(tensors)

    def _learnt(self, inputs: dict, flat: list[Any]) -> tuple | None:
        cache = inputs.get("cache")
        top = self._state(cache, skip="layers")
        layers = [self._state(layer) for layer in getattr(cache, "layers", ())]
        if top is None or top[3] or not layers or any(state is None for state in layers) \
                or type(cache.layers) is not list:
            return None
        plan = (tuple(inputs), top, tuple(layers))
        listed = self._listed(inputs, plan)
        if listed is None or len(listed) != len(flat) or \
                not all(a is b for a, b in zip(listed, flat)):
            return None
        return plan

    def _listed(self, inputs: dict, plan: tuple | None = None) -> list[Any] | None:
        keys, top, layers = plan if plan is not None else self.plan
        if tuple(inputs) != keys:
            return None
        cache = inputs["cache"]
        if type(cache) is not top[0] or tuple(vars(cache)) != top[1] or \
                any(getattr(cache, name) != value for name, value in top[2]) or \
                type(cache.layers) is not list or len(cache.layers) != len(layers):
            return None
        tensors = []
        for layer, (kind, names, plain, tensor_names) in zip(cache.layers, layers):
            attributes = vars(layer)
            if type(layer) is not kind or tuple(attributes) != names:
                return None
            for name, value in plain:
                got = attributes[name]
                if type(got) is not type(value) or got != value:
                    return None
            for name in tensor_names:
                value = attributes[name]
                if not isinstance(value, torch.Tensor):
                    return None
                tensors.append(value)
        leaves: list[Any] = []
        for key in keys:
            value = inputs[key]
            if key == "cache":
                leaves.extend(tensors)
            elif value is None or isinstance(value, torch.Tensor) or \
                    type(value) in PLAIN_VALUES:
                leaves.append(value)
            else:
                return None
        return leaves


class StepOutput:
    """Makes each step's ``CausalLMOutputWithPast(logits=..., cache=...)``.

    The dataclass constructor of a transformers ``ModelOutput`` costs tens of microseconds
    (every attribute set looks the fields up again), a few percent of a small model's
    decoding step. The first step's output is made by the constructor, and so is a second
    object from the same values the way later steps make theirs: the object's attributes
    and its items set directly. Where the two are alike (type, attributes, items in order)
    later steps are made that way; otherwise (another transformers), by the constructor.
    Only the first output's layout is kept (its class, attribute names, item names)."""

    def __init__(self) -> None:
        self._layout: tuple[type, dict, list[str], bool] | None = None
        self._direct = False

    def __call__(self, logits: torch.Tensor, cache: Any) -> Any:
        if self._layout is None:
            made = CausalLMOutputWithPast(logits=logits, **{CACHE: cache})
            attributes = {key: None for key in vars(made)}
            self._layout = (type(made), attributes, list(made.keys()), cache is None)
            copy = self._direct_copy(logits, cache)
            self._direct = type(copy) is type(made) and vars(copy) == vars(made) and \
                list(copy.items()) == list(made.items()) and \
                all(a is b for a, b in zip(copy.values(), made.values()))
            return made
        if not self._direct or (cache is None) != self._layout[3]:
            return CausalLMOutputWithPast(logits=logits, **{CACHE: cache})
        return self._direct_copy(logits, cache)

    def _direct_copy(self, logits: torch.Tensor, cache: Any) -> Any:
        kind, names, keys, _ = self._layout
        output = kind.__new__(kind)
        attributes = object.__getattribute__(output, "__dict__")
        attributes.update(names)
        attributes["logits"] = logits
        attributes[CACHE] = cache
        for key in keys:
            OrderedDict.__setitem__(output, key, attributes[key])
        return output
