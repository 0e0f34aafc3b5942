"""Models whose attention runs through ``torch.compile`` inside their own forward:
transformers' ``attn_implementation="flex_attention"`` (its flex attention is a function it
compiles, ``compile_friendly_flex_attention``).

fxsight's passes on fake tensors (a capture, a scan) would run that compiled function under
fxsight's own modes: dynamo recompiles it for them, fails (flex attention's operator has no
rule for those modes), and leaves its cache so changed that the model's next plain call
fails too ("Attempted to call function marked as skipped", torch 2.13), a change to the
process no trace may make. Such a model is refused before any pass runs, naming the setting
and the way out.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from ..errors import TraceError, at_line, user_line

_COMPILED = frozenset({"flex_attention"})  # attention implementations transformers compiles


def refuse_compiled_attention(model: torch.nn.Module) -> None:
    """Raise a ``TraceError`` where ``model`` (or a part of it) is set to an attention
    implementation that transformers runs through ``torch.compile``."""
    for config in _configs(model):
        chosen = getattr(config, "_attn_implementation", None)
        names = set(chosen.values()) if isinstance(chosen, dict) else {chosen}
        if names & _COMPILED:
            raise TraceError(at_line(
                f"the model's attention is flex_attention ({type(config).__name__}."
                f"_attn_implementation={chosen!r}), which transformers runs through "
                f"torch.compile inside the forward: fxsight's passes on fake tensors would "
                f"recompile it and leave torch's compiled-code cache changed (the model's "
                f"next plain call fails). Use another attention for tracing: "
                f"`model.set_attn_implementation('sdpa')` (or load it with "
                f"attn_implementation='sdpa' / 'eager'; the values agree up to float "
                f"rounding)", user_line()))


def _configs(model: torch.nn.Module) -> Iterator[Any]:
    """The distinct transformers configs of ``model``'s modules and their sub-configs."""
    seen: set[int] = set()
    stack = [getattr(module, "config", None) for module in model.modules()]
    while stack:
        config = stack.pop()
        if config is None or id(config) in seen or not hasattr(config, "to_dict"):
            continue
        seen.add(id(config))
        yield config
        for name in getattr(config, "sub_configs", None) or ():
            stack.append(getattr(config, name, None))
