"""PyTorch modules whose eager forward can take a fast path that a capture never sees.

Under ``torch.export`` a forward's tensors are traced (``has_torch_function``), which turns
PyTorch's fast paths off: the captured graph holds the slow path. Such a module runs as an
opaque call in the captured graph instead (``capture/opaque.py``): its eager forward,
which chooses its path as a plain forward does, bit for bit.

- ``nn.TransformerEncoder`` (``enable_nested_tensor=True``, the default) given a
  ``src_key_padding_mask`` in eval mode without gradients runs its layers on nested
  tensors, whose padded rows come out as zeros; the slow path gave other values there
  (0.66 off on a small encoder), silently.
- ``nn.MultiheadAttention`` (``batch_first=True``, self-attention) in eval mode without
  gradients runs torch's fused attention kernel; the slow path's values were last bits off
  (1e-7 in fp32, 4e-16 in fp64), with or without ``need_weights`` and masks, silently.
  The padding checks see such a call as the attention it is (``attention_ops``).

Inside such a module, an operation of its slow path (``.source``) is not called where the
fast path runs: :func:`fast_path_refusal` says so, on every backend.

``nn.TransformerEncoderLayer``'s own fused kernel stays captured (its slow path's values
are last bits off, see docs/porting.md).
"""

from __future__ import annotations

from typing import Callable

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

# the name ``.source`` gives the fused kernel's call in ``nn.MultiheadAttention.forward``
FUSED_ATTENTION_OPERATION = "torch__native_multi_head_attention"


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


def _reason(module: torch.nn.Module) -> str | None:
    """Why ``module``'s eager forward may take a fast path now, ``None`` where it may not
    (over-approximated: the checks that depend on the inputs are left to the forward)."""
    if module.training or torch.is_autocast_enabled():
        return None
    if torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters()):
        return None
    if isinstance(module, torch.nn.TransformerEncoder):
        return REASON if getattr(module, "use_nested_tensor", False) else None
    if isinstance(module, torch.nn.MultiheadAttention):
        return ATTENTION_REASON if _attention_may_take_fast_path(module) else None
    return None


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
    if isinstance(model, torch.nn.MultiheadAttention):  # (alone: one opaque call)
        reason = _reason(model)
        return {"": reason} if reason is not None else {}
    for path, module in model.named_modules():
        if not path or any(path.startswith(p + ".") for p in found):
            continue
        reason = _reason(module)
        if reason is not None:
            found[path] = reason
    return found


def fast_path_refusal(path: str, called: Callable[[str], bool]) -> str | None:
    """Why the operation at ``path`` (``attn.source.F_multi_head_attention_forward_1``,
    or one inside it) is not called in this forward pass, where that is because its
    module ran torch's fused attention kernel (``nn.MultiheadAttention``'s fast path:
    ``called(op path)`` says that operation of the module's forward was called);
    ``None`` otherwise."""
    module_path = "" if path.startswith(f"{SOURCE}.") else path.split(f".{SOURCE}.")[0]
    if module_path == path:
        return None
    prefix = f"{module_path}.{SOURCE}." if module_path else f"{SOURCE}."
    if not called(f"{prefix}{FUSED_ATTENTION_OPERATION}_0"):
        return None
    label = module_label(module_path)
    return (f"{label} runs torch's fused fast path in this forward pass, as a plain "
            f"forward does (nn.MultiheadAttention in eval mode without gradients, "
            f"self-attention with batch_first=True): it computes attention in one fused "
            f"kernel, so this operation of its slow path is not called. Read {label}.output "
            f"instead; or trace with gradients enabled (outside torch.no_grad(), with "
            f"parameters requiring gradients), in train mode, or after "
            f"torch.backends.mha.set_fastpath_enabled(False), where a plain forward takes "
            f"the slow path that calls it")
