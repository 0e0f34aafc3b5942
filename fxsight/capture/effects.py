"""What a forward that fxsight runs only to learn shapes (a scan on fake tensors, an opaque
call's recording on real ones) changes is put back: the model's parameters and buffers
written in place, the random generators and ``parametrize.cached()``'s cache, so that a
trace changes the model and the process only as its plain forward does."""

from __future__ import annotations

import contextlib
import itertools
from typing import Callable, Iterator

import torch

from .._torch import (compiled_functions_eager, kept_parametrization_cache, pytree, real_writes,
                      set_tensor_version, tensor_version)


@contextlib.contextmanager
def kept_tensors(model: torch.nn.Module, restored: list[torch.Tensor] | None = None):
    """``model``'s parameters and buffers written in place while active get their values
    back, and their version counters too: to autograd and to anyone reading versions,
    they are the tensors they were, as if never written (the trace's forward then bumps
    them as the plain forward does, once per write: ``spectral_norm``'s power iteration
    in train mode, BatchNorm's ``num_batches_tracked``). For the forwards fxsight runs to
    learn shapes: fake mode runs an operation whose inputs are all real for real (RWKV's
    first forward in eval mode divides its weights in place, ``spectral_norm`` updates
    its vectors ``u``, ``v``), and a probe with real values runs every one. (Only the
    model's own memory is copied: not the activations a probe changes in place.)
    ``restored``, if given, gets the tensors so put back."""
    storages = {t.untyped_storage().data_ptr()
                for t in itertools.chain(model.parameters(), model.buffers()) if not t.is_meta}
    written: list[tuple[torch.Tensor, torch.Tensor, int | None]] = []
    try:
        with real_writes(written, storages):
            yield
    finally:
        with torch.no_grad():
            for tensor, value, version in written:
                _put_back(tensor, value, version)
                if restored is not None:
                    restored.append(tensor)


def _put_back(tensor: torch.Tensor, value: torch.Tensor, version: int | None) -> None:
    """``tensor`` given ``value`` and the version counter ``version`` (``None``: an
    inference tensor, which has none)."""
    tensor.copy_(value)
    if version is not None:
        set_tensor_version(tensor, version)


@contextlib.contextmanager
def kept_forward_effects(model: torch.nn.Module, args: tuple, kwargs: dict,
                         changed: list[torch.Tensor] | None = None) -> Iterator[None]:
    """What a forward of ``model`` run only to learn shapes (on fake or real tensors)
    changes is put back when the block ends: buffers and parameters changed in place get
    their values back (:func:`kept_tensors`), the random generators (the CPU's, and those
    of the CUDA devices the model or the inputs are on) their states, and
    ``parametrize.cached()``'s cache its tensors (not those the forward computed, fake
    ones included); a ``torch.compile``d function it calls runs eagerly, leaving dynamo's
    compiled code as it was (:func:`~fxsight._torch.compiled_functions_eager`). A buffer is
    compared by value too: BatchNorm's kernel updates its running statistics in place
    without bumping their version counter (a buffer holding NaN is put back whatever
    happened: the same values); a buffer put back keeps its version counter. ``changed``,
    if given, gets the buffers so put back."""
    saved = [(b, tensor_version(b), b.detach().clone()) for b in model.buffers()
             if not b.is_meta]
    restored: list[torch.Tensor] = []
    try:
        with torch.random.fork_rng(devices=_cuda_devices(model, args, kwargs)), \
                kept_parametrization_cache(), kept_tensors(model, restored), \
                compiled_functions_eager():
            yield
    finally:
        written = {t.untyped_storage().data_ptr() for t in restored}
        with torch.no_grad():
            for buffer, version, copy in saved:
                if tensor_version(buffer) != version or not torch.equal(buffer, copy):
                    _put_back(buffer, copy, version)
                elif buffer.untyped_storage().data_ptr() not in written:
                    continue
                if changed is not None:
                    changed.append(buffer)


def saved_generators(model: torch.nn.Module, args: tuple, kwargs: dict
                     ) -> Callable[[], None]:
    """The states of the random generators a forward of ``model`` on these inputs draws
    from (the CPU's, and those of the CUDA devices the model or the inputs are on), saved
    now; the function returned puts them back (a run started over draws alike)."""
    devices = _cuda_devices(model, args, kwargs)
    cpu = torch.random.get_rng_state()
    cuda = [(device, torch.cuda.get_rng_state(device)) for device in devices]

    def restore() -> None:
        torch.random.set_rng_state(cpu)
        for device, generator_state in cuda:
            torch.cuda.set_rng_state(generator_state, device)
    return restore


def _cuda_devices(model: torch.nn.Module, args: tuple, kwargs: dict) -> list[int]:
    """The CUDA devices a forward of ``model`` on these inputs may draw random numbers on:
    none where CUDA is not initialised in this process (no tensor can be on a CUDA device
    then: nothing is walked); else those of the parameters, buffers and inputs, walked
    until every device is found."""
    if not torch.cuda.is_initialized():
        return []
    count = torch.cuda.device_count()
    found: set[int] = set()
    inputs = (v for v in pytree.tree_leaves((args, kwargs)) if isinstance(v, torch.Tensor))
    for tensor in itertools.chain(model.parameters(), model.buffers(), inputs):
        if tensor.device.type == "cuda":
            found.add(tensor.device.index or 0)
            if len(found) >= count:
                break
    return sorted(found)
