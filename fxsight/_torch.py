"""Every private torch API fxsight uses, in one place.

Private names change without notice between torch releases: each one here says why it is
needed and since which torch version it has been checked (fxsight runs on torch 2.11 to
2.14). Where a public API does the same, it is used instead (``torch.compiler.disable``,
``ExportedProgram.call_spec``, ``torch.fx.node.map_arg``). No other fxsight module names
``torch._…``, ``torch.utils._pytree``, ``torch.fx._…`` or ``torch.export._…``.
"""

from __future__ import annotations

import contextlib
import itertools
import linecache
import threading
import types
from typing import Any, Callable

import torch
import torch.fx as fx
# the default device torch.set_default_device sets (no public read without an allocation)
import torch.utils._device
import torch.nn.utils.parametrize
# pytree: torch has no public pytree module yet (torch.utils._pytree since 1.x; checked 2.13)
import torch.utils._pytree as pytree
# an OptimizedModule is what torch.compile(module) returns; no public name (checked 2.13)
from torch._dynamo.eval_frame import OptimizedModule
# fake tensors: shapes of a forward pass without computing it; no public API (checked 2.13)
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
# what fake tensors raise for an operation whose output shape (nonzero, a boolean mask) or
# a number it reads (.item()) depends on the data; no public names (checked 2.13)
from torch._subclasses.fake_tensor import (DataDependentOutputException,
                                           DynamicOutputShapeException)

__all__ = ["pytree", "OptimizedModule", "FakeTensorMode", "unset_fake_temporarily",
           "fake_cache_unchanged",
           "DynamicOutputShapeException", "DataDependentOutputException",
           "mark_static_address", "python_binding", "dispatched",
           "torch_function_modes_active", "dispatch_modes_active",
           "is_op_overload", "entry_point", "is_unused_random", "compile_backend",
           "without_duck_shaping", "plain_codegen", "pytree_codegen", "rename_node",
           "global_forward_hooks", "global_hook_keys", "holds_size", "unflatten_keeping_sizes",
           "generated_source_keys", "TreeSpec", "uncompiled", "plain_pickling",
           "generated_source_key", "forget_generated_source", "tensor_version",
           "set_tensor_version", "script_object_class",
           "forward_hook_dicts", "default_store", "dict_version_reader",
           "is_operator", "ambient_state_plain", "global_state_guard", "tensor_guards",
           "inductor_compile", "returns_alias", "inductor_mode_options",
           "fake_embedding_takes_meta_weights", "export_leaves_no_buffer_hook",
           "autocast_cache_off", "default_device_set", "parametrization_cache_on",
           "kept_parametrization_cache", "real_writes", "after_each_operator",
           "storage_key", "written_arguments", "inside_activation_checkpoint",
           "enclosing_checkpoint", "backend_flag_readers", "mha_fastpath_enabled",
           "function_mode_depth", "function_modes", "is_device_context", "dispatch_mode_depth",
           "dispatch_modes", "saved_tensors_hooks_top", "profiler_enabled",
           "user_modes_suspended", "user_modes_resumed", "FAKE_TENSOR_LOGGER",
           "as_own_work",
           "unmarked_writes", "writes_unmarked", "in_tracing_machinery"]

TreeSpec = pytree.TreeSpec

# the logger of fake tensors' dispatch (it logs a meta kernel's failure with its traceback
# before raising it; checked 2.11-2.13)
FAKE_TENSOR_LOGGER = "torch._subclasses.fake_tensor"


def _torch_at_least(major: int, minor: int) -> bool:
    """Whether the running torch is ``major.minor`` or newer (pre-releases of a version
    count as that version; local tags such as ``+cu130`` are ignored)."""
    release = torch.__version__.split("+")[0].split(".")
    return (int(release[0]), int(release[1])) >= (major, minor)


# the torch version differences fxsight works around (versions before 2.13: checked 2.11)
_TORCH_2_13 = _torch_at_least(2, 13)


def fake_embedding_takes_meta_weights() -> bool:
    """Whether fake tensors run ``aten.embedding`` on meta weights with indices on another
    device (the result is on meta): torch 2.13 gives ``aten.embedding`` a fake rule that
    allows it (``torch._subclasses.fake_impls``); torch 2.11 raises a device mismatch, so
    a model whose weights are on meta needs fake inputs on meta too."""
    return _TORCH_2_13


@contextlib.contextmanager
def fake_cache_unchanged():
    """The operators that fake tensors run in the block are cached as they run, and those
    entries are dropped at its end. ``FakeTensorMode.cache`` is one dict for every fake
    mode of the process (a class attribute, never trimmed by torch), keyed by operator and
    input shapes: each new input shape a trace walks on fake tensors (fxsight's scans and
    checks, ``torch.export``'s capture) added entries for good, a few kilobytes per
    operator of the model. The entries added last are the block's (the dict keeps its
    insertion order); another thread's fake tensors, rare and merely slower for it, may
    lose theirs. (``FakeTensorMode.cache`` is private; checked 2.13.)"""
    cache = FakeTensorMode.cache
    before = len(cache)
    try:
        yield
    finally:
        added = len(cache) - before
        if added > 0:
            try:
                for key in list(itertools.islice(reversed(cache), added)):
                    cache.pop(key, None)
            except RuntimeError:  # (changed by another thread meanwhile: left as it is)
                pass


@contextlib.contextmanager
def autocast_cache_off():
    """While active, autocast neither reads nor fills its cache of weight casts; the flag
    is put back as it was. Under ``torch.autocast`` with its cache on (the default),
    torch keeps the cast of every leaf tensor that requires grad (a parameter) until the
    outermost autocast block ends, keyed by that tensor, and reuses it for any later cast
    of it: a cast made in one of fxsight's fake-tensor forwards would be a fake tensor
    that the user's real forwards then compute with. ``torch.is_autocast_cache_enabled``
    and ``torch.set_autocast_cache_enabled`` are undocumented (the thread-local flag
    ``torch.autocast(cache_enabled=)`` sets; ``torch.fx`` tracing turns it off so too;
    checked 2.11-2.14). Entering ``torch.autocast`` instead would clear the user's cache
    on leaving where no autocast block is open."""
    previous = torch.is_autocast_cache_enabled()
    torch.set_autocast_cache_enabled(False)
    try:
        yield
    finally:
        torch.set_autocast_cache_enabled(previous)


@contextlib.contextmanager
def export_leaves_no_buffer_hook():
    """``torch.export`` (non-strict) registers a process-wide buffer registration hook
    that holds the module it exports (``register_buffer_assignment_hook``); before torch
    2.13 it is not removed when tracing raises, and the module (and its model) would live
    as long as the process. Such a hook that the block adds and leaves is removed here
    (``torch.nn.modules.module._global_buffer_registration_hooks``; checked 2.11; torch
    2.13 removes it itself, and nothing is done there)."""
    if _TORCH_2_13:
        yield
        return
    hooks = torch.nn.modules.module._global_buffer_registration_hooks
    before = set(hooks)
    try:
        yield
    finally:
        for key in [key for key in hooks if key not in before]:
            if getattr(hooks[key], "__name__", None) == "_map_assigned_buffer_to_proxy":
                del hooks[key]


def is_op_overload(target: Any) -> bool:
    """Whether a graph node's target is an ATen/custom operator overload (``OpOverload``
    lives in ``torch._ops``; checked 2.13)."""
    return isinstance(target, torch._ops.OpOverload)


def entry_point(target: Any) -> Callable | None:
    """The C++ entry point behind a plain ``OpOverload`` (its ``_op``), or ``None`` where
    calling the overload does more than forward to it. Saves a Python frame per ATen call in
    eager rewritten graphs (checked 2.11-2.14)."""
    overload = torch._ops.OpOverload
    if type(target) is not overload or type(target).__call__ is not overload.__call__:
        return None
    return target._op


def python_binding(target: Any) -> Callable | None:
    """torch's generated Python binding of an ATen operator's name: the function of
    ``torch`` (``torch._C._VariableFunctions``), of ``torch.nn.functional``'s C module
    (``torch._C._nn``) or the C method of ``Tensor`` (``torch._C.TensorBase``), or
    ``None``. It parses its arguments with a parser made for them (about half the cost
    of an ``OpOverload``'s generic one) and picks the overload by their types, which may
    be another than ``target``: :func:`dispatched` tells (checked 2.11-2.14)."""
    if type(target) is not torch._ops.OpOverload or target.namespace != "aten":
        return None
    name = target._schema.name.partition("::")[2]
    for holder in (torch._C._VariableFunctions, torch._C._nn):
        function = getattr(holder, name, None)
        if isinstance(function, types.BuiltinFunctionType):
            return function
    method = getattr(torch._C.TensorBase, name, None)
    return method if isinstance(method, types.MethodDescriptorType) else None


def dispatched(fn: Callable, args: tuple, kwargs: dict) -> tuple[list[tuple], Any]:
    """``(the calls fn(*args, **kwargs) makes below autograd, in order, each
    (operator, args, kwargs); its result)``, recorded by a ``TorchDispatchMode``
    (``torch.utils._python_dispatch``, checked 2.11-2.14)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Recorder(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[Any] = []

        def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
            self.calls.append((func, args, kwargs or {}))
            return func(*args, **(kwargs or {}))

    with _Recorder() as recorder:
        result = fn(*args, **kwargs)
    return recorder.calls, result


@contextlib.contextmanager
def real_writes(written: list, storages: set[int]):
    """Appends to ``written`` ``(tensor, copy of its value, its version counter)``, both
    as they were before the write, for each real tensor (not fake, not meta) in one of
    ``storages`` (``untyped_storage().data_ptr()``) that an operator run while active
    first writes in place: a ``TorchDispatchMode`` (``torch.utils._python_dispatch``)
    reading which arguments an operator writes from its schema (``_schema``,
    ``alias_info.is_write``; checked 2.13).
    Entered outside a ``FakeTensorMode``, it sees the operators that mode runs for real
    (those whose inputs are all real)."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: set[int] = set()

    class _Writes(TorchDispatchMode):
        supports_higher_order_operators = True  # (flex attention: no schema, no write)

        def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
            kwargs = kwargs or {}
            if is_op_overload(func) and func._schema.is_mutable:
                for i, argument in enumerate(func._schema.arguments):
                    if argument.alias_info is None or not argument.alias_info.is_write:
                        continue
                    value = args[i] if i < len(args) else kwargs.get(argument.name)
                    for tensor in value if isinstance(value, (list, tuple)) else (value,):
                        if isinstance(tensor, torch.Tensor) and \
                                not isinstance(tensor, FakeTensor) and not tensor.is_meta \
                                and id(tensor) not in seen and \
                                tensor.untyped_storage().data_ptr() in storages:
                            seen.add(id(tensor))
                            with unset_fake_temporarily():  # (a real copy)
                                written.append((tensor, tensor.detach().clone(),
                                                tensor_version(tensor)))
            return func(*args, **kwargs)

    with _Writes():
        yield


@contextlib.contextmanager
def after_each_operator(callback: Callable[[Any, tuple, dict, Any], None]):
    """Calls ``callback(operator, args, kwargs, result)`` after each operator run while
    active (below autograd; inside a ``FakeTensorMode`` entered before it, on its fake
    tensors): a ``TorchDispatchMode`` (``torch.utils._python_dispatch``, checked 2.13)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _After(TorchDispatchMode):
        # (higher-order operators too, flex attention's: ``callback`` sees them as any
        # operator, with their function arguments; checked 2.13)
        supports_higher_order_operators = True

        def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
            kwargs = kwargs or {}
            result = func(*args, **kwargs)
            callback(func, args, kwargs, result)
            return result

    with _After():
        yield


def storage_key(tensor: torch.Tensor) -> int:
    """A number naming ``tensor``'s storage, the same for its views (fake and meta tensors
    included; ``untyped_storage()._cdata``, checked 2.13): valid while the storage lives.
    A tensor without a storage (a sparse or nested tensor, a subclass) is named by its
    ``id``."""
    try:
        return tensor.untyped_storage()._cdata
    except (RuntimeError, NotImplementedError, AttributeError, TypeError):
        return id(tensor)


def dispatch_modes_active() -> bool:
    """Whether a ``TorchDispatchMode`` is active (a fake tensor mode, a user's mode;
    ``torch._C._len_torch_dispatch_stack``, checked 2.11-2.14)."""
    return torch._C._len_torch_dispatch_stack() != 0


def torch_function_modes_active() -> bool:
    """Whether a torch function mode is active (``torch.device(...)`` as a context, a
    user's ``TorchFunctionMode``; ``torch._C._len_torch_function_stack``, checked 2.13)."""
    return torch._C._len_torch_function_stack() != 0


def is_unused_random(target: Any) -> bool:
    """A non-mutating random operator (dropout, sdpa with dropout_p), which fx counts as
    impure: its schema (``_schema``, checked 2.13) tells whether it mutates an argument."""
    return is_op_overload(target) and torch.Tag.nondeterministic_seeded in target.tags and \
        not target._schema.is_mutable


def returns_alias(target: Any) -> bool:
    """Whether an operator overload returns its first argument's memory: a view
    (``aten.view``, ``aten.slice``, ``aten.split``, ...) or the argument changed in place
    (``aten.relu_``): its schema's first return carries alias information (``_schema``,
    checked 2.13)."""
    if not is_op_overload(target):
        return False
    returns = target._schema.returns
    return bool(returns) and returns[0].alias_info is not None


def unflatten_unchecked(leaves: list[Any], spec: Any) -> Any:
    """``pytree.tree_unflatten(leaves, spec)``, with the named tuples in it made without
    calling their ``__new__`` (``PackedSequence`` refuses a ``batch_sizes`` off the CPU:
    its meta stand-in); the other nodes by their registered ``unflatten_fn``
    (``SUPPORTED_NODES``, ``TreeSpec.children()``, checked 2.13)."""
    items = iter(leaves)

    def build(node: Any) -> Any:
        if node.is_leaf():
            return next(items)
        children = [build(child) for child in node.children()]
        kind = node.context  # (a named tuple's node: the type is its context)
        if isinstance(kind, type) and issubclass(kind, tuple) and hasattr(kind, "_fields"):
            return tuple.__new__(kind, children)
        if node.type is torch.Size and all(type(c) is int for c in children):
            return torch.Size(children)
        return pytree.SUPPORTED_NODES[node.type].unflatten_fn(children, node.context)

    return build(spec)


def holds_size(spec: Any) -> bool:
    """Whether a pytree layout has a ``torch.Size`` in it: torch's ``tree_unflatten``
    rebuilds every ``torch.Size`` as a plain tuple (its ``unflatten_fn`` is ``tuple``,
    checked 2.13), so such a layout is rebuilt by :func:`unflatten_keeping_sizes`."""
    return spec.type is torch.Size or any(holds_size(child) for child in spec.children())


def unflatten_keeping_sizes(leaves: list[Any], spec: Any) -> Any:
    """``pytree.tree_unflatten(leaves, spec)``, with each ``torch.Size`` of integers
    rebuilt as a ``torch.Size`` (as the value it was flattened from), not a tuple."""
    if not holds_size(spec) and not holds_packed(spec):
        return pytree.tree_unflatten(leaves, spec)
    return unflatten_unchecked(leaves, spec)


def holds_packed(spec: Any) -> bool:
    """Whether a pytree layout has a ``PackedSequence`` in it: its constructor refuses
    ``batch_sizes`` off the CPU (a meta or fake tensor while shapes are learnt), so such a
    layout is rebuilt by :func:`unflatten_unchecked` (as the named tuple it is)."""
    packed = torch.nn.utils.rnn.PackedSequence  # (a named tuple: its type is the context)
    return spec.type is packed or spec.context is packed or \
        any(holds_packed(child) for child in spec.children())


def changes_first_argument(target: Any) -> bool:
    """Whether an operator overload changes its first argument in place and returns it
    (``aten.add_``, ``aten.copy_``): the first argument and the first return share a
    written alias set in its schema (``_schema``, checked 2.13)."""
    if not is_op_overload(target):
        return False
    schema = target._schema
    if not schema.arguments or not schema.returns:
        return False
    argument, result = schema.arguments[0].alias_info, schema.returns[0].alias_info
    return argument is not None and result is not None and argument.is_write and \
        set(argument.before_set) == set(result.before_set)


def written_arguments(target: Any) -> tuple[tuple[int, str], ...]:
    """``(position, name)`` of each argument an operator overload writes in place
    (``aten.copy_``'s ``self``, an ``out=`` argument): its schema's alias information says
    so (``_schema``, checked 2.13). None for anything else."""
    if not is_op_overload(target) or not target._schema.is_mutable:
        return ()
    return tuple((i, a.name) for i, a in enumerate(target._schema.arguments)
                 if a.alias_info is not None and a.alias_info.is_write)


# the batch norm kernels that update the running statistics they are given (arguments 3
# and 4) in training (argument 5) although their schemas mark no write (checked 2.13)
_STATISTICS_WRITERS = frozenset({"aten::native_batch_norm", "aten::cudnn_batch_norm",
                                 "aten::miopen_batch_norm"})


def writes_unmarked(target: Any) -> bool:
    """Whether an operator overload writes in place what its schema does not say it
    writes: a batch norm kernel (``native_batch_norm``, the cuDNN and MIOpen ones) updates
    the running statistics it is given in training (their version counters are not bumped
    either). :func:`unmarked_writes` says what."""
    return is_op_overload(target) and target._schema.name in _STATISTICS_WRITERS


def unmarked_writes(target: Any, args: tuple) -> tuple[Any, ...]:
    """What an operator overload writes in place although its schema does not say so
    (see :func:`writes_unmarked`): a batch norm kernel's running statistics, in
    training."""
    if not writes_unmarked(target) or len(args) < 6 or not args[5]:
        return ()
    return args[3], args[4]


def compile_backend(backend: Any, mode: str | None, options: dict | None,
                    dynamic: bool | None) -> Callable:
    """The backend callable ``torch.compile(backend=..., mode=..., options=...)`` builds:
    wrapping it lets fxsight count compilations. ``torch._TorchCompileInductorWrapper`` and
    ``torch._TorchCompileWrapper`` are what ``torch.compile`` itself uses (checked 2.11-2.14)."""
    if backend == "inductor":
        return torch._TorchCompileInductorWrapper(mode, options, dynamic)
    return torch._TorchCompileWrapper(backend, mode, options, dynamic)


def inductor_mode_options(mode: str | None) -> dict:
    """The inductor options a ``torch.compile`` mode stands for (``"reduce-overhead"``:
    ``{"triton.cudagraphs": True}``); ``torch._inductor.list_mode_options`` is what
    ``torch.compile`` reads (checked 2.11-2.14)."""
    from torch._inductor import list_mode_options

    return dict(list_mode_options(mode)) if mode else {}


def without_duck_shaping(fn: Callable) -> Callable:
    """``fn`` run with dynamo's duck shaping off: sizes of equal value get their own
    symbols, so a sequence length equal to a head size is not specialized. The switch is
    ``torch.fx.experimental._config.use_duck_shape`` (checked 2.11-2.14)."""
    return torch.fx.experimental._config.patch(use_duck_shape=False)(fn)


def plain_codegen(graph: fx.Graph) -> None:
    """Make ``graph`` generate a flat ``forward(*inputs)`` (drop export's pytree codegen).
    ``Graph._codegen`` has no public setter (checked 2.13)."""
    graph._codegen = fx.graph.CodeGen()


def pytree_codegen(graph: fx.Graph, names: list[str], in_spec: Any, out_spec: Any) -> None:
    """Make ``graph`` take and return pytrees laid out by ``in_spec``/``out_spec``, as an
    exported module does (``fx.graph._PyTreeCodeGen``; checked 2.13)."""
    graph._codegen = fx.graph._PyTreeCodeGen(fx.graph._PyTreeInfo(names, in_spec, out_spec))


def rename_node(node: fx.Node, name: str) -> None:
    """Give a graph node a new (unique) name: ``Node._rename`` keeps the graph's namespace
    consistent, which assigning ``node.name`` does not (checked 2.13)."""
    node._rename(name)


def uncompiled(module: Any) -> Any:
    """The module a ``torch.compile``d one wraps (``OptimizedModule._orig_mod``, checked
    2.11-2.14); ``module`` itself otherwise."""
    while isinstance(module, OptimizedModule):
        module = module._orig_mod
    return module


def plain_pickling(graph: fx.Graph) -> None:
    """Make a GraphModule of ``graph`` unpickle by re-tracing its code with plain fx, not
    with the tracer that built it (``Graph._tracer_cls``/``_tracer_extras``; checked 2.13)."""
    graph._tracer_cls, graph._tracer_extras = None, {}


def global_forward_hooks() -> tuple[tuple, tuple]:
    """The process-wide forward pre-hooks and hooks (``register_module_forward_hook``):
    there is no public getter (``torch.nn.modules.module._global_forward_*``; checked 2.13)."""
    module = torch.nn.modules.module
    return tuple(module._global_forward_pre_hooks), tuple(module._global_forward_hooks)


def forward_hook_dicts(module: torch.nn.Module | None = None) -> tuple[dict, dict]:
    """The dicts that hold the forward pre-hooks and forward hooks of ``module`` (torch's
    process-wide ones for ``None``): ``Module._forward_pre_hooks``/``_forward_hooks`` and
    ``torch.nn.modules.module._global_forward_*`` have no public accessor (checked 2.13)."""
    if module is None:
        globals_ = torch.nn.modules.module
        return globals_._global_forward_pre_hooks, globals_._global_forward_hooks
    return module._forward_pre_hooks, module._forward_hooks


def global_hook_keys() -> list[tuple]:
    """The handle ids of torch's four process-wide module hook dicts (forward, forward-pre,
    backward, backward-pre): no public getter (``torch.nn.modules.module._global_*``;
    checked 2.13)."""
    module = torch.nn.modules.module
    return [tuple(getattr(module, name)) for name in (
        "_global_forward_hooks", "_global_forward_pre_hooks",
        "_global_backward_hooks", "_global_backward_pre_hooks")]


def generated_source_key(graph_module: fx.GraphModule) -> str | None:
    """The name under which fx keeps the source of ``graph_module``'s generated forward
    (the code's file name), or ``None``. ``GraphModule.recompile`` stores the source in
    ``torch.fx.graph_module._loader.eval_cache`` and a lazy ``linecache`` entry, under a
    name unique to that compilation, and never drops either (checked 2.13)."""
    code = getattr(getattr(type(graph_module), "forward", None), "__code__", None)
    key = getattr(code, "co_filename", None)
    if key is None or key not in torch.fx.graph_module._loader.eval_cache:
        return None
    return key


def generated_source_keys() -> set[str]:
    """The names of every generated source fx keeps (see :func:`generated_source_key`)."""
    return set(torch.fx.graph_module._loader.eval_cache)


def forget_generated_source(key: str) -> None:
    """Drop the source fx registered under ``key`` (see :func:`generated_source_key`)."""
    torch.fx.graph_module._loader.eval_cache.pop(key, None)
    linecache.cache.pop(key, None)


def mark_static_address(tensor: torch.Tensor) -> None:
    """Mark ``tensor`` as having a static address for compiled code, as transformers'
    static cache layers do with theirs (``torch._dynamo.mark_static_address`` with its
    default guard, the call transformers makes; checked 2.11-2.13)."""
    torch._dynamo.mark_static_address(tensor)


def tensor_version(tensor: torch.Tensor) -> int | None:
    """A tensor's in-place version counter (``_version``; no public API tells whether a
    tensor was changed in place, checked 2.13), or ``None`` for inference tensors (none)."""
    try:
        return tensor._version
    except RuntimeError:
        return None


def set_tensor_version(tensor: torch.Tensor, version: int) -> None:
    """Set ``tensor``'s in-place version counter (shared with its views) back to
    ``version``: for a tensor written in place and then given its old value back, which is
    then the tensor it was (autograd's checks of saved tensors included). No public API
    (``torch._C._autograd._unsafe_set_version_counter``; checked 2.13)."""
    torch._C._autograd._unsafe_set_version_counter((tensor,), (version,))


def script_object_class(value: torch.ScriptObject) -> str:
    """The qualified name of a TorchScript object's class
    (``__torch__.torch.classes.quantized.LinearPackedParamsBase``); no public API
    (``ScriptObject._type()``; checked 2.13)."""
    try:
        return value._type().qualified_name()
    except Exception:  # noqa: BLE001 - a name for a message only
        return type(value).__name__


def default_store() -> Any:
    """The key-value store of the default ``torch.distributed`` process group (the one its
    ranks met through; a ``TCPStore`` under torchrun or ``init_method="env://"``), or
    ``None``. No public accessor (``distributed_c10d._get_default_store``; checked 2.13):
    the sweep's rank heartbeats go through it (``experiments.ranks``)."""
    from torch.distributed import distributed_c10d

    try:
        return distributed_c10d._get_default_store()
    except (RuntimeError, ValueError, AttributeError):
        return None


_DICT_VERSION: list = []  # [the reader, or None], found at the first call


def dict_version_reader() -> Callable[[dict], int] | None:
    """A function that returns a dict's version tag (CPython's PEP 509 ``ma_version_tag``:
    every change of the dict gives it a new number, unique in the process), or ``None``
    where this Python and torch do not give one that behaves so. dynamo guards on it and
    exposes a reader, ``torch._C._dynamo.guards.dict_version`` (checked 2.11-2.14); it is
    tried here on a dict of its own before being trusted."""
    if not _DICT_VERSION:
        reader = None
        try:
            from torch._C._dynamo.guards import dict_version as candidate

            probe: dict = {}
            seen = [candidate(probe)]
            probe["a"] = 1
            seen.append(candidate(probe))
            probe["a"] = 2
            seen.append(candidate(probe))
            del probe["a"]
            seen.append(candidate(probe))
            other = {}
            if len(set(seen)) == len(seen) and candidate(other) not in seen and \
                    candidate(probe) == seen[-1]:
                reader = candidate
        except Exception:  # noqa: BLE001 - not there, or not a version: compare values
            reader = None
        _DICT_VERSION.append(reader)
    return _DICT_VERSION[0]


# --- compiling a graph with inductor without dynamo (run.direct) ----------------------------
def is_operator(target: Any) -> bool:
    """Whether a graph node's target is an operator overload (:func:`is_op_overload`) or
    an overload packet (``torch._ops``; checked 2.13)."""
    return is_op_overload(target) or isinstance(target, torch._ops.OpOverloadPacket)


def default_device_set() -> Any:
    """The default device set by ``torch.set_default_device`` or a ``with torch.device(...)``
    block, or ``None`` where none is: what ``torch.get_default_device()`` reads, without
    the tensor it allocates on every call where no device is set
    (``torch.utils._device.CURRENT_DEVICE``, ``torch._C._len_torch_function_stack``; a
    ``with torch.device`` block is a ``DeviceContext`` torch function mode, found on
    ``torch.overrides._get_current_function_mode_stack()``; a user's own mode is none;
    checked 2.13)."""
    if torch.utils._device.CURRENT_DEVICE is not None:
        return torch.utils._device.CURRENT_DEVICE
    if torch._C._len_torch_function_stack():  # (another mode, a user's, is no device)
        from torch.overrides import _get_current_function_mode_stack
        for mode in reversed(_get_current_function_mode_stack()):
            if isinstance(mode, torch.utils._device.DeviceContext):
                return mode.device
    return None


def parametrization_cache_on() -> bool:
    """Whether a ``torch.nn.utils.parametrize.cached()`` block is open: parametrized
    tensors are then computed once and kept until it ends (the module's flag
    ``_cache_enabled`` has no public read; checked 2.13)."""
    return bool(torch.nn.utils.parametrize._cache_enabled)


@contextlib.contextmanager
def kept_parametrization_cache():
    """While active, what a forward puts into ``parametrize.cached()``'s cache is taken out
    again when the block ends (a forward on fake tensors would leave fake parametrized
    tensors there for the rest of the user's block; the module's ``_cache`` dict has no
    public API; checked 2.13)."""
    cache = torch.nn.utils.parametrize._cache
    saved = dict(cache) if parametrization_cache_on() else None  # (off: nothing is cached)
    try:
        yield
    finally:
        if saved is not None:
            cache.clear()
            cache.update(saved)


def ambient_state_plain() -> bool:
    """No torch function mode, saved-tensor hooks or default device is active: dynamo
    guards on each (its ``TORCH_FUNCTION_MODE_STACK``, ``top_saved_tensors_hooks`` and
    ``DEFAULT_DEVICE`` guards; the same private reads, checked 2.13)."""
    return (torch._C._len_torch_function_stack() == 0
            and torch._C._autograd._top_saved_tensors_default_hooks(True) is None
            and torch.utils._device.CURRENT_DEVICE is None)


def global_state_guard() -> Any:
    """Dynamo's C++ check of the global state (grad mode, autocast, deterministic
    algorithms, ...) as it is now: ``.check()`` tells whether it is still so
    (``torch._C._dynamo.guards.GlobalStateGuard``; checked 2.13)."""
    return torch._C._dynamo.guards.GlobalStateGuard()


def tensor_guards(tensors: list[torch.Tensor], sizes: list[list], strides: list[list]) -> Any:
    """Dynamo's C++ check of tensors' type, dispatch keys, dtype, device,
    ``requires_grad`` and the sizes and strides given (``None``: any), as the tensors are
    now: ``.check(*tensors)`` (``torch._C._dynamo.guards.TensorGuards``; checked 2.13)."""
    return torch._C._dynamo.guards.TensorGuards(*tensors, dynamic_dims_sizes=sizes,
                                                dynamic_dims_strides=strides)


def inductor_compile(owned: fx.GraphModule, flat: list[Any],
                     dynamic: list[list[bool] | None],
                     options: dict | None,
                     symbolic_ints: list[int] = ()) -> tuple[Callable, Any, list]:
    """``(inductor's compilation of owned, its ShapeEnv, the fake inputs)``: what dynamo's
    inductor backend does with a graph (``compile_fx``, which may change the graph it is
    given: ``owned`` is the caller's copy), on fake inputs of a private ``ShapeEnv`` (no
    duck shaping) where the tensor inputs' dimensions flagged in ``dynamic`` are symbolic
    and the others fixed, and so are the integer inputs at ``symbolic_ints`` (of any sign,
    0 and 1 included). (``compile_fx``, ``TracingContext``, ``StatelessSymbolicContext``,
    ``ShapeEnv.create_symbol``; checked 2.13.)"""
    from torch._dynamo.source import ConstantSource
    from torch._inductor.compile_fx import compile_fx
    from torch.fx.experimental.symbolic_shapes import (DimDynamic, ShapeEnv,
                                                       StatelessSymbolicContext)
    shape_env = ShapeEnv(duck_shape=False)
    fake_mode = FakeTensorMode(shape_env=shape_env)
    fakes = list(flat)
    for i, flags in enumerate(dynamic):
        if flags is not None:
            kinds = [DimDynamic.DYNAMIC if flag else DimDynamic.STATIC for flag in flags]
            fakes[i] = fake_mode.from_tensor(
                flat[i], symbolic_context=StatelessSymbolicContext(dynamic_sizes=kinds))
    for i in symbolic_ints:
        source = ConstantSource(f"fxsight_index_{i}")
        symbol = shape_env.create_symbol(flat[i], source, dynamic_dim=DimDynamic.DYNAMIC,
                                         positive=None, do_not_specialize_zero_one=True)
        fakes[i] = shape_env.create_symintnode(symbol, hint=flat[i], source=source)
    with fake_cache_unchanged(), \
            torch._guards.tracing(torch._guards.TracingContext(fake_mode)):
        compiled = compile_fx(owned, fakes, config_patches=options)
    return compiled, shape_env, fakes


def inside_activation_checkpoint() -> bool:
    """Whether the code running now is the first forward of a non-reentrant
    ``torch.utils.checkpoint`` (whose backward reruns it): the innermost saved-tensors hooks
    are checkpoint's own (``torch.utils.checkpoint._checkpoint_hook``, checked 2.11-2.13;
    there is no public query of the hooks in force). Inside :func:`user_modes_suspended`,
    the hooks it put aside count: those are the forward's."""
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if not hooks:
        suspensions = _suspensions()
        saved = suspensions[-1] if suspensions else None
        hooks = saved[3][-1] if saved is not None and saved[3] else None
    if not hooks:
        return False
    return getattr(hooks[0], "__qualname__", "").startswith("_checkpoint_hook.")


def _checkpoint_codes() -> tuple[Any, Any]:
    """The code of ``torch.utils.checkpoint.checkpoint`` itself (under its
    ``torch._disable_dynamo`` wrapper, which keeps it as ``__wrapped__``) and of the
    reentrant variant's ``CheckpointFunction.forward`` (checked 2.11-2.13)."""
    import torch.utils.checkpoint as checkpoint
    function = getattr(checkpoint.checkpoint, "__wrapped__", checkpoint.checkpoint)
    return function.__code__, checkpoint.CheckpointFunction.forward.__code__


def enclosing_checkpoint(frame: types.FrameType | None) -> str | None:
    """Whether ``frame`` (and the code that called it) runs inside a call of
    ``torch.utils.checkpoint.checkpoint`` (also as ``checkpoint_sequential`` or
    transformers' ``_gradient_checkpointing_func`` call it): ``"reentrant"`` where one of
    the enclosing calls is reentrant (``use_reentrant=True``), ``"non-reentrant"`` where
    all are, ``None`` outside. Seen from the stack, so in any grad mode (a checkpoint with
    gradients off runs its function as it is, but is still called)."""
    function, reentrant = _checkpoint_codes()
    found = None
    while frame is not None:
        code = frame.f_code
        if code is reentrant:
            return "reentrant"
        if code is function:
            found = "non-reentrant"
        frame = frame.f_back
    return found


def backend_flag_readers() -> tuple[Callable[[], Any], ...]:
    """Readers of cuDNN's ``enabled``, ``benchmark``, ``deterministic`` and ``allow_tf32``
    and oneDNN's ``enabled`` (what ``torch.backends.cudnn.flags()`` and
    ``torch.backends.mkldnn.flags()`` set), read for every recorded operation. Through the
    modules' attributes each costs a module ``__getattr__`` (~0.6 us); the class's
    ``ContextProp`` descriptors hold their C getters (``.getter``, checked 2.11-2.13;
    otherwise the attribute is read)."""
    readers = []
    for module, name in [(torch.backends.cudnn, "enabled"), (torch.backends.cudnn, "benchmark"),
                         (torch.backends.cudnn, "deterministic"),
                         (torch.backends.cudnn, "allow_tf32"),
                         (torch.backends.mkldnn, "enabled")]:
        getter = getattr(vars(type(module)).get(name), "getter", None)
        readers.append(getter if callable(getter) else
                       lambda module=module, name=name: getattr(module, name))
    return tuple(readers)


def mha_fastpath_enabled() -> bool:
    """``torch.backends.mha.get_fastpath_enabled()`` without its check of TorchScript
    scripting (~0.6 us, read for every recorded operation): the module's flag (checked
    2.11-2.13; otherwise the public function)."""
    flag = getattr(torch.backends.mha, "_is_fastpath_enabled", None)
    return flag if isinstance(flag, bool) else torch.backends.mha.get_fastpath_enabled()


# the depth of the torch function mode stack (a ``with torch.device(...)`` block, a user's
# ``TorchFunctionMode``) and of the dispatch mode stack (``FlopCounterMode``, a user's
# ``TorchDispatchMode``): read for every recorded operation (``torch._C``, checked 2.13)
function_mode_depth: Callable[[], int] = torch._C._len_torch_function_stack
dispatch_mode_depth: Callable[[], int] = torch._C._len_torch_dispatch_stack


def function_modes() -> list:
    """The torch function modes in force, innermost last
    (``torch.overrides._get_current_function_mode_stack``, checked 2.13)."""
    from torch.overrides import _get_current_function_mode_stack
    return _get_current_function_mode_stack()


def is_device_context(mode: Any) -> bool:
    """Whether a torch function mode is a ``with torch.device(...)`` block's
    (``torch.utils._device.DeviceContext``, checked 2.13)."""
    return isinstance(mode, torch.utils._device.DeviceContext)


def dispatch_modes() -> list:
    """The dispatch modes in force, innermost last
    (``torch.utils._python_dispatch._get_current_dispatch_mode_stack``, checked 2.13)."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack
    return _get_current_dispatch_mode_stack()


def saved_tensors_hooks_top() -> Any:
    """The innermost ``(pack, unpack)`` of ``torch.autograd.graph.saved_tensors_hooks``
    (``save_on_cpu``, a non-reentrant checkpoint's) in force, or ``None``: read for every
    recorded operation; no public query (``torch._C._autograd``, checked 2.13)."""
    return torch._C._autograd._top_saved_tensors_default_hooks(True)


# whether the autograd profiler (``torch.profiler.profile``, ``torch.autograd.profiler``)
# is on: read for every recorded operation (``torch._C._autograd``, checked 2.13)
profiler_enabled: Callable[[], bool] = torch._C._autograd._profiler_enabled


# per thread, the user modes each open ``user_modes_suspended`` put aside, innermost last
# (``None`` where there were none): what ``user_modes_resumed`` puts back
_SUSPENDED = threading.local()


def _suspensions() -> list:
    stack = getattr(_SUSPENDED, "stack", None)
    if stack is None:
        stack = _SUSPENDED.stack = []
    return stack


def _tracing() -> bool:
    """Whether the code running is being traced into a graph: by dynamo, or by
    AOTAutograd / ``make_fx`` (a fake, proxy or functional tensor mode is active), as
    inductor traces fxsight's helpers in a graph it compiles
    (``torch._C._get_dispatch_mode``, ``_TorchDispatchModeKey``; checked 2.13)."""
    if torch.compiler.is_compiling():
        return True
    keys = torch._C._TorchDispatchModeKey
    return any(torch._C._get_dispatch_mode(key) is not None
               for key in (keys.FAKE, keys.PROXY, keys.FUNCTIONAL))


@contextlib.contextmanager
def user_modes_suspended():
    """While active, the caller's dispatch modes, saved-tensor hooks and torch function
    modes other than ``with torch.device(...)`` blocks are put aside (restored after, also
    where the block raises): fxsight's own work (the capture, the shape scan, its checks
    and reads of shapes) is no forward a user's ``FlopCounterMode``, ``TorchFunctionMode``
    or pack hook should see; :func:`user_modes_resumed` puts them back where the model or
    the user's own operations run. The device context stays: it decides where the
    forward's own factories put their tensors. Enter it before fxsight's own modes
    (``real_writes``, ``after_each_operator``): it puts aside every mode in force.
    (``torch.utils._python_dispatch._disable_current_modes``,
    ``torch._C._pop_torch_function_stack`` / ``_push_on_torch_function_stack``,
    ``torch._C._autograd._pop_saved_tensors_default_hooks`` / ``_push_...``; checked 2.13.)"""
    if _tracing():  # (a helper of a graph being compiled: nothing to put aside)
        yield
        return
    suspensions = _suspensions()
    if not (function_mode_depth() or dispatch_mode_depth() or saved_tensors_hooks_top()):
        suspensions.append(None)
        try:
            yield
        finally:
            suspensions.pop()
        return
    from torch.utils._python_dispatch import _disable_current_modes
    autograd = torch._C._autograd
    hooks = []
    while autograd._top_saved_tensors_default_hooks(True) is not None:
        hooks.append(autograd._top_saved_tensors_default_hooks(True))
        autograd._pop_saved_tensors_default_hooks()
    functions = [torch._C._pop_torch_function_stack() for _ in range(function_mode_depth())]
    try:
        kept = [mode for mode in reversed(functions) if is_device_context(mode)]
        for mode in kept:
            torch._C._push_on_torch_function_stack(mode)
        with _disable_current_modes() as dispatch:
            user = [mode for mode in reversed(dispatch)  # (not export's pre-dispatch)
                    if getattr(mode, "_dispatch_key", None) is None]
            suspensions.append((functions[::-1], kept, user, hooks[::-1]))
            try:
                yield
            finally:
                suspensions.pop()
    finally:
        while function_mode_depth():
            torch._C._pop_torch_function_stack()
        for mode in reversed(functions):
            torch._C._push_on_torch_function_stack(mode)
        for pack, unpack in reversed(hooks):
            autograd._push_saved_tensors_default_hooks(pack, unpack)


def as_own_work(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` inside :func:`user_modes_suspended`. Where nothing compiles,
    no mode or saved-tensor hook is in force and no suspension with modes put aside is
    the innermost, the suspension would put nothing aside and a ``user_modes_resumed``
    inside would bring nothing back: ``function`` is called directly, the same call
    without entering the suspension (a few µs, paid by fxsight's helpers in a rewritten
    graph at every run, and by each step of a trace)."""
    if torch.compiler.is_compiling() or function_mode_depth() or dispatch_mode_depth() \
            or saved_tensors_hooks_top() is not None:
        with user_modes_suspended():
            return function(*args)
    stack = getattr(_SUSPENDED, "stack", None)
    if stack and stack[-1] is not None:
        with user_modes_suspended():
            return function(*args)
    return function(*args)


@contextlib.contextmanager
def user_modes_resumed():
    """Inside :func:`user_modes_suspended`, the modes it put aside back in force (below
    any mode fxsight entered since, restored after, also where the block raises): the
    model's own forward and the user's recorded operations run in the user's modes, as
    in a plain forward. Outside a suspension, or where it put nothing aside, nothing
    changes. (``torch.utils._python_dispatch._push_mode`` / ``_pop_mode``, and the stacks
    of :func:`user_modes_suspended`; checked 2.13.)"""
    suspensions = [] if _tracing() else _suspensions()
    saved = suspensions[-1] if suspensions else None
    if saved is None:
        yield
        return
    from torch.utils._python_dispatch import _pop_mode, _push_mode
    functions, kept, dispatch, hooks = saved
    autograd = torch._C._autograd
    own_functions = [torch._C._pop_torch_function_stack()
                     for _ in range(function_mode_depth())][::-1]
    own_dispatch = [_pop_mode() for _ in range(dispatch_mode_depth())][::-1]
    own_hooks = []
    while autograd._top_saved_tensors_default_hooks(True) is not None:
        own_hooks.append(autograd._top_saved_tensors_default_hooks(True))
        autograd._pop_saved_tensors_default_hooks()
    own_hooks.reverse()
    suspensions.append(None)  # (a suspension inside puts aside what is in force then)
    try:
        for mode in functions:
            torch._C._push_on_torch_function_stack(mode)
        for mode in own_functions:
            if not any(mode is k for k in kept):
                torch._C._push_on_torch_function_stack(mode)
        for mode in [*dispatch, *own_dispatch]:
            _push_mode(mode)
        for pack, unpack in [*hooks, *own_hooks]:
            autograd._push_saved_tensors_default_hooks(pack, unpack)
        yield
    finally:
        suspensions.pop()
        while function_mode_depth():
            torch._C._pop_torch_function_stack()
        for mode in own_functions:
            torch._C._push_on_torch_function_stack(mode)
        while dispatch_mode_depth():
            _pop_mode()
        for mode in own_dispatch:
            _push_mode(mode)
        while autograd._top_saved_tensors_default_hooks(True) is not None:
            autograd._pop_saved_tensors_default_hooks()
        for pack, unpack in own_hooks:
            autograd._push_saved_tensors_default_hooks(pack, unpack)


# ``compiled_functions_eager``: how many blocks are open (all threads), and the stance
# the first one found
_EAGER_LOCK = threading.Lock()
_EAGER_OPEN = [0, None]


@contextlib.contextmanager
def compiled_functions_eager():
    """While active, a ``torch.compile``d function or module the model calls runs as plain
    Python (dynamo's ``force_eager`` stance: ``torch.compiler.set_stance``): the forwards
    fxsight runs on fake tensors or under modes of its own to learn shapes would otherwise
    make dynamo compile it for them, or mark its code to be skipped from then on (a frame
    met under a dispatch mode is skipped, for every later call too: a ``fullgraph=True``
    function then fails, "found no compiled frames"; checked 2.13), which changes the
    user's compiled code for good. The stance is one setting of the process: blocks of
    several threads share one (set by the first, put back by the last; a compiled call
    in another thread meanwhile runs eagerly, to the same values). Inside a compiled
    region (where torch refuses to change the stance) nothing is changed."""
    from torch._C._dynamo.eval_frame import get_eval_frame_callback
    from torch._dynamo.eval_frame import DynamoStance, _set_stance

    if get_eval_frame_callback() not in (None, False):  # (a compiled region)
        yield
        return
    with _EAGER_LOCK:
        if _EAGER_OPEN[0] == 0:
            _EAGER_OPEN[1] = _set_stance(DynamoStance("force_eager"))
        _EAGER_OPEN[0] += 1
    try:
        yield
    finally:
        with _EAGER_LOCK:
            _EAGER_OPEN[0] -= 1
            if _EAGER_OPEN[0] == 0:
                _set_stance(_EAGER_OPEN[1])
                _EAGER_OPEN[1] = None


# the packages of torch's tracing machinery: export, fx, dynamo and inductor, aot autograd,
# fake tensors and the Python dispatch modes, decompositions and meta kernels (checked
# 2.13); a warning their code issues while fxsight captures a model is about the capture
# (``torch.export`` warns that an ``nn.LSTM`` assigns ``_flat_weights`` while traced), not
# about the model: a plain forward never issues it
_TRACING_MACHINERY = ("torch.export", "torch._export", "torch.fx", "torch._dynamo",
                      "torch._inductor", "torch._functorch", "torch._subclasses",
                      "torch._higher_order_ops", "torch._library", "torch._custom_op",
                      "torch._guards", "torch._ops", "torch._python_dispatcher",
                      "torch._decomp", "torch._prims", "torch._prims_common", "torch._refs",
                      "torch._meta_registrations", "torch._logging", "torch._dispatch",
                      "torch._compile", "torch.utils._pytree",
                      "torch.utils._python_dispatch", "torch.utils._sympy",
                      "torch.compiler", "sympy")


def in_tracing_machinery(module_name: str | None) -> bool:
    """Whether the module called ``module_name`` is part of torch's tracing machinery."""
    return isinstance(module_name, str) and any(
        module_name == package or module_name.startswith(package + ".")
        for package in _TRACING_MACHINERY)
