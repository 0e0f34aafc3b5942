"""Models dispatched by accelerate (``device_map=``, ``max_memory=``, ``offload_folder=``).

``from_pretrained(..., device_map=...)`` hands the model to accelerate's ``dispatch_model``,
which wraps the ``forward`` of many modules (``add_hook_to_module``: the instance gets a
``forward`` of its own, ``_hf_hook`` and ``_old_forward``). Its ``AlignDevicesHook``
moves a module's inputs to the module's execution device before the forward and, with
``io_same_device``, the output back to the input's device after it. Those moves are plain
``Tensor.to`` calls, which a capture records like any other operation: a model spread over
several devices without offload is captured (and runs) with its moves in the graph.

*Offloaded* modules (``"cpu"`` or ``"disk"`` in the device map, ``offload=True``) are
another matter: their parameters live on the meta device and the hook loads the real
weights (from CPU memory or from the offload folder) into the module before each forward
and puts the meta tensors back after it. A captured graph cannot repeat that (it would
hold the weights of the capture's forward, or none), so such a model runs on the hooks
backend, where each forward is a plain forward of the dispatched model.

``cpu_offload_with_hook`` adds a ``CpuOffload`` hook instead: it loads no weights, but
moves the whole model to its execution device when a call finds it elsewhere (and first
offloads the previous model of its pipeline, ``prev_module_hook``, to the CPU). Where
the model is already on that device and no previous model is named, its call is the
plain forward and the model is captured; otherwise it runs on the hooks backend.

Nothing here changes a hook: fxsight only reads ``_hf_hook``.
"""

from __future__ import annotations

from typing import Any

import torch

# accelerate's hook class that moves a whole model to its execution device at its call
# (``cpu_offload_with_hook``)
_MOVING = "CpuOffload"


def is_accelerate_hook(value: Any) -> bool:
    """Whether ``value`` is one of accelerate's module hooks (``_hf_hook``). Its attributes
    are the hook's working state, not the model's settings: ``AlignDevicesHook`` notes the
    device of each forward's inputs (``input_device``) in every forward, so a model's state
    holds the hook by identity (another hook is another state)."""
    return (getattr(type(value), "__module__", "") or "").startswith("accelerate.hooks")


def accelerate_hooks(model: torch.nn.Module) -> list[tuple[str, Any]]:
    """``(path, hook)`` of each module of ``model`` that accelerate's
    ``add_hook_to_module`` wrapped (``_hf_hook``), in module order."""
    found = []
    for path, module in model.named_modules():
        hook = module.__dict__.get("_hf_hook")
        if hook is not None:
            found.append((path, hook))
    return found


def _hooks_in(hook: Any) -> list:
    inner = getattr(hook, "hooks", None)  # (a SequentialHook)
    return list(inner) if isinstance(inner, (list, tuple)) else [hook]


def swaps_weights(hook: Any) -> bool:
    """Whether an accelerate hook loads the module's weights in each forward and puts meta
    tensors back after it (``AlignDevicesHook`` with ``offload=True``): the module's
    tensors are the hook's."""
    return any(getattr(one, "offload", False) is True for one in _hooks_in(hook))


def _moves(one: Any, module: torch.nn.Module) -> bool:
    """Whether a ``CpuOffload`` hook's next call of ``module`` changes a model: it offloads
    a previous model (``prev_module_hook``: whether it does depends on where that other
    model is then), or its own check (the device of the module's first parameter equals
    ``execution_device``) fails, so it moves the module and the call's inputs to its
    execution device (a move to the device they are on changes nothing, but a captured
    graph cannot trace ``module.to``)."""
    if type(one).__name__ != _MOVING:
        return False
    if getattr(one, "prev_module_hook", None) is not None:
        return True
    first = next(module.parameters(), None)
    return first is None or not bool(first.device == one.execution_device)


def offloads(hook: Any, module: torch.nn.Module) -> bool:
    """Whether an accelerate hook changes the model's tensors when ``module`` is called:
    it loads the weights in each forward (:func:`swaps_weights`), or moves the model to
    its execution device (a ``CpuOffload`` hook, see :func:`_moves`)."""
    return swaps_weights(hook) or any(_moves(one, module) for one in _hooks_in(hook))


def offloaded(model: torch.nn.Module) -> list[str]:
    """The paths of the modules whose weights accelerate loads or moves in each forward
    (offloaded to CPU memory or disk, or moved by ``cpu_offload_with_hook``); empty for a
    model that is not dispatched or not offloaded."""
    if not any("_hf_hook" in m.__dict__ for m in model.modules()):
        return []
    return [path for path, hook in accelerate_hooks(model)
            if offloads(hook, model.get_submodule(path))]


def offload_reason(model: torch.nn.Module) -> tuple[str, str] | None:
    """``(path, why)`` where ``model`` cannot be captured because accelerate offloads some
    of its modules or moves them at their call, else ``None``."""
    paths = offloaded(model)
    if not paths:
        return None
    hooks = dict(accelerate_hooks(model))
    moving = next((p for p in paths if not swaps_weights(hooks[p])), None)
    if moving is not None:
        return moving, _moving_reason(moving, model.get_submodule(moving), hooks[moving])
    device_map = getattr(model, "hf_device_map", None)
    devices: dict[str, Any] = {}
    if isinstance(device_map, dict):  # (the entries of the map, not every leaf)
        named = [(key, device) for key, device in device_map.items()
                 if any(p == key or p.startswith(key + ".") or not key for p in paths)]
        if named:
            paths = [key for key, _ in named]
            devices = dict(named)
    shown = ", ".join((repr(p) if p else "'' (the whole model)") +
                      (f" (on {devices[p]!r})" if p in devices else "") for p in paths[:3])
    more = f" and {len(paths) - 3} more" if len(paths) > 3 else ""
    how = " (device_map)" if devices else ""  # (else cpu_offload, disk_offload, ...)
    return paths[0], (
        f"accelerate offloads module {shown}{more}{how}: its AlignDevicesHook loads "
        f"the weights into the module before each forward and puts meta tensors back "
        f"after it, which a captured graph cannot repeat; each trace runs the dispatched "
        f"model's own forward with hooks instead (same numbers)")



def _moving_reason(path: str, module: torch.nn.Module, hook: Any) -> str:
    one = next(o for o in _hooks_in(hook) if _moves(o, module))
    device = getattr(one, "execution_device", None)
    if getattr(one, "prev_module_hook", None) is not None:
        what = (f"offloads the previous model of its pipeline (prev_module_hook) to the "
                f"CPU when that model is elsewhere, and moves the module to its execution "
                f"device ({device!r}) where it is not there yet,")
    else:
        first = next(module.parameters(), None)
        found = "has no parameter" if first is None else f"is on {str(first.device)!r}"
        what = (f"moves the module and the call's inputs to its execution device "
                f"({device!r}; the module's first parameter {found}, which accelerate "
                f"does not find equal to it: a device given as a string never is)")
    return (f"accelerate's CpuOffload hook (cpu_offload_with_hook) on module "
            f"{path or 'model'!r} {what} at each call, which a captured graph cannot "
            f"repeat; each trace runs the model's own forward with hooks instead (same "
            f"numbers)")


def loads_weights(module: torch.nn.Module) -> bool:
    """Whether calling ``module`` runs an accelerate hook that loads or moves weights (its
    own or a submodule's): such a call can only run on real tensors (in fake mode the hook
    would leave fake tensors as the module's parameters)."""
    return any(offloads(m.__dict__["_hf_hook"], m) for m in module.modules()
               if m.__dict__.get("_hf_hook") is not None)


def execution_device(module: torch.nn.Module) -> torch.device:
    """The device accelerate runs ``module`` on (its hook's ``execution_device``; the
    first one found in the module tree), else the CPU."""
    for sub in module.modules():
        hook = sub.__dict__.get("_hf_hook")
        for one in _hooks_in(hook) if hook is not None else []:
            device = getattr(one, "execution_device", None)
            if device is not None:
                return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    return torch.device("cpu")


def offloaded_value(model: torch.nn.Module, name: str) -> torch.Tensor | None:
    """The values accelerate loads into the tensor ``name`` (a parameter's or buffer's path
    in ``model``) of an offloaded module before each forward: its entry in the
    ``weights_map`` of the closest module above it whose hook offloads (CPU memory or the
    offload folder); ``None`` where no hook holds it."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, -1, -1):
        try:
            owner = model.get_submodule(".".join(parts[:cut]))
        except AttributeError:
            continue
        hook = owner.__dict__.get("_hf_hook")
        for one in _hooks_in(hook) if hook is not None else []:
            weights = getattr(one, "weights_map", None)
            if weights is None or not swaps_weights(one):
                continue
            relative = ".".join(parts[cut:])
            try:
                return weights[relative]
            except KeyError:
                continue
    return None
