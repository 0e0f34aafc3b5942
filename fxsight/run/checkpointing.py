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
reentrant or not): the scan sees which module boundaries it reaches inside such a call
(``ScanResult.checkpointed``), and :func:`check_checkpoint_sites` refuses a write there
before the forward runs. A forward that calls the checkpoint only with gradients on (the
scan runs without) is seen only as it runs, at the write
(:func:`check_write_outside_checkpoint`): the model's buffers and the random generators
are then put back as they were (:func:`undone_on_refusal`; the user's hooks up to there
have run, as they would in a plain forward up to an error).

A reentrant checkpoint (``use_reentrant=True``) runs its block without gradients and
rebuilds them in the backward pass from fresh tensors: the values a forward hook sees
inside the block carry no gradient, so reading or replacing their ``.grad`` is refused
before the forward runs too.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from typing import Any, Iterator, Mapping

import torch
import torch.nn as nn
import torch.utils.checkpoint

from .._torch import enclosing_checkpoint, inside_activation_checkpoint, tensor_version
from ..capture.effects import saved_generators
from ..errors import TraceError, at_line
from ..record.program import Kind, Node, Program
from ..record.sites import Site, module_label
from ..splice.gradients import grad_target
from ..splice.shared_memory import read_root


def check_checkpointed_writes(model: nn.Module, program: Program) -> None:
    """Raise where ``program`` writes (or changes in place, or skips) a module's value
    inside a layer whose forward is gradient-checkpointed in this run, or reads (or
    replaces) the gradient of one inside a layer checkpointed with ``use_reentrant=True``."""
    if not torch.is_grad_enabled():
        return  # (a checkpointed layer runs as it is without gradients)
    layers = _checkpointed_layers(model)
    if not layers:
        return
    for node in program.nodes:
        site, grad = _written_site(node), _grad_site(node)
        for path, reentrant in layers.items():
            prefix = f"{path}." if path else ""
            if site is not None and site.path != path and site.path.startswith(prefix):
                raise TraceError(at_line(
                    f"this line writes {site.label}, inside {module_label(path)}, whose "
                    f"forward is gradient-checkpointed (gradient_checkpointing_enable() "
                    f"in train mode): the backward pass reruns that forward, and the rerun "
                    f"would not make this write, so the gradients would not be those of "
                    f"the written value. Write {module_label(path)}'s own output or input "
                    f"instead, or call gradient_checkpointing_disable() for the trace "
                    f"(or trace in eval mode, or under torch.no_grad())", node.line))
            if reentrant and grad is not None and grad.path != path and \
                    grad.path.startswith(prefix):
                raise TraceError(at_line(_reentrant_grad_message(
                    grad, path, "gradient_checkpointing_enable() with use_reentrant=True, in "
                    "train mode", "gradient_checkpointing_enable(gradient_checkpointing_kwargs"
                    "={'use_reentrant': False})"), node.line))


def check_checkpoint_sites(program: Program, checkpointed: Mapping[Site, str]) -> None:
    """Raise, before the forward runs, where ``program`` writes a value that the forward
    computes inside ``torch.utils.checkpoint`` (``checkpointed``: the scan's sites and
    their checkpoint's kind, ``ScanResult.checkpointed``), or reads or replaces the
    gradient of one that a reentrant checkpoint computes."""
    if not checkpointed or not torch.is_grad_enabled():
        return
    for node in program.nodes:
        site = _written_site(node)
        if site is not None and site in checkpointed:
            raise TraceError(at_line(_inside_message(site), node.line))
        site = _grad_site(node)
        if site is not None and checkpointed.get(site) == "reentrant":
            raise TraceError(at_line(_reentrant_grad_message(
                site, site.path, "torch.utils.checkpoint(..., use_reentrant=True)",
                "use_reentrant=False"), node.line))


def _inside_message(site: Site) -> str:
    return (f"this line writes {site.label}, which the forward computes inside "
            f"torch.utils.checkpoint: the backward pass reruns that code, and the rerun "
            f"would not make this write, so the gradients would not be those of the written "
            f"value. The fx backend runs such a write once, with the right gradients "
            f"(backend=\"fx\"); or write a value outside the checkpointed block, or trace "
            f"under torch.no_grad()")


def _reentrant_grad_message(site: Site, path: str, how: str, instead: str) -> str:
    within = f"inside {module_label(path)}, whose forward" if path != site.path else \
        "which the forward"
    return (f"this line uses the gradient of {site.label}, {within} runs under {how}: a "
            f"reentrant checkpoint computes that code without gradients and rebuilds it "
            f"from fresh tensors in the backward pass, so the value fxsight sees there has "
            f"no gradient. Use {instead}, or the gradient of a value outside the "
            f"checkpointed block, or disable the checkpointing for the trace")


def _checkpointed_layers(model: nn.Module) -> dict[str, bool]:
    """The paths of the modules whose forward runs under a checkpoint now, each with
    whether that checkpoint is reentrant (transformers' ``_gradient_checkpointing_func``
    is ``partial(torch.utils.checkpoint.checkpoint, use_reentrant=...)``; torch takes
    ``None`` as ``True``; ``False`` where it is another function)."""
    layers = sys.modules.get("transformers.modeling_layers")  # (never imported here)
    layer_class = getattr(layers, "GradientCheckpointingLayer", None)
    if layer_class is None:
        return {}
    return {path: _is_reentrant(getattr(module, "_gradient_checkpointing_func", None))
            for path, module in model.named_modules()
            if isinstance(module, layer_class) and module.training
            and getattr(module, "gradient_checkpointing", False)}


def _is_reentrant(function: Any) -> bool:
    if not isinstance(function, functools.partial) or \
            function.func is not torch.utils.checkpoint.checkpoint:
        return False
    return function.keywords.get("use_reentrant") in (True, None)


def _grad_site(node: Node) -> Site | None:
    """The module site whose gradient ``node`` reads or replaces (``.grad``), if any."""
    if node.kind not in (Kind.GRAD, Kind.GRAD_WRITE):
        return None
    try:
        return grad_target(node)[0].site
    except TraceError:  # (a computed value: refused where the gradient is tapped)
        return None


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
    raise _Refused(at_line(
        f"{_inside_message(site)} (raised as the forward reached "
        f"{module_label(site.path)})", writes[-1].line))


def check_gradient_outside_reentrant(site: Site, reads: Mapping[Site, Node],
                                     grad: bool) -> None:
    """Raise, as the forward reaches ``site`` (whose gradient ``reads[site]`` reads, if
    any), where a reentrant ``torch.utils.checkpoint`` runs it: that value has no gradient
    (the scan did not see the checkpoint: one the forward calls only with gradients on)."""
    node = reads.get(site)
    if node is None or not grad or not _inside_reentrant_checkpoint():
        return
    raise _Refused(at_line(_reentrant_grad_message(
        site, site.path, "torch.utils.checkpoint(..., use_reentrant=True)",
        "use_reentrant=False") + f" (raised as the forward reached {module_label(site.path)})",
        node.line))


def gradient_reads(program: Program) -> dict[Site, Node]:
    """The module sites whose gradient ``program`` reads or replaces, each with its first
    such node."""
    reads: dict[Site, Node] = {}
    for node in program.nodes:
        site = _grad_site(node)
        if site is not None:
            reads.setdefault(site, node)
    return reads


def _inside_reentrant_checkpoint() -> bool:
    """Whether a reentrant ``torch.utils.checkpoint`` (``use_reentrant=True``) runs its
    function now: its ``CheckpointFunction.forward`` is a frame of the stack."""
    return enclosing_checkpoint(sys._getframe(1)) == "reentrant"


class _Refused(TraceError):
    """:func:`check_write_outside_checkpoint`'s refusal, raised mid-forward (a
    ``TraceError`` to the user: :func:`undone_on_refusal` turns it into one)."""


@contextlib.contextmanager
def undone_on_refusal(model: nn.Module, program: Program, args: tuple, kwargs: dict,
                      written: frozenset[str] | None = None) -> Iterator[None]:
    """Around a hooks-backend forward: where :func:`check_write_outside_checkpoint` refuses
    a write as the forward reaches it, the model's buffers (BatchNorm's running
    statistics: changed in place without a version bump, so compared by value) and the
    random generators (dropout) are put back as they were before the forward (also where
    :func:`check_gradient_outside_reentrant` refuses a gradient). Snapshots are taken only
    where a refusal can come: gradients on and a write or a gradient in ``program``; and
    of the buffers the forward writes alone (``written``: their names, as the scan of
    these inputs saw them, ``ScanResult.written_buffers``; ``None``: not known, all),
    not of those it only reads.
    Any other buffer written before the refusal (on a path the scan did not take: one run
    only with gradients on) cannot be put back: the refusal names it where its version
    counter moved (BatchNorm's kernel and a write through ``.data`` move none)."""
    if not torch.is_grad_enabled() or not any(
            _written_site(n) or _grad_site(n) for n in program.nodes):
        yield
        return
    kept = [b for b in model.buffers() if not b.is_meta] if written is None \
        else _named_buffers(model, written)
    buffers = [(b, b.detach().clone()) for b in kept]
    ids = {id(b) for b in kept}
    versions = [(name, b, tensor_version(b)) for name, b in model.named_buffers()
                if id(b) not in ids and not b.is_meta]
    generators = saved_generators(model, args, kwargs)
    try:
        yield
    except _Refused as refused:
        with torch.no_grad():
            for buffer, copy in buffers:
                if not torch.equal(buffer, copy):
                    buffer.copy_(copy)
        generators()
        moved = [name for name, b, version in versions if tensor_version(b) != version]
        message = refused.args[0]
        if moved:
            message += (f"\n(before that, the forward had changed the buffers "
                        f"{', '.join(moved)} in place, on a path the scan of these inputs "
                        f"did not take: they are left as it changed them)")
        raise TraceError(message, *refused.args[1:]) from None


def _named_buffers(model: nn.Module, names: frozenset[str]) -> list[torch.Tensor]:
    """The buffers of ``model`` with these names (each once; meta ones and names that no
    longer name a buffer left out)."""
    found: dict[int, torch.Tensor] = {}
    for name in sorted(names):
        try:
            buffer = model.get_buffer(name)
        except AttributeError:
            continue
        if isinstance(buffer, torch.Tensor) and not buffer.is_meta:
            found.setdefault(id(buffer), buffer)
    return list(found.values())
