"""Which operators of a forward pass are attentions, and over how many keys.

An attention is an attention kernel (``scaled_dot_product_attention`` and its variants,
``MultiheadAttention``'s and ``TransformerEncoderLayer``'s fused fast paths,
``flex_attention``: its keys are its key argument's tokens, the encoder layer's its
input's; an opaque call of either module, which runs that fast path) or a softmax over the
last dimension of scores. A softmax of scores of four dimensions (batch, heads, queries,
keys) is one at once; of three (batch * heads, queries, keys: ``torch.bmm`` attention,
``MultiheadAttention`` with ``need_weights``) or more, where its scores are a product of
two tensors the forward computed from its inputs (queries times keys; a router's logits
are its input times a weight) and its probabilities weigh values in a product of
matrices (``probs @ v``, ``torch.bmm(probs, v)``, an einsum summing over their last
dimension). Its keys are those the product sums over: the values weighted. A softmax
over the keys and a learned sink logit beside them (GPT-OSS: the sink's column dropped
before the product) attends over the keys alone.

:class:`Attentions` records them as a forward pass runs, an operator at a time: on
captured graph nodes or on the tensors of a scan alike, each result named by a key
(the node, the storage) that its later uses are looked up by.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .opaque import attention_key

_aten = torch.ops.aten
# attention kernels: (overload packet or higher-order operator) -> the position of its key
# argument, whose tokens (dimension -2) are the keys
_KERNELS: dict[Any, int] = {
    getattr(_aten, name): 1 for name in (
        "scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_attention_math",
        "_scaled_dot_product_fused_attention_overrideable",
        # (MultiheadAttention's fused fast path: query, key, value of (batch, tokens, width))
        "_native_multi_head_attention") if hasattr(_aten, name)}
# (TransformerEncoderLayer's fused fast path: self-attention over its input, batch first,
# whose result adds that input back: the layer's residual connections)
_RESIDUAL_KERNELS = frozenset(getattr(_aten, name) for name in (
    "_transformer_encoder_layer_fwd",) if hasattr(_aten, name))
_KERNELS.update((kernel, 0) for kernel in _RESIDUAL_KERNELS)
if hasattr(torch.ops.higher_order, "flex_attention"):
    _KERNELS[torch.ops.higher_order.flex_attention] = 1
_SOFTMAXES = frozenset(getattr(_aten, name) for name in ("softmax", "_softmax", "_safe_softmax")
                       if hasattr(_aten, name))
# products of matrices whose first operand's last dimension is summed over
_PRODUCTS = frozenset({_aten.bmm, _aten.mm, _aten.matmul})
# ... whose second operand's (``baddbmm(input, probs, v)``)
_ADDED_PRODUCTS = frozenset({_aten.baddbmm})
# views that take part of the last dimension (the probabilities without a sink's column)
_SLICES = frozenset({_aten.slice, _aten.narrow})
_CONCATENATIONS = frozenset({_aten.cat, _aten.concat, _aten.concatenate})


def packet(target: Any) -> Any:
    """An operator overload's packet (``aten.softmax`` for ``aten.softmax.int``); a
    higher-order operator, or anything else, is its own."""
    return getattr(target, "overloadpacket", target)


def _key_argument(target: Any, args: tuple) -> tuple[Any, bool] | None:
    """An attention kernel's key argument and whether its result adds that argument back
    (an encoder layer's residual connections), ``None`` for another operator."""
    position = _KERNELS.get(packet(target))
    if position is None:
        # (a module that runs as an opaque call: nn.MultiheadAttention or
        # nn.TransformerEncoderLayer on its fast path)
        return attention_key(target, args)
    if len(args) <= position:
        return None
    return args[position], packet(target) in _RESIDUAL_KERNELS


def kernel_residual(target: Any, args: tuple) -> Any:
    """Where ``target`` is an attention kernel whose result adds its key argument back
    (``nn.TransformerEncoderLayer``'s fused kernel, or an opaque call of the layer): that
    argument, whose flow reaches the result directly, not only through the attention;
    ``None`` otherwise."""
    found = _key_argument(target, args)
    return found[0] if found is not None and found[1] else None


def kernel_keys(target: Any, args: tuple, tensor_of: Callable) -> int | None:
    """The number of keys of an attention kernel (-1 where symbolic), ``None`` for
    another operator."""
    found = _key_argument(target, args)
    if found is None:
        return None
    key = tensor_of(found[0])
    if not isinstance(key, torch.Tensor) or key.dim() < 2:
        return None
    try:
        return _size(key.shape[-2])
    except (RuntimeError, ValueError):  # (a nested tensor's ragged tokens)
        return -1


def softmax_keys(target: Any, args: tuple, tensor_of: Callable) -> tuple[int, bool] | None:
    """For a softmax over the last dimension of scores of three or more dimensions: its
    number of columns and whether it is an attention by itself (four dimensions; else
    once its probabilities weigh values, :func:`weighed_keys`). ``None`` otherwise."""
    if packet(target) not in _SOFTMAXES or len(args) < 2:
        return None
    scores = tensor_of(args[0])
    if not isinstance(scores, torch.Tensor) or scores.dim() < 3 or \
            not isinstance(args[1], int) or args[1] % scores.dim() != scores.dim() - 1:
        return None
    return _size(scores.shape[-1]), scores.dim() == 4


def _operands(target: Any, args: tuple) -> list:
    """The matrices a product of matrices multiplies, none for another operator."""
    family = packet(target)
    if family in _PRODUCTS:
        return list(args[:2])
    if family in _ADDED_PRODUCTS:
        return list(args[1:3])
    if family is _aten.einsum and len(args) == 2 and isinstance(args[1], (list, tuple)):
        return list(args[1])
    return []


def weighed_keys(target: Any, args: tuple, held: Callable, tensor_of: Callable) -> \
        tuple[Any, int] | None:
    """Where ``target`` is a product of matrices that sums over the last dimension of an
    operand ``held`` says holds probabilities: that operand and the size of that
    dimension (the keys whose values it weighs). ``None`` otherwise."""
    family = packet(target)
    if family in _PRODUCTS or family in _ADDED_PRODUCTS:
        operand = _operands(target, args)[0] if len(args) > 1 else None
        probs = tensor_of(operand)
        if held(operand) and isinstance(probs, torch.Tensor) and probs.dim() >= 2:
            return operand, _size(probs.shape[-1])
    elif family is _aten.einsum and len(args) == 2 and isinstance(args[0], str):
        inputs, _, output = args[0].replace(" ", "").partition("->")
        for term, operand in zip(inputs.split(","), args[1]):
            probs = tensor_of(operand)
            if held(operand) and isinstance(probs, torch.Tensor) and term and \
                    term[-1].isalpha() and output and term[-1] not in output:
                return operand, _size(probs.shape[-1])
    return None


def _keeps_columns(target: Any, args: tuple, value: Any, result: Any) -> bool:
    """Whether ``result`` (a tensor of an operator run on ``value``) holds ``value``'s
    columns (its last dimension): all of them (a cast, dropout, a view or a copy, a
    scaling, a mask added), part of them (a slice of the last dimension) or more (a
    concatenation along it: a sink's logit beside the scores)."""
    if not isinstance(result, torch.Tensor) or not isinstance(value, torch.Tensor) or \
            result.dim() < 2 or value.dim() < 1:
        return False
    last = value.dim() - 1
    family = packet(target)
    if family in _SLICES and len(args) > 1 and isinstance(args[1], int) and \
            args[1] % value.dim() == last:
        return True
    if family in _CONCATENATIONS:
        dim = args[1] if len(args) > 1 else 0
        return isinstance(dim, int) and dim % value.dim() == last
    return _size(result.shape[-1]) == _size(value.shape[-1])


def _size(size: Any) -> int:
    """A size as an int, -1 where it is symbolic without a value."""
    try:
        return int(size)
    except (TypeError, ValueError, RuntimeError):
        return -1


class Attentions:
    """The attentions of a forward pass, in the order they run (see the module's
    docstring): ``after`` is told each operator run. ``key_of(leaf)``: what names a
    value (a graph node itself, a tensor's storage); ``tensor_of(leaf)``: its tensor (a
    node's value); ``flow_of(leaf)``: what it carries of the inputs (empty: nothing)."""

    def __init__(self, key_of: Callable, tensor_of: Callable, flow_of: Callable):
        self._key_of, self._tensor_of, self._flow_of = key_of, tensor_of, flow_of
        # each one: [path of the module it runs in, its keys' number, what its arguments
        # carry, whether it is known to attend]
        self._found: list[list] = []
        self._held: dict[Any, int] = {}  # a value holding probabilities -> its softmax
        self._scores: set = set()  # values holding a product of two computed tensors

    def _index(self, leaf: Any) -> int | None:
        key = self._key_of(leaf)
        return None if key is None else self._held.get(key)

    def _is_scores(self, leaf: Any) -> bool:
        key = self._key_of(leaf)
        return key is not None and key in self._scores

    def after(self, target: Any, args: tuple, results: list, flow: Any,
              where: Callable) -> None:
        """Note an operator run: ``target`` of ``args`` made ``results`` (its leaves);
        ``flow``: what its arguments carry; ``where()``: the path of the module it runs
        in."""
        tensor_of = self._tensor_of
        keys = kernel_keys(target, args, tensor_of)
        if keys is not None:
            self._found.append([where(), keys, flow, True])
            return
        softmax = softmax_keys(target, args, tensor_of)
        if softmax is not None:
            if softmax[1] or self._is_scores(args[0]):
                self._found.append([where(), softmax[0], flow, softmax[1]])
                self._hold(results, len(self._found) - 1)
            return
        operands = _operands(target, args)
        if operands:  # (a product: it weighs values, or makes scores)
            weighed = weighed_keys(target, args, lambda leaf: self._index(leaf) is not None,
                                   tensor_of) if self._held else None
            if weighed is not None:  # (an attention over the values weighed)
                found = self._found[self._index(weighed[0])]
                found[1], found[3] = weighed[1], True
            elif sum(1 for leaf in operands if any(self._flow_of(leaf))) >= 2:
                self._scores.update(k for k in map(self._key_of, results) if k is not None)
            return
        if self._held or self._scores:
            self._follow(target, args, results)

    def _follow(self, target: Any, args: tuple, results: list) -> None:
        """Carry the probabilities and the scores an operator's arguments hold on to
        its results that keep their columns."""
        leaves = [leaf for arg in args
                  for leaf in (arg if isinstance(arg, (list, tuple)) else (arg,))]
        for leaf in leaves:
            index, scores = self._index(leaf), self._is_scores(leaf)
            if index is None and not scores:
                continue
            value = self._tensor_of(leaf)
            for result in results:
                key = self._key_of(result)
                if key is None or not _keeps_columns(target, args, value,
                                                     self._tensor_of(result)):
                    continue
                if index is not None:
                    self._held[key] = index
                if scores:
                    self._scores.add(key)

    def _hold(self, results: list, index: int) -> None:
        for result in results:
            key = self._key_of(result)
            if key is not None:
                self._held[key] = index

    def found(self) -> tuple[tuple[str, int, Any], ...]:
        """Each attention found: (the path of its module, its keys' number, what its
        arguments carry)."""
        return tuple((path, keys, flow) for path, keys, flow, attends in self._found
                     if attends)
