"""The process-wide modes a trace block's lines are recorded in, and the refusal of a line
recorded in other modes than the trace's.

fxsight runs a block's lines when the trace ends (the forward, and every recorded
operation at its place in it), in the modes in force as the trace was entered: a
``with torch.no_grad():``, ``torch.autocast``, ``sdpa_kernel(...)`` or
``torch.backends.cudnn.flags(...)`` opened inside the block has ended by then, so it would
not apply. An operation recorded under such a mode is refused at the user's line.

Modes that no query reveals are not seen: ``torch.random.fork_rng()`` (its saved state
lives in a suspended generator) and a device context (``with torch.device(...)``: an
operation on traced values takes its device from them).
"""

from __future__ import annotations

import torch

from .._torch import backend_flag_readers, mha_fastpath_enabled
from ..errors import TraceError, at_line, user_line


_CUDA = torch.backends.cuda
_CUDNN_ENABLED, _CUDNN_BENCHMARK, _CUDNN_DETERMINISTIC, _CUDNN_TF32, _MKLDNN_ENABLED = \
    backend_flag_readers()


def ambient_modes() -> tuple:
    """The modes in force that change what an operation computes or how: gradients (off
    in ``torch.inference_mode()`` too), autocast (CPU and CUDA: on, and its dtype), then
    :func:`_forward_modes`. (One flat tuple: it is read for every recorded operation.)"""
    return (torch.is_grad_enabled(),
            torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
            torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"),
            *_forward_modes())


def _forward_modes() -> tuple:
    """The modes that change how a forward runs, beyond gradients and autocast: the
    default dtype, anomaly detection, the attention kernels, cuDNN and oneDNN settings,
    deterministic algorithms, the float32 matmul precision, the attention fast path."""
    return (torch.get_default_dtype(),
            torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled(),
            _CUDA.flash_sdp_enabled(), _CUDA.mem_efficient_sdp_enabled(),
            _CUDA.math_sdp_enabled(), _CUDA.cudnn_sdp_enabled(),
            _CUDNN_ENABLED(), _CUDNN_BENCHMARK(), _CUDNN_DETERMINISTIC(), _CUDNN_TF32(),
            _MKLDNN_ENABLED(),
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.get_float32_matmul_precision(),
            mha_fastpath_enabled())


# (the number of ``ambient_modes`` entries each mode takes, what it is, what to do instead)
_MODES: tuple[tuple[int, str, str], ...] = (
    (1, "", ""),  # gradients (its words depend on the direction: see ``_grad_words``)
    (4, "another autocast mode than the trace's (torch.autocast)",
     "convert with `.to(dtype)` where the dtype should change"),
    (1, "another default dtype than the trace's (torch.set_default_dtype)",
     "give the dtype explicitly (`dtype=`, `.to(dtype)`)"),
    (2, "anomaly detection other than the trace's (torch.autograd.detect_anomaly, "
        "set_detect_anomaly)", ""),
    (4, "other attention kernels than the trace's (torch.nn.attention.sdpa_kernel)", ""),
    (4, "other cuDNN settings than the trace's (torch.backends.cudnn.flags)", ""),
    (1, "other oneDNN settings than the trace's (torch.backends.mkldnn.flags)", ""),
    (2, "other deterministic-algorithm settings than the trace's "
        "(torch.use_deterministic_algorithms)", ""),
    (1, "another float32 matmul precision than the trace's "
        "(torch.set_float32_matmul_precision, torch.backends.cuda.matmul.allow_tf32)", ""),
    (1, "the attention fast path set otherwise than in the trace "
        "(torch.backends.mha.set_fastpath_enabled)", ""),
)


def refuse_mode_change(entered: tuple) -> None:
    """Refuse an operation recorded in other modes than ``entered`` (the trace's, from
    :func:`ambient_modes`): the block's lines run when the trace ends, in the trace's
    modes."""
    now, start = ambient_modes(), 0
    for size, what, instead in _MODES:
        if now[start:start + size] != entered[start:start + size]:
            break
        start += size
    if start == 0:
        what, instead = _grad_words(entered[0])
    instead = f"{instead}, " if instead else ""
    raise TraceError(at_line(
        f"this line runs with {what}: fxsight runs the block's lines when the trace ends, "
        f"in the modes the trace was entered in, so that mode would not apply to it; "
        f"{instead}set the mode around the whole trace, or run the line's Python on the "
        f"real values with the mode inside: fxsight.apply(fn, ...)", user_line()))


def refuse_forward_mode_change(entered: tuple) -> None:
    """Refuse a read or write of a module recorded in other modes than ``entered``, other
    than gradients and autocast (a read under ``torch.no_grad()`` is the same read): the
    forward runs when the trace ends, so an attention kernel, a backend flag or a default
    dtype set around the line would not apply to it."""
    if _forward_modes() != entered[_FORWARD:]:
        refuse_mode_change(entered)


_FORWARD = 5  # the first entry of ``ambient_modes`` after gradients and autocast


def _grad_words(entered: bool) -> tuple[str, str]:
    if entered:
        return ("gradients off (torch.no_grad(), inference_mode())",
                "`.detach()` the value that should carry no gradient")
    return "gradients on (torch.enable_grad())", "enter the trace with gradients on"
