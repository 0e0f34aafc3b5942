"""The meta-tensor walker: a Program evaluated on meta tensors before anything runs.

:class:`MetaWalker` gives every node its shape, dtype and position and makes every check
that must fail before the model runs (shapes of writes, skips, data-dependent operations);
the helpers below run an operation on meta values (device moves, module calls on meta
copies of their weights, fake tensors where meta kernels lack the data).
"""

from __future__ import annotations

import itertools
import operator
import types
from typing import Any

import torch
from .._torch import (DataDependentOutputException, DynamicOutputShapeException,
                      FakeTensorMode, autocast_cache_off, fake_cache_unchanged, pytree,
                      user_modes_suspended)

from ..errors import (DataDependentError, ItemAssignmentError, NotOnGraph, ShapeError,
                      ShapeIndexError, UsageError, at_line)
from ..record.program import (AUTOGRAD_GRAD, Kind, ModuleCall, Node, Program, execute,
                              origin, setitem)
from .rows import Rows
from ..capture.dispatch import execution_device, loads_weights
from ..capture.effects import kept_forward_effects
from ..capture.events import silenced_hooks
from .walker import Walker, _describe, _structure_mismatch
from ..record.sites import Site, module_label


class UnknownMeta:
    """The meta value of something that could not be computed without real data."""

    def __repr__(self) -> str:
        return "<unknown>"


UNKNOWN = UnknownMeta()


class MetaWalker(Walker):
    """Evaluates a Program on meta tensors: shapes, dtypes, positions, and every check
    that must happen before anything runs."""

    taps_gradients = False

    def __init__(self, program: Program, rows: dict[Any, Rows], source: Any):
        super().__init__(program, rows, source.index, getattr(source, "alias_keys", None))
        self.source = source
        self._visiting: Node | None = None  # (the node whose line an error names)

    def visit(self, node: Node) -> None:
        self._visiting = node
        super().visit(node)

    def site_value(self, site: Site) -> Any:
        try:
            return self.source.meta_value(site)
        except NotOnGraph as error:  # (a size the capture knows only when it runs)
            message = str(error)
            if "\n  at " in message or self._visiting is None:
                raise
            raise NotOnGraph(at_line(message, self._visiting.line)) from None

    def run(self, nodes=None) -> None:
        self._check_inside_skips()
        with user_modes_suspended():  # (no forward a user's mode or hook should see)
            super().run(list(self.program.nodes) if nodes is None else nodes)

    def check_grad_write(self, node, site, old, value, rows) -> None:
        if not isinstance(old, torch.Tensor) or isinstance(value, UnknownMeta):
            return
        # (a computed value's gradient is of the value as the block has it: no narrowing)
        shape = old.shape if rows.whole or site is None else \
            (rows.stop - rows.start, *old.shape[1:])
        label = "this value" if site is None else site.label
        new_shape = value.shape if isinstance(value, torch.Tensor) else ()
        try:
            fits = torch.broadcast_shapes(new_shape, shape) == torch.Size(shape)
        except RuntimeError:
            fits = False
        if not fits:
            raise ShapeError(at_line(f"a gradient of shape {tuple(new_shape)} cannot replace "
                                     f"the gradient of {label}, of shape {tuple(shape)}",
                                     node.line))
        if isinstance(value, torch.Tensor) and value.dtype != old.dtype:
            # (torch refuses a tensor hook that changes a gradient's dtype, in backward())
            raise ShapeError(at_line(
                f"a {_dtype(value)} gradient cannot replace the gradient of {label}, "
                f"which is {_dtype(old)}: convert it first (`.to({old.dtype})`)", node.line))

    def _check_inside_skips(self) -> None:
        """Nothing may be read or written inside a module skipped for the whole batch."""
        spans = []
        for node in self.program.nodes:
            if node.skip and self._rows(node).whole:
                site = node.site
                start = self.index.get(Site(site.path, "input", site.call))
                end = self.index.get(site)
                if start is not None and end is not None:
                    spans.append((start, end, site))
        for node in self.program.nodes if spans else ():
            if node.kind not in (Kind.READ, Kind.WRITE) or node.skip:
                continue
            position = self.index.get(node.site)
            for start, end, skipped in spans:
                if position is not None and start < position < end:
                    raise UsageError(at_line(
                        f"{node.site.label} is inside {module_label(skipped.path)}, "
                        f"which is skipped (.skip(...)) and does not run",
                        node.line))

    def input_value(self, node: Node) -> Any:
        value = self.program.input_values[node.input_index]
        return pytree.tree_map_only(
            torch.Tensor, lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta"), value)

    def call(self, node, op, target, args, kwargs, position):
        if any(isinstance(v, UnknownMeta) for v in pytree.tree_leaves((args, kwargs))):
            return UNKNOWN
        if op == "call_method" and target == "backward" or target is AUTOGRAD_GRAD:
            return None
        try:
            if isinstance(target, ModuleCall):  # real weights: run it on meta copies
                return _module_call_meta(target, args, kwargs)
            if op == "call_method" and target in _DEVICE_MOVES:
                return _device_move_meta(target, args, kwargs)
            if target is operator.getitem or target is setitem:
                args = _meta_index(args)
            if node is not None and node.lenient:
                return _applied_meta(node, op, target, args, kwargs)
            return execute(op, target, args, kwargs)
        except NotOnGraph as error:  # (a cache object at a boundary: see capture.caches)
            raise NotOnGraph(at_line(str(error), node.line if node is not None else None)) \
                from None
        except Exception as error:  # noqa: BLE001
            if node is None or node.lenient:
                return UNKNOWN
            name = target if isinstance(target, str) else getattr(target, "__name__", target)
            where = origin(node)
            where = f" (on values from {where})" if where else ""
            if target is setitem and isinstance(args[0], tuple):
                raise ItemAssignmentError(at_line(_tuple_item_message(node), node.line)) \
                    from None
            needs = _needs_data(error, op, target, args, kwargs)
            if needs is not None:
                source = origin(node)
                of = f" of {source}" if source else ""
                raise DataDependentError(at_line(
                    f"`{name}` {needs.format(of=of)}{_DATA_HINT}", node.line)) from None
            kind = ShapeIndexError if isinstance(error, IndexError) else ShapeError
            raise kind(at_line(f"{name} fails on these shapes{where}: {error}",
                               node.line)) from None

    def check_write(self, node, site, old, value, rows):
        if isinstance(value, UnknownMeta):
            return
        old_leaves = pytree.tree_leaves(old)
        new_leaves = [value] if isinstance(value, torch.Tensor) else pytree.tree_leaves(value)
        if len(old_leaves) != len(new_leaves):
            raise ShapeError(at_line(_structure_mismatch(site, old, value), node.line))
        for old_leaf, new_leaf in zip(old_leaves, new_leaves):
            if not isinstance(old_leaf, torch.Tensor) or isinstance(new_leaf, UnknownMeta):
                continue
            target_shape = old_leaf.shape
            if not rows.whole and old_leaf.dim() > 0 and old_leaf.shape[0] == rows.total:
                target_shape = (rows.stop - rows.start, *old_leaf.shape[1:])
            if type(new_leaf) in (int, float, bool) and not node.skip:
                continue  # a number fills the tensor
            if not isinstance(new_leaf, torch.Tensor):
                raise ShapeError(at_line(
                    f"{site.label} holds {_describe(old_leaf)}; the written value is "
                    f"{_describe(new_leaf)} (write a tensor, or a number to fill it)",
                    node.line))
            if new_leaf.dtype != old_leaf.dtype:
                raise ShapeError(at_line(
                    f"a {_dtype(new_leaf)} value cannot be written into {site.label}, which "
                    f"is {_dtype(old_leaf)}: convert it first (`.to({old_leaf.dtype})`)",
                    node.line))
            if node.skip and rows.whole and new_leaf.shape != old_leaf.shape:
                raise ShapeError(at_line(
                    f"{module_label(site.path)}.skip(...) needs a value shaped like the "
                    f"module's output, {tuple(old_leaf.shape)}; it got "
                    f"{_describe(new_leaf)}", node.line))
            if not _fits(new_leaf.shape, torch.Size(target_shape)):
                raise ShapeError(at_line(
                    f"a write keeps the site's shape (give every dimension, or fewer leading "
                    f"ones to repeat the value over them): a value of shape "
                    f"{tuple(new_leaf.shape)} cannot be written into {site.label} of shape "
                    f"{tuple(target_shape)}{_rows_note(node, rows)}", node.line))


def _applied_meta(node: Node, op: str, target: Any, args: Any, kwargs: Any) -> Any:
    """The result of an applied function (``fxsight.apply``) on meta values: called with
    the meta device as the default one (a tensor it makes, ``torch.randn(h.shape)``, is a
    meta tensor) and the random generators put back after it (one it makes on a device of
    its own draws nothing from the run's generators). A function of the user's with no
    traced value among its arguments is not called: it has nothing meta to work on, so
    the call would be a real one, made again when the model runs; its result is unknown
    until then (:data:`UNKNOWN`). A torch function (``torch.randn``) is called."""
    if not any(n.kind is not Kind.INPUT for n in node.all_input_nodes) and \
            not _torch_function(target):
        return UNKNOWN
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda), torch.device("meta"):
        return execute(op, target, args, kwargs)


def _torch_function(target: Any) -> bool:
    """Whether ``target`` is one of torch's functions (``torch.randn``, ``F.dropout``), not
    a method bound to an object (``model.zero_grad``: a call of it would be a real one)."""
    if not isinstance(getattr(target, "__self__", None), (type(None), types.ModuleType)):
        return False
    module = getattr(target, "__module__", None) or ""
    return module == "torch" or module.startswith("torch.")


_DEVICE_MOVES = ("cpu", "cuda", "to")
_DATA_HINT = (
    ", which are not known while the block is recorded (the graph, and every check of "
    "what comes after, need the shape before anything runs). Keep the shape instead, e.g. "
    "`torch.where(h > 0, h, 0)` or `h * (h > 0)` in place of `h[h > 0]`, or run it on the "
    "real values with fxsight.apply(fn, ...), e.g. `fxsight.apply(lambda h: h[h > 0], h)`"
)


def _is_index_scalar(value: Any) -> bool:
    """A 0-d integer tensor: as an index, torch selects at the integer it holds."""
    return isinstance(value, torch.Tensor) and value.dim() == 0 and \
        not value.dtype.is_floating_point and not value.dtype.is_complex and \
        value.dtype not in (torch.bool, torch.uint8)


def _meta_index(args: tuple) -> tuple:
    """``getitem``/``setitem`` arguments on meta values with a 0-d integer tensor in the
    key at 0: torch reads such an index with ``.item()`` (no data on meta); any integer
    gives the result's shape."""
    key = args[1]
    if type(key) is tuple and any(map(_is_index_scalar, key)):
        key = tuple(0 if _is_index_scalar(item) else item for item in key)
    elif _is_index_scalar(key):
        key = 0
    else:
        return args
    return (args[0], key, *args[2:])


def _needs_data(error: Exception, op: str, target: Any, args: tuple,
                kwargs: dict) -> str | None:
    """Why an operation that failed on meta values with ``error`` needs the data (its
    result's shape, or a number it reads, depends on the values), asked of fake tensors;
    ``None`` where it does not (the shapes do not fit)."""
    if not isinstance(error, NotImplementedError) and not (
            isinstance(error, RuntimeError) and "meta" in str(error)):
        return None  # (what meta kernels raise for data they lack; fake tensors log others)
    try:
        _fake_execute(op, target, args, kwargs, torch.device("cpu"))
    except DynamicOutputShapeException:
        return "gives a result whose shape depends on the values{of}"
    except DataDependentOutputException:
        return ("needs a number read out of the values{of} (`.item()`, a tensor used as a "
                "size)")
    except Exception:  # noqa: BLE001
        return None
    return None


def _tuple_item_message(node: Node) -> str:
    """Why ``value[i] = v`` fails on a tuple, and what to write instead."""
    target = node.args[0]
    if type(target) is Node and target.kind is Kind.READ:
        label = f"{module_label(target.site.path)}.{target.accessor}"
        return (f"'tuple' object does not support item assignment: {label} is a tuple. "
                f"Assign the whole value instead (`{label} = (new, *rest)`), or change a "
                f"tensor in it in place (`{label}[0][:] = new`)")
    return ("'tuple' object does not support item assignment: build a new tuple instead "
            "(`(new, *value[1:])`), or change a tensor in it in place (`value[0][:] = new`)")


def _device_move_meta(target: str, args: tuple, kwargs: dict) -> Any:
    """``value.cpu()``, ``.cuda()``, ``.to(device, ...)`` on a meta value: the result stays
    on meta (it has no data to copy), with the shape and any dtype the move asks for."""
    value, *rest = args
    if not isinstance(value, torch.Tensor):
        return execute("call_method", target, args, kwargs)
    if target != "to":
        return value
    kwargs = {k: v for k, v in kwargs.items() if k != "device"}
    rest = [a for a in rest if not isinstance(a, (str, torch.device, int))
            or isinstance(a, bool)]
    if not rest and "dtype" not in kwargs:
        return value
    return value.to(*rest, **kwargs)


def _module_call_meta(call: ModuleCall, args: tuple, kwargs: dict) -> Any:
    """A module applied to meta values: with meta copies of its weights (fast), else, for
    modules that need real devices or data, on fake tensors. The hooks already on its
    modules (the user's, torch's global ones) do not run: they see the real call only."""
    with silenced_hooks(call.module):
        return _module_call_shapes(call, args, kwargs)


def _module_call_shapes(call: ModuleCall, args: tuple, kwargs: dict) -> Any:
    module = call.module
    if loads_weights(module):
        return _probe_offloaded(call, args, kwargs)
    try:
        state = {name: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
                 for name, t in itertools.chain(module.named_parameters(),
                                                module.named_buffers())}
        return call.collect(
            lambda: torch.func.functional_call(module, state, tuple(args), kwargs))
    except Exception:  # noqa: BLE001
        return _fake_execute("call_function", call, args, kwargs, call.device())


def _probe_offloaded(call: ModuleCall, args: tuple, kwargs: dict) -> Any:
    """A module whose weights accelerate loads in each call (offloaded to CPU memory or
    disk), applied to zeros of the meta values' shapes on its execution device: its hooks
    load real weights, which neither meta copies nor fake mode can stand in for (fake mode
    would leave fake tensors as its parameters). What the call changes (buffers, the random
    generators) is put back; the result is given back as meta tensors."""
    device = execution_device(call.module)
    args, kwargs = pytree.tree_map_only(
        torch.Tensor, lambda t: torch.zeros(t.shape, dtype=t.dtype, device=device)
        if t.is_meta else t, (args, kwargs))
    with torch.no_grad(), kept_forward_effects(call.module, args, kwargs):
        result = call(*args, **kwargs)
    return pytree.tree_map_only(
        torch.Tensor, lambda t: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype,
                                                    device="meta"), result)


def _fake_execute(op: str, target: Any, args: tuple, kwargs: dict,
                  device: torch.device) -> Any:
    """Run an operation that touches real tensors (a module's weights) on fake tensors made
    from the meta ones, on ``device``; the result is given back as meta tensors. Autocast's
    cache of weight casts is off meanwhile: a fake cast of a weight would stay in it."""
    def to_meta(t: torch.Tensor) -> torch.Tensor:
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")

    with autocast_cache_off(), fake_cache_unchanged(), \
            FakeTensorMode(allow_non_fake_inputs=True):
        args, kwargs = pytree.tree_map_only(
            torch.Tensor, lambda t: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype,
                                                        device=device) if t.is_meta else t,
            (args, kwargs))
        result = execute(op, target, args, kwargs)
    return pytree.tree_map_only(torch.Tensor, to_meta, result)


def _rows_note(node: Node, rows: Rows) -> str:
    """Which invoke's rows a write targets, for error messages."""
    invoke = node.invoke
    if invoke is None:
        return f" (the whole batch of {rows.total} rows)"
    return f" (invoke #{invoke}: rows {rows.start}:{rows.stop} of a batch of {rows.total})"


def _fits(new: torch.Size, old: torch.Size) -> bool:
    """Whether a written value of shape ``new`` can take the place of one of shape ``old``:
    the same shape, or fewer dimensions repeated over the leading ones (a row written into
    every row). A size-1 dimension is not stretched: ``h[:1]`` written where ``h`` was
    would change the batch under a forward hook, so it is an error, not a broadcast."""
    if len(new) == len(old):
        return new == old
    if len(new) > len(old):
        return False
    try:
        return torch.broadcast_shapes(new, old) == old and new == old[len(old) - len(new):]
    except RuntimeError:
        return False


def _dtype(value: torch.Tensor) -> str:
    return str(value.dtype).replace("torch.", "")
