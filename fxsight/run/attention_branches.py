"""Operations inside transformers' attention functions, as the plain forward calls them.

transformers' attention functions (``sdpa_attention_forward``, behind a model's
``attention_interface``) choose how to call the kernel from their arguments and from
whether they are being compiled or exported, and those differ between the plain forward
and the graph fxsight captures:

- the mask: eagerly, transformers' mask functions give ``None`` where the padding mask is
  all ones and the shapes allow it (a prompt without a cache, one query token); a captured
  graph is made as when the model is exported, where they always build one;
- ``is_torchdynamo_compiling()`` is true in a captured graph, false eagerly.

So a grouped-query model's ``repeat_kv_0`` (``.source`` of ``attention_interface_0``) is
reached in the captured graph of every decoding step, and eagerly only where the mask has
zeros and there are several query tokens: one query token with such a mask is grouped per
key/value head (``pack_gqa_0``), no mask hands the key/value heads to the kernel as they
are (``use_gqa_in_sdpa_0`` is then ``True``, ``False`` in the captured graph). The fx
backend's attention calls themselves are the eager ones (``splice.attention_masks``); its
``.source`` sites inside the function are the captured branch's.

What the plain forward reaches inside these functions is read from a scan (eager, on fake
tensors) of the inputs with every padding mask that is all ones given as ``None``: a
mask function then decides from the shapes alone, as it does eagerly for a mask of ones
(a scan cannot read a mask's values; with one it builds the mask, as the capture does).
The attention functions see only what the mask functions give them, so their branch is
the plain forward's. :func:`branch_refusal` then refuses, before anything runs, on both
backends alike, a read or write of such an operation that the plain forward does not call
(a ``TraceError`` naming the module, the operation and the line), and tells the fx
backend where its graph holds an operation otherwise than the plain forward (not at all,
or another kind of value: a Python value, a shape, ``None``), which it cannot run: the
hooks backend runs it where allowed (``backend="auto"``), else that is the error.
"""

from __future__ import annotations

import inspect
from typing import Any, Iterable

import torch
import torch.nn as nn

from .._torch import pytree
from ..capture.captures import cached_capture
from ..capture.export import CaptureError, Captured
from ..capture.operations import SOURCE, describe
from ..capture.scan import ScanResult, cached_scan
from ..errors import TraceError, at_line
from ..record.program import Kind, Node
from ..record.sites import Site, is_operation, module_label

# where transformers' attention functions live (``ALL_ATTENTION_FUNCTIONS``' values)
_ATTENTION_PACKAGE = "transformers.integrations."


def attention_function(path: str, callees: dict) -> str | None:
    """The name of the transformers attention function that the operation at ``path``
    (``h.0.attn.source.attention_interface_0.source.repeat_kv_0``) is inside, as
    ``callees`` (a capture's or a scan's: op path -> function) know it; else ``None``."""
    parts = path.split(".")
    for i in range(len(parts) - 2):
        if parts[i] != SOURCE:
            continue
        called = callees.get(".".join(parts[:i + 2]))  # (an operation the path goes into)
        if (getattr(called, "__module__", None) or "").startswith(_ATTENTION_PACKAGE):
            return describe(called)
    return None


def attention_nodes(nodes: Iterable[Node], callees: dict) -> list[tuple[Node, str]]:
    """The reads and writes among ``nodes`` of operations inside transformers' attention
    functions, each with the function's name."""
    found = []
    for node in nodes:
        if not nested_operation(node):
            continue
        function = attention_function(node.site.path, callees)
        if function is not None:
            found.append((node, function))
    return found


def nested_operation(node: Node) -> bool:
    """Whether ``node`` reads or writes an operation inside a function an operation calls
    (``attn.source.attention_interface_0.source.repeat_kv_0``)."""
    site = node.site if node.kind in (Kind.READ, Kind.WRITE) else None
    return site is not None and is_operation(site.path) and \
        site.path.split(".").count(SOURCE) >= 2


def plain_inputs(module: nn.Module, args: tuple, kwargs: dict,
                 drop: bool | None = None) -> tuple[tuple, dict]:
    """``args`` and ``kwargs`` with every padding mask (a 2-D tensor given as
    ``*attention_mask``) given as ``None`` where it is all ones (``drop``: where told
    so, whatever its values)."""
    names = _parameter_names(module, len(args))
    args = tuple(None if _dropped(name, value, drop) else value
                 for name, value in zip(names, args))
    kwargs = {name: None if _dropped(name, value, drop) else value
              for name, value in kwargs.items()}
    return args, kwargs


def _parameter_names(module: nn.Module, count: int) -> list[str]:
    """The names of the first ``count`` positional parameters of ``module``'s forward
    (empty strings where they cannot be known)."""
    try:
        parameters = [p for p in inspect.signature(module.forward).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        parameters = []
    names = [p.name for p in parameters[:count]]
    return names + [""] * (count - len(names))


def _dropped(name: str, value: Any, drop: bool | None) -> bool:
    if not name.endswith("attention_mask") or not isinstance(value, torch.Tensor) or \
            value.dim() != 2 or value.is_meta:
        return False
    return drop if drop is not None else bool((value == 1).all())


def plain_scan(module: nn.Module, args: tuple, kwargs: dict, operations: frozenset,
               drop: bool | None = None) -> ScanResult | None:
    """A scan of the operations the plain forward of these inputs reaches inside
    attention functions (see the module docstring; ``drop`` as :func:`plain_inputs`);
    ``None`` where the model cannot be scanned so."""
    args, kwargs = plain_inputs(module, args, kwargs, drop)
    try:
        return cached_scan(module, args, kwargs, operations)
    except Exception:  # noqa: BLE001 - a forward that needs its mask: the runs tell
        return None


class PlainBranchValues:
    """A capture or scan (``source``) whose values of operations inside transformers'
    attention functions are the plain forward's (``plain``: :func:`plain_scan`), for the
    checks made before running and the shapes read while recording; the rest, the event
    order among it, is ``source``'s (the plain forward's operations there are among the
    source's, or refused before running)."""

    def __init__(self, source: Any, plain: ScanResult, inside: tuple[str, ...]):
        self._source = source
        self._plain = plain
        self._inside = inside  # ("<op path>.source.", ...) of the attention functions

    def meta_value(self, site: Site) -> Any:
        if site.path.startswith(self._inside) and site in self._plain.index:
            return self._plain.meta_value(site)
        return self._source.meta_value(site)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._source, name)


def with_plain_values(module: nn.Module, args: tuple, kwargs: dict, operations: frozenset,
                      source: Any) -> Any:
    """``source`` (a capture or a scan of these inputs with ``operations``), its values
    of operations inside transformers' attention functions the plain forward's
    (:class:`PlainBranchValues`) where ``operations`` reach inside one."""
    if not any(len(chain) > 1 for chain in operations):
        return source
    inside = tuple(f"{path}.{SOURCE}." for path, called in source.callees.items()
                   if (getattr(called, "__module__", None) or "").startswith(
                       _ATTENTION_PACKAGE))
    if not inside:
        return source
    plain = plain_scan(module, args, kwargs, operations)
    return source if plain is None else PlainBranchValues(source, plain, inside)


def branch_refusal(nodes: list[tuple[Node, str]], plain: ScanResult | None,
                   captured: Captured | None, where: str = "this forward pass",
                   fx: bool | None = None) -> str | None:
    """Raise a ``TraceError`` for the first of ``nodes`` (from :func:`attention_nodes`)
    whose operation the plain forward (``plain``: :func:`plain_scan`) does not call; on
    the fx backend (``fx``; by default, where ``captured``, its graph, is given), why it
    cannot run them as the plain forward does (not checked: ``plain`` or ``captured`` is
    ``None``), else ``None``. ``where``: the forward pass, as users read it."""
    fx = captured is not None if fx is None else fx
    if plain is None or (fx and captured is None):
        return unchecked(nodes[0][0], where, "the model could not be scanned or captured "
                         "to check it") if fx and nodes else None
    for node, function in nodes:
        site = node.site
        if site not in plain.index:
            raise TraceError(at_line(_not_called(site, function, where), node.line))
    if not fx:
        return None
    for node, function in nodes:
        site = node.site
        if site not in captured.index:
            detail = "the plain forward calls it, the captured graph does not"
        else:
            detail = _difference(captured, plain, site)
            if detail is None:
                continue
        return at_line(
            f"{module_label(site.path)}.{site.kind} in {where} is not in the fx backend's "
            f"graph as the plain forward computes it: transformers' {function} takes "
            f"another branch in the captured graph (made as when the model is exported: "
            f"it always has a mask, and transformers' is_torchdynamo_compiling() is true "
            f"there) than in the plain forward with these inputs ({detail}). "
            f"backend=\"hooks\" runs the plain forward's operations", node.line)
    return None


def _not_called(site: Site, function: str, where: str) -> str:
    return (f"{module_label(site.path)} has no {site.kind} call #{site.call} in {where} "
            f"(its line is not reached with these inputs: transformers' {function} "
            f"chooses its branch from its arguments, whether there is an attention mask "
            f"(transformers leaves it out where the padding mask is all ones), how many "
            f"query tokens and key/value heads there are, and from whether the model is "
            f"compiled or exported, as a captured graph is; the plain forward's branch "
            f"does not call this operation)")


def unchecked(node: Node, where: str, why: str) -> str:
    """Why the fx backend leaves ``node``'s operation inside an attention function to the
    hooks backend where it cannot check it (``why``)."""
    site = node.site
    return at_line(f"{module_label(site.path)}.{site.kind} in {where}: the fx backend "
                   f"cannot tell whether its graph holds this operation inside "
                   f"transformers' attention as the plain forward computes it ({why}). "
                   f"backend=\"hooks\" runs the plain forward's operations", node.line)


def plain_capture(module: nn.Module, args: tuple, kwargs: dict,
                  operations: frozenset) -> Captured | None:
    """The exact-shape capture with ``operations`` of these inputs, as the fx backend
    captures a forward pass; ``None`` where the model cannot be captured."""
    try:
        return cached_capture(module, args, kwargs, operations=operations)
    except CaptureError:
        return None


def _difference(captured: Captured, plain: ScanResult, site: Site) -> str | None:
    """How ``site``'s value in the captured graph differs from the plain forward's, in
    what can be told without running (structure, tensor shapes and dtypes, ``None``,
    Python numbers and strings); ``None`` where they agree."""
    try:
        ours, theirs = captured.meta_value(site), plain.meta_value(site)
    except TraceError:
        return "its value there cannot be compared with the plain forward's"
    our_leaves, our_spec = pytree.tree_flatten(ours)
    their_leaves, their_spec = pytree.tree_flatten(theirs)
    if our_spec != their_spec:
        return "its value there is laid out otherwise than in the plain forward"
    for mine, plain_value in zip(our_leaves, their_leaves):
        a, b = _summary(mine), _summary(plain_value)
        if a != b:
            return f"{_shown(a)} there, {_shown(b)} in the plain forward"
    return None


def _summary(value: Any) -> Any:
    """What of a value can be compared without running: a tensor's shape and dtype, a
    plain value itself, any other object its presence (cache objects and modules are
    represented otherwise in a capture)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype)
    if value is None or isinstance(value, (bool, int, float, complex, str, torch.dtype)):
        return ("value", value)
    return ("object",)


def _shown(summary: tuple) -> str:
    if summary[0] == "tensor":
        return f"a tensor of shape {summary[1]} ({summary[2]})"
    if summary[0] == "value":
        return repr(summary[1])
    return "an object"
