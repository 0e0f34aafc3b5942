"""PyTorch modules whose eager forward can take a fast path that a capture never sees.

An ``nn.TransformerEncoder`` (``enable_nested_tensor=True``, the default) given a
``src_key_padding_mask`` in eval mode without gradients runs its layers on nested tensors,
whose padded rows come out as zeros. Under ``torch.export`` its tensors are traced
(``has_torch_function``), so the captured graph held the slow path: other values at the
padded rows (0.66 off on a small encoder), silently. Such an encoder runs as an opaque call
in the captured graph instead (``capture/opaque.py``): its eager forward, which chooses its
path as a plain forward does.

The fused kernels of ``nn.TransformerEncoderLayer`` and ``nn.MultiheadAttention`` alone
(no padding mask) differ from the slow path in the last bits only (6e-8 in fp32) and stay
captured: made opaque, the padding checks (``splice/attention_masks.py``) could not see
inside them (see docs/porting.md).
"""

from __future__ import annotations

import torch

REASON = ("in eval mode without gradients its forward may run its layers on nested "
          "tensors (PyTorch's fast path for a padding mask), which a captured graph does "
          "not hold")


def may_take_fast_path(module: torch.nn.Module) -> bool:
    """Whether ``module``'s eager forward may take its nested-tensor path now
    (over-approximated: the checks that depend on the inputs are left to the forward)."""
    if not isinstance(module, torch.nn.TransformerEncoder) or module.training:
        return False
    if not getattr(module, "use_nested_tensor", False):
        return False
    if torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters()):
        return False
    return not torch.is_autocast_enabled()


def fast_path_modules(model: torch.nn.Module, limit: int) -> dict[str, str]:
    """The outermost modules of ``model`` (not the root) that may take a fast path,
    path -> reason; none where there are more than ``limit`` of them."""
    found: dict[str, str] = {}
    for path, module in model.named_modules():
        if not path or any(path.startswith(p + ".") for p in found):
            continue
        if may_take_fast_path(module):
            found[path] = REASON
    return found if len(found) <= limit else {}
