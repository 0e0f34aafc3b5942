"""PyTorch modules whose eager forward can take a fast path that a capture never sees.

Under ``torch.export`` a forward's tensors are traced (``has_torch_function``), which turns
PyTorch's fast paths off: the captured graph holds the slow path. Such a module runs as an
opaque call in the captured graph instead (``capture/opaque.py``): its eager forward,
which chooses its path as a plain forward does, bit for bit.

- ``nn.TransformerEncoder`` (``enable_nested_tensor=True``, the default) given a
  ``src_key_padding_mask`` in eval mode without gradients runs its layers on nested
  tensors, whose padded rows come out as zeros; the slow path gave other values there
  (0.66 off on a small encoder), silently.
- Modules with one fused kernel for their whole forward (:data:`_FUSED`), in eval mode
  without gradients: ``nn.MultiheadAttention`` (``batch_first=True``, self-attention)
  runs torch's fused attention kernel, ``nn.TransformerEncoderLayer`` (``batch_first=True``,
  relu or gelu, as torch's checks ask) its fused encoder layer kernel. Their slow paths'
  values were last bits off (MHA: 1e-7 in fp32, 4e-16 in fp64; an encoder layer given a
  mask: up to 4.8e-7 in fp32, 6.7e-16 in fp64), silently. The padding checks see such a
  call as the attention it is (:func:`attention_key_argument`, ``attention_ops``; an
  encoder layer's output adds its input back, :func:`attention_adds_its_keys`).

Inside such a module, an operation of its slow path (``.source``) is not called where the
fast path runs: :func:`fast_path_refusal` says so, on every backend.

``nn.TransformerEncoderLayer`` also takes its slow path where a forward hook or pre-hook
is on it or on a module inside it: the hooks backend observes those modules without hooks
(:func:`hook_sensitive_modules`, ``events``), so a read or a write of a layer's output
leaves the layer on the path the plain forward takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from .._torch import mha_fastpath_enabled
from ..record.sites import module_label
from .operations import SOURCE

REASON = ("in eval mode without gradients its forward may run its layers on nested "
          "tensors (PyTorch's fast path for a padding mask), which a captured graph does "
          "not hold")
ATTENTION_REASON = ("in eval mode without gradients its forward may run torch's fused "
                    "attention kernel (its fast path), which a captured graph does not hold "
                    "(its slow path's values differ in the last bits)")
ENCODER_LAYER_REASON = ("in eval mode without gradients its forward may run torch's fused "
                        "encoder layer kernel (its fast path), which a captured graph does "
                        "not hold (its slow path's values differ in the last bits)")


def _attention_may_take_fast_path(module: torch.nn.MultiheadAttention) -> bool:
    """The conditions of ``nn.MultiheadAttention``'s fast path that do not depend on its
    inputs (those that do, self-attention among them, are left to its forward)."""
    if module.training or not module.batch_first or module.num_heads % 2:
        return False
    if module.bias_k is not None or module.bias_v is not None or module.add_zero_attn:
        return False
    if not module._qkv_same_embed_dim or module.in_proj_weight is None or \
            module.in_proj_bias is None:
        return False
    return mha_fastpath_enabled()


def _hooked(module: torch.nn.Module) -> bool:
    """Whether a forward hook or pre-hook is on ``module`` or a module inside it (torch's
    own test in ``nn.TransformerEncoderLayer.forward``)."""
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def _encoder_layer_may_take_fast_path(module: torch.nn.TransformerEncoderLayer) -> bool:
    """The conditions of ``nn.TransformerEncoderLayer``'s fast path that do not depend on
    its inputs (its ``why_not_sparsity_fast_path`` checks; the input's rank, nested
    tensors and device are left to its forward)."""
    attention = getattr(module, "self_attn", None)
    if module.training or not isinstance(attention, torch.nn.MultiheadAttention):
        return False
    if not attention.batch_first or attention.in_proj_bias is None or \
            not attention._qkv_same_embed_dim or attention.num_heads % 2:
        return False
    if not getattr(module, "activation_relu_or_gelu", 0) or \
            module.norm1.eps != module.norm2.eps:
        return False
    return mha_fastpath_enabled() and not _hooked(module)


@dataclass(frozen=True)
class _FusedPath:
    """A module whose whole forward can be one fused kernel: when it may (``may_take``,
    the conditions that do not depend on its inputs), the name ``.source`` gives that
    kernel's call in its forward, and how messages describe the path."""

    kind: type
    may_take: Callable[[Any], bool]
    reason: str
    operation: str
    described: str


_FUSED = (
    _FusedPath(torch.nn.MultiheadAttention, _attention_may_take_fast_path, ATTENTION_REASON,
               "torch__native_multi_head_attention",
               "nn.MultiheadAttention in eval mode without gradients, self-attention with "
               "batch_first=True: it computes attention in one fused kernel"),
    _FusedPath(torch.nn.TransformerEncoderLayer, _encoder_layer_may_take_fast_path,
               ENCODER_LAYER_REASON, "torch__transformer_encoder_layer_fwd",
               "nn.TransformerEncoderLayer in eval mode without gradients with "
               "batch_first=True: it computes the whole layer in one fused kernel"),
)
FUSED_REASONS = frozenset(fused.reason for fused in _FUSED)


def _fused(module: torch.nn.Module) -> _FusedPath | None:
    return next((fused for fused in _FUSED if isinstance(module, fused.kind)), None)


def _reason(module: torch.nn.Module) -> str | None:
    """Why ``module``'s eager forward may take a fast path now, ``None`` where it may not
    (over-approximated: the checks that depend on the inputs are left to the forward)."""
    if module.training or torch.is_autocast_enabled():
        return None
    if torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters()):
        return None
    if isinstance(module, torch.nn.TransformerEncoder):
        return REASON if getattr(module, "use_nested_tensor", False) else None
    fused = _fused(module)
    return fused.reason if fused is not None and fused.may_take(module) else None


_GRAD_DECIDED = (torch.nn.MultiheadAttention, torch.nn.TransformerEncoderLayer,
                 torch.nn.TransformerEncoder)


def grad_decides_path(model: torch.nn.Module) -> bool:
    """Whether a module of ``model`` chooses between its fast and slow paths by the grad
    mode (a forward pass that learns what the plain one calls runs in the caller's)."""
    return any(isinstance(module, _GRAD_DECIDED) for module in model.modules())


def may_take_fast_path(module: torch.nn.Module) -> bool:
    """Whether ``module``'s eager forward may take a fast path now (over-approximated:
    the checks that depend on the inputs are left to the forward)."""
    return _reason(module) is not None


def fast_path_modules(model: torch.nn.Module) -> dict[str, str]:
    """The outermost modules of ``model`` (not the root) that may take a fast path,
    path -> reason."""
    found: dict[str, str] = {}
    if _fused(model) is not None:  # (alone: one opaque call)
        reason = _reason(model)
        return {"": reason} if reason is not None else {}
    for path, module in model.named_modules():
        if not path or any(path.startswith(p + ".") for p in found):
            continue
        reason = _reason(module)
        if reason is not None:
            found[path] = reason
    return found


def hook_sensitive_modules(modules: Iterable[torch.nn.Module]) -> set[torch.nn.Module]:
    """The modules among ``modules`` (a model's, each once) whose forward hooks would turn
    an enclosing module's fast path off (``nn.TransformerEncoderLayer`` takes its slow
    path where any module inside it has one): each encoder layer with no hooks on it or
    inside it, and the modules inside it. A forward observed with hooks there would not
    be the plain forward."""
    found: set[torch.nn.Module] = set()
    for module in modules:
        if isinstance(module, torch.nn.TransformerEncoderLayer) and module not in found \
                and not _hooked(module):
            found.update(module.modules())
    return found


def attention_key_argument(module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
    """For a module whose fast path is an attention over tokens of dimension -2 (a
    batch-first ``nn.MultiheadAttention``, or ``nn.TransformerEncoderLayer``, which
    attends over its own input): the argument of this call whose tokens are the keys,
    else ``None``."""
    if isinstance(module, torch.nn.MultiheadAttention) and module.batch_first:
        return args[1] if len(args) > 1 else kwargs.get("key")
    if isinstance(module, torch.nn.TransformerEncoderLayer) and \
            getattr(getattr(module, "self_attn", None), "batch_first", False):
        return args[0] if args else kwargs.get("src")
    return None


def attention_adds_its_keys(module: torch.nn.Module) -> bool:
    """Whether ``module``'s output adds its key argument back (the residual connections
    of ``nn.TransformerEncoderLayer`` are inside its fused kernel): what that argument
    carries reaches the output directly, not only through the attention."""
    return isinstance(module, torch.nn.TransformerEncoderLayer)


def _enclosing_module(path: str) -> str | None:
    """The path of the module whose forward holds the operation at ``path``
    (``attn.source.F_multi_head_attention_forward_1``, or one inside it); ``None`` for a
    module's own path."""
    if path.startswith(f"{SOURCE}."):
        return ""
    module_path = path.split(f".{SOURCE}.")[0]
    return None if module_path == path else module_path


def fast_path_refusal(path: str, called: Callable[[str], bool]) -> str | None:
    """Why the operation at ``path`` (``attn.source.F_multi_head_attention_forward_1``,
    ``layer.source.self__sa_block_0``, or one inside it) is not called in this forward
    pass, where that is because its module ran a fused fast path (``called(op path)``
    says that operation of the module's forward was called); ``None`` otherwise."""
    module_path = _enclosing_module(path)
    if module_path is None:
        return None
    prefix = f"{module_path}.{SOURCE}." if module_path else f"{SOURCE}."
    fused = next((f for f in _FUSED if called(f"{prefix}{f.operation}_0")), None)
    if fused is None:
        return None
    label = module_label(module_path)
    return (f"{label} runs torch's fused fast path in this forward pass, as a plain "
            f"forward does ({fused.described}), so this operation of its slow path is not "
            f"called. Read {label}.output instead; or trace with gradients enabled (outside "
            f"torch.no_grad(), with parameters requiring gradients), in train mode, or "
            f"after torch.backends.mha.set_fastpath_enabled(False), where a plain forward "
            f"takes the slow path that calls it")
