"""Writes inside a gradient-checkpointed layer, refused on the hooks backend.

transformers' ``gradient_checkpointing_enable()`` makes each decoder layer (a
``GradientCheckpointingLayer``) run its forward under ``torch.utils.checkpoint`` in train
mode with gradients on: the backward pass runs that forward again to rebuild what it
needs. The layer's own hooks stay outside the checkpoint, but the hooks of the modules
inside it fire again in the rerun, where a plain forward hook writes its value again. The
hooks backend's writes are made in the first forward only (and a ``backward()`` after the
trace reruns the forward without any hook): the gradients would be those of the values
before the write, silently. So such a write is refused before the forward runs.

A forward may checkpoint a block itself (``torch.utils.checkpoint.checkpoint(block, x)``,
reentrant or not): that is only seen as it runs, at the write
(:func:`check_write_outside_checkpoint`).
"""

from __future__ import annotations

import sys

import torch
import torch.nn as nn
import torch.utils.checkpoint

from .._torch import inside_activation_checkpoint
from ..errors import TraceError, at_line
from ..record.program import Kind, Node, Program
from ..record.sites import Site, module_label
from ..splice.shared_memory import read_root


def check_checkpointed_writes(model: nn.Module, program: Program) -> None:
    """Raise where ``program`` writes (or changes in place, or skips) a module's value
    inside a layer whose forward is gradient-checkpointed in this run."""
    if not torch.is_grad_enabled():
        return  # (a checkpointed layer runs as it is without gradients)
    layers = _checkpointed_layers(model)
    if not layers:
        return
    for node in program.nodes:
        site = _written_site(node)
        if site is None:
            continue
        for path in layers:
            prefix = f"{path}." if path else ""
            if site.path != path and site.path.startswith(prefix):
                raise TraceError(at_line(
                    f"this line writes {site.label}, inside {module_label(path)}, whose "
                    f"forward is gradient-checkpointed (gradient_checkpointing_enable() "
                    f"in train mode): the backward pass reruns that forward, and the rerun "
                    f"would not make this write, so the gradients would not be those of "
                    f"the written value. Write {module_label(path)}'s own output or input "
                    f"instead, or call gradient_checkpointing_disable() for the trace "
                    f"(or trace in eval mode, or under torch.no_grad())", node.line))


def _checkpointed_layers(model: nn.Module) -> list[str]:
    """The paths of the modules whose forward runs under a checkpoint now."""
    layers = sys.modules.get("transformers.modeling_layers")  # (never imported here)
    layer_class = getattr(layers, "GradientCheckpointingLayer", None)
    if layer_class is None:
        return []
    return [path for path, module in model.named_modules()
            if isinstance(module, layer_class) and module.training
            and getattr(module, "gradient_checkpointing", False)]


def _written_site(node: Node) -> Site | None:
    """The site ``node`` writes, skips or changes in place, if any."""
    if node.kind is Kind.WRITE:
        return node.site
    if node.kind is Kind.OP and node.mutation:
        root = read_root(node.args[0]) if node.args else None
        return root.site if root is not None else None
    return None


def check_write_outside_checkpoint(site: Site, nodes: list[Node], grad: bool) -> None:
    """Raise, before ``site``'s written value is given to the forward, where the forward
    runs it inside ``torch.utils.checkpoint`` (``nodes``: those that ran at the event;
    ``grad``: whether the trace runs with gradients on)."""
    writes = [node for node in nodes if _written_site(node) == site]
    if not writes or not grad:
        return  # (a gradient tap alone is no write: the rerun's values are the same)
    if torch.is_grad_enabled():
        if not inside_activation_checkpoint():
            return
    elif not _inside_reentrant_checkpoint():  # (which runs its block without gradients)
        return
    line = writes[-1].line
    raise TraceError(at_line(
        f"this line writes {site.label}, which the forward computes inside "
        f"torch.utils.checkpoint: the backward pass reruns that code, and the rerun would "
        f"not make this write, so the gradients would not be those of the written value "
        f"(raised as the forward reached {module_label(site.path)}). The fx backend runs "
        f"such a write once, with the right gradients (backend=\"fx\"); or write a value "
        f"outside the checkpointed block, or trace under torch.no_grad()", line))


def _inside_reentrant_checkpoint() -> bool:
    """Whether a reentrant ``torch.utils.checkpoint`` (``use_reentrant=True``) runs its
    function now: its ``CheckpointFunction.forward`` is a frame of the stack."""
    code = torch.utils.checkpoint.CheckpointFunction.forward.__code__
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False
