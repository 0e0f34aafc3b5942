"""A snapshot of everything a trace could change in the process and on the user's objects.

``snapshot(*objects)`` reads torch's global flags and mode stacks, RNG states, every torch
config module, dynamo's caches, global module hooks, logging, warnings, tracing and
profiling functions, the garbage collector, the environment, imported modules, signal
handlers, and the state of the objects given (modules, tokenizers, tensors, dicts) into one
flat ``{key: value}`` dict of hashable values. ``changes(before, after)`` is what differs.

The audit compares what a feature changes against what its plain equivalent (a forward, a
``generate``, a forward hook) changes: the two must be the same.
"""

from __future__ import annotations

import gc
import logging
import os
import random
import signal
import sys
import threading
import warnings
from typing import Any, Callable, Iterator

import torch

State = dict[tuple, Any]


def freeze(value: Any, depth: int = 0) -> Any:
    """A hashable, comparable stand-in for ``value`` (containers by content, tensors by
    content and version, other objects by type and identity)."""
    if depth > 6:
        return ("deep", id(value))
    if value is None or isinstance(value, (bool, int, float, str, bytes, complex)):
        return value
    if isinstance(value, torch.Tensor):
        if value.device.type == "meta" or value.is_sparse or type(value) is not torch.Tensor \
                and not isinstance(value, torch.nn.Parameter):
            return ("tensor", type(value).__name__, id(value))
        return ("tensor", id(value), tuple(value.shape), str(value.dtype),
                value.detach().cpu().numpy().tobytes() if value.numel() < 1 << 16 else
                float(value.detach().double().sum()), value._version, value.requires_grad)
    if isinstance(value, (torch.dtype, torch.device, torch.Size)):
        return str(value)
    if isinstance(value, dict):
        return ("dict", tuple((freeze(k, depth + 1), freeze(v, depth + 1))
                              for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(freeze(v, depth + 1) for v in value))
    if isinstance(value, (set, frozenset)):
        return ("set", tuple(sorted(repr(freeze(v, depth + 1)) for v in value)))
    return ("object", type(value).__qualname__, id(value))


def _flat(prefix: tuple, mapping: dict) -> State:
    return {prefix + (key,): freeze(value) for key, value in mapping.items()}


# --- torch ------------------------------------------------------------------------------

def _torch_flags() -> State:
    b = torch.backends
    readers: dict[str, Callable[[], Any]] = {
        "grad": torch.is_grad_enabled,
        "inference_mode": torch.is_inference_mode_enabled,
        "autocast_cpu": lambda: (torch.is_autocast_enabled("cpu"),
                                 torch.get_autocast_dtype("cpu")),
        "autocast_cuda": lambda: (torch.is_autocast_enabled("cuda"),
                                  torch.get_autocast_dtype("cuda")),
        "autocast_cache": torch.is_autocast_cache_enabled,
        "default_dtype": torch.get_default_dtype,
        "default_device": torch.get_default_device,
        "deterministic": lambda: (torch.are_deterministic_algorithms_enabled(),
                                  torch.is_deterministic_algorithms_warn_only_enabled()),
        "matmul_precision": torch.get_float32_matmul_precision,
        "cudnn": lambda: (b.cudnn.enabled, b.cudnn.benchmark, b.cudnn.deterministic,
                          b.cudnn.allow_tf32),
        "mkldnn": lambda: b.mkldnn.enabled,
        "cuda_matmul": lambda: (b.cuda.matmul.allow_tf32,
                                b.cuda.matmul.allow_fp16_reduced_precision_reduction),
        "sdpa": lambda: (b.cuda.flash_sdp_enabled(), b.cuda.mem_efficient_sdp_enabled(),
                         b.cuda.math_sdp_enabled(), b.cuda.cudnn_sdp_enabled()),
        "mha_fastpath": b.mha.get_fastpath_enabled,
        "threads": lambda: (torch.get_num_threads(), torch.get_num_interop_threads()),
        "anomaly": lambda: (torch.is_anomaly_enabled(), torch.is_anomaly_check_nan_enabled()),
        "function_modes": torch._C._len_torch_function_stack,
        "dispatch_modes": torch._C._len_torch_dispatch_stack,
        "torch_function_enabled": torch._C._is_torch_function_enabled,
        "saved_tensors_hooks": lambda: torch._C._autograd._top_saved_tensors_default_hooks(
            False),
        "saved_tensors_hooks_enabled": torch._C._autograd._saved_tensors_hooks_is_enabled,
        "jit_tracing": torch._C._get_tracing_state,
        "fx_tracing": lambda: torch.fx._symbolic_trace._is_fx_tracing_flag,
        "fx_traceback": lambda: (torch.fx.traceback.has_preserved_node_meta(),
                                 dict(torch.fx.traceback.current_meta)),
        "compiling": torch.compiler.is_compiling,
        "eval_frame_callback": torch._C._dynamo.eval_frame.get_eval_frame_callback,
        "forward_ad_level": lambda: torch.autograd.forward_ad._current_level,
        "functorch_level": torch._C._functorch.maybe_current_level,
        "print_options": lambda: dict(vars(torch._tensor_str.PRINT_OPTS)),
        "rng_cpu": lambda: torch.get_rng_state().numpy().tobytes(),
        "rng_seed": torch.initial_seed,
        "tracing_context": lambda: torch._guards.TracingContext.try_get(),
    }
    state: State = {}
    for name, read in readers.items():
        try:
            state[("torch", name)] = freeze(read())
        except Exception as error:  # (a reader this torch lacks)
            state[("torch", name)] = ("unreadable", type(error).__name__)
    return state


def _torch_configs() -> State:
    """Every ``torch.*.config``-like module (dynamo, inductor, functorch, fx, export...)."""
    from torch.utils._config_module import ConfigModule
    state: State = {}
    for name, module in list(sys.modules.items()):
        if isinstance(module, ConfigModule):
            state.update(_flat(("config", name), module.get_config_copy()))
    return state


def _dynamo_caches(objects: tuple) -> State:
    """What dynamo keeps: frames compiled, cache entries in all and on the objects' code."""
    state: State = {}
    eval_frame = torch._C._dynamo.eval_frame
    if "torch._dynamo" in sys.modules:
        dynamo = sys.modules["torch._dynamo"]
        frames = dynamo.convert_frame
        state[("dynamo", "frames")] = (frames.FRAME_COUNTER, len(frames.input_codes.seen),
                                       len(frames.output_codes.seen))
        counters = dynamo.utils.counters
        state.update({("dynamo", "counter", k): freeze(dict(v)) for k, v in counters.items()
                      if v})
        state[("dynamo", "cached_backends")] = len(dynamo.eval_frame.cached_backends)
    for obj in objects:
        if isinstance(obj, torch.nn.Module):
            for name, module in obj.named_modules():
                code = type(module).forward.__code__
                state[("dynamo", "code", name)] = len(eval_frame._debug_get_cache_entry_list(
                    code))
    return state


def _module_hooks() -> State:
    from torch.nn.modules import module
    return {("global_hooks", name): freeze(getattr(module, name))
            for name in dir(module) if name.startswith("_global_")}


def _registries() -> State:
    """Registries torch keeps process-wide: pytree node types, fx's side-effectful and
    wrapped functions, custom operator namespaces."""
    from torch.utils import _pytree
    state: State = {
        ("registry", "pytree"): freeze(set(map(repr, _pytree.SUPPORTED_NODES))),
        ("registry", "fx_side_effectful"): freeze(set(
            map(repr, torch.fx.node._side_effectful_functions))),
        ("registry", "fx_wrapped"): freeze(list(
            map(repr, torch.fx._symbolic_trace._wrapped_fns_to_patch))),
        ("registry", "op_namespaces"): freeze({n for n in torch.ops._dir if n[:2] != "__"}),
    }
    return state


# --- Python -----------------------------------------------------------------------------

def _loggers() -> State:
    state: State = {("logging", "disable"): logging.root.manager.disable}
    loggers = {"": logging.root, **logging.root.manager.loggerDict}
    for name, logger in loggers.items():
        if isinstance(logger, logging.Logger):
            state[("logging", name)] = (
                logger.level, logger.propagate, logger.disabled,
                tuple(id(h) for h in logger.handlers), tuple(id(f) for f in logger.filters))
    return state


class _Probe(Warning):
    """A warning never shown (an ``ignore`` filter is added once, at import), issued only to
    read the filters' version: each change to ``warnings.filters`` (a ``catch_warnings``
    block entered or left) makes Python forget which warnings it has already shown."""


warnings.filterwarnings("ignore", category=_Probe)


def filters_version() -> int:
    """The version of ``warnings.filters`` (it grows at every change)."""
    registry: dict = {}
    warnings.warn_explicit("probe", _Probe, __file__, 0, module=__name__, registry=registry)
    return registry["version"]


def shown_warnings(registry: dict, version: int | None = None) -> Any:
    """The warnings ``registry`` (a module's ``__warningregistry__``) says its module has
    shown: its entries where it is current for the filters' version, else none (Python
    clears it at the module's next warning: each warning it held shows again, though the
    user saw it)."""
    version = filters_version() if version is None else version
    if registry.get("version") != version:
        return freeze({})
    return freeze({key: value for key, value in registry.items() if key != "version"})


def _warnings() -> State:
    """The filters (the list, its entries), ``showwarning``, and which warnings each
    module has shown (see :func:`shown_warnings`). The filters' version itself is not
    kept: a user never sees it, only what it makes Python forget."""
    version = filters_version()
    state: State = {("warnings", "filters"): freeze(
        [tuple(map(repr, f)) for f in warnings.filters if f[2] is not _Probe]),
        ("warnings", "filters_list"): id(warnings.filters)}
    state[("warnings", "showwarning")] = id(warnings.showwarning)
    registries = {name: vars(module).get("__warningregistry__")
                  for name, module in list(sys.modules.items()) if hasattr(module, "__dict__")}
    registries["<once>"] = warnings.onceregistry
    for name, registry in registries.items():
        if isinstance(registry, dict):
            state[("warningregistry", name)] = shown_warnings(registry, version)
    return state


def _interpreter() -> State:
    import atexit
    state: State = {
        ("sys", "trace"): freeze(sys.gettrace()),
        ("sys", "profile"): freeze(sys.getprofile()),
        ("threading", "trace"): freeze(threading.gettrace()),
        ("threading", "profile"): freeze(threading.getprofile()),
        ("threading", "excepthook"): id(threading.excepthook),
        ("sys", "excepthook"): id(sys.excepthook),
        ("sys", "unraisablehook"): id(sys.unraisablehook),
        ("sys", "displayhook"): id(sys.displayhook),
        ("sys", "recursionlimit"): sys.getrecursionlimit(),
        ("sys", "switchinterval"): sys.getswitchinterval(),
        ("sys", "meta_path"): tuple(map(id, sys.meta_path)),
        ("sys", "path_hooks"): tuple(map(id, sys.path_hooks)),
        ("sys", "path"): tuple(sys.path),
        ("gc", "enabled"): gc.isenabled(),
        ("gc", "threshold"): gc.get_threshold(),
        ("gc", "debug"): gc.get_debug(),
        ("gc", "callbacks"): tuple(map(id, gc.callbacks)),
        ("atexit", "callbacks"): atexit._ncallbacks(),
        ("os", "cwd"): os.getcwd(),
        ("random", "state"): random.getstate(),
        ("threads", "alive"): threading.active_count(),
    }
    state.update(_flat(("environ",), dict(os.environ)))
    state.update({("module", name): True for name in list(sys.modules)})
    for number in signal.valid_signals():
        try:
            state[("signal", int(number))] = freeze(signal.getsignal(number))
        except (ValueError, OSError):
            pass
    if "numpy" in sys.modules:
        numpy = sys.modules["numpy"]
        rng = numpy.random.get_state()
        state[("numpy", "rng")] = (rng[0], rng[1].tobytes(), rng[2:])
        state[("numpy", "err")] = freeze(numpy.geterr())
        state[("numpy", "print")] = freeze(numpy.get_printoptions())
    return state


# --- the user's objects -----------------------------------------------------------------

def _tensor(key: tuple, tensor: torch.Tensor) -> State:
    grad = tensor.grad if tensor.is_leaf else None
    return {key: (id(tensor), tensor._version, tensor.requires_grad, tensor.data_ptr(),
                  freeze(grad), freeze(dict(vars(tensor))),
                  freeze(getattr(tensor, "_backward_hooks", None)),
                  freeze(getattr(tensor, "_post_accumulate_grad_hooks", None)),
                  tensor.detach().cpu().numpy().tobytes() if tensor.dtype != torch.bfloat16
                  else tensor.detach().float().numpy().tobytes())}


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks",
               "_backward_pre_hooks", "_forward_hooks_with_kwargs",
               "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")


def _module(key: tuple, model: torch.nn.Module) -> State:
    state: State = {}
    for name, module in model.named_modules(remove_duplicate=False):
        at = key + (name,)
        state[at + ("class",)] = id(type(module))
        state[at + ("training",)] = module.training
        state[at + ("forward",)] = freeze(getattr(module.forward, "__func__", module.forward))
        for attribute, value in vars(module).items():
            if attribute in ("_parameters", "_buffers", "_modules") or \
                    attribute in _HOOK_DICTS:
                continue
            state[at + ("attr", attribute)] = (id(value), freeze(value))
        for hooks in _HOOK_DICTS:
            state[at + (hooks,)] = freeze(dict(getattr(module, hooks, {})))
        for pname, param in module._parameters.items():
            state.update(_tensor(at + ("param", pname), param) if param is not None
                         else {at + ("param", pname): None})
        for bname, buffer in module._buffers.items():
            state.update(_tensor(at + ("buffer", bname), buffer) if buffer is not None
                         else {at + ("buffer", bname): None})
        state[at + ("children",)] = tuple((n, id(m)) for n, m in module._modules.items())
    for attribute in ("config", "generation_config"):
        config = getattr(model, attribute, None)
        if config is not None and hasattr(config, "to_dict"):
            state.update(_flat(key + (attribute,), config.to_dict()))
            state.update(_flat(key + (attribute, "__dict__"), dict(vars(config))))
    return state


def _tokenizer(key: tuple, tokenizer: Any) -> State:
    state = _flat(key + ("attr",), dict(vars(tokenizer)))
    for name in ("padding_side", "truncation_side", "pad_token", "model_max_length"):
        state[key + (name,)] = freeze(getattr(tokenizer, name, None))
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None:
        state[key + ("backend", "padding")] = freeze(backend.padding)
        state[key + ("backend", "truncation")] = freeze(backend.truncation)
    return state


def _objects(objects: tuple) -> State:
    state: State = {}
    for index, obj in enumerate(objects):
        key = ("object", index)
        if isinstance(obj, torch.nn.Module):
            state.update(_module(key, obj))
        elif isinstance(obj, torch.Tensor):
            state.update(_tensor(key, obj))
        elif isinstance(obj, dict) and not hasattr(obj, "convert_ids_to_tokens"):
            state[key + ("keys",)] = tuple(obj)
            for name, value in obj.items():
                if isinstance(value, torch.Tensor):
                    state.update(_tensor(key + (name,), value))
                else:
                    state[key + (name,)] = (id(value), freeze(value))
        elif hasattr(obj, "convert_ids_to_tokens"):
            state.update(_tokenizer(key, obj))
        else:
            state[key] = (id(obj), freeze(dict(vars(obj))) if hasattr(obj, "__dict__")
                          else freeze(obj))
    return state


# --- the snapshot -----------------------------------------------------------------------

def snapshot(*objects: Any) -> State:
    """Everything readable in the process and on ``objects``, as one flat dict."""
    state: State = {}
    for part in (_torch_flags, _torch_configs, _module_hooks, _registries, _loggers,
                 _warnings, _interpreter):
        state.update(part())
    state.update(_dynamo_caches(objects))
    state.update(_objects(objects))
    return state


def changes(before: State, after: State) -> dict[tuple, tuple]:
    """``{key: (before, after)}`` for every key whose value differs (absent: ``<absent>``)."""
    missing = "<absent>"
    return {key: (before.get(key, missing), after.get(key, missing))
            for key in before.keys() | after.keys()
            if before.get(key, missing) != after.get(key, missing)}


def changed_keys(run: Callable[[], Any], *objects: Any) -> set[tuple]:
    """The keys of the snapshot that ``run()`` changes."""
    before = snapshot(*objects)
    run()
    return set(changes(before, snapshot(*objects)))


def describe(keys: set[tuple], before: State, after: State) -> Iterator[str]:
    """Lines naming each key with its values before and after (for assertion messages)."""
    for key in sorted(keys, key=repr):
        yield f"{key}: {str(before.get(key))[:120]} -> {str(after.get(key))[:120]}"
