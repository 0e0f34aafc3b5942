"""The process-wide modes a trace block's lines are recorded in, and the refusal of a line
recorded in other modes than the trace's.

fxsight runs a block's lines when the trace ends (the forward, and every recorded
operation at its place in it), in the modes in force as the trace was entered: a
``with torch.no_grad():``, ``torch.autocast``, ``sdpa_kernel(...)`` or
``torch.backends.cudnn.flags(...)`` opened inside the block has ended by then, so it would
not apply. So would a torch function mode (``with torch.device(...)``, a user's
``TorchFunctionMode``), a dispatch mode (``FlopCounterMode``, a user's
``TorchDispatchMode``), saved-tensor hooks (``saved_tensors_hooks``, ``save_on_cpu``) and
the profiler (``torch.profiler.profile``) opened inside the block. An operation (or a read
or write of a module) recorded under such a mode is refused at the user's line; a mode
opened and closed around lines that record nothing is no concern.

A torch function such as ``torch.relu(h)`` reaches the proxy through the function modes in
force, each of them taken off the stack while it handles the call: those are counted from
their ``__torch_function__`` frames between the user's line and the recorder.

Modes that no query reveals are not seen: ``torch.random.fork_rng()`` (its saved state
lives in a suspended generator; entering it changes no generator state) and
``torch.autograd.profiler.record_function`` (a range of the profiler's, with no query).
"""

from __future__ import annotations

from types import FrameType

import torch
from torch.overrides import TorchFunctionMode

from .._torch import (backend_flag_readers, dispatch_mode_depth, dispatch_modes,
                      function_mode_depth, function_modes, is_device_context,
                      mha_fastpath_enabled, profiler_enabled, saved_tensors_hooks_top)
from ..errors import TraceError, at_line, user_frame, user_line


_CUDA = torch.backends.cuda
_CUDNN_ENABLED, _CUDNN_BENCHMARK, _CUDNN_DETERMINISTIC, _CUDNN_TF32, _MKLDNN_ENABLED = \
    backend_flag_readers()


def ambient_modes(through: int = 0) -> tuple:
    """The modes in force that change what an operation computes or how: gradients (off
    in ``torch.inference_mode()`` too), autocast (CPU and CUDA: on, and its dtype), then
    :func:`_forward_modes`. (One flat tuple: it is read for every recorded operation.)
    ``through``: the torch function modes that handed the operation on (off the stack
    while they do, see :func:`modes_passed`)."""
    return (torch.is_grad_enabled(),
            torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
            torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"),
            *_forward_modes(through))


def _forward_modes(through: int = 0) -> tuple:
    """The modes that change how a forward runs, beyond gradients and autocast: the
    default dtype, anomaly detection, the attention kernels, cuDNN and oneDNN settings,
    deterministic algorithms, the float32 matmul precision, the attention fast path, the
    torch function modes, dispatch modes, saved-tensor hooks and the profiler."""
    return (torch.get_default_dtype(),
            torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled(),
            _CUDA.flash_sdp_enabled(), _CUDA.mem_efficient_sdp_enabled(),
            _CUDA.math_sdp_enabled(), _CUDA.cudnn_sdp_enabled(),
            _CUDNN_ENABLED(), _CUDNN_BENCHMARK(), _CUDNN_DETERMINISTIC(), _CUDNN_TF32(),
            _MKLDNN_ENABLED(),
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.get_float32_matmul_precision(),
            mha_fastpath_enabled(),
            function_mode_depth() + through, dispatch_mode_depth(),
            saved_tensors_hooks_top(), profiler_enabled())


def entry_frame() -> int | None:
    """The ``id`` of the innermost frame outside fxsight: the frame a trace block is in
    (alive, so its ``id`` is its own, while the block runs)."""
    frame = user_frame()
    return None if frame is None else id(frame)


def modes_passed(frame: FrameType | None, entry: int | None) -> list:
    """The torch function modes whose ``__torch_function__`` frames lie between ``frame``
    and the trace block's frame ``entry``, as they lay on the mode stack (the innermost
    frame is the outermost mode's: it hands the call on last). Torch takes each off the
    stack while it handles the call."""
    passed = []
    while frame is not None and id(frame) != entry:
        code = frame.f_code
        if code.co_name == "__torch_function__" and code.co_argcount:
            # (the mode is the method's first argument, whatever its name)
            mode = frame.f_locals.get(code.co_varnames[0])
            if isinstance(mode, TorchFunctionMode):
                passed.append(mode)
        frame = frame.f_back
    return passed


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
    (1, "", ""),  # torch function modes (named: see ``_mode_words``)
    (1, "", ""),  # dispatch modes
    (1, "other saved-tensor hooks than the trace's (torch.autograd.graph.saved_tensors_hooks, "
        "save_on_cpu)", ""),
    (1, "the profiler set otherwise than in the trace (torch.profiler.profile)", ""),
)
_FUNCTION_MODES = sum(size for size, _, _ in _MODES[:-4])


def refuse_mode_change(entered: tuple, passed: list = ()) -> None:
    """Refuse an operation recorded in other modes than ``entered`` (the trace's, from
    :func:`ambient_modes`; ``passed``: the torch function modes that handed it on, from
    :func:`modes_passed`): the block's lines run when the trace ends, in the trace's
    modes."""
    now, start = ambient_modes(len(passed)), 0
    for size, what, instead in _MODES:
        if now[start:start + size] != entered[start:start + size]:
            break
        start += size
    if start == 0:
        what, instead = _grad_words(entered[0])
    elif start in (_FUNCTION_MODES, _FUNCTION_MODES + 1):
        what, instead = _mode_words(entered[start], passed, start == _FUNCTION_MODES)
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


def _mode_words(depth: int, passed: list, function: bool) -> tuple[str, str]:
    """What a torch function (``function``) or dispatch mode stack beyond the trace's
    ``depth`` modes holds, and what to do instead."""
    if function:
        stack = function_modes() + list(passed)
        kind = "a torch function mode"
    else:
        stack, kind = dispatch_modes(), "a dispatch mode"
    names = ", ".join(_mode_name(mode) for mode in stack[depth:]) or "none"
    changed = "entered" if len(stack) > depth else "left"
    return f"{kind} {changed} inside the block ({names})", ""


_FORWARD = 5  # the first entry of ``ambient_modes`` after gradients and autocast


def _grad_words(entered: bool) -> tuple[str, str]:
    if entered:
        return ("gradients off (torch.no_grad(), inference_mode())",
                "`.detach()` the value that should carry no gradient")
    return "gradients on (torch.enable_grad())", "enter the trace with gradients on"


def _mode_name(mode: object) -> str:
    """A mode's name: a user's class's own, torch's without a leading ``_`` (the
    ``_FlopCounterMode`` that ``FlopCounterMode`` enters)."""
    if is_device_context(mode):
        return "torch.device(...)"
    name = type(mode).__qualname__
    return name.lstrip("_") if type(mode).__module__.startswith("torch.") else name
