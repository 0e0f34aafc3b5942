"""nnsight's module-level functions: ``fxsight.trace``, ``fxsight.save``, ``fxsight.apply``,
``fxsight.log``, ``fxsight.list()`` / ``fxsight.dict()``."""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch

from .._torch import pytree
from ..errors import TraceError, at_line, user_line
from ..record.active import active_sessions, active_tracers
from ..record.proxy import Proxy, find_recorder
from .nnsight import NNsight


def save(value: Any) -> Any:
    """``value.save()`` as a function; works on nested structures of proxies too.

    On a list, dict or object of your own (nnsight's ``list().save()``), inside a trace or
    a session, it keeps the object: traced values put into it later in the block (appended
    per step, say) are saved too, and are real values in it after the block.

    >>> import torch, fxsight
    >>> net = fxsight.NNsight(torch.nn.Linear(2, 2))
    >>> with net.trace(torch.ones(1, 2)):
    ...     pair = fxsight.save([net.input, net.output])
    ...     later = fxsight.save(list())
    ...     later.append(net.output * 2)
    >>> [tuple(v.shape) for v in pair], type(later[0]).__name__
    ([(1, 2), (1, 2)], 'Tensor')
    """
    if isinstance(value, Proxy):
        return value.save()
    for leaf in pytree.tree_leaves(value):
        if isinstance(leaf, Proxy):
            leaf.save()
    if isinstance(value, (list, dict)) or (
            hasattr(value, "__dict__") and not isinstance(value, (type, torch.nn.Module))):
        keep(value)
    return value


def keep(value: Any) -> None:
    """Keep ``value`` (a container) with the innermost open trace, else session: traced
    values in it are saved when the block ends, and replaced by their values."""
    tracers, sessions = active_tracers(), active_sessions()
    if tracers:
        tracers[-1].keep(value)
    elif sessions:
        sessions[-1].keep(value)
    else:
        raise TraceError(at_line(
            f"fxsight.save() on a {type(value).__name__} keeps it for the traced values put "
            "into it, so it must be called inside a trace or a session", user_line()))


class SavableList(list):
    """nnsight 0.4's ``nnsight.list()`` (``fxsight.list()``): a list with ``.save()``,
    which is :func:`save` of it (traced values put into it later are real values in it
    after the block); otherwise a plain list. A traced value appended inside ``with
    tracer.all():`` / ``with tracer.iter[...]:`` in ``lm.generate`` becomes one entry per
    decoding step, as nnsight's body appends once per step (as it does in any list: see
    :mod:`fxsight.api.step_appends`)."""

    def save(self) -> "SavableList":
        """Keep this list with the innermost trace or session (see :func:`save`)."""
        return save(self)


class SavableDict(dict):
    """nnsight 0.4's ``nnsight.dict()`` (``fxsight.dict()``): a dict with ``.save()``
    (see :class:`SavableList`)."""

    def save(self) -> "SavableDict":
        """Keep this dict with the innermost trace or session (see :func:`save`)."""
        return save(self)


def log(*values: Any) -> None:
    """nnsight's ``nnsight.log(...)``: inside a trace, its ``tracer.log(...)`` (printed
    once the trace has run, traced values as their real values); outside, ``print``."""
    tracers = active_tracers()
    if tracers:
        tracers[-1].log(*values)
    else:
        print(*values)


def apply(fn: Callable, *args, **kwargs) -> Any:
    """Record a call of any Python callable on traced values.

    ``fn`` runs on the real values when the model runs, where the block has reached, in
    the order the block is written (as a forward hook written in that order would call
    it), whether or not its result is used: what ``fn`` does (draw random numbers from
    the generator the model's dropouts share) is unknown before it runs. So a value it
    computes cannot be written into a module the block has already read past (an
    ``OrderError``): apply it before that read.
    Before that, while the block is checked, fxsight also calls it on meta tensors (the
    arguments' shapes and dtypes, no data) to learn the shape of its result: on the hooks
    backend once per trace, on the fx backend when a graph is made for the block. So
    ``fn`` must not have side effects that expect real values (appending its argument to
    a list, writing a file): do those with saved values after the block. Where the call on
    meta tensors raises (``fn`` reads a number out of a value, say), the result's shape is
    unknown inside the block: checks of what is computed from it wait for the run. NumPy
    values among the arguments reach ``fn`` as they are.

    >>> import torch, fxsight
    >>> net = fxsight.NNsight(torch.nn.Linear(3, 3))
    >>> with net.trace(torch.ones(2, 3)):
    ...     top = fxsight.apply(lambda h: h.topk(1).indices, net.output).save()
    >>> top.shape
    torch.Size([2, 1])

    With no traced value among the arguments, inside a trace, the call is recorded all the
    same and ``fn`` runs once, where the block has reached when the model runs (nnsight's
    ``noise = nnsight.apply(torch.randn, 3, 4)``, ``nnsight.apply(model.zero_grad)`` after
    the block's ``loss.backward()``, which it then follows): a random draw takes the
    generator's numbers in the order of the plain script written with hooks. Such a ``fn``
    has nothing meta to work on, so it is not called to learn its result's shape (it
    would really run twice), unless it is one of torch's functions (``torch.randn``),
    called with the meta device as the default one; otherwise the shape is known after
    the block. Outside a trace (between a session's traces), ``fn`` is plain Python,
    called at once.

    >>> with net.trace(torch.ones(2, 3)):
    ...     noise = fxsight.apply(torch.zeros, 2, 3)
    ...     net.output = net.output + noise
    ...     out = net.output.save()
    >>> out.shape
    torch.Size([2, 3])
    """
    if not any(isinstance(v, Proxy) for v in pytree.tree_leaves((args, kwargs))):
        tracers = active_tracers()
        if not tracers:
            return fn(*args, **kwargs)  # (plain Python: between a session's traces)
        recorder = tracers[-1].recorder  # (recorded in the innermost open trace)
    else:
        recorder = find_recorder(args, kwargs)
    return recorder.create_op("call_function", fn, args, kwargs, lenient=True)


def apply_pure(fn: Callable, *args, **kwargs) -> Any:
    """fxsight's own :func:`apply` of a function it knows: one that draws no random
    numbers and whose result's shape a call on meta tensors gives, so it runs as soon as
    its arguments exist (not held to where the block has reached)."""
    return find_recorder(args, kwargs).create_op("call_function", fn, args, kwargs)


class trace:  # noqa: N801 - nnsight's spelling
    """``with fxsight.trace(module, inputs) as model:`` wraps ``module`` and traces it.

    >>> import torch, fxsight
    >>> with fxsight.trace(torch.nn.Linear(2, 1), torch.ones(3, 2)) as model:
    ...     out = model.output.save()
    >>> out.shape
    torch.Size([3, 1])
    """

    def __init__(self, module: torch.nn.Module, *args, **kwargs):
        self.model = module if isinstance(module, NNsight) else NNsight(module)
        self.tracer = self.model.trace(*args, **kwargs)

    def __enter__(self) -> NNsight:
        self.tracer.__enter__()
        return self.model

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.tracer.exit_into(sys._getframe(1), exc_type is not None)
        return False
